"""Evaluation throughput: the naive per-sentence path (LISA / GLaMM: the whole model for every sentence) vs
the grouped engine (image prefix and its KV cache once per image, the image's sentences batched, masks
decoded together), both in the same run, on a RefCOCO-val-shaped workload: images with 7 sentences each.

    python benchmarks/eval_throughput.py                       # the embedded default model, CPU
    python benchmarks/eval_throughput.py --size llava-1.5-7b --decoder vit_h --device cuda --images 40

``--size llava-1.5-7b`` builds LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336: 576 image tokens; a 32-layer
4096-wide Llama) with random weights, and a SAM ViT-H mask decoder, in bf16 on the GPU. Random weights
never write EOS, so that size is timed in teacher-forced mode (LISA's protocol: the answer "[SEG]." is
given), and generate mode with answers of exactly --max-new-tokens tokens. "same masks" counts the targets of
equal answers whose masks are equal pixel for pixel.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from grounding.device import resolve_device
from grounding import PrefixEngine
from grounding import Grounder, Query

ROOT = Path(__file__).resolve().parent.parent
SENTENCES_PER_IMAGE = 7  # RefCOCO val: 10,834 sentences on 1,500 images


def workload(n_images: int, side: int, seed: int) -> list[tuple[object, list[str]]]:
    """(image, 7 referring sentences) per image, from the synthetic REFER generator."""
    import tempfile

    from grounding.data.refer import ReferDataset
    from shapes.scenes.synthetic import generate_dataset
    from grounding.images import load_image

    root = generate_dataset(Path(tempfile.mkdtemp()) / "bench", n_images * 2, seed,
                            image_size_range=((side * 3 // 4, side), (side, side * 4 // 3)),
                            splits=(("val", 1.0),), progress=False)
    data = ReferDataset(root, "synth", "unc")
    groups: dict[int, list[str]] = {}
    for s in sorted(data.sentences("val"), key=lambda s: (s.image_id, s.sent_id)):
        groups.setdefault(s.image_id, []).append(s.text)
    out = []
    for image_id, sents in groups.items():
        if len(out) == n_images:
            break
        while len(sents) < SENTENCES_PER_IMAGE:
            sents = sents + sents
        out.append((load_image(data.image_path(image_id)), sents[:SENTENCES_PER_IMAGE]))
    return out


def build_grounder(size: str, decoder: str, device: str, max_new_tokens: int) -> Grounder:
    if size == "default":
        return Grounder.from_pretrained(ROOT / "weights" / "shapes-tiny", device=device, max_new_tokens=max_new_tokens)
    from grounding.presets import build_random

    dev, dtype = resolve_device(device)
    with torch.device(dev):
        model, tok = build_random(size, decoder={"backend": "sam", "preset": decoder}, seed=0)
    return Grounder(model, tok, dev, dtype, max_new_tokens=max_new_tokens)


def queries(groups, mode: str) -> list[list[Query]]:
    forced = mode == "teacher-forced"
    return [[Query(image, f"Please segment {s}.", answer="[SEG]." if forced else None) for s in sents]
            for image, sents in groups]


def run_naive(grounder: Grounder, work: list[list[Query]]):
    out = []
    for group in work:
        for q in group:
            grounder.clear_cache()  # LISA re-encodes the image for every sentence
            out += grounder.predict_batch([q], batch_size=1)
    return out


def run_grouped(grounder: Grounder, work: list[list[Query]], batch_size: int, overlap: bool = True):
    engine = PrefixEngine(grounder, overlap=overlap)
    grounder.clear_cache()
    answers = engine.predict_groups([(group[0].image, group) for group in work], batch_size=batch_size)
    return [p for per_image in answers for p in per_image]


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="default", help="default (weights/shapes-tiny) or a VLM preset, e.g. llava-1.5-7b")
    ap.add_argument("--decoder", default="vit_h", help="SAM preset for a random-weight --size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--side", type=int, default=320, help="image width in pixels (height 3/4 of it)")
    ap.add_argument("--modes", default="teacher-forced,generate")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of each way (best kept)")
    ap.add_argument("--batch-size", type=int, default=32, help="questions per batch (across images)")
    ap.add_argument("--no-overlap", action="store_true", help="the grouped engine decodes masks after each batch "
                                                              "instead of beside the next one")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 on a CPU other work shares: two threads "
                         "wait on each other when a core is busy elsewhere, slowing small operations many times)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    grounder = build_grounder(args.size, args.decoder, args.device, args.max_new_tokens)
    device = grounder.device
    groups = workload(args.images, args.side, seed=11)
    n = sum(len(s) for _, s in groups)
    print(f"model {args.size}, device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{len(groups)} images x {SENTENCES_PER_IMAGE} sentences, threads {torch.get_num_threads()}")
    for mode in args.modes.split(","):
        work = queries(groups, mode)
        run_grouped(grounder, work[:1], args.batch_size, not args.no_overlap)  # warm-up (kernels, allocator)
        run_naive(grounder, work[:1])
        # alternate the two ways and keep each one's best round: a busy machine slows rounds, not ways
        t_naive = t_grouped = float("inf")
        for _ in range(args.repeats):
            naive, t = timed(lambda: run_naive(grounder, work), device)
            t_naive = min(t_naive, t)
            grouped, t = timed(lambda: run_grouped(grounder, work, args.batch_size, not args.no_overlap), device)
            t_grouped = min(t_grouped, t)
        same = sum(a.answer == b.answer for a, b in zip(naive, grouped))
        masks = [(a.mask, b.mask) for x, y in zip(naive, grouped) if x.answer == y.answer
                 for a, b in zip(x.targets, y.targets) if a.mask is not None and b.mask is not None]
        same_masks = sum(a.shape == b.shape and bool((a == b).all()) for a, b in masks)
        print(f"{mode:15s} naive {n / t_naive:8.2f} sent/s   grouped {n / t_grouped:8.2f} sent/s   "
              f"ratio {t_naive / t_grouped:5.2f}x   same answers {same}/{n}   same masks {same_masks}/{len(masks)}",
              flush=True)


if __name__ == "__main__":
    main()
