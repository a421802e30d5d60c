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
``i``-th frame in presentation order (see ``grounding.video.io``). Memory held at any time: a few
frames (``encode_batch`` + ``chunk`` backwards), the tracker's window, one mask per object; results
are streamed to disk by ``save``.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from grounding.errors import PromptError
from grounding.result import Target
from grounding.video.carry import _Carrier, _carry_frames, _Reasker, _target_mask
from grounding.video.io import DEFAULT_MAX_VIDEO_PIXELS, VideoReader
from grounding.video.results import FrameObject, FrameResult, VideoRun
from segdecoder.video import ObjectPrompt, StreamingSam2Tracker

MODES = ("auto", "memory", "reask", "carry")


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
