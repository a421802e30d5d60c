"""Mask refinement: the default model's box-prompt masks decoded with its zoom (segdecoder/zoom.py) vs the same
masks with GrabCut on their outline (segdecoder/refine.py), on scenes of a seed no training run used. Prints the
time per mask of both ways, their ratio, and the mean IoU each reaches against the scenes' true masks; with
``--figure``, a picture of the first objects' mask errors, decoded (top row) and refined (bottom row).

    python benchmarks/mask_refine.py [--scenes 20] [--model weights/shapes-tiny] [--figure out/mask_refine.png]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="weights/shapes-tiny")
    ap.add_argument("--scenes", type=int, default=20)
    ap.add_argument("--figure", default=None, help="write the first objects' mask errors here (PNG)")
    args = ap.parse_args()
    model, _ = load_checkpoint(args.model)
    decoder = model.mask_decoder.eval()
    zoom = model.config.addons.get("mask_zoom", {}).get("context", 3.0)
    zoom_step, refine_step = build_addons({"mask_zoom": {"context": zoom}, "mask_refine": {"method": "grabcut"}})

    def decode(embedding, pixels, box, refine):
        """The box's mask, zoomed (and refined), as the mask_zoom and mask_refine add-ons give it."""
        ctx = MaskContext(decoder, embedding, pixels, {"boxes": box}, "prompt", {})
        pred = zoom_step.refine(decoder.decode(embedding, boxes=box), ctx)
        return (refine_step.refine(pred, ctx) if refine else pred).masks[0]
    rng = np.random.default_rng(4242)
    seconds = {None: 0.0, "grabcut": 0.0}
    ious = {None: [], "grabcut": []}
    tiles = []
    for _ in range(args.scenes):
        scene = compose_scene(rng, int(rng.integers(240, 480)), int(rng.integers(320, 640)))
        pixels = cv2.imdecode(np.frombuffer(scene.png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].copy()
        with torch.no_grad():
            embedding = decoder.encode([pixels])[0]
        for obj, polygons in zip(scene.scene.objects, scene.polygons):
            truth = polygons_to_mask(polygons, scene.height, scene.width)
            box = torch.tensor([obj.box], dtype=torch.float32)
            masks = []
            for refine in seconds:
                t0 = time.perf_counter()
                with torch.no_grad():
                    masks.append(decode(embedding, pixels, box, refine))
                seconds[refine] += time.perf_counter() - t0
                ious[refine].append((masks[-1] & truth).sum() / max(1, (masks[-1] | truth).sum()))
            if args.figure and len(tiles) < 6:
                tiles.append(_tile(pixels, obj.box, masks, truth))
    n = len(ious[None])
    print(f"mask refinement, {args.model} (SAM {decoder.preset}, zoom {zoom}), {n} box prompts on {args.scenes} "
          f"unseen scenes, CPU threads {torch.get_num_threads()}")
    for refine, label in ((None, "zoomed decode"), ("grabcut", "zoomed decode + GrabCut")):
        print(f"  {label:24s} {seconds[refine] / n * 1000:7.1f} ms/mask   mean IoU {np.mean(ious[refine]):.3f}")
    print(f"  ratio (refined / plain time): {seconds['grabcut'] / seconds[None]:.2f}x")
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
