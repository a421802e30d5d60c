"""Click path: re-encoding the image for every click (naive) vs one encode + decoder-only clicks (the Grounder
caches the embedding by content). Real SAM sizes with random weights; both ways in the same run.

    python benchmarks/click_latency.py [--preset vit_b] [--clicks 8] [--device auto]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from grounding.device import resolve_device
from segdecoder import build_decoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="sam")
    ap.add_argument("--preset", default="vit_b")
    ap.add_argument("--clicks", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device, dtype = resolve_device(args.device)
    decoder = build_decoder(args.backend, args.preset).to(device=device, dtype=dtype).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    clicks = [torch.tensor([[[float(x), float(y)]]]) for x, y in rng.integers(10, 470, (args.clicks, 2))]
    label = torch.ones((1, 1), dtype=torch.long)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    decoder.decode(decoder.encode([image])[0], points=clicks[0], point_labels=label)  # warm-up
    sync()
    t0 = time.perf_counter()
    for p in clicks:  # naive: every click runs the image encoder again
        decoder.decode(decoder.encode([image])[0], points=p, point_labels=label, multimask=True)
    sync()
    naive = (time.perf_counter() - t0) / len(clicks)
    t0 = time.perf_counter()
    embedding = decoder.encode([image])[0]
    for p in clicks:
        decoder.decode(embedding, points=p, point_labels=label, multimask=True)
    sync()
    cached = (time.perf_counter() - t0) / len(clicks)
    print(f"click latency, {args.backend} {args.preset}, {device} {str(dtype).replace('torch.', '')}, "
          f"{args.clicks} clicks on one 640x480 image")
    print(f"  naive (encode every click): {naive * 1000:8.1f} ms/click")
    print(f"  cached embedding:           {cached * 1000:8.1f} ms/click")
    print(f"  ratio: {naive / cached:.1f}x")


if __name__ == "__main__":
    main()
