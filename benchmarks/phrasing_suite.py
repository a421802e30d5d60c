"""Phrasing suite: does a model answer the way people ask? Held-out scenes, held-out question forms.

The scenes are drawn here, by this file's own renderer, not by the training generator (``shapes/scenes``): a seed
and image sizes no training run used, and rendering styles the generator lacks:

  plain      flat pastel background, flat fills (the baseline of the held-out renderer)
  noisy      Gaussian-noise background, the whole image JPEG-compressed at quality 20-35
  gradient   two-colour gradient background under a blurred-noise "photographic" texture; anti-aliased edges
  outlined   paper-grey background, fills ringed by a dark outline 4-8 px wide (the object's mask includes it)
  grey       a scene of one of the four styles above (in turn), its colour dropped: written as a 16-bit grayscale
             PNG and read back by groundseg's loader, as a grey scan or photograph comes in. Drawn after the
             others from a stream of their own, so that the four styles' scenes stay those of earlier runs. Its
             questions name kinds only ("the star", "all the squares"): colours are not there to be named
  drawn      drawn as a person draws with PIL's ImageDraw: CSS named colours (PIL.ImageColor: "pink" is a light
             pink, "brown" a red-brown), white or pale flat grounds, 480-800 px a side, rectangles at any angle and
             diamonds lying on their side too, half the objects ringed by a thin black line. From a stream of its
             own, after the grey scenes

Questions (``FORMS``; ``*`` marks a form that is also a training template, the rest were never used in training;
grounding/data/tasks.py lists the training forms), each phrase in varied case and punctuation:

  present    "Please segment the X."*, "Where is the X?", "Can you find the X in this picture?", "Show me the X."*,
             "the X", "X" -- X names one object ("yellow circle", or "circle" when the kind is alone; grey: a
             kind the scene holds once)
  absent     the same forms about a colour + kind the scene lacks (a near miss: its colour or kind is there;
             grey: a kind the scene lacks)
  multi      "Please segment all C shapes.", "Segment all the Ks.", "Please segment the X and the Y."
  region     "What is in this region?" (the web app's) / "What is this?" with a box on one object
  foreign    a Chinese, Spanish or German question about one object (not asked of grey scenes)
  every      "Please segment all shapes.", "Segment all the shapes.", "Segment every shape.", "How many shapes are
             there?" -- every object of the scene, grey ones too. One per scene, drawn after the rest from a stream
             of their own, so that the other items are those of earlier runs

Measures (``TARGETS`` gives the bar beside each):

  present denied      present questions answered with no target ("There is no ..."), lower is better
  absent denied       absent questions answered with no target
  phrase copied       present answers whose first <ref> phrase is the question's phrase (case, a leading article
                      and end punctuation ignored)
  present mask IoU    mean IoU of the first target's mask with the object's, over every present question (a denial
                      or a missing mask counts 0)
  multi exact         multi questions answered with one target per object, each target's box (IoU >= 0.5) and
                      mask (IoU >= 0.5) on the same object, no object twice
  every exact         the same of the "every" questions
  region named        region answers that hold the object's colour and kind words (grey: its kind word)
  foreign handled     non-English questions whose first mask is right (IoU >= 0.5) or whose Prediction has a
                      note saying the model reads English only
  English noted       English questions (every other kind) whose Prediction has that note all the same

    python benchmarks/phrasing_suite.py [--model weights/shapes-tiny] [--scenes 8] [--seed 4711] [--json out.json]
"""
from __future__ import annotations

import argparse
import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image, ImageColor, ImageDraw

STYLES = ("plain", "noisy", "gradient", "outlined")
GREY = "grey"
DRAWN = "drawn"

# name -> RGB: near the training palette's hues (the model knows only those words) but not its exact values
COLOURS = {"red": (205, 40, 50), "green": (50, 150, 70), "blue": (45, 90, 210), "yellow": (235, 215, 45),
           "orange": (240, 145, 40), "purple": (145, 65, 180), "pink": (240, 140, 190), "cyan": (45, 200, 215),
           "brown": (120, 80, 45)}
KINDS = ("circle", "square", "triangle", "pentagon", "hexagon", "star", "diamond", "rectangle")
PLURAL = {k: k + "s" for k in KINDS}

FORMS: tuple[tuple[str, str, bool], ...] = (   # (name, template, also a training template)
    ("please-segment", "Please segment {x}.", True),
    ("where-is", "Where is {x}?", False),
    ("can-you-find", "Can you find {x} in this picture?", False),
    ("show-me", "Show me {x}.", True),
    ("bare-the", "{x}", False),
    ("bare", "{x}", False),     # the phrase without its article
)
MULTI_FORMS = ("Please segment all {c} shapes.", "Segment all the {ks}.", "Please segment {x} and {y}.")
REGION_QUESTIONS = ("What is in this region?", "What is this?")
EVERY_FORMS = ("Please segment all shapes.", "Segment all the shapes.", "Segment every shape.",
               "How many shapes are there?")
FOREIGN = {   # language -> (template, colour words, kind words)
    "zh": ("请分割{c}的{k}。", {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "orange": "橙色",
                              "purple": "紫色", "pink": "粉色", "cyan": "青色", "brown": "棕色"},
           {"circle": "圆", "square": "正方形", "triangle": "三角形", "pentagon": "五边形", "hexagon": "六边形",
            "star": "星形", "diamond": "菱形", "rectangle": "长方形"}),
    "es": ("Por favor, segmenta el {k} {c}.", {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo",
                                               "orange": "naranja", "purple": "morado", "pink": "rosa",
                                               "cyan": "cian", "brown": "marrón"},
           {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "pentagon": "pentágono",
            "hexagon": "hexágono", "star": "estrella", "diamond": "rombo", "rectangle": "rectángulo"}),
    "de": ("Bitte segmentiere die Form {k} in der Farbe {c}.", {"red": "Rot", "green": "Grün", "blue": "Blau",
                                                        "yellow": "Gelb", "orange": "Orange", "purple": "Lila",
                                                        "pink": "Rosa", "cyan": "Türkis", "brown": "Braun"},
           {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "pentagon": "Fünfeck",
            "hexagon": "Sechseck", "star": "Stern", "diamond": "Raute", "rectangle": "Rechteck"}),
}

# measure -> (target, "max" when the figure must stay at or under it, else "min")
TARGETS = {"present_denied": (0.02, "max"), "absent_denied": (0.90, "min"), "phrase_copied": (0.98, "min"),
           "present_mask_iou": (0.80, "min"), "multi_exact": (0.90, "min"), "region_named": (0.90, "min"),
           "foreign_handled": (1.00, "min"), "every_exact": (0.90, "min"), "english_noted": (0.02, "max")}


# ------------------------------------------------------------------------------------------------ scenes
@dataclass
class Obj:
    colour: str
    kind: str
    mask: np.ndarray          # bool H x W (visible: objects never overlap)
    box: tuple[float, float, float, float]

    @classmethod
    def of(cls, colour: str, kind: str, mask: np.ndarray) -> "Obj":
        ys, xs = np.nonzero(mask)
        return cls(colour, kind, mask, (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))


@dataclass
class Scene:
    style: str
    image: np.ndarray         # uint8 H x W x 3
    objects: list[Obj]


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Corner points (float xy) of a polygonal kind of circumradius ``r``."""
    def ring(n, start, radius=r):
        t = start + np.arange(n) * 2 * np.pi / n
        return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], 1)
    if kind == "square":
        return ring(4, np.pi / 4 + angle)
    if kind == "diamond":
        pts = ring(4, angle)
        pts[:, 0] = cx + (pts[:, 0] - cx) * 0.7      # a rhombus, taller than wide
        return pts
    if kind == "rectangle":
        w, h = r * 1.0, r * 0.55
        return np.array([[cx - w, cy - h], [cx + w, cy - h], [cx + w, cy + h], [cx - w, cy + h]])
    if kind == "triangle":
        return ring(3, -np.pi / 2 + angle)
    if kind == "pentagon":
        return ring(5, -np.pi / 2 + angle)
    if kind == "hexagon":
        return ring(6, angle)
    if kind == "star":
        outer, inner = ring(5, -np.pi / 2 + angle), ring(5, -np.pi / 2 + angle + np.pi / 5, r * 0.45)
        return np.stack([outer, inner], 1).reshape(-1, 2)
    raise ValueError(kind)


def _clear_of(mask: np.ndarray, taken: np.ndarray) -> bool:
    """Whether the bool ``mask`` keeps 7 px away from every ``taken`` pixel."""
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    return not (grown & taken).any()


def _shape_mask(kind: str, h: int, w: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    if kind == "circle":
        cv2.circle(m, (int(round(cx)), int(round(cy))), int(round(r)), 1, -1)
    else:
        cv2.fillPoly(m, [np.round(_polygon(kind, cx, cy, r, angle)).astype(np.int32)], 1)
    return m.astype(bool)


def _background(style: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    if style == "plain":
        return np.broadcast_to(rng.integers(190, 250, 3), (h, w, 3)).astype(np.float32)
    if style == "noisy":
        base = rng.integers(110, 170)
        return np.clip(base + rng.normal(0, 28, (h, w, 3)), 0, 255).astype(np.float32)
    if style == "gradient":
        a, b = rng.integers(60, 230, 3), rng.integers(60, 230, 3)
        t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
        grad = a + (b - a) * t
        texture = cv2.resize(rng.normal(0, 1, (h // 8 + 1, w // 8 + 1)).astype(np.float32), (w, h))
        return np.clip(grad + 18 * texture[..., None], 0, 255).astype(np.float32) * np.ones((h, w, 3), np.float32)
    if style == "outlined":
        return np.clip(np.full((h, w, 3), 200.0) + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.float32)
    raise ValueError(style)


def make_scene(rng: np.random.Generator, style: str) -> Scene:
    """4-5 objects, each (colour, kind) once; usually two share a colour and two share a kind, so that "all C
    shapes" and "all the Ks" name groups. Sizes 260-460 px a side (training scenes: 160-320)."""
    h, w = int(rng.integers(260, 461)), int(rng.integers(260, 461))
    n = int(rng.integers(4, 6))
    colours, kinds = list(COLOURS), list(KINDS)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        c = pairs[0][0] if len(pairs) == 1 and rng.random() < 0.8 else colours[int(rng.integers(len(colours)))]
        k = pairs[2][1] if len(pairs) == 3 and rng.random() < 0.8 else kinds[int(rng.integers(len(kinds)))]
        if (c, k) not in pairs:
            pairs.append((c, k))
    image = _background(style, rng, h, w)
    taken = np.zeros((h, w), bool)
    objects: list[Obj] = []
    side = min(h, w)
    for c, k in pairs:
        for _ in range(200):
            r = side * rng.uniform(0.08, 0.16)
            cx, cy = rng.uniform(r + 4, w - r - 4), rng.uniform(r + 4, h - r - 4)
            mask = _shape_mask(k, h, w, cx, cy, r, rng.uniform(-0.15, 0.15))
            if _clear_of(mask, taken):
                break
        else:
            continue
        taken |= mask
        colour = np.array(COLOURS[c], np.float32) + rng.normal(0, 6, 3)
        if style == "gradient":       # anti-aliased: the fill fades over the outline's pixel
            soft = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0.8)[..., None]
            image = image * (1 - soft) + colour * soft
        else:
            image[mask] = colour
        if style == "outlined":
            width = int(rng.integers(4, 9))
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            ring = np.zeros((h, w), np.uint8)
            cv2.drawContours(ring, contours, -1, 1, width)
            ring_b = ring.astype(bool)
            image[ring_b] = np.clip(colour * 0.35, 0, 255)
            mask = mask | ring_b
        objects.append(Obj.of(c, k, mask))
    out = np.clip(image, 0, 255).astype(np.uint8)
    if style == "noisy":
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(20, 36)))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy()
    return Scene(style, out, objects)


def _drawn_angle(kind: str, rng: np.random.Generator) -> float:
    """The turn (radians) a drawing gives ``kind``: any, but a square only a little (turned by 45 degrees it is a
    diamond) and a diamond standing or lying."""
    if kind == "square":
        return float(rng.uniform(-0.25, 0.25))
    if kind == "diamond":
        return float(rng.uniform(-0.2, 0.2)) + (np.pi / 2 if rng.random() < 0.5 else 0.0)
    return float(rng.uniform(0, 2 * np.pi))


def _draw(canvas: Image.Image, kind: str, shape: list, fill, line) -> None:
    """``shape`` (a circle's xyxy box, else polygon corners) drawn by ImageDraw, ringed 2 px wide by ``line``."""
    pen = ImageDraw.Draw(canvas)
    (pen.ellipse if kind == "circle" else pen.polygon)(shape, fill=fill, outline=line, width=2)


def make_drawn_scene(rng: np.random.Generator) -> Scene:
    """3-6 objects drawn by PIL's ImageDraw in CSS named colours (``DRAWN`` in the module docstring)."""

    h, w = int(rng.integers(480, 801)), int(rng.integers(480, 801))
    ground = (255, 255, 255) if rng.random() < 0.4 else tuple(int(v) for v in rng.integers(225, 256, 3))
    image = Image.new("RGB", (w, h), ground)
    n = int(rng.integers(3, 7))
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        pair = (list(COLOURS)[int(rng.integers(len(COLOURS)))], KINDS[int(rng.integers(len(KINDS)))])
        if pair not in pairs:
            pairs.append(pair)
    taken = np.zeros((h, w), bool)
    objects: list[Obj] = []
    for c, k in pairs:
        outline = rng.random() < 0.5
        for _ in range(200):
            r = min(h, w) * rng.uniform(0.06, 0.15)
            cx, cy = rng.uniform(r + 4, w - r - 4), rng.uniform(r + 4, h - r - 4)
            if k == "circle":
                shape = [cx - r, cy - r, cx + r, cy + r]
            else:
                t = _drawn_angle(k, rng)
                turn = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
                shape = [tuple(p) for p in (_polygon(k, 0.0, 0.0, r, 0.0) @ turn.T + (cx, cy)).tolist()]
            stencil = Image.new("L", (w, h), 0)
            _draw(stencil, k, shape, 255, 255 if outline else None)
            mask = np.asarray(stencil) > 0
            if _clear_of(mask, taken):
                break
        else:
            continue
        taken |= mask
        _draw(image, k, shape, ImageColor.getrgb(c), (0, 0, 0) if outline else None)
        objects.append(Obj.of(c, k, mask))
    return Scene(DRAWN, np.asarray(image).copy(), objects)


def grey_png(image: np.ndarray) -> bytes:
    """The uint8 RGB ``image`` as a 16-bit grayscale PNG (luma 0.299, 0.587, 0.114, scaled to 0..65535)."""
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    buf = io.BytesIO()
    Image.fromarray(np.round(luma * 257).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def make_grey_scene(rng: np.random.Generator, style: str) -> Scene:
    """A ``style`` scene, its colour dropped: what groundseg's loader reads from its 16-bit grayscale PNG."""
    from grounding.images import load_image

    scene = make_scene(rng, style)
    return Scene(GREY, load_image(grey_png(scene.image)), scene.objects)


# ------------------------------------------------------------------------------------------------ questions
@dataclass
class Item:
    scene: int
    kind: str                 # present / absent / multi / region / foreign / every
    question: str
    form: str
    phrase: str = ""          # present: the phrase the answer should copy
    objects: list[int] = field(default_factory=list)    # indices of the objects the answer should name
    box: tuple[float, ...] | None = None                # region: the box prompt


def _vary(text: str, rng: np.random.Generator) -> str:
    """Case and end punctuation as people type them."""
    r = rng.random()
    if r < 0.3:
        text = text.lower()
    elif r < 0.4:
        text = text.upper()
    elif r < 0.55:
        text = text[:1].upper() + text[1:]
    r = rng.random()
    if r < 0.25:
        text = text.rstrip(".?!")
    elif r < 0.35:
        text = text.rstrip(".?!") + "!"
    elif r < 0.45:
        text = text.rstrip(".?!") + "?"
    return text


def _phrase(scene: Scene, i: int) -> str:
    o = scene.objects[i]
    alone = sum(p.kind == o.kind for p in scene.objects) == 1
    return o.kind if alone and i % 2 else f"{o.colour} {o.kind}"   # bare kind names for some objects


def make_items(scenes: list[Scene], rng: np.random.Generator, per_scene: int = 3) -> list[Item]:
    items: list[Item] = []
    form_at = 0
    for s, scene in enumerate(scenes):
        objs = scene.objects
        for i in rng.permutation(len(objs))[:per_scene]:
            name, template, _ = FORMS[form_at % len(FORMS)]
            form_at += 1
            phrase = _phrase(scene, int(i)) if name == "bare" else "the " + _phrase(scene, int(i))
            items.append(Item(s, "present", _vary(template.format(x=phrase), rng), name, phrase, [int(i)]))
        present = {(o.colour, o.kind) for o in objs}
        near = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in present
                and (c in {o.colour for o in objs} or k in {o.kind for o in objs})]
        for j in rng.permutation(len(near))[:max(1, per_scene - 1)]:
            c, k = near[int(j)]
            name, template, _ = FORMS[form_at % len(FORMS)]
            form_at += 1
            phrase = f"{c} {k}" if name == "bare" else f"the {c} {k}"
            items.append(Item(s, "absent", _vary(template.format(x=phrase), rng), name, phrase))
        by_colour = {c: [i for i, o in enumerate(objs) if o.colour == c] for c in COLOURS}
        by_kind = {k: [i for i, o in enumerate(objs) if o.kind == k] for k in KINDS}
        groups = [("all-colour", MULTI_FORMS[0].format(c=c), ids) for c, ids in by_colour.items() if len(ids) >= 2]
        groups += [("all-kind", MULTI_FORMS[1].format(ks=PLURAL[k]), ids) for k, ids in by_kind.items()
                   if len(ids) >= 2]
        a, b = (int(v) for v in rng.permutation(len(objs))[:2])
        groups.append(("x-and-y", MULTI_FORMS[2].format(x="the " + f"{objs[a].colour} {objs[a].kind}",
                                                        y="the " + f"{objs[b].colour} {objs[b].kind}"), [a, b]))
        for name, q, ids in groups[:2] if len(groups) > 2 else groups:
            items.append(Item(s, "multi", _vary(q, rng), name, objects=list(ids)))
        i = int(rng.integers(len(objs)))
        x1, y1, x2, y2 = objs[i].box
        items.append(Item(s, "region", REGION_QUESTIONS[s % 2], "app-region" if s % 2 == 0 else "what-is-this",
                          objects=[i], box=(x1 - 2, y1 - 2, x2 + 2, y2 + 2)))
        lang = list(FOREIGN)[s % len(FOREIGN)]
        template, cw, kw = FOREIGN[lang]
        i = int(rng.integers(len(objs)))
        items.append(Item(s, "foreign", template.format(c=cw[objs[i].colour], k=kw[objs[i].kind]), lang,
                          objects=[i]))
    return items


def make_grey_items(scenes: list[Scene], rng: np.random.Generator, per_scene: int = 3) -> list[Item]:
    """The items of grey scenes (``Item.scene`` indexes ``scenes``): present, absent, multi and region questions
    that name kinds only."""
    items: list[Item] = []
    form_at = 0
    for s, scene in enumerate(scenes):
        objs = scene.objects
        count = {k: sum(o.kind == k for o in objs) for k in KINDS}
        alone = [i for i, o in enumerate(objs) if count[o.kind] == 1]
        for i in rng.permutation(alone)[:per_scene]:
            name, template, _ = FORMS[form_at % len(FORMS)]
            form_at += 1
            phrase = objs[int(i)].kind if name == "bare" else "the " + objs[int(i)].kind
            items.append(Item(s, "present", _vary(template.format(x=phrase), rng), name, phrase, [int(i)]))
        lacking = [k for k in KINDS if not count[k]]
        for j in rng.permutation(len(lacking))[:max(1, per_scene - 1)]:
            name, template, _ = FORMS[form_at % len(FORMS)]
            form_at += 1
            phrase = lacking[int(j)] if name == "bare" else "the " + lacking[int(j)]
            items.append(Item(s, "absent", _vary(template.format(x=phrase), rng), name, phrase))
        groups = [("all-kind", MULTI_FORMS[1].format(ks=PLURAL[k]), [i for i, o in enumerate(objs) if o.kind == k])
                  for k in KINDS if count[k] >= 2]
        if len(alone) >= 2:
            a, b = (int(v) for v in rng.permutation(alone)[:2])
            groups.append(("x-and-y", MULTI_FORMS[2].format(x="the " + objs[a].kind, y="the " + objs[b].kind),
                           [a, b]))
        for name, q, ids in groups[:2]:
            items.append(Item(s, "multi", _vary(q, rng), name, objects=list(ids)))
        i = int(rng.integers(len(objs)))
        x1, y1, x2, y2 = objs[i].box
        items.append(Item(s, "region", REGION_QUESTIONS[s % 2], "app-region" if s % 2 == 0 else "what-is-this",
                          objects=[i], box=(x1 - 2, y1 - 2, x2 + 2, y2 + 2)))
    return items


def make_every_items(scenes: list[Scene], rng: np.random.Generator) -> list[Item]:
    """One question per scene about all of its objects."""
    return [Item(s, "every", _vary(EVERY_FORMS[s % len(EVERY_FORMS)], rng), f"every-{s % len(EVERY_FORMS)}",
                 objects=list(range(len(scene.objects)))) for s, scene in enumerate(scenes)]


# ------------------------------------------------------------------------------------------------ scoring
def _iou(a: np.ndarray | None, b: np.ndarray) -> float:
    if a is None:
        return 0.0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _box_iou(a, b) -> float:
    if a is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _norm_phrase(text: str | None) -> str:
    text = (text or "").lower().strip().strip(".?!,")
    return re.sub(r"^(the|a|an) ", "", text).strip()


def _english_note(pred) -> bool:
    return any("english" in n.lower() for n in pred.notes)


def _hits(targets, objects: list[Obj]) -> int:
    """How many ``targets`` each land on an object of ``objects`` no earlier target took (mask and box IoU >= 0.5)."""
    free, hits = list(objects), 0
    for tg in targets:
        best = max(free, key=lambda o: _iou(tg.mask, o.mask), default=None)
        if best is not None and _iou(tg.mask, best.mask) >= 0.5 and _box_iou(tg.box, best.box) >= 0.5:
            free.remove(best)
            hits += 1
    return hits


def score(item: Item, scene: Scene, pred) -> dict:
    """One item's outcome (a JSON-ready dict)."""
    t = pred.targets
    row = {"kind": item.kind, "form": item.form, "style": scene.style, "question": item.question,
           "answer": pred.answer, "notes": list(pred.notes), "targets": len(t), "english_note": _english_note(pred)}
    objs = scene.objects
    if item.kind == "present":
        target = objs[item.objects[0]]
        row["denied"] = not t
        row["copied"] = bool(t) and _norm_phrase(t[0].phrase) == _norm_phrase(item.phrase)
        row["iou"] = _iou(t[0].mask, target.mask) if t else 0.0
    elif item.kind == "absent":
        row["denied"] = not t
    elif item.kind in ("multi", "every"):
        wanted = list(item.objects)
        why = [] if len(t) == len(wanted) else [f"{len(t)} targets for {len(wanted)} objects"]
        used: set[int] = set()
        for n, tg in enumerate(t if not why else [], 1):
            best = max(wanted, key=lambda j: _iou(tg.mask, objs[j].mask))
            mask_iou, box_iou = _iou(tg.mask, objs[best].mask), _box_iou(tg.box, objs[best].box)
            if best in used:
                why.append(f"target {n} on an object named before")
            elif mask_iou < 0.5 or box_iou < 0.5:
                why.append(f"target {n}: mask IoU {mask_iou:.2f}, box IoU {box_iou:.2f}")
            used.add(best)
        row["exact"], row["why"] = not why, "; ".join(why)
        row["hits"], row["wanted"] = _hits(t, [objs[j] for j in wanted]), len(wanted)
    elif item.kind == "region":
        o = objs[item.objects[0]]
        words = set(re.findall(r"[a-z]+", pred.answer.lower()))
        row["named"] = (scene.style == GREY or o.colour in words) and o.kind in words
    elif item.kind == "foreign":
        right = bool(t) and _iou(t[0].mask, objs[item.objects[0]].mask) >= 0.5
        row["right"], row["handled"] = right, right or row["english_note"]
    return row


def summarise(rows: list[dict]) -> dict:
    def mean(kind, key, where: Callable[[dict], bool] = lambda r: True):
        vals = [float(r[key]) for r in rows if r["kind"] == kind and where(r)]
        return (sum(vals) / len(vals)) if vals else None

    def ratio(part, whole, kind="multi"):
        multi = [r for r in rows if r["kind"] == kind]
        total = sum(r[whole] for r in multi)
        return sum(r[part] for r in multi) / total if total else None
    report = {
        "present_denied": mean("present", "denied"),
        "absent_denied": mean("absent", "denied"),
        "phrase_copied": mean("present", "copied", lambda r: not r["denied"]),
        "present_mask_iou": mean("present", "iou"),
        "multi_exact": mean("multi", "exact"),
        "region_named": mean("region", "named"),
        "foreign_handled": mean("foreign", "handled"),
        "english_noted": sum(r["english_note"] for r in rows if r["kind"] != "foreign")
                         / max(1, sum(r["kind"] != "foreign" for r in rows)),
        # informative, without a target: of the multi answers' targets, the share on a wanted object (precision),
        # and of the wanted objects, the share a target found (recall)
        "multi_precision": ratio("hits", "targets"),
        "multi_recall": ratio("hits", "wanted"),
        "every_exact": mean("every", "exact"),
        "every_precision": ratio("hits", "targets", "every"),
        "every_recall": ratio("hits", "wanted", "every"),
        "counts": {k: sum(r["kind"] == k for r in rows)
                   for k in ("present", "absent", "multi", "region", "foreign", "every")},
        "by_form": {}, "by_style": {},
    }
    for r in rows:
        if r["kind"] == "present":
            d = report["by_form"].setdefault(r["form"], {"n": 0, "denied": 0, "iou": 0.0})
            d["n"] += 1
            d["denied"] += int(r["denied"])
            d["iou"] += r["iou"]
            s = report["by_style"].setdefault(r["style"], {"n": 0, "denied": 0, "iou": 0.0})
            s["n"] += 1
            s["denied"] += int(r["denied"])
            s["iou"] += r["iou"]
    for d in list(report["by_form"].values()) + list(report["by_style"].values()):
        d["denied"], d["iou"] = d["denied"] / d["n"], d["iou"] / d["n"]
    report["passed"] = {k: (v is not None and (v <= t if how == "max" else v >= t))
                        for k, (t, how) in TARGETS.items() for v in [report[k]]}
    return report


def draw_suite(scenes_per_style: int = 8, seed: int = 4711, per_scene: int = 3,
               grey: bool = True, drawn: bool = True) -> tuple[list[Scene], list[Item]]:
    """The suite's scenes and items: ``scenes_per_style`` of each style, then as many grey ones and as many drawn
    ones (each from a stream of its own: the earlier scenes and items do not depend on them)."""
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, style) for _ in range(scenes_per_style) for style in STYLES]
    items = make_items(scenes, rng, per_scene)
    if grey:
        grey_rng = np.random.default_rng([seed, 1])
        greys = [make_grey_scene(grey_rng, STYLES[n % len(STYLES)]) for n in range(scenes_per_style)]
        items += [Item(**{**vars(item), "scene": item.scene + len(scenes)})
                  for item in make_grey_items(greys, grey_rng, per_scene)]
        scenes += greys
    if drawn:
        drawn_rng = np.random.default_rng([seed, 3])
        pictures = [make_drawn_scene(drawn_rng) for _ in range(scenes_per_style)]
        items += [Item(**{**vars(item), "scene": item.scene + len(scenes)})
                  for item in make_items(pictures, drawn_rng, per_scene)]
        scenes += pictures
    return scenes, items + make_every_items(scenes, np.random.default_rng([seed, 2]))


def run_suite(grounder, scenes_per_style: int = 8, seed: int = 4711, per_scene: int = 3,
              grey: bool = True, drawn: bool = True) -> tuple[dict, list[dict]]:
    """Draw the scenes, ask every item, score it: (summary, rows)."""
    scenes, items = draw_suite(scenes_per_style, seed, per_scene, grey, drawn)
    rows = []
    for item in items:
        scene = scenes[item.scene]
        pred = grounder.predict(scene.image, item.question, boxes=None if item.box is None else [list(item.box)])
        rows.append(score(item, scene, pred))
    return summarise(rows), rows


def table(report: dict) -> str:
    lines = [f"{'measure':<18} {'value':>7}  target", "-" * 38]
    for key, (t, how) in TARGETS.items():
        v = report[key]
        value = "n/a" if v is None else f"{v:7.3f}"
        lines.append(f"{key:<18} {value:>7}  {'<=' if how == 'max' else '>='} {t:.2f}  "
                     f"{'ok' if report['passed'][key] else 'MISSED'}")
    for key in ("multi_precision", "multi_recall", "every_precision", "every_recall"):
        v = report[key]
        lines.append(f"{key:<18} {'n/a' if v is None else f'{v:7.3f}':>7}  (no target)")
    lines.append(f"items: {report['counts']}")
    lines.append("present, by form:  " + ", ".join(f"{k} denied {d['denied']:.2f} IoU {d['iou']:.2f} (n={d['n']})"
                                                   for k, d in report["by_form"].items()))
    lines.append("present, by style: " + ", ".join(f"{k} denied {d['denied']:.2f} IoU {d['iou']:.2f} (n={d['n']})"
                                                   for k, d in report["by_style"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="weights/shapes-tiny")
    ap.add_argument("--scenes", type=int, default=8, help="scenes per rendering style")
    ap.add_argument("--seed", type=int, default=4711)
    ap.add_argument("--json", type=Path, help="write the summary and every answer here")
    ap.add_argument("--save-scenes", type=Path, help="write the first scene of each style as PNG into this folder")
    ap.add_argument("--no-grey", action="store_true", help="leave the grey scenes out (the suite before v13)")
    ap.add_argument("--no-drawn", action="store_true", help="leave the drawn scenes out (the suite before v18)")
    ap.add_argument("--addon", action="append", default=[], help="change an add-on for this run, as groundseg's "
                                                                  "--addon (NAME=off, NAME.SETTING=VALUE)")
    args = ap.parse_args()
    from apps.addon_options import parse_addon_options
    from grounding import Grounder
    grounder = Grounder.from_pretrained(args.model, device="cpu", addons=parse_addon_options(args.addon))
    t0 = time.perf_counter()
    report, rows = run_suite(grounder, args.scenes, args.seed, grey=not args.no_grey, drawn=not args.no_drawn)
    seconds = time.perf_counter() - t0
    scenes = args.scenes * (len(STYLES) + (not args.no_grey) + (not args.no_drawn))
    print(f"model {args.model}, {len(rows)} questions on {scenes} scenes, seed {args.seed}, {seconds:.0f} s")
    print(table(report))
    if args.save_scenes:
        args.save_scenes.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(args.seed)
        for style in STYLES:
            Image.fromarray(make_scene(rng, style).image).save(args.save_scenes / f"{style}.png")
        (args.save_scenes / f"{GREY}.png").write_bytes(grey_png(make_scene(np.random.default_rng([args.seed, 1]),
                                                                          STYLES[0]).image))
        Image.fromarray(make_drawn_scene(np.random.default_rng([args.seed, 3])).image).save(
            args.save_scenes / f"{DRAWN}.png")
    if args.json:
        args.json.write_text(json.dumps({"summary": report, "rows": rows}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
