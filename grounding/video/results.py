"""What a video run gives: per-frame results (``FrameResult`` of ``FrameObject``s) and the ``VideoRun`` that
streams them and saves them atomically (``frames.jsonl``, ``video.json`` and, with a drawing function,
``overlay.mp4``). Masks ``bool H x W`` at the video's size, boxes pixel ``(x1, y1, x2, y2)`` from the mask."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from grounding.errors import VideoError
from grounding.result import Prediction, Target, atomic_write_text, box_from_mask, rle_decode, rle_encode
from grounding.video.io import VideoReader, VideoWriter, temporary_name

FRAMES_FILE, OVERLAY_FILE, SUMMARY_FILE = "frames.jsonl", "overlay.mp4", "video.json"


@dataclass
class FrameObject:
    """One object on one frame: ``mask`` bool ``H x W`` (empty when not visible), ``score`` the tracker's
    confidence (SAM2: probability the object is visible; carry/reask: the decoder's predicted IoU)."""

    obj_id: int
    phrase: str | None
    mask: np.ndarray
    score: float | None = None

    @property
    def box(self):
        return box_from_mask(self.mask)


@dataclass
class FrameResult:
    """Every tracked object on frame ``index`` (at ``time_s`` seconds). One line of ``frames.jsonl``::

        {"frame": i, "time_s": t, "objects": [{"id": 1, "phrase": str | null, "box": [x1, y1, x2, y2] | null,
         "area": int, "score": float | null, "mask": {"size": [H, W], "counts": str}}, ...]}
    """

    index: int
    time_s: float
    objects: list[FrameObject] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"frame": self.index, "time_s": round(self.time_s, 6), "objects": [
            {"id": o.obj_id, "phrase": o.phrase, "box": None if o.box is None else list(o.box),
             "area": int(o.mask.sum()), "score": None if o.score is None else round(float(o.score), 6),
             "mask": rle_encode(o.mask)} for o in self.objects]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FrameResult":
        return cls(data["frame"], data["time_s"], [
            FrameObject(o["id"], o["phrase"], rle_decode(o["mask"]), o["score"]) for o in data["objects"]])

    def to_prediction(self, size: tuple[int, int]) -> Prediction:
        """As a Prediction whose target ``i`` is object id ``i + 1`` (absent ids: empty targets), so that
        ``apps.overlay.draw_overlay`` gives an object the same colour on every frame."""
        by_id = {o.obj_id: o for o in self.objects}
        targets = []
        for obj_id in range(1, max(by_id, default=0) + 1):
            o = by_id.get(obj_id)
            visible = o is not None and o.mask.any()
            targets.append(Target(phrase=o.phrase if visible else None, box=o.box if visible else None,
                                  mask=o.mask if visible else None, score=o.score if visible else None))
        return Prediction(answer="", targets=targets, image_size=size)


class VideoRun:
    """A video job: iterate it for per-frame results (each iteration runs the tracking again, lazily), or
    ``save`` it. ``objects`` maps object id -> phrase (it grows during iteration in ``reask`` mode)."""

    def __init__(self, reader: VideoReader, frames: Callable[[], Iterator[FrameResult]], *, mode: str,
                 key_frame: int, objects: dict[int, str | None], question: str | None = None,
                 key_prediction: Prediction | None = None, notes: Sequence[str] = ()):
        self.reader, self.info = reader, reader.info
        self._frames = frames
        self.mode, self.key_frame, self.objects = mode, key_frame, objects
        self.question, self.key_prediction, self.notes = question, key_prediction, list(notes)

    def __iter__(self) -> Iterator[FrameResult]:
        return self._frames()

    def save(self, out_dir: str | os.PathLike,
             draw: Callable[[np.ndarray, Prediction], np.ndarray] | None = None) -> dict[str, Path]:
        """Write ``frames.jsonl`` (one line per frame, in frame order) and ``video.json``, and with ``draw``
        also ``overlay.mp4``. -> ``{"frames": ..., "summary": ...}`` (and ``"overlay"``) paths.

        draw: ``draw(rgb, prediction) -> rgb``, called on every frame with :meth:`FrameResult.to_prediction`
        (``apps.overlay.draw_overlay`` fits); without it no overlay video is written (nor listed in
        ``video.json``'s ``files``). Drawing lives with the apps, so the caller passes it in.

        Results are spooled to a temporary file as they come (any order), then one pass writes the outputs
        in frame order under temporary names (decoding the video only to draw); they are renamed into place
        only at the end (``video.json`` last), so an interrupted job leaves no half-written output."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        final = {"frames": out / FRAMES_FILE, "overlay": out / OVERLAY_FILE, "summary": out / SUMMARY_FILE}
        if draw is None:
            del final["overlay"]
        spool_path = temporary_name(out / "spool.jsonl")
        tmp = {k: temporary_name(final[k]) for k in ("frames", "overlay") if k in final}
        n = self.info.num_frames
        offsets = np.full(n, -1, dtype=np.int64)
        try:
            with open(spool_path, "w+b") as spool:
                for fr in self:
                    offsets[fr.index] = spool.tell()
                    spool.write(json.dumps(fr.to_json(), ensure_ascii=False).encode("utf-8") + b"\n")
                missing = np.flatnonzero(offsets < 0)
                if len(missing):
                    raise VideoError(f"no result for {len(missing)} frames (first: {missing[0]})")
                writer = None if draw is None else VideoWriter(tmp["overlay"], self.info.width, self.info.height,
                                                               self.info.fps)
                try:
                    with open(tmp["frames"], "wb") as lines:
                        frames = (((i, None) for i in range(n)) if writer is None else self.reader.frames())
                        for index, rgb in frames:
                            spool.seek(int(offsets[index]))
                            line = spool.readline()
                            lines.write(line)
                            if writer is not None:
                                result = FrameResult.from_json(json.loads(line))
                                writer.write(draw(rgb, result.to_prediction(self.info.size)),
                                             time_s=self.reader.time_s(index))
                        lines.flush()
                        os.fsync(lines.fileno())
                finally:
                    if writer is not None:
                        writer.close()
            for k in tmp:
                os.replace(tmp[k], final[k])
            summary = self.summary()
            if draw is None:
                summary["files"].pop("overlay", None)
            atomic_write_text(final["summary"], json.dumps(summary, ensure_ascii=False, indent=2))
        finally:
            for path in (spool_path, *tmp.values()):
                if path.exists():
                    path.unlink()
        return final

    def summary(self) -> dict[str, Any]:
        info = self.info
        return {"version": 1, "video": info.name, "width": info.width, "height": info.height,
                "num_frames": info.num_frames, "fps": info.fps, "variable_frame_rate": info.variable_frame_rate,
                "question": self.question, "answer": None if self.key_prediction is None else self.key_prediction.answer,
                "key_frame": self.key_frame, "mode": self.mode,
                "objects": [{"id": k, "phrase": v} for k, v in sorted(self.objects.items())],
                "notes": self.notes, "files": {"frames": FRAMES_FILE, "overlay": OVERLAY_FILE}}
