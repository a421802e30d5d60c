"""Locator mirror: the default model's REC answers ("Where is {s}? Answer with a box.", greedy, the box written by
the [SEG] locator) with the locator reading the image alone vs the image and its mirror (shapes/locator_mirror.py),
on scenes of a seed no training run used. Prints the time per question of both ways, their ratio, and the Acc@0.5
each reaches.

    python benchmarks/locator_mirror.py [--scenes 10] [--model weights/shapes-tiny]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from eval.metrics import rec_hit
from grounding.data.refer import ReferDataset
from shapes.scenes.synthetic import generate_dataset
from grounding.images import load_image
from grounding import Grounder, Query


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="weights/shapes-tiny")
    ap.add_argument("--scenes", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ds = ReferDataset(generate_dataset(tmp, args.scenes, seed=4243, progress=False), dataset="synth")
        sentences = [s for split in ds.splits for s in ds.sentences(split)]
        images = {i: load_image(ds.image_path(i)) for i in {s.image_id for s in sentences}}
        queries = [Query(images[s.image_id], f"Where is {s.text}? Answer with a box.") for s in sentences]
        truth = [ds.box_xyxy(s.ann_id) for s in sentences]
    seconds, hits = {}, {}
    for mirror in (False, True):
        grounder = Grounder.from_pretrained(args.model, device="cpu", addons={"locator": {"mirror": mirror}})
        grounder.predict_batch(queries[:2])                      # warm-up, and the images' embeddings cached
        t0 = time.perf_counter()
        with torch.no_grad():
            answers = grounder.predict_batch(queries)
        seconds[mirror] = time.perf_counter() - t0
        hits[mirror] = [bool(a.targets) and rec_hit(a.targets[0].box, b) for a, b in zip(answers, truth)]
    n = len(queries)
    print(f"locator mirror, {args.model}, {n} REC questions on {args.scenes} unseen scenes, "
          f"CPU threads {torch.get_num_threads()}")
    for mirror, label in ((False, "image only"), (True, "image + mirror")):
        print(f"  {label:16s} {seconds[mirror] / n * 1000:7.1f} ms/question   Acc@0.5 {np.mean(hits[mirror]):.3f}")
    print(f"  ratio (mirror / image-only time): {seconds[True] / seconds[False]:.2f}x")


if __name__ == "__main__":
    main()
