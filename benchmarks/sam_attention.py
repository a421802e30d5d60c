"""SAM image encoder: segment-anything's own attention vs the SDPA one (segdecoder/sam_attention.py), in one
run, on the same seeded random weights (non-zero rel-pos tables) and the same input. Prints ms per image of
each (best of ``--repeats`` after a warm-up), their ratio, and the max abs difference of the encoder outputs.
Default (~25 s on 2 CPU cores): the project's ``tiny`` preset at a 1024 input (64 x 64 tokens: one block of 8 x 8
windows, one global block of 4096 tokens), float32, on the CPU. ``--preset vit_b --image-size 512`` (32 x 32
tokens: 14 x 14 windows with padding, 4 global blocks of 1024 tokens) is the official shape, ~1.5 min here.

    python benchmarks/sam_attention.py [--preset tiny] [--image-size 1024] [--repeats 3] [--dtype float32]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from segdecoder.build import SAM_PRESETS
from segdecoder.sam import build_sam_model
from segdecoder.sam_attention import use_sdpa_attention


def ms_per_image(encoders: dict[str, torch.nn.Module], x: torch.Tensor,
                 repeats: int) -> dict[str, tuple[float, torch.Tensor]]:
    """Per encoder: best wall time of ``repeats`` calls (after one warm-up), in ms per image, and the output.
    The encoders take turns call by call, so that a busy machine slows them alike."""
    best = {name: float("inf") for name in encoders}
    outs = {}
    with torch.no_grad():
        for name, enc in encoders.items():
            outs[name] = enc(x)
        for _ in range(repeats):
            for name, enc in encoders.items():
                start = time.perf_counter()
                outs[name] = enc(x)
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name] * 1e3 / x.shape[0], outs[name]) for name in encoders}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=sorted(SAM_PRESETS))
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.manual_seed(0)
    original = build_sam_model(SAM_PRESETS[args.preset], args.image_size).image_encoder.eval()
    with torch.no_grad():   # SAM zero-initialises the rel-pos tables; trained ones are not zero
        for name, param in original.named_parameters():
            if "rel_pos" in name:
                param.normal_(0.0, 0.2)
    sdpa = copy.deepcopy(original)
    blocks = use_sdpa_attention(sdpa)
    dtype = getattr(torch, args.dtype)
    original, sdpa = original.to(dtype), sdpa.to(dtype)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size).to(dtype)
    grid = args.image_size // SAM_PRESETS[args.preset]["patch_size"]
    print(f"sam {args.preset} image encoder, {args.image_size}px ({grid}x{grid} tokens), batch {args.batch}, "
          f"{args.dtype}, cpu, {torch.get_num_threads()} threads, {blocks} blocks on sdpa")
    timed = ms_per_image({"original": original, "sdpa": sdpa}, x, args.repeats)
    (t_orig, y_orig), (t_sdpa, y_sdpa) = timed["original"], timed["sdpa"]
    print(f"original attention: {t_orig:8.1f} ms/image")
    print(f"sdpa attention:     {t_sdpa:8.1f} ms/image")
    print(f"speed-up (original / sdpa): {t_orig / t_sdpa:.2f}x")
    diff = (y_orig.float() - y_sdpa.float()).abs().max().item()
    print(f"max abs difference of outputs: {diff:.3g} (output max abs {y_orig.float().abs().max().item():.3g})")


if __name__ == "__main__":
    main()
