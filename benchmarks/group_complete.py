"""What the ``group_complete`` add-on costs an "all ..." answer: the same questions with it off and on, in the same
run, on examples/shapes.png (405 x 403) and on a 4000 x 3000 upscale of it, with the default model on the CPU.

    python benchmarks/group_complete.py [--model DIR] [--repeats 3]

The first question about an image pays for the object proposals (the decoder's click grid on the whole image and
its tiles); they are kept with the image, and later questions about it pay only for checking the proposals that no
target covers. Both are timed: "first" with the image's caches cleared before each answer (the decoder and
vision-tower encodes are the same for both ways), "again" with them kept.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ("Please segment all shapes.", "Segment all the squares.")


def seconds(grounder, image, question: str, repeats: int, fresh: bool) -> tuple[float, int]:
    """Median seconds of an answer and its number of targets."""
    times, targets = [], 0
    grounder.predict(image, question)   # warm: the image encoded, the proposals made
    for _ in range(repeats):
        if fresh:
            grounder.clear_cache()
        t0 = time.perf_counter()
        targets = len(grounder.predict(image, question).targets)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), targets


def main() -> None:
    from apps.cli import DEFAULT_MODEL
    from grounding import Grounder
    from grounding.images import load_image

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    small = load_image(ROOT / "examples" / "shapes.png")
    images = {"405x403": small, "4000x3000": cv2.resize(small, (4000, 3000), interpolation=cv2.INTER_CUBIC)}
    ways = {"off": Grounder.from_pretrained(args.model, device="cpu", addons={"group_complete": None}),
            "on": Grounder.from_pretrained(args.model, device="cpu")}
    print(f"{'image':<10} {'question':<28} {'when':<6} {'off s':>7} {'on s':>7} {'on/off':>7}  targets off/on")
    for name, image in images.items():
        for question in QUESTIONS:
            for when, fresh in (("first", True), ("again", False)):
                (off, n_off), (on, n_on) = (seconds(g, image, question, args.repeats, fresh) for g in ways.values())
                print(f"{name:<10} {question:<28} {when:<6} {off:7.2f} {on:7.2f} {on / off:7.2f}  {n_off}/{n_on}",
                      flush=True)


if __name__ == "__main__":
    main()
