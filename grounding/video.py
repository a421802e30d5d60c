"""Videos: the VLM answers on a key frame, its targets are carried through every frame.

    run = predict_video(grounder, "clip.mp4", "Please segment the red circle.", key_frame=0)
    run.key_prediction          # the VLM's answer on the key frame (a Prediction)
    for fr in run: ...          # one FrameResult per frame: key frame, forwards to the end, then backwards
    run.save("out/", draw=draw_overlay)   # out/frames.jsonl, out/overlay.mp4, out/video.json, written atomically
                                          # (draw: apps.overlay.draw_overlay; without it, no overlay.mp4)
    for fr in track(grounder, "clip.mp4", 10, points=[[120, 80]]): ...   # click-to-track, no VLM

Two ways to carry targets (``mode``):

- ``"memory"`` (SAM2 checkpoints): each [SEG] mask (or, without [SEG], the answer's box) conditions
  one object of :class:`segdecoder.video.StreamingSam2Tracker` on the key frame, as Sa2VA gives its
  [SEG] masks to SAM2; SAM2's memory carries them, forwards then backwards, frames decoded one by one.
- ``"reask"`` (checkpoints without trained SAM2 memory, e.g. the SAM v1 default model): the image
  mask decoder carries each object from frame to frame, prompted by a box predicted from the
  object's last two masks (constant velocity, ``margin`` added on each side). Every ``every``-th frame
  (counted from the key frame, both ways) the VLM is asked again; its new targets are linked to the
  carried objects by mask IoU (an optimal one-to-one assignment, pairs below ``min_iou`` rejected):
  a linked object takes the VLM's mask (drift is reset), a new target starts a new object, an object
  the VLM has not confirmed for more than ``max_misses`` re-asks in a row is dropped. ``"carry"`` is the same
  without re-asking (click-to-track on such checkpoints).

Coordinates are the project's: masks ``bool H x W`` at the video's size, boxes pixel
``(x1, y1, x2, y2)`` (continuous, from the mask), points pixel ``(x, y)``. Frame ``i`` is the
``i``-th frame in presentation order (see ``grounding.video_io``). Memory held at any time: a few
frames (``encode_batch`` + ``chunk`` backwards), the tracker's window, one mask per object; results
are streamed to disk by ``save``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from grounding.errors import PromptError, VideoError
from grounding.result import Prediction, Target, atomic_write_text, box_from_mask, rle_decode, rle_encode
from grounding.video_io import DEFAULT_MAX_VIDEO_PIXELS, VideoReader, VideoWriter, temporary_name
from segdecoder import MaskPrediction
from segdecoder.video import ObjectPrompt, StreamingSam2Tracker

FRAMES_FILE, OVERLAY_FILE, SUMMARY_FILE = "frames.jsonl", "overlay.mp4", "video.json"
MODES = ("auto", "memory", "reask", "carry")


# ---- results -------------------------------------------------------------------------------------------


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


# ---- entry points ---------------------------------------------------------------------------------------


def predict_video(grounder, video, question: str, key_frame: int = 0, *, mode: str = "auto", every: int = 8,
                  min_iou: float = 0.3, max_misses: int = 2, margin: float = 0.1, encode_batch: int = 4,
                  chunk: int = 16, max_pixels: int = DEFAULT_MAX_VIDEO_PIXELS, strict_frame_rate: bool = False,
                  max_new_tokens: int | None = None) -> VideoRun:
    """Ask ``question`` about frame ``key_frame`` of ``video`` (a file, a folder of frames or a list of
    frames) and carry every target it names through the whole video. The video is opened and checked, and
    the VLM answers, before this returns; tracking runs when the result is iterated or saved.

    mode: ``auto`` (``memory`` with a SAM2 decoder, else ``reask``), ``memory``, ``reask`` or ``carry``;
    every / min_iou / max_misses: re-asking (``reask``); margin: box growth per side when carrying;
    encode_batch: frames per image-encoder call (``memory``); chunk: frames decoded per step backwards."""
    reader = _open(video, max_pixels, strict_frame_rate)
    key_frame = _check_key(reader, key_frame)
    mode = _resolve_mode(grounder, mode, clicks=False)
    key_pixels = reader.read(key_frame)
    prediction = grounder.predict(key_pixels, question, max_new_tokens=max_new_tokens)
    objects = {i + 1: t.phrase for i, t in enumerate(prediction.targets)}
    notes = list(prediction.notes)
    if not objects:
        notes.append("the key frame's answer names no object" + (
            f"; the VLM is asked again every {every} frames" if mode == "reask" and every else ": nothing to track"))
    if mode == "memory":
        prompts = [_target_prompt(i + 1, t, reader.info.size) for i, t in enumerate(prediction.targets)]
        frames = lambda: _memory_frames(grounder, reader, key_frame, prompts, objects, encode_batch, chunk)
    else:
        carry = _Carrier(grounder.steps, margin)
        start = [(t.phrase, _target_mask(carry, key_pixels, t)) for t in prediction.targets]
        reask = _Reasker(grounder, question, every, min_iou, max_misses, max_new_tokens) if mode == "reask" else None
        frames = lambda: _carry_frames(carry, reader, key_frame, start, objects, reask, chunk)
    return VideoRun(reader, frames, mode=mode, key_frame=key_frame, objects=objects, question=question,
                    key_prediction=prediction, notes=notes)


def track(grounder, video, frame_index: int, points: Sequence[Sequence[float]] | None = None,
          point_labels: Sequence[int] | None = None, box: Sequence[float] | None = None, *,
          mode: str = "auto", **kwargs) -> VideoRun:
    """Click-to-track, no language model: clicks (pixel ``(x, y)``, labels 1 object / 0 background) and/or a
    box (pixel ``x1, y1, x2, y2``) on frame ``frame_index`` start one object (id 1), tracked through every
    frame. ``mode``: ``auto`` (``memory`` with SAM2, else ``carry``), ``memory`` or ``carry``. Keyword
    arguments as for :func:`track_objects`."""
    return track_objects(grounder, video, frame_index,
                         [ObjectPrompt(1, points=points, point_labels=point_labels, box=box)], mode=mode, **kwargs)


def track_objects(grounder, video, frame_index: int, prompts: Sequence[ObjectPrompt], *, mode: str = "auto",
                  margin: float = 0.1, encode_batch: int = 4, chunk: int = 16,
                  max_pixels: int = DEFAULT_MAX_VIDEO_PIXELS, strict_frame_rate: bool = False) -> VideoRun:
    """Several objects at once, each an :class:`~segdecoder.video.ObjectPrompt` (mask, clicks or box) on
    frame ``frame_index``. Phrases are ``None``."""
    reader = _open(video, max_pixels, strict_frame_rate)
    frame_index = _check_key(reader, frame_index)
    if not prompts:
        raise PromptError("give at least one object to track")
    mode = _resolve_mode(grounder, mode, clicks=True)
    prompts = [p.checked(reader.info.size) for p in prompts]
    objects: dict[int, str | None] = {p.obj_id: None for p in prompts}
    if mode == "memory":
        frames = lambda: _memory_frames(grounder, reader, frame_index, prompts, objects, encode_batch, chunk)
    else:
        carry = _Carrier(grounder.steps, margin)
        key_pixels = reader.read(frame_index)
        start = [(None, carry.from_prompt(key_pixels, p)) for p in prompts]
        frames = lambda: _carry_frames(carry, reader, frame_index, start, objects, None, chunk, list(objects))
    return VideoRun(reader, frames, mode=mode, key_frame=frame_index, objects=objects)


def _target_prompt(obj_id: int, t: Target, size: tuple[int, int]) -> ObjectPrompt:
    """A [SEG] target starts from its mask (as Sa2VA gives SAM2 its masks); a box-only target from its box."""
    if t.mask is not None:
        return ObjectPrompt(obj_id, mask=t.mask)
    h, w = size
    x1, y1, x2, y2 = np.clip(np.asarray(t.box, dtype=np.float64), 0, [w, h, w, h])
    if x2 - x1 < 1 or y2 - y1 < 1:
        return ObjectPrompt(obj_id, mask=np.zeros(size, bool))
    return ObjectPrompt(obj_id, box=[x1, y1, x2, y2])


def _open(video, max_pixels: int, strict_frame_rate: bool) -> VideoReader:
    return video if isinstance(video, VideoReader) else VideoReader(
        video, max_pixels=max_pixels, strict_frame_rate=strict_frame_rate)


def _check_key(reader: VideoReader, key: int) -> int:
    n = reader.info.num_frames
    if not isinstance(key, (int, np.integer)) or not 0 <= int(key) < n:
        raise PromptError(f"key frame {key!r} does not exist: the video has {n} frames (0..{n - 1})")
    return int(key)


def _resolve_mode(grounder, mode: str, clicks: bool) -> str:
    if mode not in MODES:
        raise PromptError(f"unknown video mode {mode!r}; choose one of {', '.join(MODES)}")
    sam2 = getattr(grounder.model.mask_decoder, "backend_name", None) == "sam2"
    if mode == "auto":
        return "memory" if sam2 else ("carry" if clicks else "reask")
    if mode == "memory" and not sam2:
        raise PromptError("mode 'memory' needs a SAM2 mask decoder; this checkpoint's decoder is "
                          f"{grounder.model.mask_decoder.backend_name!r}: use 'reask' or 'carry'")
    if mode == "reask" and clicks:
        raise PromptError("click-to-track has no question to re-ask: use 'carry' or 'memory'")
    return mode


# ---- memory mode ----------------------------------------------------------------------------------------


def _memory_frames(grounder, reader: VideoReader, key: int, prompts: list[ObjectPrompt],
                   phrases: dict[int, str | None], encode_batch: int, chunk: int) -> Iterator[FrameResult]:
    n = reader.info.num_frames
    if not prompts:   # nothing named: every frame is empty, no model work
        for index in [*range(key, n), *range(key - 1, -1, -1)]:
            yield FrameResult(index, reader.time_s(index))
        return
    tracker = StreamingSam2Tracker.from_backend(grounder.model.mask_decoder, encode_batch=encode_batch)
    forward = reader.frames(key)
    _, key_pixels = next(forward)
    to_result = lambda tf: FrameResult(tf.index, reader.time_s(tf.index), [
        FrameObject(i, phrases.get(i), m, float(s)) for i, m, s in zip(tf.obj_ids, tf.masks, tf.object_scores)])
    yield to_result(tracker.start(key_pixels, key, n, prompts))
    del key_pixels
    for tf in tracker.propagate(forward):
        yield to_result(tf)
    for tf in tracker.propagate(reader.frames_reversed(0, key, chunk), reverse=True):
        yield to_result(tf)


# ---- carry / reask modes --------------------------------------------------------------------------------


@dataclass
class _Carried:
    """One object in carry mode: its mask on the last frame, the box before that (for velocity), the last
    non-empty mask (for linking after a loss) and how many re-asks in a row did not confirm it."""
    obj_id: int
    phrase: str | None
    mask: np.ndarray
    previous_box: tuple | None = None
    last_seen: np.ndarray | None = None
    misses: int = 0
    score: float | None = None


class _Carrier:
    """The image mask decoder as a frame-to-frame tracker (no memory); each mask goes through the grounder's mask
    steps (``AnswerSteps.decode``: e.g. the ``mask_zoom`` and ``mask_refine`` add-ons), as in ``Grounder``."""

    def __init__(self, steps, margin: float):
        self.steps, self.margin = steps, margin
        self.decoder, self.device = steps.model.mask_decoder, steps.device

    def embed(self, rgb: np.ndarray):
        return self.decoder.encode([rgb])[0].to(self.device)

    def decode(self, embedding, rgb: np.ndarray, **prompts) -> MaskPrediction:
        return self.steps.decode(rgb, embedding, "video", **prompts)

    def from_prompt(self, rgb: np.ndarray, p: ObjectPrompt) -> np.ndarray:
        """The key frame's mask of a click/box prompt (one click: best of 3, as ``Grounder.segment``)."""
        if p.mask is not None:
            return p.mask
        t = lambda a, dt=torch.float32: None if a is None else torch.as_tensor(a, dtype=dt, device=self.device)[None]
        one_click = p.points is not None and len(p.points) == 1 and p.box is None
        pred = self.decode(self.embed(rgb), rgb, points=t(p.points), point_labels=t(p.point_labels, torch.int32),
                           boxes=t(p.box), multimask=one_click)
        return pred.masks[0]

    def predicted_box(self, o: _Carried, size: tuple[int, int]) -> np.ndarray | None:
        """The last box moved by the last step's motion (constant velocity), grown by ``margin`` per side."""
        box = box_from_mask(o.mask)
        if box is None:
            return None
        b = np.asarray(box, dtype=np.float64)
        if o.previous_box is not None:
            p = np.asarray(o.previous_box)
            b = b + np.tile(((b[:2] + b[2:]) - (p[:2] + p[2:])) / 2, 2)
        grow = self.margin * np.array([-(b[2] - b[0]), -(b[3] - b[1]), b[2] - b[0], b[3] - b[1]])
        h, w = size
        b = np.clip(b + grow, 0, [w, h, w, h])
        if b[2] - b[0] < 1 or b[3] - b[1] < 1:
            return None
        return b

    def step(self, embedding, rgb: np.ndarray, objects: list[_Carried]) -> None:
        """Move every visible object to the frame ``rgb`` (its decoder ``embedding``), in place."""
        boxes, moving = [], []
        for o in objects:
            box = self.predicted_box(o, rgb.shape[:2])
            if box is not None:
                boxes.append(box)
                moving.append(o)
        if moving:
            pred = self.decode(embedding, rgb, boxes=torch.as_tensor(np.stack(boxes), dtype=torch.float32,
                                                                     device=self.device))
        for o in objects:
            o.previous_box = box_from_mask(o.mask)
            o.score = None   # lost objects (empty mask) are not carried, and get no score
        for i, o in enumerate(moving):
            o.mask, o.score = pred.masks[i], float(pred.scores[i])
            if o.mask.any():
                o.last_seen = o.mask


class _Reasker:
    """Re-asks the VLM every ``every`` frames and links its targets to the carried objects by IoU."""

    def __init__(self, grounder, question: str, every: int, min_iou: float, max_misses: int,
                 max_new_tokens: int | None):
        if every < 0:
            raise PromptError(f"every must be >= 0 (0 = never re-ask), got {every}")
        self.grounder, self.question, self.every = grounder, question, every
        self.min_iou, self.max_misses, self.max_new_tokens = min_iou, max_misses, max_new_tokens

    def due(self, distance: int) -> bool:
        return self.every > 0 and distance % self.every == 0

    def ask(self, rgb: np.ndarray, carrier: _Carrier) -> tuple[list[tuple[str | None, np.ndarray]], Any]:
        """The VLM's targets on this frame as (phrase, mask), and the frame's (cached) decoder embedding."""
        prediction = self.grounder.predict(rgb, self.question, max_new_tokens=self.max_new_tokens)
        embedding = self.grounder.prepare([rgb])[0].embedding.to(carrier.device)
        return [(t.phrase, _target_mask(carrier, rgb, t, embedding)) for t in prediction.targets], embedding

    def link(self, objects: list[_Carried], found: list[tuple[str | None, np.ndarray]],
             new_id: Callable[[str | None], int]) -> list[_Carried]:
        """Objects after a re-ask: linked ones take the VLM's mask, new targets are added, objects not
        confirmed ``max_misses`` times in a row are dropped."""
        reference = [o.last_seen if o.last_seen is not None else o.mask for o in objects]
        pairs = match_by_iou(mask_iou_matrix(reference, [m for _, m in found]), self.min_iou)
        matched_objects, matched_found = {i for i, _ in pairs}, {j for _, j in pairs}
        for i, j in pairs:
            o = objects[i]
            o.mask, o.misses, o.score = found[j][1], 0, None
            if o.mask.any():
                o.last_seen = o.mask
        kept = []
        for i, o in enumerate(objects):
            if i not in matched_objects:
                o.misses += 1
            if o.misses <= self.max_misses:
                kept.append(o)
        for j, (phrase, mask) in enumerate(found):
            if j not in matched_found and mask.any():
                kept.append(_Carried(new_id(phrase), phrase, mask, last_seen=mask))
        return kept


def _target_mask(carrier: _Carrier, rgb: np.ndarray, t: Target, embedding=None) -> np.ndarray:
    """A target's mask; a target with a box but no [SEG] gets the decoder's mask for its box."""
    if t.mask is not None:
        return t.mask
    if embedding is None:
        embedding = carrier.embed(rgb)
    h, w = rgb.shape[:2]
    box = np.clip(np.asarray(t.box, dtype=np.float32), 0, [w, h, w, h])
    if box[2] <= box[0] or box[3] <= box[1]:
        return np.zeros((h, w), bool)
    return carrier.decode(embedding, rgb, boxes=torch.as_tensor(box[None], device=carrier.device)).masks[0]


def _carry_frames(carrier: _Carrier, reader: VideoReader, key: int, start: list[tuple[str | None, np.ndarray]],
                  phrases: dict[int, str | None], reask: _Reasker | None, chunk: int,
                  ids: list[int] | None = None) -> Iterator[FrameResult]:
    """Key frame, then forwards, then backwards from the key frame again; new objects get fresh ids."""
    ids = ids or list(range(1, len(start) + 1))
    for stale in [k for k in phrases if k not in ids]:   # objects found by an earlier iteration
        del phrases[stale]

    def new_id(phrase):
        i = max(phrases, default=0) + 1
        phrases[i] = phrase
        return i

    def initial():
        return [_Carried(i, phrase, mask, last_seen=mask if mask.any() else None)
                for i, (phrase, mask) in zip(ids, start)]

    def result(index, objects):
        return FrameResult(index, reader.time_s(index), [FrameObject(o.obj_id, o.phrase, o.mask, o.score)
                                                          for o in objects])

    yield result(key, initial())
    for frames in (reader.frames(key + 1), reader.frames_reversed(0, key, chunk)):
        objects = initial()
        for index, rgb in frames:
            if reask is not None and reask.due(abs(index - key)):
                found, embedding = reask.ask(rgb, carrier)
                carrier.step(embedding, rgb, objects)
                objects = reask.link(objects, found, new_id)
            elif any(o.mask.any() for o in objects):
                carrier.step(carrier.embed(rgb), rgb, objects)
            else:   # nothing visible to carry: no encoder call
                for o in objects:
                    o.score = None
            yield result(index, objects)


# ---- linking --------------------------------------------------------------------------------------------


def mask_iou_matrix(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """``[len(a), len(b)]`` IoU of bool ``H x W`` masks (0 when both are empty)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    fa = np.stack([m.reshape(-1) for m in a]).astype(np.float32)
    fb = np.stack([m.reshape(-1) for m in b]).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def match_by_iou(iou: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """The one-to-one assignment of rows to columns with the largest total IoU (Hungarian method, scipy),
    keeping pairs with IoU >= ``min_iou``; sorted by row."""
    from scipy.optimize import linear_sum_assignment

    iou = np.asarray(iou, dtype=np.float64)
    if iou.size == 0:
        return []
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return sorted((int(i), int(j)) for i, j in zip(rows, cols) if iou[i, j] >= min_iou)
