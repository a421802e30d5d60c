"""Mask steps any checkpoint can turn on (each off unless its ``groundseg.json`` names it):

  mask_zoom      each mask decoded again on a crop around its object (segdecoder/zoom.py), for decoders whose
                 input is small next to the image;
  mask_refine    each mask's outline re-decided against the image (segdecoder/refine.py), for decoders whose
                 logit grid is coarse;
  box_clip       an answer's masks cut to their box prompts grown by ``margin`` times the box's sides: a decoder
                 that reads a [SEG] prompt beside a box can spill onto a like-coloured neighbour beyond it;
  clicked_parts  a mask from clicks alone keeps only its parts that hold a positive click: a small decoder's
                 mask can spill onto a like-coloured shape elsewhere (box prompts keep every part: an occluded
                 object can be in pieces inside its box); and background clicks only take pixels away: the mask
                 is cut to the mask of the same prompt without them, grown a little (segdecoder.masks.within_reach).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from grounding.addons.base import AddOn, MaskContext
from grounding.addons.registry import register_addon
from segdecoder import MaskPrediction
from segdecoder.masks import clicked_parts, clip_to_boxes, within_reach
from segdecoder.refine import MASK_REFINERS, refine_masks
from segdecoder.zoom import decode_zoomed


@register_addon
class MaskZoom(AddOn):
    @dataclass
    class Settings:
        context: float = 3.0     # crop side / box side

        def __post_init__(self):
            if not self.context >= 1:
                raise ValueError(f"mask_zoom's context must be >= 1 (crop side / box side), got {self.context!r}")

    name, mask_order = "mask_zoom", 10

    def refine(self, pred: MaskPrediction, ctx: MaskContext) -> MaskPrediction:
        pred, crops = decode_zoomed(ctx.backend, ctx.pixels, pred, self.settings.context, **ctx.prompts)
        ctx.stats["zoom_crops"] = ctx.stats.get("zoom_crops", 0) + crops
        return pred


@register_addon
class MaskRefine(AddOn):
    @dataclass
    class Settings:
        method: str = "grabcut"
        interior: bool = False   # after the outline, re-decide the mask's inside (segdecoder/refine.py)

        def __post_init__(self):
            if self.method not in MASK_REFINERS:
                raise ValueError(f"mask_refine's method must be one of {MASK_REFINERS}, got {self.method!r}")

    name, mask_order = "mask_refine", 20

    def refine(self, pred: MaskPrediction, ctx: MaskContext) -> MaskPrediction:
        pixels = ctx.pixels
        sides = pred.region_sides if pred.region_sides is not None else np.full(len(pred.masks), max(pixels.shape[:2]))
        return dataclasses.replace(pred, masks=refine_masks(pixels, pred.masks, sides, pred.low_res_logits.shape[-1],
                                                            self.settings.interior))


@register_addon
class BoxClip(AddOn):
    @dataclass
    class Settings:
        margin: float = 0.0      # times the box's width / height, on each side

        def __post_init__(self):
            if not self.margin >= 0:
                raise ValueError(f"box_clip's margin must be >= 0, got {self.margin!r}")

    name, mask_order = "box_clip", 30

    def refine(self, pred: MaskPrediction, ctx: MaskContext) -> MaskPrediction:
        boxes = ctx.prompts.get("boxes")
        if ctx.source != "answer" or boxes is None:
            return pred
        return dataclasses.replace(pred, masks=clip_to_boxes(pred.masks, boxes.float().cpu().numpy(),
                                                             self.settings.margin))


@register_addon
class ClickedParts(AddOn):
    name, mask_order = "clicked_parts", 40

    def refine(self, pred: MaskPrediction, ctx: MaskContext) -> MaskPrediction:
        points, labels = ctx.prompts.get("points"), ctx.prompts.get("point_labels")
        if ctx.source != "prompt" or points is None:
            return pred
        pred = _negatives_only_remove(pred, ctx)
        if ctx.prompts.get("boxes") is not None:
            return pred
        masks = np.stack([clicked_parts(m, p.cpu().numpy(), lab.cpu().numpy())
                          for m, p, lab in zip(pred.masks, points, labels)]) if len(pred.masks) else pred.masks
        return dataclasses.replace(pred, masks=masks)


def _negatives_only_remove(pred: MaskPrediction, ctx: MaskContext) -> MaskPrediction:
    """Prompts with background clicks: each mask cut to the reach of the same prompt's mask without them (one more
    decoder call on the cached embedding; a prompt with no positive click and no box is left as it is)."""
    points, labels, boxes = ctx.prompts["points"], ctx.prompts["point_labels"], ctx.prompts.get("boxes")
    if not bool((labels == 0).any()):
        return pred
    masks = pred.masks.copy()
    for i in range(len(masks)):
        keep = labels[i] == 1
        box = None if boxes is None else boxes[i:i + 1]
        if not bool((labels[i] == 0).any()) or (not bool(keep.any()) and box is None):
            continue
        pos = points[i:i + 1, keep] if bool(keep.any()) else None
        pos_labels = labels[i:i + 1, keep] if pos is not None else None
        reference = ctx.backend.decode(ctx.embedding, points=pos, point_labels=pos_labels, boxes=box,
                                       multimask=box is None and int(keep.sum()) == 1,
                                       threshold=ctx.prompts.get("threshold", 0.0)).masks[0]
        if box is None:  # the positive clicks' own parts (a stray part elsewhere is no part of the object)
            reference = clicked_parts(reference, pos[0].cpu().numpy(), pos_labels[0].cpu().numpy())
        masks[i] = within_reach(masks[i], reference)
    return dataclasses.replace(pred, masks=masks)
