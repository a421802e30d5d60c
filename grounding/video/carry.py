"""Carrying objects from frame to frame with the image mask decoder (``reask`` and ``carry`` modes of
``predict_video``): a box predicted from each object's last two masks prompts the decoder on the next frame;
in ``reask`` mode the VLM is asked again every few frames and its targets are linked to the carried objects by
mask IoU (an optimal one-to-one assignment)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from grounding.errors import PromptError
from grounding.result import Target, box_from_mask
from grounding.video.io import VideoReader
from grounding.video.results import FrameObject, FrameResult
from segdecoder import MaskPrediction
from segdecoder.video import ObjectPrompt


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
