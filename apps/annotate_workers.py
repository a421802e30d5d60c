"""The worker side of ``groundseg annotate`` (apps/annotate.py): :func:`annotate_items` annotates files in order,
writing each one's result (images here, videos in apps/annotate_video.py); :func:`run_workers` does it in
``--num-procs`` processes.

Sharding. ``--num-procs N`` starts N "spawn" processes; the i-th image still to do goes to worker i % N,
which loads the model itself with ``torch.set_num_threads(max(1, cpus // N))``. Workers and parent share
nothing but the per-image result files: the parent counts them for the progress bar and merges them.
A worker stops by itself when its parent dies.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from apps.annotate_common import (VIDEO, AnnotateError, GrounderFactory, Item, Settings, overlay_path, question_for,
                                  read_record, record_path, write_record)
from apps.annotate_video import annotate_one_video
from apps.exporters import Instance, instance_box
from apps.overlay import draw_overlay, save_image
from grounding.errors import GroundsegError, ImageError
from grounding.images import DEFAULT_MAX_PIXELS, load_image
from grounding.result import Prediction, Target


def annotate_items(settings: Settings, items: Sequence[Item], grounder, on_done: Callable[[int], None] | None = None,
                   stop: Callable[[], bool] | None = None) -> None:
    """Annotate ``items`` in order with ``grounder``, writing each result; ``stop()`` is asked between images."""
    if settings.mask_threshold:
        grounder.mask_threshold = settings.mask_threshold
    for item in items:
        if stop is not None and stop():
            return
        if item.kind == VIDEO:
            annotate_one_video(settings, item, grounder)
        else:
            _annotate_image(settings, item, grounder)
        if on_done is not None:
            on_done(1)


def _annotate_image(settings: Settings, item: Item, grounder) -> None:
    try:
        pixels = load_image(Path(settings.input_dir) / item.file, getattr(grounder, "max_pixels", DEFAULT_MAX_PIXELS),
                            name=item.file)
    except ImageError as err:
        record = {"status": "error", "reason": str(err)}
    else:
        if item.overlay_only:
            record = read_record(record_path(settings, item.file)) or {}
            predictions = [Prediction.from_json(p) for p in record.get("predictions", [])]
        else:
            # (image, question) tuples are Grounder Queries; no import of the model code here
            queries = [(pixels, question_for(p)) for p in settings.prompts]
            predictions = grounder.predict_batch(queries, batch_size=settings.batch_size)
        if settings.overlays:
            _write_overlay(settings, item.file, pixels, instances_from(predictions))
        if item.overlay_only:
            return
        record = {"status": "ok", "image_size": list(pixels.shape[:2]),
                  "predictions": [p.to_json() for p in predictions]}
    write_record(settings, item, record)


def instances_from(predictions: Sequence) -> list[Instance]:
    """Prediction ``k`` answers prompt ``k``: each of its targets with a non-empty mask or a box is one
    instance of category ``k`` (an empty mask counts as none)."""
    out = []
    for category, prediction in enumerate(predictions):
        for t in prediction.targets:
            mask = t.mask if t.mask is not None and t.mask.any() else None
            if mask is None and t.box is None:
                continue
            out.append(Instance(category, mask, t.box, t.score))
    return out


def _write_overlay(settings: Settings, file: str, pixels, instances: list[Instance]) -> None:
    h, w = pixels.shape[:2]
    targets = [Target(phrase=settings.prompts[i.category], box=instance_box(i, w, h), mask=i.mask, score=i.score)
               for i in instances]
    save_image(overlay_path(settings, file), draw_overlay(pixels, Prediction("", targets, (h, w))))


# --------------------------------------------------------------------------- processes


def _worker_main(settings: Settings, items: list[Item], factory: GrounderFactory, threads: int) -> None:
    """Entry point of a spawned worker: its own model, its own threads, results written as files."""
    import torch

    torch.set_num_threads(threads)
    parent = mp.parent_process()
    try:
        annotate_items(settings, items, factory(settings.model_dir, settings.device),
                       stop=lambda: parent is not None and not parent.is_alive())
    except GroundsegError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)


def run_workers(settings: Settings, todo: list[Item], num_procs: int, factory: GrounderFactory,
                advance: Callable[[int], None]) -> None:
    """Shard ``todo`` over ``num_procs`` spawned workers (item i -> worker i % N); follow their result files."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cpus // num_procs)
    shards = [todo[k::num_procs] for k in range(min(num_procs, len(todo)))]  # no empty shard
    context = mp.get_context("spawn")
    workers = [context.Process(target=_worker_main, args=(settings, shard, factory, threads), name=f"annotate-{k}")
               for k, shard in enumerate(shards)]
    cursors = [0] * len(workers)

    def follow() -> None:  # each worker goes through its shard in order: check its next file only
        for k, shard in enumerate(shards):
            while cursors[k] < len(shard) and _done(settings, shard[cursors[k]]):
                cursors[k] += 1
                advance(1)

    try:
        for worker in workers:
            worker.start()
        while any(w.is_alive() for w in workers):
            follow()
            time.sleep(0.2)
        follow()
    finally:
        for worker in workers:
            if worker.pid is None:  # never started (a failed start): nothing to stop
                continue
            if worker.is_alive():
                worker.terminate()
            worker.join()
    failed = [(k, w.exitcode) for k, w in enumerate(workers) if w.exitcode != 0]
    if failed:
        k, code = failed[0]
        raise AnnotateError(f"worker {k} of {len(workers)} stopped with exit code {code} (its message is above); "
                            "finished images are kept: run the same command again to resume")


def _done(settings: Settings, item: Item) -> bool:
    if item.overlay_only:
        return overlay_path(settings, item.file, item.kind).is_file()
    return record_path(settings, item.file).is_file()
