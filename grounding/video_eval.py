"""Region similarity J of the video path on the synthetic moving-shape videos.

Videos come from ``grounding.data.synthetic_video.generate_video_dataset`` (folders of PNG frames +
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

    python -m grounding.video_eval --data out/video-eval --videos 20 --seed 123 \\
        --model weights/shapes-tiny --source question --mode reask --every 8 --out out/video-eval/j.json
"""
from __future__ import annotations

import argparse
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
                           f"grounding.data.synthetic_video.generate_video_dataset")
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset folder (generated when missing)")
    ap.add_argument("--videos", type=int, default=20, help="videos to generate when --data is missing")
    ap.add_argument("--seed", type=int, default=123, help="seed of the generated videos")
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parent.parent / "weights" / "shapes-tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--source", choices=("question", "box"), default="question")
    ap.add_argument("--mode", default="auto", help="auto, memory, reask, carry")
    ap.add_argument("--every", type=int, default=None, help="reask: VLM every N frames")
    ap.add_argument("--margin", type=float, default=None, help="carry: box growth per side")
    ap.add_argument("--mask-zoom", type=float, default=None,
                    help="masks decoded again on a crop of this many times their box side (0: off; default: the model's)")
    ap.add_argument("--mask-refine", choices=("none", "grabcut"), default=None,
                    help="refine each mask's outline against the frame (default: the model's setting)")
    ap.add_argument("--out", type=Path, default=None, help="also write the full report (JSON) here")
    args = ap.parse_args(argv)

    from grounding.data.synthetic_video import generate_video_dataset
    from grounding.predictor import Grounder
    from grounding.result import atomic_write_text
    from segdecoder.refine import refine_option

    if not (args.data / "videos.json").is_file():
        generate_video_dataset(args.data, args.videos, args.seed)
    grounder = Grounder.from_pretrained(args.model, device=args.device,
                                        mask_zoom="model" if args.mask_zoom is None else args.mask_zoom,
                                        mask_refine=refine_option(args.mask_refine))
    options = {k: v for k, v in (("mode", args.mode), ("every", args.every), ("margin", args.margin))
               if v is not None}
    if args.source == "box":
        options.pop("every", None)
    report = evaluate_videos(grounder, args.data, source=args.source, **options)
    print(f"J {report['J']:.3f} (key frame {report['J_key']:.3f}, other frames {report['J_after_key']:.3f}) over "
          f"{report['tracks']} tracks in {report['videos']} videos, source {args.source}, options {options}, "
          f"{report['seconds']} s")
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
