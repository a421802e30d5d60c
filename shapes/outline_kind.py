"""What kind of shape a mask is, read from its outline.

The region head reads kinds from the vision tower's features, learnt on the training generator's rendering; on scenes
drawn by other hands it misreads clean outlines (the outlined yellow circle of ``examples/shapes.png`` as a hexagon).
A mask of one whole object says its kind directly, whatever its colours and textures:

  ring       a hole of 15-50% of the area, in a round outline
  star       5 deep notches;  cross  4 deep notches about 90 degrees apart, solidity (area / convex hull area)
             0.70-0.82
  square / rectangle    fills its rotated bounding box (>= 93%); its aspect (< or >= 1.3)
  triangle   fills its smallest enclosing triangle (>= 88%)
  circle / ellipse      matches its fitted ellipse (IoU >= 0.97); that ellipse's aspect (< or >= 1.3)
  diamond    a clean 4-gon, elongated (aspect >= 1.32), filling under 82% of its rotated box
  pentagon / hexagon    a clean 5-gon / 6-gon that fills its rotated box and enclosing triangle as a regular one

"Clean k-gon": k is the fewest sides of a convex polygon around the outline (OpenCV's ``approxPolyN``) that covers
the mask with IoU >= 0.93. A reading is returned only when every test it rests on passes clearly; a partly hidden,
ragged or merged mask gives None, and the head's reading stands.
"""
from __future__ import annotations

import cv2
import numpy as np

MIN_AREA = 30          # pixels: smaller masks have no outline to read
POLYGON_FIT = 0.93     # IoU of the mask with a polygon around it, for a "clean k-gon"
SPUR = 0.01            # parts thinner than about twice this share of the mask's side are opened away
ELONGATED = 1.3        # aspect that tells a rectangle from a square, an ellipse from a circle
READ_SIDE = 400        # a mask is read in a window at most this many pixels on its longer side (shape measures are
                       # ratios; a 12-megapixel mask read whole costs about 0.3 s, in this window a few ms)


def object_window(mask: np.ndarray) -> np.ndarray | None:
    """``mask`` (bool ``H x W``) cut to its tight box with a margin of half the box's longer side (room for the
    ellipse and polygons fitted around it), shrunk (area-averaged, then thresholded at half) so that its longer side
    is at most ``READ_SIDE``; uint8 0/1. None for an empty mask."""
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask, dtype=bool).view(np.uint8))
    if not w:
        return None
    box = mask[y:y + h, x:x + w]
    window = np.pad(box, max(2, max(box.shape) // 2)).astype(np.uint8)
    scale = READ_SIDE / max(window.shape)
    if scale < 1:
        size = (max(1, round(window.shape[1] * scale)), max(1, round(window.shape[0] * scale)))
        window = (cv2.resize(window.astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5).astype(np.uint8)
    return np.ascontiguousarray(window)


def outline_features(mask: np.ndarray) -> dict[str, float] | None:
    """Shape measures of the largest outer outline of ``mask`` (bool ``H x W``), None for a mask too small."""
    m = object_window(mask)
    if m is None:
        return None
    # thin spurs (a refined edge that follows a drawn outline a little way) are not the object's outline
    side = 2 * int(round(SPUR * np.sqrt(max(int(m.sum()), 1)))) + 1
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side)))
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    outer = [i for i in range(len(contours)) if hierarchy[0][i][3] < 0]
    i = max(outer, key=lambda k: cv2.contourArea(contours[k]))
    c = contours[i]
    area = cv2.contourArea(c)
    if area < MIN_AREA or len(c) < 5:
        return None
    holes = sum(cv2.contourArea(contours[k]) for k in range(len(contours)) if hierarchy[0][k][3] == i)
    hull_index = cv2.convexHull(c, returnPoints=False)
    hull = c[hull_index[:, 0]]
    solidity = area / max(cv2.contourArea(hull), 1e-6)
    try:
        defects = cv2.convexityDefects(c, hull_index) if len(hull_index) > 3 else None
    except cv2.error:   # an outline that touches itself: its notches are not read
        defects = None
    defects = np.zeros((0, 4), int) if defects is None else defects.reshape(-1, 4)
    deep = c[defects[defects[:, 3] / 256.0 > 0.12 * np.sqrt(area), 2], 0].astype(float)   # the notches' bottoms
    moments = cv2.moments(c)
    centre = np.array([moments["m10"], moments["m01"]]) / moments["m00"]
    angles = np.sort(np.degrees(np.arctan2(*(deep - centre).T[::-1])) % 360)
    notch_gap = float(np.max(np.diff(np.r_[angles, angles[:1] + 360]))) if len(angles) else 360.0
    _, (rw, rh), _ = cv2.minAreaRect(c)
    triangle_area, _ = cv2.minEnclosingTriangle(c)
    ellipse = cv2.fitEllipse(c)
    filled = np.zeros_like(m)
    cv2.drawContours(filled, [c], -1, 1, -1)
    fitted = np.zeros_like(m)
    cv2.ellipse(fitted, ellipse, 1, -1)
    iou = lambda a, b: float((a & b).sum() / max((a | b).sum(), 1))
    corners = 0   # the fewest sides of a convex polygon around the outline that covers it cleanly
    for sides in range(3, 7):
        drawn = np.zeros_like(m)
        around = hull if len(hull) <= sides else cv2.approxPolyN(hull, sides)
        if np.abs(around).max() > 4 * max(m.shape):   # two sides nearly parallel: no polygon of so few sides
            continue
        cv2.fillPoly(drawn, [around.astype(np.int32)], 1)
        if iou(drawn, filled) >= POLYGON_FIT:
            corners = sides
            break
    return dict(hole=holes / area, solidity=solidity, notches=len(deep), notch_gap=notch_gap,
                rect_fill=area / max(rw * rh, 1e-6), triangle_fill=area / max(triangle_area, 1e-6),
                aspect=max(rw, rh) / max(min(rw, rh), 1e-6),
                ellipse_aspect=max(ellipse[1]) / max(min(ellipse[1]), 1e-6), ellipse_iou=iou(fitted, filled),
                corners=corners)


def outline_kind(mask: np.ndarray | None) -> str | None:
    """The kind (a word of the training vocabulary) that ``mask``'s outline clearly has, else None."""
    f = outline_features(mask) if mask is not None else None
    if f is None:
        return None
    clean = lambda k: f["corners"] == k
    aspect_clear = lambda a: abs(a - ELONGATED) >= 0.15
    if f["hole"] > 0.15:
        return "ring" if f["hole"] < 0.5 and f["ellipse_iou"] > 0.9 else None
    if f["solidity"] < 0.85:
        if f["notches"] == 5 and f["solidity"] < 0.72:
            return "star"
        if f["notches"] == 4 and f["notch_gap"] < 110 and 0.70 < f["solidity"] < 0.82:
            return "cross"
        return None
    if f["rect_fill"] > 0.9:
        if f["rect_fill"] >= 0.93 and aspect_clear(f["aspect"]):
            return "rectangle" if f["aspect"] > ELONGATED else "square"
        return None
    if f["triangle_fill"] > 0.85:
        return "triangle" if f["triangle_fill"] >= 0.88 else None
    if f["ellipse_iou"] > 0.96:
        if f["ellipse_iou"] >= 0.97 and aspect_clear(f["ellipse_aspect"]):
            return "ellipse" if f["ellipse_aspect"] > ELONGATED else "circle"
        return None
    if f["ellipse_aspect"] > 1.25:
        return "diamond" if f["ellipse_aspect"] >= 1.32 and f["rect_fill"] < 0.82 and clean(4) else None
    # a regular hexagon fills 75% of its rotated box and 67% of its enclosing triangle, a pentagon 69% and 58%:
    # a clipped square or pentagon may need six sides but does not fill them so
    if clean(6) and f["rect_fill"] < 0.8 and f["triangle_fill"] > 0.61:
        return "hexagon"
    if clean(5) and f["rect_fill"] < 0.75 and f["triangle_fill"] < 0.61:
        return "pentagon"
    return None
