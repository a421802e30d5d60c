"""Region similarity J of the video path on the synthetic moving-shape videos.

Videos come from ``shapes.scenes.synthetic_video.generate_video_dataset`` (folders of PNG frames +
``annotations.json`` with per-frame RLE masks per object and a ``description`` naming each object
alone). For every object of every video, one track:

- ``--source question``: ``predict_video`` asks ``"Please segment {description}."`` on the key frame
  (the phrasing the default model was trained on) and carries the answer's targets (the whole
  system: VLM + carrying);
- ``--source box``: click-to-track (``track``) from the object's ground-truth box on the key frame
  (isolates the carrying from the VLM).

The predicted mask of a frame is the union of every tracked object's mask on it (one referring
expression -> one mask, as Ref-YouTube-VOS / MeViS score it). J of a track is the mean over frames
of IoU(predicted, ground truth), counting 1 when both are empty (DAVIS); the key frame is included
(``J_after_key`` leaves it out). The score is the mean over tracks.

    groundseg video-eval --data out/video-eval --videos 20 --seed 123 \\
        --model weights/shapes-tiny --source question --mode reask --every 8 --out out/video-eval/j.json
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from grounding.errors import DatasetError
from grounding.result import rle_decode

QUESTION = "Please segment {description}."


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def evaluate_videos(grounder, data_dir: str | Path, *, source: str = "question", key_frame: int = 0,
                    question: str = QUESTION, limit: int | None = None, **video_kwargs: Any) -> dict[str, Any]:
    """J over every object of every video listed in ``data_dir/videos.json`` (see the module docstring).
    ``video_kwargs`` go to ``predict_video`` / ``track`` (mode, every, margin, ...)."""
    from grounding.video import predict_video, track

    root = Path(data_dir)
    index = root / "videos.json"
    if not index.is_file():
        raise DatasetError(f"no videos.json in {root}: generate videos with "
                           f"shapes.scenes.synthetic_video.generate_video_dataset")
    if source not in ("question", "box"):
        raise ValueError(f"source must be 'question' or 'box', got {source!r}")
    videos = json.loads(index.read_text())["videos"][:limit]
    tracks, started = [], time.perf_counter()
    for video in videos:
        folder = root / video["name"]
        ann = json.loads((folder / "annotations.json").read_text())
        for obj in ann["objects"]:
            gt = [rle_decode(next(o["segmentation"] for o in f["objects"] if o["id"] == obj["id"]))
                  for f in ann["frames"]]
            if source == "question":
                run = predict_video(grounder, folder, question.format(description=obj["description"]), key_frame,
                                    **video_kwargs)
            else:
                box = next(o["box_xyxy"] for o in ann["frames"][key_frame]["objects"] if o["id"] == obj["id"])
                if box is None:
                    continue   # hidden on the key frame: nothing to click
                run = track(grounder, folder, key_frame, box=box, **video_kwargs)
            scores = np.zeros(len(gt))
            for fr in run:
                pred = np.zeros_like(gt[fr.index])
                for o in fr.objects:
                    pred |= o.mask
                scores[fr.index] = iou(pred, gt[fr.index])
            tracks.append({"video": video["name"], "object": obj["id"], "description": obj["description"],
                           "answer": None if run.key_prediction is None else run.key_prediction.answer,
                           "mode": run.mode, "J": float(scores.mean()), "J_key": float(scores[key_frame]),
                           "J_after_key": float(np.delete(scores, key_frame).mean()) if len(scores) > 1 else None})
    if not tracks:
        raise DatasetError(f"{root} has no object to evaluate")
    mean = lambda k: float(np.mean([t[k] for t in tracks if t[k] is not None]))
    return {"source": source, "videos": len(videos), "tracks": len(tracks), "J": mean("J"), "J_key": mean("J_key"),
            "J_after_key": mean("J_after_key"), "seconds": round(time.perf_counter() - started, 1),
            "options": {"key_frame": key_frame, "question": question, **video_kwargs}, "per_track": tracks}

