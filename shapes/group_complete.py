"""An "all ..." answer also gets the objects the locator never reached.

``GroupCount`` (shapes/group_count.py) keeps an answer going while the locator's next candidate is another object that
the phrase names. The locator's distinct candidates run out after three or four objects. On scenes unlike its
training (grey ones) they wander off sooner: a box between two objects, or the same object again. And an answer of
256 tokens holds about nine objects. The ``group_complete`` add-on runs after ``region`` has dropped such repeats and
looks for the rest among the mask decoder's object proposals (shapes/object_proposals.py). A proposal that no target
covers yet (its box overlaps none by more than ``GroupCount.overlap`` IoU and holds no target's centre) is decoded
again from its box with the model's mask steps. It joins the group, after the group's last target, when that mask:
- is one object: its tight box fits the box it was decoded from by IoU ``REPEAT_BOX_FIT`` (the proposal's, or once
  more its own: a proposal from a coarse mask can be loose), and no more than ``REPEAT_MASK_SHARE`` of it lies on
  the answer's masks;
- has the named colour by the region head's reading of its box (at ``GroupCount.confidence``), and a clear outline
  (``outline_kind``) of the named kind; where no kind is named, a clear outline of any kind, or, on a mask not much
  smaller than the group's others, a solid outline (``solid``) or the head's reading of some kind (``has_names``).
"""
from __future__ import annotations

import cv2
import numpy as np

from grounding.text.boxes import box_iou
from shapes.group_count import GroupCount, new_object
from shapes.object_proposals import object_proposals
from shapes.outline_kind import outline_features, outline_kind
from shapes.region_head import region_box
from shapes.region_verify import (ARTICLES, KINDLESS, QUANTIFIERS, REPEAT_BOX_FIT, REPEAT_MASK_SHARE, plain_names,
                                  share_on, sureness)
from shapes.silhouette_kind import sure_of

MIN_SOLIDITY = 0.9      # area / convex hull area of a solid object added without a clear outline
MIN_AREA_SHARE = 0.25   # of the mean mask area of the group's targets, for an object added without a clear outline
NOTE = ("target {number} ({phrase!r}) added: an object the answer left out, found among the mask decoder's object "
        "proposals, its outline and colour as the phrase names")


def group_names(phrase: str, vocab) -> tuple[list[str], list[str]] | None:
    """(colours, kinds) each object of a group phrase has: "all red shapes" -> (["red"], []), "the pentagons" ->
    ([], ["pentagon"]), "all shapes" / "every object" -> ([], []); None for a phrase that names one object ("the red
    square") or has other words ("all small shapes")."""
    words = phrase.lower().split()
    quantified = bool(words) and words[0] in QUANTIFIERS
    rest = [w for w in words if w not in QUANTIFIERS and w not in ARTICLES]
    if rest and all(w in KINDLESS for w in rest):
        return ([], []) if quantified or rest[-1].endswith("s") else None
    names = plain_names(phrase, vocab)
    plural = bool(rest) and rest[-1] in vocab.kind_words() and rest[-1] not in vocab.kinds
    return names if names is not None and (quantified or plural or rest[-1] in ("shapes", "objects")) else None


def has_names(model, region, keys, image, box: list[float], mask: np.ndarray, names: tuple[list[str], list[str]],
              group_area: float) -> bool:
    """Whether the object in ``box`` (its ``mask``) has the named colours (the region head's reading, at
    ``GroupCount.confidence``) and kind (a clear outline of it, ``outline_kind``: the head misreads kinds on grey
    scenes; or the ``silhouette`` network's sure reading of it, ``sure_of``). Where no kind is named, a clear
    outline of any kind will do, or else, on a mask of at least ``MIN_AREA_SHARE`` of ``group_area`` (a speck of
    background texture can read as a colour and a kind), a solid outline or the head's reading of some kind."""
    colours, kinds = names
    read = outline_kind(mask)
    if read is None and kinds and sure_of(model, mask, kinds[0]):
        read = kinds[0]
    if kinds and read != kinds[0]:
        return False
    square = region_box(image.size, box).to(keys.device, keys.dtype)
    if colours and sureness(region, keys, square, colours, []) < GroupCount.confidence:
        return False
    if read is not None:
        return True
    if mask.sum() < MIN_AREA_SHARE * group_area:
        return False
    return solid(mask) or float(region.probabilities(keys, square)["kind"].max()) >= GroupCount.confidence


def solid(mask: np.ndarray) -> bool:
    """Whether the largest outline of the bool ``H x W`` ``mask`` is solid: it fills at least ``MIN_SOLIDITY`` of its
    convex hull, as a convex object's mask does even where its outline is too rounded or ragged to read a kind from
    (a grey object on a ground of about its brightness). A mask that follows background texture is not."""
    features = outline_features(mask)
    return features is not None and features["solidity"] >= MIN_SOLIDITY


def more_of_group(model, region, image, prediction, phrase: str, names, limit: int) -> list[tuple]:
    """Up to ``limit`` objects of ``phrase`` the answer's targets do not cover: (pixel xyxy box, bool ``H x W``
    mask, score) each, best proposal first."""
    keys = model.addons["locator"].read_image(model, [image])[0].keys
    boxes = [list(t.box) for t in prediction.targets if t.box is not None]
    masks = [t.mask for t in prediction.targets if t.mask is not None]
    group_area = float(np.mean([t.mask.sum() for t in prediction.targets if t.phrase == phrase and t.mask is not None]
                               or [0.0]))
    found = []
    if "group_complete" not in image.extras:   # the image's next "all ..." question reads them again
        image.extras["group_complete"] = object_proposals(model.mask_decoder, image.pixels, image.embedding)
    for proposal in image.extras["group_complete"]:
        if len(found) == limit:
            break
        if not new_object(proposal.box, boxes):
            continue
        marked, own = settled(model, region, image, proposal.box)
        if marked is None or not new_object(own, boxes):
            continue
        mask = marked.masks[0]
        if share_on(mask, masks) > REPEAT_MASK_SHARE:
            continue
        if has_names(model, region, keys, image, own, mask, names, group_area):
            found.append((own, mask, float(marked.scores[0])))
            boxes.append(own)
            masks.append(mask)
    return found


def settled(model, region, image, box: list[float]) -> tuple:
    """The mask ``box`` gets with the model's mask steps (a ``MaskPrediction``) and that mask's tight box, where the
    mask is one object's: its box fits ``box`` by IoU ``REPEAT_BOX_FIT``, or (a proposal's box from a coarse mask
    can be loose) decoding again from its box gives a mask whose box fits that one; (None, None) otherwise."""
    for _ in range(2):
        marked = region.marked(model, image, box=box)
        own = object_box(marked.masks[0])
        if own is None:
            return None, None
        if box_iou(own, box) >= REPEAT_BOX_FIT:
            return marked, own
        box = own
    return None, None


def object_box(mask: np.ndarray) -> list[float] | None:
    """Pixel xyxy box of the largest 8-connected part of a bool ``H x W`` mask (a few stray pixels of the mask
    steps do not widen it); None for an empty mask."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count < 2:
        return None
    x, y, w, h = stats[1 + int(stats[1:, cv2.CC_STAT_AREA].argmax()), :4]
    return [float(x), float(y), float(x + w), float(y + h)]
