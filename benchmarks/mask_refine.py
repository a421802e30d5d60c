"""Mask post-processing: the default model's box-prompt masks decoded on the whole image, then zoomed
(segdecoder/zoom.py), then refined with GrabCut as the model's ``mask_refine`` says (its outline; with ``interior``
its inside too; segdecoder/refine.py), on scenes of a seed no training run used. Prints the time per mask of the
decode and of each step, the ratio of the refined way to the plain zoomed one, and the mean IoU each stage reaches
against the scenes' true masks; with ``--figure``, a picture of the first objects' mask errors, decoded (top row)
and refined (bottom row).

    python benchmarks/mask_refine.py [--scenes 20] [--model weights/shapes-tiny] [--figure out/mask_refine.png]
    python benchmarks/mask_refine.py --megapixels 12 --scenes 6     # the same scenes scaled up to 12 MP

``--megapixels M`` scales each scene up (bicubic) to about M million pixels and draws its true masks again at that
size from the scene's polygons, as a camera's photo of the same shapes would be: the step costs that grow with the
image show there (the refinement's budget is 300 ms per mask at 12 MP on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch

from grounding.addons import MaskContext, build_addons
from grounding.checkpoint import load_checkpoint
from shapes.scenes.figures import polygons_to_mask
from shapes.scenes.synthetic import compose_scene

STAGES = ("decoded", "zoomed", "refined")


def scenes(rng: np.random.Generator, n: int, megapixels: float | None):
    """(pixels uint8 H x W x 3, [(box xyxy, true mask bool H x W), ...]) per scene; scaled to ``megapixels``."""
    for _ in range(n):
        scene = compose_scene(rng, int(rng.integers(240, 480)), int(rng.integers(320, 640)))
        pixels = cv2.imdecode(np.frombuffer(scene.png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].copy()
        h, w = scene.height, scene.width
        scale = 1.0 if megapixels is None else (megapixels * 1e6 / (h * w)) ** 0.5
        H, W = round(h * scale), round(w * scale)
        if scale != 1.0:
            pixels = cv2.resize(pixels, (W, H), interpolation=cv2.INTER_CUBIC)
        objects = []
        for obj, polygons in zip(scene.scene.objects, scene.polygons):
            grown = [[v * (W / w if k % 2 == 0 else H / h) for k, v in enumerate(p)] for p in polygons]
            truth = polygons_to_mask(grown, H, W)
            ys, xs = np.nonzero(truth)
            objects.append(((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)), truth))
        yield pixels, objects


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="weights/shapes-tiny")
    ap.add_argument("--scenes", type=int, default=20)
    ap.add_argument("--megapixels", type=float, default=None, help="scale the scenes up to about this size")
    ap.add_argument("--figure", default=None, help="write the first objects' mask errors here (PNG)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.model)
    decoder = model.mask_decoder.eval()
    zoom = model.config.addons.get("mask_zoom", {}).get("context", 3.0)
    refine = model.config.addons.get("mask_refine") or {"method": "grabcut"}
    zoom_step, refine_step = build_addons({"mask_zoom": {"context": zoom}, "mask_refine": refine})

    rng = np.random.default_rng(4242)
    seconds = {"decode": 0.0, "zoom": 0.0, "refine": 0.0}
    worst = {"zoom": 0.0, "refine": 0.0, "post": 0.0}
    ious = {stage: [] for stage in STAGES}
    tiles, n, sizes = [], 0, []
    for pixels, objects in scenes(rng, args.scenes, args.megapixels):
        sizes.append(pixels.shape[0] * pixels.shape[1])
        with torch.no_grad():
            embedding = decoder.encode([pixels])[0]
        for box_xyxy, truth in objects:
            box = torch.tensor([box_xyxy], dtype=torch.float32)
            ctx = MaskContext(decoder, embedding, pixels, {"boxes": box}, "prompt", {})
            masks = {}
            with torch.no_grad():
                t0 = time.perf_counter()
                pred = decoder.decode(embedding, boxes=box)
                t1 = time.perf_counter()
                masks["decoded"] = pred.masks[0]
                pred = zoom_step.refine(pred, ctx)
                t2 = time.perf_counter()
                masks["zoomed"] = pred.masks[0]
                pred = refine_step.refine(pred, ctx)
                t3 = time.perf_counter()
                masks["refined"] = pred.masks[0]
            seconds["decode"] += t1 - t0
            seconds["zoom"] += t2 - t1
            seconds["refine"] += t3 - t2
            for step, took in (("zoom", t2 - t1), ("refine", t3 - t2), ("post", t3 - t1)):
                worst[step] = max(worst[step], took)
            for stage in STAGES:
                ious[stage].append((masks[stage] & truth).sum() / max(1, (masks[stage] | truth).sum()))
            n += 1
            if args.figure and len(tiles) < 6:
                tiles.append(_tile(pixels, box_xyxy, [masks["zoomed"], masks["refined"]], truth))
    size = f"{np.mean(sizes) / 1e6:.1f} MP" if args.megapixels else "240-480 x 320-640 px"
    print(f"mask post-processing, {args.model} (SAM {decoder.preset}, zoom {zoom}, refinement {refine}), "
          f"{n} box prompts on {args.scenes} unseen scenes ({size}), CPU threads {torch.get_num_threads()}")
    print(f"  decode on the whole image   {seconds['decode'] / n * 1000:8.1f} ms/mask   mean IoU {np.mean(ious['decoded']):.3f}")
    print(f"  + zoom                      {seconds['zoom'] / n * 1000:8.1f} ms/mask   mean IoU {np.mean(ious['zoomed']):.3f}"
          f"   (slowest {worst['zoom'] * 1000:.0f} ms)")
    print(f"  + GrabCut refinement        {seconds['refine'] / n * 1000:8.1f} ms/mask   mean IoU {np.mean(ious['refined']):.3f}"
          f"   (slowest {worst['refine'] * 1000:.0f} ms)")
    post = (seconds["zoom"] + seconds["refine"]) / n
    print(f"  post-processing (zoom + refinement) {post * 1000:.1f} ms/mask (slowest mask {worst['post'] * 1000:.0f} ms); "
          f"ratio refined / zoomed way (decode included): "
          f"{sum(seconds.values()) / (seconds['decode'] + seconds['zoom']):.2f}x")
    if tiles:
        cv2.imwrite(args.figure, np.concatenate(tiles, axis=1)[..., ::-1])
        print(f"  wrote {args.figure}")


def _tile(pixels: np.ndarray, box, masks, truth: np.ndarray, side: int = 200) -> np.ndarray:
    """The object's surroundings (its box grown by half its side) scaled to ``side`` pixels, once per mask of
    ``masks`` (decoded above, refined below), with the mask's errors painted: red where it covers background,
    blue where it misses the object."""
    x1, y1, x2, y2 = box
    pad = max(x2 - x1, y2 - y1) / 2
    H, W = pixels.shape[:2]
    l, t = int(max(0, x1 - pad)), int(max(0, y1 - pad))
    r, b = int(min(W, x2 + pad)), int(min(H, y2 + pad))
    panels = []
    for mask in masks:
        view = pixels[t:b, l:r].copy()
        view[mask[t:b, l:r] & ~truth[t:b, l:r]] = (255, 0, 0)
        view[~mask[t:b, l:r] & truth[t:b, l:r]] = (0, 0, 255)
        scale = side / max(r - l, b - t)
        size = (max(1, round((r - l) * scale)), max(1, round((b - t) * scale)))
        panel = np.zeros((side, side, 3), np.uint8)
        panel[:size[1], :size[0]] = cv2.resize(view, size, interpolation=cv2.INTER_NEAREST)
        panels.append(panel)
    return np.concatenate(panels, axis=0)


if __name__ == "__main__":
    main()
