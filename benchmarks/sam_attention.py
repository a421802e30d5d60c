"""SAM image encoder: segment-anything's own attention vs the SDPA one (segdecoder/sam_attention.py), in one
run, on the same seeded random weights (non-zero rel-pos tables) and the same input. Prints ms per image of
each (best of ``--repeats`` after a warm-up), their ratio, and the max abs difference of the encoder outputs.
Default (~25 s on 2 CPU cores): the project's ``tiny`` preset at a 1024 input (64 x 64 tokens: one block of 8 x 8
windows, one global block of 4096 tokens), float32, on the CPU. ``--preset vit_b --image-size 512`` (32 x 32
tokens: 14 x 14 windows with padding, 4 global blocks of 1024 tokens) is the official shape, ~1.5 min here.

    python benchmarks/sam_attention.py [--preset tiny] [--image-size 1024] [--repeats 3] [--dtype float32]
        [--device cpu|cuda] [--compile]

``--compile`` adds a third encoder, the SDPA one under ``compile_image_encoder`` (compiled during the warm-up call,
not timed). ``--dtype bfloat16`` runs all of them in bf16 (with ``keep_fp32_islands``, as ``SamBackend`` does); the
difference printed is then against the float32 original on the same weights.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from segdecoder.build import SAM_PRESETS
from segdecoder.sam import build_sam_model
from segdecoder.sam_attention import compile_image_encoder, keep_fp32_islands, use_sdpa_attention


def ms_per_image(encoders: dict[str, torch.nn.Module], x: torch.Tensor,
                 repeats: int) -> dict[str, tuple[float, torch.Tensor]]:
    """Per encoder: best wall time of ``repeats`` calls (after one warm-up), in ms per image, and the output.
    The encoders take turns call by call, so that a busy machine slows them alike."""
    best = {name: float("inf") for name in encoders}
    outs = {}
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for name, enc in encoders.items():
            outs[name] = enc(x)
        for _ in range(repeats):
            for name, enc in encoders.items():
                sync()
                start = time.perf_counter()
                outs[name] = enc(x)
                sync()
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name] * 1e3 / x.shape[0], outs[name]) for name in encoders}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=sorted(SAM_PRESETS))
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time the SDPA encoder under torch.compile")
    args = ap.parse_args()
    torch.manual_seed(0)
    original = build_sam_model(SAM_PRESETS[args.preset], args.image_size).image_encoder.eval()
    with torch.no_grad():   # SAM zero-initialises the rel-pos tables; trained ones are not zero
        for name, param in original.named_parameters():
            if "rel_pos" in name:
                param.normal_(0.0, 0.2)
    sdpa = copy.deepcopy(original)
    blocks = use_sdpa_attention(sdpa)
    keep_fp32_islands(sdpa)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    x32 = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad():
        reference = original.to(device)(x32).float() if dtype != torch.float32 else None
    original, sdpa = original.to(device, dtype), sdpa.to(device, dtype)
    x = x32.to(dtype)
    encoders = {"original": original, "sdpa": sdpa}
    if args.compile:
        encoders["sdpa+compile"] = compile_image_encoder(copy.deepcopy(sdpa))
    grid = args.image_size // SAM_PRESETS[args.preset]["patch_size"]
    print(f"sam {args.preset} image encoder, {args.image_size}px ({grid}x{grid} tokens), batch {args.batch}, "
          f"{args.dtype}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads, {blocks} blocks on sdpa")
    timed = ms_per_image(encoders, x, args.repeats)
    (t_orig, y_orig), (t_sdpa, y_sdpa) = timed["original"], timed["sdpa"]
    print(f"original attention: {t_orig:8.1f} ms/image")
    print(f"sdpa attention:     {t_sdpa:8.1f} ms/image")
    print(f"speed-up (original / sdpa): {t_orig / t_sdpa:.2f}x")
    if "sdpa+compile" in timed:
        t_comp, y_comp = timed["sdpa+compile"]
        print(f"sdpa + compile:     {t_comp:8.1f} ms/image   speed-up (original / sdpa+compile): {t_orig / t_comp:.2f}x"
              f"   max abs difference to sdpa: {(y_comp.float() - y_sdpa.float()).abs().max().item():.3g}")
    diff = (y_orig.float() - y_sdpa.float()).abs().max().item()
    print(f"max abs difference of outputs: {diff:.3g} (output max abs {y_orig.float().abs().max().item():.3g})")
    if reference is not None:
        for name, (_, y) in timed.items():
            print(f"  {name:13s} {args.dtype} vs float32 original: max abs {(y.float() - reference).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
