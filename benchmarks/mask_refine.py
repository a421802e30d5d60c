"""Mask refinement: the default model's box-prompt masks decoded with its zoom (segdecoder/zoom.py) vs the same
masks with GrabCut on their outline (segdecoder/refine.py), on scenes of a seed no training run used. Prints the
time per mask of both ways, their ratio, and the mean IoU each reaches against the scenes' true masks.

    python benchmarks/mask_refine.py [--scenes 20] [--model weights/shapes-tiny]
"""
from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch

from grounding.checkpoint import load_checkpoint
from grounding.data.shapes import polygons_to_mask
from grounding.data.synthetic import compose_scene
from segdecoder.masks import decode_masks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="weights/shapes-tiny")
    ap.add_argument("--scenes", type=int, default=20)
    args = ap.parse_args()
    model, _ = load_checkpoint(args.model)
    decoder = model.mask_decoder.eval()
    zoom = model.config.mask_zoom or 3.0
    rng = np.random.default_rng(4242)
    seconds = {None: 0.0, "grabcut": 0.0}
    ious = {None: [], "grabcut": []}
    for _ in range(args.scenes):
        scene = compose_scene(rng, int(rng.integers(240, 480)), int(rng.integers(320, 640)))
        pixels = cv2.imdecode(np.frombuffer(scene.png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].copy()
        with torch.no_grad():
            embedding = decoder.encode([pixels])[0]
        for obj, polygons in zip(scene.scene.objects, scene.polygons):
            truth = polygons_to_mask(polygons, scene.height, scene.width)
            box = torch.tensor([obj.box], dtype=torch.float32)
            for refine in seconds:
                t0 = time.perf_counter()
                with torch.no_grad():
                    mask = decode_masks(decoder, embedding, pixels, zoom, refine, boxes=box)[0].masks[0]
                seconds[refine] += time.perf_counter() - t0
                ious[refine].append((mask & truth).sum() / max(1, (mask | truth).sum()))
    n = len(ious[None])
    print(f"mask refinement, {args.model} (SAM {decoder.preset}, zoom {zoom}), {n} box prompts on {args.scenes} "
          f"unseen scenes, CPU threads {torch.get_num_threads()}")
    for refine, label in ((None, "zoomed decode"), ("grabcut", "zoomed decode + GrabCut")):
        print(f"  {label:24s} {seconds[refine] / n * 1000:7.1f} ms/mask   mean IoU {np.mean(ious[refine]):.3f}")
    print(f"  ratio (refined / plain time): {seconds['grabcut'] / seconds[None]:.2f}x")


if __name__ == "__main__":
    main()
