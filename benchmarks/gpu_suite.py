"""Every GPU figure of the project in one run: real sizes, random weights, bf16, one GPU (<= 8 minutes on an H100).

    python benchmarks/gpu_suite.py                    # needs CUDA; without it: one 'skipped' line, exit 0
    python benchmarks/gpu_suite.py --tiny             # the same code at tiny sizes on the CPU (~30 s; the test)
    python benchmarks/gpu_suite.py --results /tmp/R.md --workdir /scratch/gs   # where rows and the 7B file go

Figures (each printed beside its target, and written as one table between the ``gpu_suite`` markers of
``benchmarks/RESULTS.md``, with the device, torch / transformers versions and git revision):

  eval          LLaVA-1.5-7B + SAM ViT-H, RefCOCO-shaped workload (7 sentences per image), teacher-forced
                ("[SEG]." given: random weights never write EOS; LISA's protocol): the grouped engine
                (grounding/inference/engine.py) vs the naive one-sentence-at-a-time path, sentences/s and
                their ratio, same run, same model;
  generate      the grouped engine writing 8 tokens per sentence, dynamic vs static KV cache (``cache="static"``;
                ``--compile`` adds the compiled decode step, CUDA graphs);
  text query    ``Grounder.predict`` on an image already encoded (8 new tokens, greedy), p50;
  click         ``Grounder.segment`` (one click -> mask, ViT-H decoder only) on the encoded image, p50;
  sam2 video    SAM2.1 Hiera-L (sam2's own ``configs/sam2.1/sam2.1_hiera_l.yaml``, random weights) through the
                streaming tracker (segdecoder/video.py), 1024 px, 8-frame encoder batches, bf16 autocast, frames/s;
  7B load       ``Grounder.from_pretrained`` of a random 7B + ViT-H checkpoint saved once to ``--workdir``
                (the file was just written, so it comes from the page cache), seconds;
  4-bit         peak GPU memory of that checkpoint loaded with ``Grounder.from_pretrained(quantize="4bit")``
                (bitsandbytes; SAM ViT-H and the vision tower in bf16), through one text query.

Models are built on the meta device (accelerate's ``init_empty_weights``, buffers kept real) and materialised
straight on the target device with random N(0, 0.02) weights (norm weights 1, biases 0): no minutes of CPU init.
A section that fails or runs past ``--budget-s`` gets its reason in its row instead of a number.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEGIN = "<!-- gpu_suite: begin (benchmarks/gpu_suite.py writes this section; do not edit it by hand) -->"
END = "<!-- gpu_suite: end -->"


@dataclass
class Sizes:
    vlm: str
    sam: str
    sam2: str
    device: str
    dtype: torch.dtype
    images: int          # eval workload: images x 7 sentences
    side: int            # eval image width
    queries: int         # text queries timed
    clicks: int          # clicks timed
    frames: int          # video frames propagated
    new_tokens: int = 8


REAL = Sizes("llava-1.5-7b", "vit_h", "hiera_l", "cuda", torch.bfloat16, images=24, side=480, queries=10,
             clicks=30, frames=64)
TINY = Sizes("tiny", "tiny", "tiny", "cpu", torch.float32, images=1, side=96, queries=2, clicks=3, frames=2)


@dataclass
class Row:
    key: str
    figure: str
    unit: str
    target: str
    ok: Callable[[float], bool] | None = None
    value: float | None = None
    note: str = ""

    def cell(self) -> str:
        if self.value is None:
            return self.note or "not run"
        text = f"{self.value:,.3g}" if abs(self.value) < 100 else f"{self.value:,.0f}"
        return f"{text} {self.unit}" + (f" ({self.note})" if self.note else "")


def make_rows(s: Sizes) -> dict[str, Row]:
    model = f"{s.vlm} + SAM {s.sam}"
    rows = [
        Row("eval_grouped", f"eval, grouped engine ({model}, teacher-forced)", "sent/s", ">= 150 sent/s",
            lambda v: v >= 150),
        Row("eval_naive", f"eval, naive per-sentence path ({model}, teacher-forced)", "sent/s", "-"),
        Row("eval_ratio", "eval, grouped / naive (same run)", "x", ">= 15x", lambda v: v >= 15),
        Row("generate_dynamic", f"generate {s.new_tokens} tokens, grouped engine, dynamic KV cache", "sent/s", "-"),
        Row("generate_static", f"generate {s.new_tokens} tokens, grouped engine, static KV cache", "sent/s", "-"),
        Row("text_query_p50", f"text query on a cached image ({s.new_tokens} new tokens), p50", "ms", "<= 150 ms",
            lambda v: v <= 150),
        Row("click_p50", f"click to mask, SAM {s.sam}, cached image, p50", "ms", "<= 10 ms", lambda v: v <= 10),
        Row("sam2_video", f"SAM2.1 {s.sam2} video propagation (8-frame encoder batches)", "frames/s",
            ">= 60 frames/s", lambda v: v >= 60),
        Row("load_7b", f"load {s.vlm} + SAM {s.sam} checkpoint (Grounder.from_pretrained)", "s", "-"),
        Row("peak_4bit", f"{s.vlm} in 4 bit + SAM {s.sam} bf16, peak GPU memory", "GB", "<= 8 GB",
            lambda v: v <= 8),
    ]
    return {r.key: r for r in rows}


# ---- building on the meta device ----------------------------------------------------------------------------

def materialise(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter (meta or not) with a random one on ``device``: N(0, 0.02), 1-D ``weight`` = 1 (norms),
    ``bias`` = 0; floating buffers move to ``device`` keeping their dtype. Parameters shared by several modules
    stay shared."""
    gen = torch.Generator(device=device).manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                t = torch.empty(p.shape, device=device, dtype=dtype if p.is_floating_point() else p.dtype)
                if name == "bias":
                    t.zero_()
                elif name == "weight" and p.ndim == 1:
                    t.fill_(1.0)
                else:
                    t.normal_(0.0, 0.02, generator=gen)
                made[id(p)] = torch.nn.Parameter(t, requires_grad=False)
            module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.to(device)
    return model


def build_grounder(s: Sizes, device: torch.device, max_new_tokens: int):
    from accelerate import init_empty_weights

    from grounding import Grounder
    from grounding.presets import build_random

    with init_empty_weights(include_buffers=False):
        model, tok = build_random(s.vlm, decoder={"backend": "sam", "preset": s.sam}, seed=0)
    materialise(model, device, s.dtype)
    return Grounder(model.eval(), tok, device, s.dtype, max_new_tokens=max_new_tokens)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def p50_ms(fn, calls: list, device: torch.device) -> float:
    times = []
    for call in calls:
        times.append(timed(lambda: fn(call), device)[1] * 1000)
    return statistics.median(times)


# ---- the sections ---------------------------------------------------------------------------------------------

def language_sections(s: Sizes, rows: dict[str, Row], device: torch.device, workdir: Path, compile_decode: bool,
                      budget: Callable[[], bool]) -> None:
    sys.path.insert(0, str(HERE))
    import eval_throughput as et

    from grounding import PrefixEngine
    from grounding.checkpoint import save_checkpoint

    grounder = build_grounder(s, device, s.new_tokens)
    groups = et.workload(s.images, s.side, seed=11)
    n = sum(len(sents) for _, sents in groups)
    forced = et.queries(groups, "teacher-forced")
    warm = device.type == "cuda"                            # warm-ups: kernels, allocator (a GPU's business)
    if warm:
        et.run_grouped(grounder, forced[:1], 32)
        et.run_naive(grounder, forced[:1])
    naive, t_naive = timed(lambda: et.run_naive(grounder, forced), device)
    grouped, t_grouped = timed(lambda: et.run_grouped(grounder, forced, 32), device)
    same = sum(a.answer == b.answer for a, b in zip(naive, grouped))
    rows["eval_grouped"].value, rows["eval_naive"].value = n / t_grouped, n / t_naive
    rows["eval_ratio"].value = t_naive / t_grouped
    rows["eval_ratio"].note = f"{n} sentences on {len(groups)} images, same answers {same}/{n}"

    if budget():
        free = et.queries(groups, "generate")
        jobs = [(g[0].image, g) for g in free]
        for key, engine in (("generate_dynamic", PrefixEngine(grounder)),
                            ("generate_static", PrefixEngine(grounder, cache="static", compile_decode=compile_decode))):
            if warm or compile_decode:
                engine.predict_groups(jobs[:1], batch_size=32)     # warm-up (and the compile, if asked)
            _, t = timed(lambda: engine.predict_groups(jobs, batch_size=32), device)
            rows[key].value = n / t
        if compile_decode:
            rows["generate_static"].note = "compiled decode step"
    else:
        for key in ("generate_dynamic", "generate_static"):
            rows[key].note = "skipped: time budget spent"

    image, sents = groups[0]
    grounder.prepare([image])                                # the image is cached: only the language path runs
    question = f"Please segment {sents[0]}."
    if warm:
        grounder.predict(image, question)
    rows["text_query_p50"].value = p50_ms(lambda q: grounder.predict(image, q), [question] * s.queries, device)

    rng = np.random.default_rng(0)
    h, w = image.shape[:2]
    clicks = [[[float(x), float(y)]] for x, y in zip(rng.uniform(1, w - 1, s.clicks), rng.uniform(1, h - 1, s.clicks))]
    if warm:
        grounder.segment(image, points=clicks[0])
    rows["click_p50"].value = p50_ms(lambda p: grounder.segment(image, points=p), clicks, device)

    ckpt = workdir / f"{s.vlm}-{s.sam}"
    if not (ckpt / "groundseg.json").is_file():              # once: reused by later runs
        save_checkpoint(grounder.model, grounder.processor.tokenizer, ckpt)
    del grounder
    free_memory(device)


def video_section(s: Sizes, rows: dict[str, Row], device: torch.device) -> None:
    sys.path.insert(0, str(HERE))
    from video_propagation import frames_of, prompts_for

    from segdecoder.build import preset_spec
    from segdecoder.sam2 import Sam2Backend, build_sam2_model
    from segdecoder.video import StreamingSam2Tracker

    spec = preset_spec("sam2", s.sam2)
    torch.manual_seed(0)
    if s.sam2 == "hiera_l":
        from sam2.build_sam import build_sam2
        model = build_sam2("configs/sam2.1/sam2.1_hiera_l.yaml", ckpt_path=None, device=str(device))
    else:   # no packaged yaml for the tiny preset: the same architecture code, built from the preset
        model = build_sam2_model(spec).to(device).eval()
    backend = Sam2Backend(model, s.sam2, spec)
    autocast = None if s.dtype == torch.float32 else s.dtype
    frames = frames_of(s.frames + 5, 480, 640)
    prompts = prompts_for(2, 480, 640)

    def run(n: int) -> float:
        tracker = StreamingSam2Tracker.from_backend(backend, encode_batch=8, autocast_dtype=autocast,
                                                    storage_device=device)
        tracker.start(frames[0], 0, len(frames), prompts)
        _, t = timed(lambda: sum(1 for _ in tracker.propagate((i, frames[i]) for i in range(1, n + 1))), device)
        return n / t

    if device.type == "cuda":
        run(4)                                               # warm-up
    rows["sam2_video"].value = run(s.frames)
    rows["sam2_video"].note = f"{s.frames} frames of 640x480 at {model.image_size} px, 2 objects"
    del backend, model
    free_memory(device)


def load_section(s: Sizes, rows: dict[str, Row], device: torch.device, workdir: Path) -> None:
    from grounding import Grounder

    ckpt = workdir / f"{s.vlm}-{s.sam}"
    if not (ckpt / "groundseg.json").is_file():
        rows["load_7b"].note = f"skipped: no checkpoint at {ckpt} (the eval section writes it)"
        return
    grounder, t = timed(lambda: Grounder.from_pretrained(ckpt, device=str(device),
                                                          dtype="bf16" if s.dtype == torch.bfloat16 else "fp32"),
                        device)
    rows["load_7b"].value = t
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**30
    rows["load_7b"].note = f"{size:.1f} GiB on disk"
    del grounder
    free_memory(device)


def bnb_problem(device: torch.device) -> str | None:
    """Why the 4-bit row cannot run here, or None."""
    if device.type != "cuda":
        return "skipped: 4-bit (bitsandbytes) needs CUDA"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA library it cannot load
        return f"skipped: bitsandbytes is not importable ({type(exc).__name__}: {exc}); pip install bitsandbytes"
    return None


def four_bit_section(s: Sizes, rows: dict[str, Row], device: torch.device, workdir: Path) -> None:
    """The project's own 4-bit path: ``Grounder.from_pretrained(..., quantize="4bit")`` of the saved checkpoint
    (grounding/quantize.py: the language model's Linear layers through bitsandbytes NF4), then one text query."""
    problem = bnb_problem(device)
    if problem:
        rows["peak_4bit"].note = problem
        return
    from grounding import Grounder

    ckpt = workdir / f"{s.vlm}-{s.sam}"
    if not (ckpt / "groundseg.json").is_file():
        rows["peak_4bit"].note = f"skipped: no checkpoint at {ckpt} (the eval section writes it)"
        return
    free_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    grounder = Grounder.from_pretrained(ckpt, device=str(device), dtype="bf16", quantize="4bit",
                                        max_new_tokens=s.new_tokens)
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    grounder.predict(image, "Please segment the red circle.")
    sync(device)
    rows["peak_4bit"].value = torch.cuda.max_memory_allocated(device) / 1e9
    rows["peak_4bit"].note = "load + one text query (image encode, 8 new tokens)"
    del grounder
    free_memory(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the results table ----------------------------------------------------------------------------------------

def git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() or "unknown") + (" + local changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def section(rows: dict[str, Row], s: Sizes, device: torch.device, tiny: bool, wall: float) -> str:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [BEGIN, f"{date.today().isoformat()}, {name}, {str(s.dtype).replace('torch.', '')}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}, code {git_rev()}, {wall:.0f} s in all"
             + (" — `--tiny`: tiny sizes on the CPU, a check of the code only; the targets are for the real sizes"
                if tiny else "") + ".", "",
             "| figure | measured | target | met |", "|---|---|---|---|"]
    for r in rows.values():
        met = "-" if r.ok is None or r.value is None else ("n/a (tiny)" if tiny else ("yes" if r.ok(r.value) else "no"))
        lines.append(f"| {r.figure} | {r.cell()} | {r.target} | {met} |")
    lines += [END]
    return "\n".join(lines)


def write_results(path: Path, text: str) -> None:
    """Replace the section between the markers (or append it, under a heading of its own)."""
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n## gpu_suite.py\n\n" + text + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (checks the code, no real figures)")
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="the markdown file to update")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the saved checkpoints go (default: a folder under the system temp dir, kept)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="sections starting after this many seconds are skipped")
    ap.add_argument("--compile", action="store_true", help="also compile the static-cache decode step (CUDA graphs)")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_suite: skipped: CUDA is not available (the real sizes need one GPU; --tiny checks the code on the "
              "CPU); nothing written")
        return 0
    s = TINY if args.tiny else REAL
    device = torch.device(s.device)
    workdir = args.workdir or Path(tempfile.gettempdir()) / ("groundseg-gpu-suite" + ("-tiny" if args.tiny else ""))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = make_rows(s)
    start = time.perf_counter()
    within = lambda: time.perf_counter() - start < args.budget_s

    sections = [
        (("eval_grouped", "eval_naive", "eval_ratio", "generate_dynamic", "generate_static", "text_query_p50",
          "click_p50"), lambda: language_sections(s, rows, device, workdir, args.compile, within)),
        (("sam2_video",), lambda: video_section(s, rows, device)),
        (("load_7b",), lambda: load_section(s, rows, device, workdir)),
        (("peak_4bit",), lambda: four_bit_section(s, rows, device, workdir)),
    ]
    for keys, run in sections:
        if not within():
            for k in keys:
                rows[k].note = rows[k].note or f"skipped: time budget ({args.budget_s:.0f} s) spent"
            continue
        t0 = time.perf_counter()
        try:
            run()
        except Exception as exc:  # one broken section must not cost the others' figures
            for k in keys:
                if rows[k].value is None and not rows[k].note:
                    rows[k].note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            free_memory(device)
        for k in keys:
            r = rows[k]
            print(f"{r.figure:78s} {r.cell():>28s}   target {r.target}", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    wall = time.perf_counter() - start
    write_results(args.results, section(rows, s, device, args.tiny, wall))
    print(f"gpu_suite: {wall:.0f} s; rows written to {args.results}")
    return 0


if __name__ == "__main__":
    main()   # no sys.exit: run_all.py runs this file through runpy, and SystemExit would stop it
