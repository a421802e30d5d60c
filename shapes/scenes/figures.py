"""Shapes, colours, textures and backgrounds of the synthetic scenes, and mask <-> polygon conversion.

Coordinate conventions (the whole ``grounding.data`` package):

* pixel ``(col, row)`` covers the continuous square ``[col, col+1) x [row, row+1)``; boxes are
  float ``x1, y1, x2, y2`` in those continuous coordinates (a mask filling columns 3..7 has
  ``x1=3, x2=8``); COCO ``bbox`` is ``[x, y, w, h]`` in the same coordinates;
* COCO polygons are flat ``[x1, y1, x2, y2, ...]`` lists in the same coordinates; pycocotools
  rasterises them by testing pixel centres ``(col+0.5, row+0.5)``;
* images are ``uint8`` RGB arrays ``H x W x 3``; masks are ``bool`` arrays ``H x W``.

Masks are drawn with OpenCV's non-anti-aliased fill (``LINE_8``) so that they are exact; only
the rendered pixels may later be softened.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from pycocotools import mask as mask_utils

# name -> RGB. Chosen to be far apart so that the colour word of every object is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (245, 225, 30),
    "orange": (250, 135, 20),
    "purple": (135, 50, 190),
    "pink": (250, 130, 195),
    "cyan": (30, 215, 225),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
    "grey": (128, 128, 128),
    "brown": (125, 75, 35),
}


@dataclass(frozen=True)
class ShapeKind:
    """A shape family. ``corners`` is the number of polygon corners a person would count
    (0 for round shapes); reasoning expressions use it."""

    name: str
    plural: str
    corners: int
    has_hole: bool = False


SHAPE_KINDS: dict[str, ShapeKind] = {
    k.name: k
    for k in (
        ShapeKind("circle", "circles", 0),
        ShapeKind("ellipse", "ellipses", 0),
        ShapeKind("ring", "rings", 0, has_hole=True),
        ShapeKind("triangle", "triangles", 3),
        ShapeKind("square", "squares", 4),
        ShapeKind("rectangle", "rectangles", 4),
        ShapeKind("diamond", "diamonds", 4),
        ShapeKind("pentagon", "pentagons", 5),
        ShapeKind("hexagon", "hexagons", 6),
        ShapeKind("star", "stars", 10),
        ShapeKind("cross", "crosses", 12),
    )
}

TEXTURES = ("solid", "stripes", "dots", "checker")
TEXTURE_ADJECTIVE = {"solid": "solid", "stripes": "striped", "dots": "dotted", "checker": "checkered"}

# Circumradius as a fraction of min(H, W). The gaps between classes keep "small" / "large"
# meaningful to a viewer (adjacent classes differ by at least ~1.3x in extent).
SIZE_RANGES = {"small": (0.075, 0.10), "medium": (0.13, 0.165), "large": (0.215, 0.26)}
SIZE_WORD = {"small": "small", "medium": "medium-sized", "large": "large"}

# Rotation ranges (degrees) keep kinds visually distinct: a square turned 45 degrees would read as
# a diamond, a cross turned 45 degrees as an "x".
_ROTATION = {"square": 12, "diamond": 10, "cross": 15, "rectangle": 25, "circle": 0, "ring": 0}
# ``turned`` scenes (``groundseg synth --turned``) also draw the poses people draw that keep a kind itself: a
# rectangle at any angle (standing up, too) and a diamond lying on its side as often as standing
_TURNED_ROTATION = {**_ROTATION, "rectangle": 180}


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to draw one object. ``cx, cy`` in continuous pixels, ``radius`` =
    circumradius in pixels, ``angle`` in degrees, ``aspect`` >= 1 for elongated kinds."""

    kind: str
    colour: str
    size: str
    texture: str
    outline: str | None  # outline colour name, or None
    cx: float
    cy: float
    radius: float
    angle: float
    aspect: float
    texture_period: int
    texture_angle: float


def unit_vertices(kind: str, aspect: float) -> np.ndarray:
    """Vertices (N x 2, float) of a shape of circumradius ~1 centred at 0, before rotation.
    The ring returns its outer outline; ``shape_mask`` punches the hole."""
    if kind in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        return np.stack([np.cos(t), np.sin(t) / aspect], 1)
    if kind in ("triangle", "pentagon", "hexagon"):
        n = {"triangle": 3, "pentagon": 5, "hexagon": 6}[kind]
        t = -np.pi / 2 + 2 * np.pi * np.arange(n) / n
        return np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "square":
        a = 0.75
        return np.array([[-a, -a], [a, -a], [a, a], [-a, a]])
    if kind == "rectangle":
        return np.array([[-1, -1 / aspect], [1, -1 / aspect], [1, 1 / aspect], [-1, 1 / aspect]])
    if kind == "diamond":
        return np.array([[0, -1], [1 / aspect, 0], [0, 1], [-1 / aspect, 0]])
    if kind == "star":
        t = -np.pi / 2 + np.pi * np.arange(10) / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if kind == "cross":
        a, b = 0.32, 0.85
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
                         [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]])
    raise ValueError(f"unknown shape kind {kind!r}")


def spec_vertices(spec: ShapeSpec) -> np.ndarray:
    """Vertices in image pixels (N x 2, float, continuous coordinates)."""
    v = unit_vertices(spec.kind, spec.aspect) * spec.radius
    t = np.deg2rad(spec.angle)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return v @ rot.T + np.array([spec.cx, spec.cy])


_SHIFT = 4  # fractional bits for cv2.fillPoly: sub-pixel vertices, still a hard (non-AA) fill


def _fill(mask: np.ndarray, verts: np.ndarray, value: int) -> None:
    # fillPoly treats integer vertex (c, r) as the centre of pixel (c, r); ours are continuous
    # coordinates whose pixel centres sit at +0.5, hence the shift by -0.5.
    pts = np.round((verts - 0.5) * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(mask, [pts], value, lineType=cv2.LINE_8, shift=_SHIFT)


def shape_mask(spec: ShapeSpec, height: int, width: int) -> np.ndarray:
    """The exact full (unoccluded) mask of one object, ``bool`` H x W."""
    m = np.zeros((height, width), np.uint8)
    _fill(m, spec_vertices(spec), 1)
    if SHAPE_KINDS[spec.kind].has_hole:
        inner = unit_vertices("circle", 1.0) * spec.radius * 0.55 + np.array([spec.cx, spec.cy])
        _fill(m, inner, 0)
    return m.astype(bool)


def sample_spec(rng: np.random.Generator, height: int, width: int, kind: str, colour: str,
                size: str, turned: bool = False) -> ShapeSpec:
    """Random pose, texture and outline for an object of the given kind/colour/size, placed so
    that it lies fully inside the image; ``turned``: in the wider poses of ``_TURNED_ROTATION``."""
    lo, hi = SIZE_RANGES[size]
    radius = float(rng.uniform(lo, hi) * min(height, width))
    aspect = float(rng.uniform(1.6, 2.1)) if kind in ("rectangle", "ellipse") else (
        float(rng.uniform(1.4, 1.7)) if kind == "diamond" else 1.0)
    limit = (_TURNED_ROTATION if turned else _ROTATION).get(kind, 180)
    angle = float(rng.uniform(-limit, limit)) if limit else 0.0
    if turned and kind == "diamond" and rng.random() < 0.5:
        angle += 90.0
    texture = TEXTURES[int(rng.choice(len(TEXTURES), p=[0.5, 0.2, 0.15, 0.15]))]
    outline = None
    if rng.random() < 0.3:
        outline = "white" if _luminance(COLOURS[colour]) < 0.35 else "black"
    probe = ShapeSpec(kind, colour, size, texture, outline, 0.0, 0.0, radius, angle, aspect,
                      int(rng.integers(4, 8)), float(rng.uniform(0, 180)))
    v = spec_vertices(probe)
    lo_xy, hi_xy = v.min(0), v.max(0)
    cx = float(rng.uniform(1 - lo_xy[0], width - 1 - hi_xy[0]))
    cy = float(rng.uniform(1 - lo_xy[1], height - 1 - hi_xy[1]))
    return ShapeSpec(**{**probe.__dict__, "cx": cx, "cy": cy})


def moved(spec: ShapeSpec, cx: float, cy: float, radius: float, angle: float) -> ShapeSpec:
    """A copy of ``spec`` at a new pose (used by the video generator)."""
    return ShapeSpec(**{**spec.__dict__, "cx": cx, "cy": cy, "radius": radius, "angle": angle})


def _luminance(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255.0


def _shade(rgb: tuple[int, int, int]) -> np.ndarray:
    """Second tone of a texture: a darker version of the same hue (a lighter red would read as
    pink), except for near-black, which can only go lighter."""
    c = np.array(rgb, np.float32)
    return c * 0.55 if _luminance(rgb) > 0.15 else c + (255 - c) * 0.3


def paint(canvas: np.ndarray, spec: ShapeSpec, full: np.ndarray) -> None:
    """Paint one object onto ``canvas`` (float32 H x W x 3, RGB) inside its full mask."""
    ys, xs = np.nonzero(full)
    if len(ys) == 0:
        return
    base = np.array(COLOURS[spec.colour], np.float32)
    p = spec.texture_period
    if spec.texture == "solid":
        second = np.zeros(len(ys), bool)
    elif spec.texture == "stripes":
        t = np.deg2rad(spec.texture_angle)
        second = ((xs * np.cos(t) + ys * np.sin(t)) % (2 * p)) >= p
    elif spec.texture == "dots":
        s = p + 3
        second = ((xs % s) - s / 2) ** 2 + ((ys % s) - s / 2) ** 2 <= (0.32 * s) ** 2
    else:  # checker
        second = ((xs // p) + (ys // p)) % 2 == 1
    colours = np.where(second[:, None], _shade(COLOURS[spec.colour])[None], base[None])
    canvas[ys, xs] = colours
    if spec.outline is not None:
        width = 1 if spec.radius < 20 else 2
        inner = cv2.erode(full.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=width)
        ring = full & ~inner.astype(bool)
        canvas[ring] = np.array(COLOURS[spec.outline], np.float32)


def visible_masks(fulls) -> list[np.ndarray]:
    """Visible part of each full mask when they are painted in order (later ones in front)."""
    out: list[np.ndarray] = []
    covered = None
    for full in reversed(fulls):
        out.append(full if covered is None else full & ~covered)
        covered = full.copy() if covered is None else covered | full
    return out[::-1]


def render_scene(background: np.ndarray, specs, fulls, rng: np.random.Generator) -> np.ndarray:
    """Paint objects in order (later ones in front) on a copy of ``background``; sometimes soften
    the edges (the GT masks stay the hard ones) and add sensor-like noise. Returns uint8 RGB."""
    canvas = background.copy()
    for spec, full in zip(specs, fulls):
        paint(canvas, spec, full)
    if rng.random() < 0.5:
        canvas = cv2.GaussianBlur(canvas, (3, 3), float(rng.uniform(0.5, 0.8)))
    if rng.random() < 0.3:
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(1, 4))
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def make_background(rng: np.random.Generator, height: int, width: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A low-saturation noisy, gradient or textured background. Returns (float32 H x W x 3 RGB,
    its mean colour) -- the mean is used to keep object colours that contrast with it."""
    base = rng.uniform(40, 215) + rng.uniform(-25, 25, size=3)
    style = rng.choice(["flat", "gradient", "blotches", "pattern"])
    img = np.broadcast_to(base, (height, width, 3)).astype(np.float32).copy()
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if style == "gradient":
        other = base + rng.uniform(-60, 60, size=3)
        t = np.deg2rad(rng.uniform(0, 360))
        ramp = (xx * np.cos(t) + yy * np.sin(t))
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
        img = img * (1 - ramp[..., None]) + other * ramp[..., None]
    elif style == "blotches":
        grid = rng.normal(0, 1, size=(max(2, height // 24), max(2, width // 24), 3))
        low = cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
        img += low * rng.uniform(10, 25)
    elif style == "pattern":
        period = rng.uniform(10, 30)
        wave = np.sin(2 * np.pi * (xx + rng.uniform(0.3, 1.0) * yy) / period)
        img += wave[..., None] * rng.uniform(4, 10)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 10))
    img = np.clip(img, 0, 255)
    return img.astype(np.float32), img.reshape(-1, 3).mean(0)


def contrasting_colours(background_mean: np.ndarray, min_distance: float = 95.0) -> list[str]:
    """Colour names far enough (RGB Euclidean) from the background to be seen."""
    return [n for n, c in COLOURS.items()
            if np.linalg.norm(np.array(c, np.float32) - background_mean) >= min_distance]


# ---------------------------------------------------------------------------- mask <-> polygons

_UP = 4  # contours are traced on a 4x upsampled mask so that they run along pixel edges


def _cut_holes(mask: np.ndarray) -> np.ndarray:
    """COCO polygons are merged by union, so a hole (a ring, or a shape with a smaller one on top
    of it) cannot be drawn. Cut a 1-pixel vertical slit from each hole up to the outside: the
    region becomes simply connected and its outer contour goes around the hole, at the cost of
    the slit's few pixels."""
    m = mask.copy()
    for _ in range(16):
        padded = np.pad(~m, 1, constant_values=True).astype(np.uint8)
        n, labels = cv2.connectedComponents(padded, connectivity=4)
        outside = labels[0, 0]
        holes = [lab for lab in range(1, n) if lab != outside]
        if not holes:
            return m
        for lab in holes:
            rows, cols = np.nonzero(labels == lab)
            top = rows.min()
            col = cols[rows == top].min() - 1  # back to unpadded coordinates
            row = top - 2
            while row >= 0 and m[row, col]:
                m[row, col] = False
                row -= 1
    return m


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (flat lists, continuous pixel coordinates) whose pycocotools rasterisation
    reproduces ``mask`` -- exactly for hole-free masks, up to hole slits otherwise. Every
    connected component gives one polygon."""
    m = _cut_holes(mask.astype(bool))
    ys, xs = np.nonzero(m)
    if len(ys) == 0:
        return []
    y0, x0 = int(ys.min()), int(xs.min())
    crop = m[y0:ys.max() + 1, x0:xs.max() + 1].astype(np.uint8)
    up = np.pad(crop.repeat(_UP, 0).repeat(_UP, 1), 1)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for c in contours:
        c = cv2.approxPolyDP(c, 1.0, True).reshape(-1, 2).astype(np.float64)
        if len(c) < 3:
            continue
        # The contour runs through centres of boundary sub-pixels, a quarter of a sub-pixel
        # inside the true edge, which pycocotools' centre test treats as on the edge.
        pts = (c - 1 + 0.5) / _UP + np.array([x0, y0])
        polygons.append([round(float(v), 3) for v in pts.ravel()])
    return polygons


def polygons_to_rle(polygons: list[list[float]], height: int, width: int) -> dict:
    """Merged COCO RLE of a polygon list (what the REFER loaders decode)."""
    if not polygons:
        return mask_utils.encode(np.zeros((height, width), np.uint8, order="F"))
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    return mask_utils.decode(polygons_to_rle(polygons, height, width)).astype(bool)


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO RLE with ``counts`` as ``str`` (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_box_xyxy(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight box of a mask, float xyxy in continuous pixels; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
