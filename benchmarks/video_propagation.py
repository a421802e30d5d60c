"""Video propagation speed: SAM2 tracking of a few objects through a stream of frames, three ways in one run:

  per-frame   the streaming tracker (segdecoder/video.py) running the image encoder on each frame before
              its memory step;
  batched     the same tracker running the image encoder on batches of --batch frames ahead of the memory
              steps (the masks are the same; only the encoder calls are grouped);
  sam2        sam2's own SAM2VideoPredictor (init_state loads every frame first: its load time is NOT counted,
              only propagate_in_video), for reference (--no-sam2 skips it; it needs the whole clip in memory).

Frames/s count the frames propagated (the key frame's prompts excluded), preprocessing (resize + normalise)
included, video decoding excluded (frames come from memory). Random weights: speed only.

    python benchmarks/video_propagation.py                                   # tiny SAM2, CPU: the ratio
    python benchmarks/video_propagation.py --preset hiera_l --device cuda --frames 300 --batch 8
        # the GPU target: SAM2.1 Hiera-L at 1024 px >= 60 frames/s on an H100 (bf16 autocast)
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from grounding.device import resolve_device
from segdecoder.build import preset_spec
from segdecoder.sam2 import Sam2Backend, build_sam2_model
from segdecoder.video import ObjectPrompt, StreamingSam2Tracker


def frames_of(n: int, height: int, width: int) -> list[np.ndarray]:
    """A textured scene whose content moves a few pixels per frame."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    return [np.roll(base, (2 * i, 3 * i), axis=(0, 1)) for i in range(n)]


def prompts_for(n_objects: int, height: int, width: int) -> list[ObjectPrompt]:
    out = []
    for k in range(n_objects):
        x = (k + 0.5) * width / n_objects
        out.append(ObjectPrompt(k + 1, box=[max(0, x - width / 8), height / 4, min(width, x + width / 8), 3 * height / 4]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="sam2 preset: tiny, hiera_t, hiera_s, hiera_b+, hiera_l")
    ap.add_argument("--image-size", type=int, default=None, help="model input side (default: the preset's)")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--objects", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="frames per image-encoder call in the batched way")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="autocast dtype: auto (bf16 on cuda, fp32 on cpu), fp32, bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-sam2", action="store_true", help="skip sam2's own predictor")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each way, interleaved; the best is kept "
                    "(the machine may be shared)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device, args.dtype)
    spec = preset_spec("sam2", args.preset)
    torch.manual_seed(0)
    model = build_sam2_model(spec, args.image_size).to(device).eval()
    backend = Sam2Backend(model, args.preset, spec)
    autocast = None if dtype == torch.float32 else dtype
    frames = frames_of(args.frames + 1, args.height, args.width)
    prompts = prompts_for(args.objects, args.height, args.width)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    held = {}

    def streaming(batch: int, n: int) -> float:
        tracker = StreamingSam2Tracker.from_backend(backend, encode_batch=batch, autocast_dtype=autocast)
        tracker.start(frames[0], 0, len(frames), prompts)
        sync()
        t0 = time.perf_counter()
        for _ in tracker.propagate((i, frames[i]) for i in range(1, n + 1)):
            pass
        sync()
        held[batch] = (tracker.stats.peak_frames_held, tracker.stats.peak_memory_frames)
        return n / (time.perf_counter() - t0)

    streaming(args.batch, min(4, args.frames))   # warm-up (allocator, kernels)
    runs: dict[str, list[float]] = {"per_frame": [], "batched": [], "sam2": []}
    for _ in range(args.repeats):
        runs["per_frame"].append(streaming(1, args.frames))
        runs["batched"].append(streaming(args.batch, args.frames))
        if not args.no_sam2:
            runs["sam2"].append(sam2_reference(spec, args, model, frames, prompts, device, autocast, sync))
    per_frame, batched = max(runs["per_frame"]), max(runs["batched"])
    reference = max(runs["sam2"]) if runs["sam2"] else None
    x = torch.stack([backend.preprocess(f)[0] for f in frames[:8]])   # warm
    t0 = time.perf_counter()
    for f in frames[: args.frames]:
        backend.preprocess(f)
    sync()
    preprocess_ms = (time.perf_counter() - t0) / args.frames * 1000
    del x

    print(f"video propagation, sam2 {args.preset} at {model.image_size} px, {device} "
          f"{str(dtype).replace('torch.', '')}, {args.frames} frames of {args.width}x{args.height}, "
          f"{args.objects} objects, {torch.get_num_threads()} CPU threads")
    print(f"  per-frame encoder:        {per_frame:8.2f} frames/s (of which resizing + normalising the "
          f"frame: {preprocess_ms:.1f} ms/frame)")
    print(f"  encoder on {args.batch:2d}-frame batches: {batched:8.2f} frames/s")
    if reference is not None:
        print(f"  sam2 SAM2VideoPredictor:  {reference:8.2f} frames/s (propagation only; loading all frames not counted)")
    print(f"  ratio batched / per-frame: {batched / per_frame:.2f}x")
    if reference is not None:
        print(f"  ratio batched / sam2:      {batched / reference:.2f}x")
    side = model.image_size
    mb = 3 * side * side * 4 / 2**20
    print(f"  frames held as model input: per-frame {held[1][0]}, batched {held[args.batch][0]} "
          f"({held[args.batch][0] * mb:.1f} MB); sam2 holds all {len(frames)} ({len(frames) * mb:.1f} MB; "
          f"{mb * 30 * 600 / 1024:.0f} GB for 10 min at 30 fps). Memory records per object: streaming at most "
          f"{held[args.batch][1]}, sam2 every frame")


def sam2_reference(spec, args, model, frames, prompts, device, autocast, sync) -> float:
    from PIL import Image
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    predictor = build_sam2_model(spec, args.image_size, model_cls=SAM2VideoPredictor).to(device).eval()
    predictor.load_state_dict(model.state_dict())
    ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as folder, ctx:
        for i, f in enumerate(frames):
            Image.fromarray(f).save(Path(folder) / f"{i:05d}.jpg", quality=95)
        state = predictor.init_state(folder, offload_video_to_cpu=True, offload_state_to_cpu=True)
        for p in prompts:
            predictor.add_new_points_or_box(state, 0, p.obj_id, box=np.asarray(p.box, np.float32))
        sync()
        t0 = time.perf_counter()
        n = sum(1 for _ in predictor.propagate_in_video(state)) - 1   # the prompted frame is not propagated
        sync()
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
