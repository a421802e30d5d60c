"""Edge refinement of decoded masks: OpenCV's GrabCut re-decides the pixels of a band around each mask's outline.

A SAM-style decoder predicts logits on a grid of ``S/4`` cells over the square it read (64 for SAM ``tiny``'s 256-px
input, 256 for the official 1024-px models) and upsamples them bilinearly, so an outline is only placed to about one
cell: corners come back rounded and straight edges wander. GrabCut fits colour models (Gaussian mixtures) of the
object and its surroundings and cuts along image edges. It is given a trimap built from the decoded mask: pixels
further than ``band`` inside the outline are object, further than ``band`` outside are background, and only the band
between is re-decided, so the refinement can move the outline by at most ``band`` pixels and cannot add or drop an
object. The band is 1.5 cells of the grid the mask was decoded on (``band_pixels``).

It pays where the decoder's grid is coarse next to the object and objects differ from their surroundings in colour,
as with SAM ``tiny`` on the default model's synthetic scenes (measured in weights/shapes-tiny/MODEL_CARD.md). It
is the ``mask_refine`` add-on (grounding/addons/masks.py), off unless a model's ``groundseg.json`` names it: it is
not measured with the official SAM / SAM2 checkpoints, whose 4-px cells on real photos leave little to gain and
whose camouflaged or low-contrast objects give colour models little to hold.
"""
from __future__ import annotations

import cv2
import numpy as np

MASK_REFINERS = ("grabcut",)

# GrabCut runs on at most this many pixels a side (the window is shrunk first): its cost grows with the pixels
# it reads, and the band is what matters, not the object's interior.
_MAX_SIDE = 384
_ITERATIONS = 3
_BAND_CELLS = 1.5
# GrabCut fits two 5-component Gaussian mixtures in colour (50 numbers each): a mask whose core, the band taken off,
# holds fewer pixels than this (3 per number) is kept as decoded (on the default model's 64 x 96 test clips such
# cuts lost 11-px shapes)
_MIN_CORE_PIXELS = 150
# the colour models must put this share of the known pixels on the right side (_colours_separate)
_MIN_SEPARATION = 0.9


def band_pixels(region_side: float, grid: int) -> int:
    """Band half-width in pixels for a mask decoded from a region ``region_side`` pixels across (its longest
    side) on a ``grid`` x ``grid`` logit grid: 1.5 grid cells, at least 2 pixels."""
    return max(2, int(round(_BAND_CELLS * region_side / grid)))


def refine_mask(pixels: np.ndarray, mask: np.ndarray, band: int) -> np.ndarray:
    """GrabCut on the ``band``-pixel strip either side of ``mask``'s outline.

    ``pixels``: uint8 ``H x W x 3`` RGB; ``mask``: bool ``H x W``. Returns a new bool ``H x W`` mask that equals
    ``mask`` outside the strip. A mask whose core (the strip taken off) is under ``_MIN_CORE_PIXELS``, or that leaves
    no surroundings, is returned unchanged.
    """
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return mask
    H, W = mask.shape
    # the window: the mask's box, grown by the band and by half the box side, which gives GrabCut's background
    # model a ring of surroundings
    pad = 2 * band + max(xs.max() - xs.min(), ys.max() - ys.min()) // 2
    left, top = max(0, xs.min() - pad), max(0, ys.min() - pad)
    right, bottom = min(W, xs.max() + 1 + pad), min(H, ys.max() + 1 + pad)
    sub = mask[top:bottom, left:right].astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    inner = cv2.erode(sub, kernel, borderType=cv2.BORDER_REPLICATE).astype(bool)
    outer = cv2.dilate(sub, kernel).astype(bool)
    if inner.sum() < _MIN_CORE_PIXELS or outer.all():
        return mask
    image = np.ascontiguousarray(pixels[top:bottom, left:right, ::-1])   # OpenCV's BGR
    scale = min(1.0, _MAX_SIDE / max(sub.shape))
    small = lambda a, interp: a if scale == 1.0 else cv2.resize(
        a, (max(1, round(a.shape[1] * scale)), max(1, round(a.shape[0] * scale))), interpolation=interp)
    trimap = np.full(sub.shape, cv2.GC_BGD, np.uint8)
    trimap[outer] = cv2.GC_PR_BGD
    trimap[sub.astype(bool)] = cv2.GC_PR_FGD
    trimap[inner] = cv2.GC_FGD
    trimap = small(trimap, cv2.INTER_NEAREST)
    if not (trimap == cv2.GC_FGD).any() or not (trimap == cv2.GC_BGD).any():
        return mask   # too small once shrunk, or no surroundings to learn the background from
    image = small(image, cv2.INTER_AREA)
    core, far = trimap == cv2.GC_FGD, trimap == cv2.GC_BGD
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(image, trimap, None, background, foreground, _ITERATIONS, cv2.GC_INIT_WITH_MASK)
    if not _colours_separate(image, core, far, foreground, background):
        return mask
    cut = ((trimap == cv2.GC_FGD) | (trimap == cv2.GC_PR_FGD)).astype(np.uint8)
    if scale != 1.0:
        cut = cv2.resize(cut, (sub.shape[1], sub.shape[0]), interpolation=cv2.INTER_LINEAR)
    out = mask.copy()
    # the strip takes GrabCut's answer; the object's core and the far surroundings stay as decoded
    out[top:bottom, left:right] = inner | (outer & cut.astype(bool))
    return out


def _gmm_log_likelihood(model: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Log-likelihood of ``colours`` ``[P, 3]`` under one of GrabCut's fitted colour models: OpenCV stores a
    5-component Gaussian mixture as 65 numbers, the 5 weights, then the 5 means (3 each), then the 5 covariances
    (3 x 3 each, row-major)."""
    k = 5
    weights, means, covs = model[0, :k], model[0, k:4 * k].reshape(k, 3), model[0, 4 * k:].reshape(k, 3, 3)
    out = np.full(len(colours), -np.inf)
    for w, mu, cov in zip(weights, means, covs):
        if w <= 0:
            continue
        cov = cov + 1e-2 * np.eye(3)   # as OpenCV regularises a singular covariance
        d = colours - mu
        maha = np.einsum("pi,ij,pj->p", d, np.linalg.inv(cov), d)
        out = np.logaddexp(out, np.log(w) - 0.5 * (maha + np.log(np.linalg.det(cov)) + 3 * np.log(2 * np.pi)))
    return out


def _colours_separate(image: np.ndarray, core: np.ndarray, far: np.ndarray, foreground: np.ndarray,
                      background: np.ndarray) -> bool:
    """Whether GrabCut's fitted colour models tell the mask's core (``core``) from its far surroundings (``far``):
    the mean of the two shares of pixels the models put on the right side must reach ``_MIN_SEPARATION``. When
    they do not (an object the colour of what is around it: a grey image, camouflage), the cut follows the
    shortest outline rather than the object, and the decoded mask is kept."""
    colours = image.reshape(-1, 3).astype(np.float64)
    fg_wins = _gmm_log_likelihood(foreground, colours) > _gmm_log_likelihood(background, colours)
    return (fg_wins[core.ravel()].mean() + (~fg_wins[far.ravel()]).mean()) / 2 >= _MIN_SEPARATION


def refine_masks(pixels: np.ndarray, masks: np.ndarray, region_sides: np.ndarray, grid: int) -> np.ndarray:
    """``refine_mask`` on each of ``masks`` (bool ``[N, H, W]``), mask ``i`` decoded from a region
    ``region_sides[i]`` pixels across on a ``grid``-cell logit grid. Returns a new ``[N, H, W]`` array."""
    return np.stack([refine_mask(pixels, m, band_pixels(s, grid)) for m, s in zip(masks, region_sides)]) \
        if len(masks) else masks.copy()


__all__ = ["MASK_REFINERS", "band_pixels", "refine_mask", "refine_masks"]
