"""Box text formats of box-speaking VLMs (no ``[SEG]``): their answers -> targets in original pixels.

Conventions (as in ``grounding.text.boxes``): ``image_size`` is ``(H, W)`` of the ORIGINAL image; a box is float
pixel ``(x1, y1, x2, y2)`` in continuous coordinates ``[0, W] x [0, H]``.

Formats (``box_format`` names):

``shikra``      ``[x1,y1,x2,y2]`` floats with 3 decimals in [0, 1] relative to the image padded to a centred
                ``max(H, W)`` square; several boxes of one phrase ``[b1;b2]``. No phrase markup.
``llava``       LLaVA-1.5: the same frame and brackets, 2 decimals (``[0.12, 0.34, 0.56, 0.78]``).
``qwen2-vl``    ``<|object_ref_start|>p<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`` with integers in
                0..1000 of the image's width / height (the resized input has the image's aspect, so its relative
                coordinates are the original's).
``qwen2.5-vl``  JSON, usually a list inside a ```json fence: ``[{"bbox_2d": [x1, y1, x2, y2], "label": "p"}]`` in
                ABSOLUTE pixels of the resized input (``input_size`` = smart_resize of the image, multiples of 28);
                they map back by ``W / input_w`` and ``H / input_h``.

Reading never raises on any text. A box partly outside the image is clipped, one wholly outside (or empty, or
unreadable) gives ``box=None``; either way the target carries a ``note`` saying what was wrong.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Sequence

from grounding.text.boxes import Box, ParsedTarget, _shikra_frame, _shikra_groups, _size

QWEN2_REF_START, QWEN2_REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
QWEN2_BOX_START, QWEN2_BOX_END = "<|box_start|>", "<|box_end|>"
QWEN2_SCALE = 1000   # Qwen2-VL's normalisation: value / 1000 * size

SQUARE_DECIMALS = {"shikra": 3, "llava": 2}
FORMATS = ("qwen", "shikra", "llava", "qwen2-vl", "qwen2.5-vl")

_NUM = r"[+-]?[0-9]+(?:\.[0-9]+)?"
_QWEN2_PAIR_RE = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_QWEN2_TAG_RE = re.compile("|".join(re.escape(t) for t in (QWEN2_REF_START, QWEN2_REF_END, QWEN2_BOX_START,
                                                            QWEN2_BOX_END)))
_FENCE_RE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL)
# A "bbox_2d" list and, optionally, a "label" string in the same object: the fallback for cut or broken JSON.
_BBOX_RE = re.compile(r'"bbox_2d"\s*:\s*\[([^\[\]]*)\]')
_LABEL_RE = re.compile(r'"label"\s*:\s*"((?:[^"\\]|\\.)*)"')


# ----------------------------------------------------------------------------- frames


def square_to_pixels(box: Sequence[float], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box relative to the centred padded square (Shikra / LLaVA-1.5) -> pixels of the image (not clipped)."""
    h, w = _size(image_size)
    side, dx, dy = _shikra_frame(h, w)
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 * side - dx, y1 * side - dy, x2 * side - dx, y2 * side - dy)


def pixels_to_square(box: Sequence[float], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Inverse of :func:`square_to_pixels`."""
    h, w = _size(image_size)
    side, dx, dy = _shikra_frame(h, w)
    x1, y1, x2, y2 = (float(v) for v in box)
    return ((x1 + dx) / side, (y1 + dy) / side, (x2 + dx) / side, (y2 + dy) / side)


def input_to_pixels(box: Sequence[float], image_size: tuple[int, int], input_size: tuple[int, int]) -> Box:
    """A box in pixels of the VLM's resized input ``(h', w')`` -> pixels of the ``(H, W)`` image (not clipped)."""
    h, w = _size(image_size)
    ih, iw = _size(input_size)
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 * w / iw, y1 * h / ih, x2 * w / iw, y2 * h / ih)


def pixels_to_input(box: Sequence[float], image_size: tuple[int, int], input_size: tuple[int, int]) -> Box:
    """Inverse of :func:`input_to_pixels`."""
    h, w = _size(image_size)
    ih, iw = _size(input_size)
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 * iw / w, y1 * ih / h, x2 * iw / w, y2 * ih / h)


def checked_box(box: Sequence[float], image_size: tuple[int, int]) -> tuple[Box | None, str | None]:
    """A pixel box as a model wrote it -> (the box clipped to the image with its corners ordered, or None; a note
    saying what was wrong, or None)."""
    h, w = _size(image_size)
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None, f"unreadable box {list(box)!r}"
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, f"box {list(box)!r} has a non-finite coordinate"
    note = None
    if x1 > x2 or y1 > y2:
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        note = "box corners were in the wrong order"
    if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
        return None, f"box {_fmt((x1, y1, x2, y2))} lies outside the {w:g}x{h:g} image"
    clipped = (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))
    if clipped != (x1, y1, x2, y2):
        note = f"box {_fmt((x1, y1, x2, y2))} clipped to the {w:g}x{h:g} image"
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        return None, f"box {_fmt((x1, y1, x2, y2))} is empty"
    return clipped, note


def _fmt(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in box) + ")"


def _target(phrase: str | None, raw: Sequence[float] | None, size, span, note: str | None = None) -> ParsedTarget:
    box, why = checked_box(raw, size) if raw is not None else (None, None)
    notes = [n for n in (note, why) if n]
    return ParsedTarget(phrase, box, None, span, "; ".join(notes) or None)


# ----------------------------------------------------------------------------- Shikra / LLaVA-1.5


def parse_square(text: str, image_size: tuple[int, int]) -> list[ParsedTarget]:
    """Shikra / LLaVA-1.5 answers: every ``[x1,y1,x2,y2]`` (or ``[b1;b2]``) group, each box a target without a
    phrase. Values outside [0, 1] are not clamped in the square: the pixel box is clipped to the image instead
    (with a note), so a box in the padding is reported rather than moved."""
    _size(image_size)
    out = []
    for group in _shikra_groups(text, 4):
        for numbers in group:
            out.append(_target(None, square_to_pixels(numbers, image_size), image_size, (0, len(text))))
    return out


def format_square(box: Sequence[float], image_size: tuple[int, int], decimals: int) -> str:
    """Pixel box -> ``[x1,y1,x2,y2]`` on the padded square with ``decimals`` decimals (clamped to [0, 1])."""
    rel = pixels_to_square(box, image_size)
    return "[" + ",".join(f"{min(max(v, 0.0), 1.0):.{decimals}f}" for v in rel) + "]"


# ----------------------------------------------------------------------------- Qwen2-VL


def parse_qwen2(text: str, image_size: tuple[int, int]) -> list[ParsedTarget]:
    """Qwen2-VL answers: ``<|object_ref_start|>p<|object_ref_end|>`` (optional) then one or more
    ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` (0..1000); a box with no phrase right before it has
    ``phrase=None``. One left-to-right pass over the tags: linear time."""
    h, w = _size(image_size)
    tags = [(m.group(), m.start(), m.end()) for m in _QWEN2_TAG_RE.finditer(text)]
    out: list[ParsedTarget] = []
    phrase, phrase_end, phrase_start = None, -1, 0
    for i, (tok, start, end) in enumerate(tags):
        nxt = tags[i + 1] if i + 1 < len(tags) else None
        if tok == QWEN2_REF_START and nxt is not None and nxt[0] == QWEN2_REF_END:
            phrase, phrase_end, phrase_start = text[end:nxt[1]].strip(), nxt[2], start
        elif tok == QWEN2_BOX_START:
            # the phrase belongs to the boxes that follow it with only whitespace (or other boxes) between
            mine = phrase if phrase is not None and not text[phrase_end:start].strip() else None
            first = start if mine is None else phrase_start
            if nxt is None or nxt[0] != QWEN2_BOX_END:
                out.append(_target(mine, None, image_size, (first, end), "a <|box_start|> was never closed"))
                continue
            body = text[end:nxt[1]]
            pairs = list(_QWEN2_PAIR_RE.finditer(body))
            if not pairs:
                out.append(_target(mine, None, image_size, (first, nxt[2]), f"unreadable Qwen2-VL box {body!r}"))
            for m in pairs:
                x1, y1, x2, y2 = (float(g) for g in m.groups())
                raw = (x1 / QWEN2_SCALE * w, y1 / QWEN2_SCALE * h, x2 / QWEN2_SCALE * w, y2 / QWEN2_SCALE * h)
                out.append(_target(mine, raw, image_size, (first, nxt[2])))
            if mine is not None:
                phrase_end = nxt[2]   # several boxes in a row share the phrase
    return out


def format_qwen2(box: Sequence[float], image_size: tuple[int, int]) -> str:
    h, w = _size(image_size)
    x1, y1, x2, y2 = (float(v) for v in box)
    q = [min(max(round(v / s * QWEN2_SCALE), 0), QWEN2_SCALE) for v, s in ((x1, w), (y1, h), (x2, w), (y2, h))]
    return f"{QWEN2_BOX_START}({q[0]},{q[1]}),({q[2]},{q[3]}){QWEN2_BOX_END}"


# ----------------------------------------------------------------------------- Qwen2.5-VL


def _json_candidates(text: str) -> list[str]:
    """The fenced blocks of the text, else the text from its first ``[`` or ``{``."""
    fenced = [m.group(1) for m in _FENCE_RE.finditer(text)]
    if fenced:
        return fenced
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
    if not starts:
        # an opened fence that was never closed (the answer was cut): what follows it
        open_fence = text.find("```")
        return [text[open_fence + 3:].removeprefix("json")] if open_fence >= 0 else []
    return [text[min(starts):]]


def _objects(value: Any) -> list[dict] | None:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return list(value)
    return None


def parse_qwen25(text: str, image_size: tuple[int, int], input_size: tuple[int, int] | None = None) -> list[ParsedTarget]:
    """Qwen2.5-VL answers: JSON objects with ``bbox_2d`` (pixels of the ``input_size`` = ``(h', w')`` the model
    saw; default: the image's own size) and ``label``. JSON that does not load (cut by the token limit, a
    trailing comma) is read object by object with a pattern, with a note; anything else gives no target."""
    _size(image_size)
    input_size = input_size or image_size
    out: list[ParsedTarget] = []
    span = (0, len(text))
    for chunk in _json_candidates(text):
        chunk = chunk.strip()
        try:
            objects, note = _objects(json.JSONDecoder().raw_decode(chunk)[0]), None
        except ValueError:
            objects, note = None, "malformed JSON"
        if objects is None:
            objects = _pattern_objects(chunk)
            note = (note or "JSON of another shape") + (f": {len(objects)} box(es) read by pattern" if objects else "")
            if not objects:
                out.append(ParsedTarget(None, None, None, span, note + ": no bbox_2d found"))
                continue
        for obj in objects:
            label = obj.get("label")
            label = label.strip() if isinstance(label, str) else None
            raw = obj.get("bbox_2d")
            if not (isinstance(raw, (list, tuple)) and len(raw) == 4
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)):
                out.append(ParsedTarget(label, None, None, span, f"bbox_2d {raw!r} is not four numbers"))
                continue
            out.append(_target(label, input_to_pixels(raw, image_size, input_size), image_size, span, note))
    return out


def _pattern_objects(chunk: str) -> list[dict]:
    """``bbox_2d`` lists (and the ``label`` of the same object, when it follows within the object) by pattern."""
    found = []
    matches = list(_BBOX_RE.finditer(chunk))
    for k, m in enumerate(matches):
        try:
            box = [float(v) for v in m.group(1).split(",")]
        except ValueError:
            box = m.group(1)
        end = matches[k + 1].start() if k + 1 < len(matches) else len(chunk)
        obj_start = chunk.rfind("{", 0, m.start())
        label = _LABEL_RE.search(chunk, obj_start if obj_start >= 0 else m.start(), end)
        try:
            text = json.loads(f'"{label.group(1)}"') if label else None
        except ValueError:
            text = label.group(1)
        found.append({"bbox_2d": box, "label": text})
    return found


def format_qwen25(boxes: Sequence[Sequence[float]], labels: Sequence[str | None], image_size: tuple[int, int],
                  input_size: tuple[int, int] | None = None) -> str:
    """Pixel boxes -> Qwen2.5-VL's fenced JSON list in integer pixels of the resized input."""
    input_size = input_size or image_size
    ih, iw = _size(input_size)
    items = []
    for box, label in zip(boxes, labels):
        x1, y1, x2, y2 = pixels_to_input(box, image_size, input_size)
        q = [int(min(max(round(v), 0), s)) for v, s in ((x1, iw), (y1, ih), (x2, iw), (y2, ih))]
        items.append({"bbox_2d": q, **({"label": label} if label is not None else {})})
    return "```json\n" + json.dumps(items, ensure_ascii=False) + "\n```"


# ----------------------------------------------------------------------------- dispatch


def format_box_as(box: Sequence[float], image_size: tuple[int, int], box_format: str,
                  input_size: tuple[int, int] | None = None) -> str:
    """One pixel box in a non-Qwen-VL format (``grounding.text.boxes.format_box`` dispatches here)."""
    if box_format in SQUARE_DECIMALS:
        return format_square(box, image_size, SQUARE_DECIMALS[box_format])
    if box_format == "qwen2-vl":
        return format_qwen2(box, image_size)
    if box_format == "qwen2.5-vl":
        x1, y1, x2, y2 = pixels_to_input(box, image_size, input_size or image_size)
        return "[" + ", ".join(str(int(round(v))) for v in (x1, y1, x2, y2)) + "]"
    raise ValueError(f"unknown box format {box_format!r}; use one of {', '.join(FORMATS)}")


def format_point_as(point: Sequence[float], image_size: tuple[int, int], box_format: str,
                    input_size: tuple[int, int] | None = None) -> str:
    """One pixel point ``(x, y)`` in a non-Qwen-VL format."""
    x, y = (float(v) for v in point)
    if box_format in SQUARE_DECIMALS:
        rel = pixels_to_square((x, y, x, y), image_size)[:2]
        return "[" + ",".join(f"{min(max(v, 0.0), 1.0):.{SQUARE_DECIMALS[box_format]}f}" for v in rel) + "]"
    if box_format == "qwen2-vl":
        h, w = _size(image_size)
        return f"({round(x / w * QWEN2_SCALE)},{round(y / h * QWEN2_SCALE)})"
    if box_format == "qwen2.5-vl":
        px, py = pixels_to_input((x, y, x, y), image_size, input_size or image_size)[:2]
        return f"({int(round(px))}, {int(round(py))})"
    raise ValueError(f"unknown box format {box_format!r}; use one of {', '.join(FORMATS)}")


def parse_answer_as(text: str, image_size: tuple[int, int], box_format: str,
                    input_size: tuple[int, int] | None = None) -> list[ParsedTarget]:
    """Targets of an answer in a non-Qwen-VL format (``grounding.text.boxes.parse_answer`` dispatches here)."""
    if box_format in SQUARE_DECIMALS:
        return parse_square(text, image_size)
    if box_format == "qwen2-vl":
        return parse_qwen2(text, image_size)
    if box_format == "qwen2.5-vl":
        return parse_qwen25(text, image_size, input_size)
    raise ValueError(f"unknown box format {box_format!r}; use one of {', '.join(FORMATS)}")
