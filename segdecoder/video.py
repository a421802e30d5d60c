"""Streaming SAM2 video tracking: prompts on one frame, masks on every frame, bounded memory.

Why not ``sam2.SAM2VideoPredictor`` as it is: its ``init_state`` loads every frame of the video,
resized to ``S x S`` float32 (12 MB per frame at S = 1024: 216 GiB for ten minutes at 30 fps), and
keeps every frame's memory features for the whole session. The model itself only ever reads, for
the frame it is tracking (``SAM2Base._prepare_memory_conditioned_features``):

- the memories of the conditioning frames (where prompts were given: here, one key frame);
- the memories of the ``num_maskmem - 1`` previous frames (previous in the tracking direction,
  every ``memory_temporal_stride_for_eval``-th frame beyond the last one);
- the object pointers of up to ``min(num_frames, max_obj_ptrs_in_encoder) - 1`` previous frames.

So :class:`StreamingSam2Tracker` runs ``SAM2Base.track_step`` on frames pulled one by one (or
``encode_batch`` at a time, the image encoder running on the batch ahead of the per-frame memory
steps) from any iterator, and forgets every memory that no later frame can reach: a window of
``reach`` frames per object (15 with the official configs), plus the same window on the other side
of the key frame while the other direction is still to be tracked (``propagate`` backwards after
forwards reads the first forward frames, as sam2 does). Memory features are stored in bfloat16 on
``storage_device`` (the CPU by default), exactly as ``SAM2VideoPredictor`` stores them, so the
masks equal sam2's own (``tests/test_video.py`` checks it on a clip).

Order of calls (one session per tracker; ``reset`` starts another)::

    tracker = StreamingSam2Tracker.from_backend(backend, encode_batch=4)
    first = tracker.start(key_rgb, key_index, num_frames, [ObjectPrompt(1, mask=m), ObjectPrompt(2, box=b)])
    for tf in tracker.propagate(frames_after_key):            # (index, rgb) with index = key+1, key+2, ...
        ...
    for tf in tracker.propagate(frames_before_key, reverse=True):   # index = key-1, key-2, ..., 0
        ...

Coordinates: points ``(x, y)`` and boxes ``(x1, y1, x2, y2)`` in pixels of the ORIGINAL frame;
masks ``bool H x W`` at the original size. Internally frames are resized to ``S x S`` (aspect not
kept, as ``Sam2Backend.preprocess`` and SAM2 do) and mask logits live at ``S/4 x S/4``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segdecoder.errors import PromptError


@dataclass
class ObjectPrompt:
    """What starts one object's track on the key frame: a mask, or clicks and/or a box.

    obj_id:       the caller's id for the object (any int, unique in the session).
    mask:         ``bool H x W`` at the frame's size (e.g. a [SEG] mask); excludes points and box.
    points:       ``[K, 2]`` pixel ``(x, y)``; point_labels ``[K]``: 1 object, 0 background.
    box:          ``[4]`` pixel ``(x1, y1, x2, y2)``.
    """

    obj_id: int
    mask: np.ndarray | None = None
    points: np.ndarray | Sequence[Sequence[float]] | None = None
    point_labels: np.ndarray | Sequence[int] | None = None
    box: np.ndarray | Sequence[float] | None = None

    def checked(self, size: tuple[int, int]) -> "ObjectPrompt":
        """Validated copy with numpy arrays; ``PromptError`` on bad shapes or values. ``size`` = (H, W)."""
        h, w = size
        has_clicks = self.points is not None and len(self.points) > 0
        if self.mask is not None:
            mask = np.asarray(self.mask).astype(bool)
            if mask.shape != (h, w):
                raise PromptError(f"object {self.obj_id}: mask is {mask.shape}, the frame is {(h, w)}")
            if has_clicks or self.box is not None:
                raise PromptError(f"object {self.obj_id}: give a mask, or points/box, not both")
            return ObjectPrompt(self.obj_id, mask=mask)
        pts = labels = box = None
        if has_clicks:
            pts = np.asarray(self.points, dtype=np.float32).reshape(-1, 2)
            labels = (np.ones(len(pts), np.int32) if self.point_labels is None
                      else np.asarray(self.point_labels, dtype=np.int32).reshape(-1))
            if labels.shape != (len(pts),) or not np.isin(labels, (0, 1)).all():
                raise PromptError(f"object {self.obj_id}: point_labels must be 1 or 0, one per point")
            if not np.isfinite(pts).all() or (pts < 0).any() or (pts[:, 0] > w).any() or (pts[:, 1] > h).any():
                raise PromptError(f"object {self.obj_id}: a point lies outside the {w}x{h} frame")
        if self.box is not None:
            box = np.asarray(self.box, dtype=np.float32).reshape(-1)
            if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
                raise PromptError(f"object {self.obj_id}: a box is (x1, y1, x2, y2) with x2 > x1 and y2 > y1")
            box = np.clip(box, 0, [w, h, w, h]).astype(np.float32)
        if pts is None and box is None:
            raise PromptError(f"object {self.obj_id}: give a mask, points or a box")
        return ObjectPrompt(self.obj_id, points=pts, point_labels=labels, box=box)


@dataclass
class TrackedFrame:
    """One frame's masks for every object of the session, in ``obj_ids`` order.

    masks:          ``bool [N, H, W]`` at the original frame size (logit > 0).
    object_scores:  ``[N]`` probability that the object is visible (sigmoid of SAM2's object score).
    low_res_logits: ``[N, 1, S/4, S/4]`` float32 on the CPU: the mask logits before resizing.
    """

    index: int
    obj_ids: list[int]
    masks: np.ndarray
    object_scores: np.ndarray
    low_res_logits: torch.Tensor


@dataclass
class TrackerStats:
    """Counters that make the memory bound checkable: frames pulled from the iterator, the most frames
    whose pixels or image features were alive at once, and the most memory records held for one object."""

    frames_in: int = 0
    peak_frames_held: int = 0
    peak_memory_frames: int = 0
    memory_frames_now: int = 0
    encoder_calls: int = 0


class StreamingSam2Tracker:
    """SAM2 tracking over a frame stream (see the module docstring).

    model:        a ``sam2.modeling.sam2_base.SAM2Base`` (``Sam2Backend.sam2``), in eval mode.
    preprocess:   uint8 ``H x W x 3`` -> float ``[3, S, S]`` normalised model input.
    encode_batch: frames per image-encoder call; the encoder runs on them before their memory steps.
    storage_device: where memory features live between frames (default: the CPU).
    non_overlap_masks: give each pixel to the highest-scoring object only (``SAM2VideoPredictor``'s option).
    fill_hole_area: fill background holes up to this area (needs sam2's CUDA extension; 0 = off).
    autocast_dtype: run under ``torch.autocast`` in this dtype (e.g. bf16 on a GPU with float32 weights, as
                    sam2's demos do); default: the weights' dtype when it is not float32, else no autocast.
    """

    def __init__(self, model, preprocess: Callable[[np.ndarray], torch.Tensor], *, encode_batch: int = 1,
                 storage_device: torch.device | str = "cpu", non_overlap_masks: bool = False,
                 fill_hole_area: int = 0, autocast_dtype: torch.dtype | None = None):
        if encode_batch < 1:
            raise ValueError(f"encode_batch must be >= 1, got {encode_batch}")
        self.model = model.eval()
        self.preprocess = preprocess
        self.encode_batch = int(encode_batch)
        self.storage_device = torch.device(storage_device)
        self.non_overlap_masks = non_overlap_masks
        self.fill_hole_area = int(fill_hole_area)
        weights = model.no_mem_embed.dtype
        self.autocast_dtype = autocast_dtype or (None if weights == torch.float32 else weights)
        self.reset()

    @classmethod
    def from_backend(cls, backend, **kwargs) -> "StreamingSam2Tracker":
        """From a ``segdecoder.sam2.Sam2Backend`` (``GroundingModel.mask_decoder`` of a SAM2 checkpoint)."""
        if getattr(backend, "backend_name", None) != "sam2":
            raise ValueError("video tracking with memory needs a SAM2 mask decoder; this one is "
                             f"{getattr(backend, 'backend_name', type(backend).__name__)!r}")
        return cls(backend.sam2, lambda rgb: backend.preprocess(rgb)[0], **kwargs)

    def reset(self) -> None:
        """Forget the session: objects, memories, key frame."""
        self._objects: dict[int, dict] = {}      # obj_id -> sam2's {"cond_frame_outputs", "non_cond_frame_outputs"}
        self._key: int | None = None
        self._num_frames = 0
        self._size: tuple[int, int] = (0, 0)
        self._done: set[bool] = set()             # directions already propagated (False fwd, True bwd)
        self._pos_enc = None                      # memory position encoding: the same for every frame
        self.stats = TrackerStats()

    # ---- the window ------------------------------------------------------------------------------------

    @property
    def reach(self) -> int:
        """How many frames back (in the tracking direction) a frame's step can read a memory from."""
        m = self.model
        stride = max(1, int(m.memory_temporal_stride_for_eval))
        mem = (m.num_maskmem - 2) * stride + 1 if m.num_maskmem > 1 else 0
        ptr = min(self._num_frames, m.max_obj_ptrs_in_encoder) - 1 if m.use_obj_ptrs_in_encoder else 0
        return max(1, mem, ptr)

    def _evict(self, frame: int, reverse: bool) -> None:
        """Drop the memories no later step can read: outside ``reach`` of the next frame in this
        direction, and (while the other direction is still to come) outside ``reach`` of the key frame."""
        reach, key = self.reach, self._key
        # the other direction still to come, and with frames to track on that side of the key frame
        other_pending = (not reverse) not in self._done and (key > 0 if not reverse else key < self._num_frames - 1)
        for out in self._objects.values():
            bank = out["non_cond_frame_outputs"]
            for t in list(bank):
                near_front = (t >= frame + 1 - reach) if not reverse else (t <= frame - 1 + reach)
                near_key = other_pending and abs(t - key) <= reach
                if not (near_front or near_key):
                    del bank[t]
        held = max((len(o["non_cond_frame_outputs"]) + len(o["cond_frame_outputs"])
                    for o in self._objects.values()), default=0)
        self.stats.memory_frames_now = held
        self.stats.peak_memory_frames = max(self.stats.peak_memory_frames, held)

    # ---- features ---------------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.model.no_mem_embed.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def _features(self, frames: list[np.ndarray]) -> list[tuple]:
        """Image encoder on a batch -> per frame ``(vision_feats, vision_pos, feat_sizes)`` as sam2 flattens
        them (``[h*w, 1, C]`` sequences, finest level first)."""
        p = self.model.no_mem_embed
        x = torch.stack([self.preprocess(f) for f in frames]).to(p.device, p.dtype)
        with self._autocast():
            out = self.model.forward_image(x)
        self.stats.encoder_calls += 1
        per = []
        for i in range(len(frames)):
            one = {"backbone_fpn": [t[i:i + 1] for t in out["backbone_fpn"]],
                   "vision_pos_enc": [t[i:i + 1] for t in out["vision_pos_enc"]]}
            _, feats, pos, sizes = self.model._prepare_backbone_features(one)
            # sam2's FPN upcasts to float32: hand the heads the weights' dtype back (as Sam2Backend does)
            per.append(([f.to(p.dtype) for f in feats], [q.to(p.dtype) for q in pos], sizes))
        return per

    # ---- the session ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def start(self, frame: np.ndarray, frame_index: int, num_frames: int,
              prompts: Sequence[ObjectPrompt]) -> TrackedFrame:
        """Condition every object on ``frame`` (the key frame, index ``frame_index`` of ``num_frames``);
        returns the key frame's masks. Mirrors ``add_new_mask`` / ``add_new_points_or_box`` followed by
        ``propagate_in_video_preflight`` (memory encoded from the prompt's output, as from clicks)."""
        if self._key is not None:
            raise RuntimeError("this tracker already has a session: call reset() first")
        if not prompts:
            raise PromptError("give at least one object prompt to track")
        if not 0 <= frame_index < num_frames:
            raise PromptError(f"frame {frame_index} is outside the video's {num_frames} frames")
        ids = [p.obj_id for p in prompts]
        if len(set(ids)) != len(ids):
            raise PromptError(f"object ids must be unique, got {ids}")
        self._size = (int(frame.shape[0]), int(frame.shape[1]))
        prompts = [p.checked(self._size) for p in prompts]
        self._key, self._num_frames = int(frame_index), int(num_frames)
        self._hold(1)
        feats, pos, sizes = self._features([frame])[0]
        preds, scores = [], []
        for p in prompts:
            out = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
            with self._autocast():
                step = self.model.track_step(
                    frame_idx=self._key, is_init_cond_frame=True, current_vision_feats=feats,
                    current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=self._point_inputs(p),
                    mask_inputs=self._mask_inputs(p), output_dict=out, num_frames=self._num_frames,
                    track_in_reverse=False, run_mem_encoder=False)
                pred = self._fill(step["pred_masks"])
                # sam2 encodes a prompted frame's memory from its (upsampled) low-res output, "from points"
                high = F.interpolate(pred, size=(self.model.image_size,) * 2, mode="bilinear",
                                     align_corners=False)
                memory, pos_enc = self.model._encode_new_memory(
                    current_vision_feats=feats, feat_sizes=sizes, pred_masks_high_res=high,
                    object_score_logits=step["object_score_logits"], is_mask_from_pts=True)
            out["cond_frame_outputs"][self._key] = self._record(memory, pos_enc, step)
            self._objects[p.obj_id] = out
            preds.append(pred)
            scores.append(step["object_score_logits"])
        self._evict(self._key, reverse=False)
        self._hold(0)
        return self._result(self._key, preds, scores)

    def propagate(self, frames: Iterable[tuple[int, np.ndarray]], reverse: bool = False) -> Iterator[TrackedFrame]:
        """Track every object through ``frames``: ``(index, rgb)`` consecutive from the key frame outwards
        (``key+1, key+2, ...``, or with ``reverse`` ``key-1, key-2, ...``). Lazy: pulls ``encode_batch``
        frames, yields their results, pulls the next ones."""
        if self._key is None:
            raise RuntimeError("call start() before propagate()")
        if reverse in self._done:
            raise RuntimeError(f"this session already propagated {'backwards' if reverse else 'forwards'}")
        self._done.add(reverse)
        expected = self._key - 1 if reverse else self._key + 1
        iterator = iter(frames)
        while True:
            batch = []
            for index, rgb in iterator:
                if index != expected:
                    raise ValueError(f"frames must be consecutive from the key frame {self._key}: "
                                     f"expected frame {expected}, got {index}")
                if rgb.shape[:2] != self._size:
                    raise ValueError(f"frame {index} is {rgb.shape[:2]}, the key frame is {self._size}")
                batch.append((index, rgb))
                self.stats.frames_in += 1
                expected += -1 if reverse else 1
                if len(batch) == self.encode_batch:
                    break
            if not batch:
                return
            self._hold(len(batch))
            indices = [index for index, _ in batch]
            features = self._features([rgb for _, rgb in batch])
            del batch   # pixels are not needed once encoded
            for index, feat in zip(indices, features):
                yield self._track(index, feat, reverse)
            del features

    def _hold(self, n: int) -> None:
        self.stats.peak_frames_held = max(self.stats.peak_frames_held, n)

    @torch.inference_mode()
    def _track(self, index: int, feat: tuple, reverse: bool) -> TrackedFrame:
        feats, pos, sizes = feat
        preds, scores = [], []
        with self._autocast():
            for out in self._objects.values():
                step = self.model.track_step(
                    frame_idx=index, is_init_cond_frame=False, current_vision_feats=feats,
                    current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None, mask_inputs=None,
                    output_dict=out, num_frames=self._num_frames, track_in_reverse=reverse,
                    run_mem_encoder=True)
                out["non_cond_frame_outputs"][index] = self._record(step["maskmem_features"],
                                                                    step["maskmem_pos_enc"], step)
                preds.append(self._fill(step["pred_masks"]))
                scores.append(step["object_score_logits"])
        self._evict(index, reverse)
        return self._result(index, preds, scores)

    # ---- pieces -----------------------------------------------------------------------------------------

    def _point_inputs(self, p: ObjectPrompt) -> dict | None:
        """Box corners (labels 2, 3) then clicks, scaled from pixels to the ``S x S`` input, as sam2 does."""
        if p.mask is not None:
            return None
        xy, labels = [], []
        if p.box is not None:
            xy.append(p.box.reshape(2, 2))
            labels.append(np.array([2, 3], np.int32))
        if p.points is not None:
            xy.append(p.points)
            labels.append(p.point_labels)
        dev = self.model.no_mem_embed.device
        coords = torch.from_numpy(np.concatenate(xy)).float()[None]
        h, w = self._size
        coords = (coords / torch.tensor([w, h], dtype=torch.float32) * self.model.image_size).to(dev)
        return {"point_coords": coords,
                "point_labels": torch.from_numpy(np.concatenate(labels)).to(dev, torch.int32)[None]}

    def _mask_inputs(self, p: ObjectPrompt) -> torch.Tensor | None:
        """``[1, 1, S, S]`` float 0/1: the mask resized (antialiased bilinear, >= 0.5), as ``add_new_mask``."""
        if p.mask is None:
            return None
        side = self.model.image_size
        m = torch.from_numpy(p.mask)[None, None].float().to(self.model.no_mem_embed.device)
        if m.shape[-2:] != (side, side):
            m = F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
            m = (m >= 0.5).float()
        return m

    def _fill(self, pred: torch.Tensor) -> torch.Tensor:
        if self.fill_hole_area <= 0:
            return pred
        from sam2.utils.misc import fill_holes_in_mask_scores
        return fill_holes_in_mask_scores(pred, self.fill_hole_area)

    def _record(self, memory: torch.Tensor | None, pos_enc, step: dict) -> dict:
        """What later steps read of a frame: memory features (bf16, on storage_device, as sam2 stores
        them), their position encoding (one shared copy), the object pointer and object score."""
        if pos_enc is not None and self._pos_enc is None:
            self._pos_enc = [x[0:1].clone() for x in pos_enc]
        return {
            "maskmem_features": None if memory is None else memory.to(torch.bfloat16).to(self.storage_device),
            "maskmem_pos_enc": self._pos_enc,
            "obj_ptr": step["obj_ptr"],
            "object_score_logits": step["object_score_logits"],
        }

    def _result(self, index: int, preds: list[torch.Tensor], scores: list[torch.Tensor]) -> TrackedFrame:
        low = torch.cat(preds, dim=0).float()
        logits = F.interpolate(low, size=self._size, mode="bilinear", align_corners=False)
        if self.non_overlap_masks:
            logits = self.model._apply_non_overlapping_constraints(logits)
        return TrackedFrame(
            index=index, obj_ids=list(self._objects),
            masks=(logits[:, 0] > 0).cpu().numpy(),
            object_scores=torch.cat(scores).float().sigmoid().reshape(-1).cpu().numpy(),
            low_res_logits=low.cpu(),
        )
