"""Drawing a :class:`~grounding.result.Prediction` over its image, and saving images.

All arrays here are RGB ``uint8`` ``H x W x 3``. OpenCV's drawing functions do not care about
channel order (they write the three numbers they are given), so colours are passed as RGB and
no conversion happens until :func:`save_image`, where ``cv2.imencode`` expects BGR.

Coordinates follow the project conventions: boxes are float pixel ``(x1, y1, x2, y2)`` with
``x2``/``y2`` exclusive (continuous coordinates), points are pixel ``(x, y)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from grounding.errors import ImageError, PromptError
from grounding.result import Prediction, Target, atomic_write_bytes

# Distinct, saturated colours that stay readable under a white or black label text. Target ``i``
# gets ``PALETTE[i % len(PALETTE)]`` here and in the web app's coloured phrases.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (240, 60, 60),    # red
    (40, 150, 250),   # blue
    (60, 190, 75),    # green
    (250, 160, 20),   # orange
    (160, 80, 240),   # violet
    (20, 200, 200),   # cyan
    (245, 90, 190),   # pink
    (170, 210, 20),   # lime
    (150, 95, 50),    # brown
    (0, 120, 130),    # teal
    (250, 215, 50),   # yellow
    (95, 95, 245),    # indigo
)

POSITIVE_POINT_COLOUR = (0, 220, 0)
NEGATIVE_POINT_COLOUR = (230, 0, 0)
PROMPT_BOX_COLOUR = (255, 255, 255)
OUTLINE_COLOUR = (0, 0, 0)

_FONT = cv2.FONT_HERSHEY_SIMPLEX
# OpenCV 5's putText draws Unicode with its embedded fonts; 4.x's Hershey fonts are ASCII-only
# and turn other characters into garbage, so there we write '?' for them instead.
_UNICODE_TEXT = int(cv2.__version__.split(".")[0]) >= 5
_JPEG_QUALITY = 95


def target_colour(index: int) -> tuple[int, int, int]:
    """RGB colour of target ``index`` (cycles through :data:`PALETTE`)."""
    return PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class _Style:
    """Line widths and text size for one image, so drawings look alike at any resolution."""

    line: int
    font_scale: float
    text_thickness: int
    marker: int

    @classmethod
    def for_size(cls, height: int, width: int) -> "_Style":
        side = max(height, width)
        # ~1 px lines on thumbnails, ~10 px on 4000 px photos; text about 2% of the long side
        # (Hershey simplex is ~22 px tall at scale 1) but never below ~7 px.
        font_scale = max(0.3, side / 1100)
        return cls(
            line=max(1, round(side / 400)),
            font_scale=font_scale,
            text_thickness=max(1, round(font_scale * 1.4)),
            marker=max(7, round(side / 40)),
        )


def draw_overlay(
    image: np.ndarray,
    prediction: Prediction,
    alpha: float = 0.55,
    *,
    points: np.ndarray | Sequence[Sequence[float]] | None = None,
    point_labels: np.ndarray | Sequence[int] | None = None,
    boxes: np.ndarray | Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """Draw ``prediction``'s targets (and optional visual prompts) over ``image``.

    Each target ``i`` in :func:`target_colour` ``(i)``: its mask blended in with weight
    ``alpha`` plus the mask's outline, its box, and its phrase in a filled label above the box.
    Pixels far from every target and prompt keep their values.

    Args:
        image: RGB ``uint8`` ``H x W x 3``, the image the prediction is about.
        prediction: its ``image_size`` must be ``(H, W)``.
        alpha: mask opacity in ``[0, 1]``.
        points: ``N x 2`` clicked pixel ``(x, y)``; drawn as a green ``+`` (label 1) or red ``-``
            (label 0).
        point_labels: ``N`` labels 1/0; all 1 when omitted.
        boxes: ``M x 4`` prompt boxes ``(x1, y1, x2, y2)``, drawn white with a black outline.

    Returns:
        A new RGB ``uint8`` ``H x W x 3`` array.
    """
    canvas = _checked_canvas(image, prediction)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    style = _Style.for_size(*canvas.shape[:2])
    targets = prediction.targets
    # Masks first, then boxes, then labels: a later target's fill never hides an earlier label.
    for index, target in enumerate(targets):
        if target.mask is not None:
            _draw_mask(canvas, target.mask, target_colour(index), alpha, style)
    for index, target in enumerate(targets):
        if target.box is not None:
            _draw_box(canvas, target.box, target_colour(index), style.line)
    for index, target in enumerate(targets):
        _draw_label(canvas, target, target_colour(index), style)
    if boxes is not None:
        for box in _as_prompt_boxes(boxes):
            _draw_box(canvas, tuple(box), OUTLINE_COLOUR, style.line + 2)
            _draw_box(canvas, tuple(box), PROMPT_BOX_COLOUR, style.line)
    if points is not None:
        xy, labels = _as_points(points, point_labels)
        for (x, y), label in zip(xy, labels):
            _draw_point(canvas, x, y, bool(label), style)
    return canvas


def save_image(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB ``uint8`` image (``H x W x 3``, or ``H x W`` gray) as PNG or JPEG, chosen by
    the extension (``.png``, ``.jpg``, ``.jpeg``). Atomic; creates parent folders."""
    target = Path(path)
    extension = target.suffix.lower()
    if extension not in (".png", ".jpg", ".jpeg"):
        raise ImageError(f"cannot save {target}: use a .png, .jpg or .jpeg file name")
    array = np.asarray(rgb)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"save_image takes uint8 H x W x 3 RGB or H x W gray, got {array.dtype} {array.shape}")
    if array.ndim == 3:
        array = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if extension != ".png" else []
    ok, encoded = cv2.imencode(extension, array, params)
    if not ok:
        raise ImageError(f"OpenCV could not encode {target}")
    return atomic_write_bytes(target, encoded.tobytes())


# --------------------------------------------------------------------------- drawing steps


def _checked_canvas(image: np.ndarray, prediction: Prediction) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"draw_overlay takes an RGB uint8 H x W x 3 image, got {array.dtype} {array.shape}")
    if tuple(array.shape[:2]) != tuple(prediction.image_size):
        raise ValueError(
            f"the image is {array.shape[0]}x{array.shape[1]} (H x W) but the prediction is for "
            f"{prediction.image_size[0]}x{prediction.image_size[1]}"
        )
    return np.array(array, order="C", copy=True)  # cv2 draws in place on contiguous memory


def _draw_mask(canvas: np.ndarray, mask: np.ndarray, colour, alpha: float, style: _Style) -> None:
    inside = mask.astype(bool)
    region = canvas[inside].astype(np.float32)
    canvas[inside] = np.rint((1.0 - alpha) * region + alpha * np.asarray(colour, np.float32)).astype(np.uint8)
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # A dark halo under the coloured line: the outline shows on an object of the mask's own colour too.
    cv2.drawContours(canvas, contours, -1, OUTLINE_COLOUR, style.line + 2, cv2.LINE_AA)
    cv2.drawContours(canvas, contours, -1, colour, style.line, cv2.LINE_AA)


def contrasting_colour(pixels: np.ndarray, mask: np.ndarray, taken: Sequence[int] = (), alpha: float = 0.6) -> int:
    """Index into :data:`PALETTE` of the colour that, blended over the mean colour of ``pixels`` (RGB
    ``H x W x 3``) under the bool ``mask`` with weight ``alpha``, moves it farthest *and* stays vivid (RGB
    distance times the blend's chroma), among the colours not ``taken`` (all, once every one is): a mask on a
    red object is not red, and one on a cyan object is not red either (red over cyan blends to grey)."""
    free = [i for i in range(len(PALETTE)) if i not in set(taken)] or list(range(len(PALETTE)))
    if not mask.any():
        return free[0]
    mean = pixels[mask.astype(bool)].reshape(-1, 3).mean(0)

    def score(i: int) -> float:
        blend = (1 - alpha) * mean + alpha * np.asarray(PALETTE[i], np.float64)
        return float(np.linalg.norm(blend - mean) * (blend.max() - blend.min()))

    return max(free, key=score)


def draw_masks(image: np.ndarray, masks: Sequence[np.ndarray | None], colours: Sequence[tuple[int, int, int]],
               alpha: float = 0.6, *, points: Sequence[Sequence[float]] = (), point_labels: Sequence[int] = (),
               boxes: Sequence[Sequence[float]] = (), emphasis: int | None = None) -> np.ndarray:
    """The web app's view: each bool ``H x W`` mask (None: skipped) filled in its RGB colour with weight
    ``alpha`` and outlined (dark halo + colour); prompt boxes white with a black outline; clicks as in
    :func:`draw_overlay`. ``emphasis``: the index of the object being edited, outlined twice as thick.
    ``image`` RGB ``uint8 H x W x 3``; returns a new array."""
    canvas = np.array(image, order="C", copy=True)
    style = _Style.for_size(*canvas.shape[:2])
    for index, (mask, colour) in enumerate(zip(masks, colours)):
        if mask is not None and mask.any():
            bold = _Style(style.line * 2, style.font_scale, style.text_thickness, style.marker)
            _draw_mask(canvas, mask, colour, alpha, bold if index == emphasis else style)
    for box in _as_prompt_boxes(boxes if len(boxes) else np.zeros((0, 4))):
        _draw_box(canvas, tuple(box), OUTLINE_COLOUR, style.line + 2)
        _draw_box(canvas, tuple(box), PROMPT_BOX_COLOUR, style.line)
    if len(points):
        xy, labels = _as_points(points, point_labels)
        for (x, y), label in zip(xy, labels):
            _draw_point(canvas, x, y, bool(label), style)
    return canvas


def _pixel_corners(box) -> tuple[tuple[int, int], tuple[int, int]]:
    """Continuous ``(x1, y1, x2, y2)`` -> the first and last covered pixel (cv2 is inclusive)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = round(x1), round(y1)
    right, bottom = max(left, round(x2) - 1), max(top, round(y2) - 1)
    return (left, top), (right, bottom)


def _draw_box(canvas: np.ndarray, box, colour, thickness: int) -> None:
    top_left, bottom_right = _pixel_corners(box)
    # Axis-aligned: anti-aliasing would only blur the edge into the background.
    cv2.rectangle(canvas, top_left, bottom_right, colour, thickness, cv2.LINE_8)


def _draw_label(canvas: np.ndarray, target: Target, colour, style: _Style) -> None:
    """The phrase in a filled box of the target's colour, just above its box (or inside the top
    edge when there is no room), kept within the image."""
    if not target.phrase:
        return
    anchor = target.box if target.box is not None else target.box_from_mask()
    if anchor is None:
        return
    text = target.phrase if _UNICODE_TEXT else target.phrase.encode("ascii", "replace").decode("ascii")
    (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, style.font_scale, style.text_thickness)
    pad = max(1, style.line)
    label_w, label_h = text_w + 2 * pad, text_h + baseline + 2 * pad
    height, width = canvas.shape[:2]
    (left, top), _ = _pixel_corners(anchor)
    x = int(np.clip(left, 0, max(0, width - label_w)))
    y = top - label_h if top - label_h >= 0 else top
    y = int(np.clip(y, 0, max(0, height - label_h)))
    cv2.rectangle(canvas, (x, y), (x + label_w - 1, y + label_h - 1), colour, cv2.FILLED)
    cv2.putText(canvas, text, (x + pad, y + pad + text_h), _FONT, style.font_scale,
                _text_colour(colour), style.text_thickness, cv2.LINE_AA)


def _text_colour(background) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _draw_point(canvas: np.ndarray, x: float, y: float, positive: bool, style: _Style) -> None:
    """Green ``+`` for a foreground click, red ``-`` for a background click, black-outlined so
    they show on any background."""
    centre = (round(float(x)), round(float(y)))
    half = style.marker // 2
    for colour, thickness in ((OUTLINE_COLOUR, style.line + 2), (None, style.line)):
        if positive:
            cv2.drawMarker(canvas, centre, colour or POSITIVE_POINT_COLOUR, cv2.MARKER_CROSS,
                           style.marker, thickness, cv2.LINE_AA)
        else:
            cv2.line(canvas, (centre[0] - half, centre[1]), (centre[0] + half, centre[1]),
                     colour or NEGATIVE_POINT_COLOUR, thickness, cv2.LINE_AA)


# --------------------------------------------------------------------------- prompt validation


def _as_points(points, point_labels) -> tuple[np.ndarray, np.ndarray]:
    xy = np.asarray(points, dtype=np.float64)
    if xy.size == 0:
        return xy.reshape(0, 2), np.zeros(0, dtype=int)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.all(np.isfinite(xy)):
        raise PromptError(f"points must be N x 2 pixel (x, y) numbers, got shape {xy.shape}")
    if point_labels is None:
        return xy, np.ones(len(xy), dtype=int)
    labels = np.asarray(point_labels).reshape(-1)
    if len(labels) != len(xy):
        raise PromptError(f"got {len(xy)} points but {len(labels)} point labels")
    if not np.all(np.isin(labels, (0, 1))):
        raise PromptError("point labels must be 1 (foreground) or 0 (background)")
    return xy, labels.astype(int)


def _as_prompt_boxes(boxes) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4 or not np.all(np.isfinite(array)):
        raise PromptError(f"boxes must be M x 4 pixel (x1, y1, x2, y2) numbers, got shape {array.shape}")
    return array
