"""Text <-> geometry: boxes and points as the language model reads and writes them.

Coordinate conventions (the whole project uses them):

- ``image_size`` is always ``(H, W)``: height, then width, in pixels of the ORIGINAL image.
- A box is ``(x1, y1, x2, y2)``: float pixels in the original image, x to the right, y down,
  continuous coordinates in ``[0, W] x [0, H]``, ``x1 <= x2`` and ``y1 <= y2``.
- A point is ``(x, y)`` in float pixels of the original image.

Text formats (only for the model's input and output):

- Qwen-VL (default, ``fmt="qwen"``): ``<box>(x1,y1),(x2,y2)</box>`` and ``<point>(x,y)</point>``,
  integers in ``[0, 999]``, x relative to W and y relative to H of the image itself.
- Shikra (``fmt="shikra"``): ``[0.123,0.456,0.789,0.900]``, a point ``[0.123,0.456]``, several
  boxes of one phrase ``[b1;b2]``; floats with 3 decimals in ``[0, 1]`` relative to the image
  padded (centred, as Shikra's ``expand2square`` does) to a ``max(H, W)`` square.

Answer grammar read by :func:`parse_answer`::

    <ref>phrase</ref> <box>(x1,y1),(x2,y2)</box> [SEG]

where box and ``[SEG]`` are each optional, only whitespace may separate the parts, and a bare
``<box>`` or ``[SEG]`` (LISA style) is a target without a phrase. Parsing never raises on any
string and runs in linear time.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from grounding.text.tokens import BOX_END, BOX_START, POINT_END, POINT_START, REF_END, REF_START, SEG

Box = tuple[float, float, float, float]
Point = tuple[float, float]

# Qwen-VL writes integers 0..999 and its own RefCOCO evaluator decodes them as
# value / 999 * size. Encoding with round(x / size * 999) is the exact inverse up to the
# rounding, so boxes we write decode back within 0.5 / 999 * size pixels under that rule.
DIVISOR = 999

SHIKRA_DECIMALS = 3

# An unsigned or signed decimal number; ASCII digits only. No nested quantifiers, so a long
# run of digits costs linear time even when the match fails.
_NUM = r"[+-]?[0-9]+(?:\.[0-9]+)?"
_PAIR = rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
_BOX_PAIR_RE = re.compile(rf"{_PAIR}\s*,\s*{_PAIR}")
_POINT_BODY_RE = re.compile(rf"\s*{_PAIR}\s*")
_SHIKRA_NUM_RE = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*")
_SHIKRA_GROUP_RE = re.compile(r"\[([^\[\]]*)\]")
# Literal alternatives only: the scanner is linear in the length of the text.
_ANSWER_TOKEN_RE = re.compile("|".join(re.escape(t) for t in (REF_START, REF_END, BOX_START, BOX_END, SEG)))
_POINT_TOKEN_RE = re.compile(f"{re.escape(POINT_START)}|{re.escape(POINT_END)}")
_BOX_TOKEN_RE = re.compile(f"{re.escape(BOX_START)}|{re.escape(BOX_END)}")


@dataclass(frozen=True)
class ParsedTarget:
    """One object mentioned in an answer.

    phrase: text between ``<ref>`` and ``</ref>``; None for a bare ``<box>`` or ``[SEG]``.
    box: pixel xyxy in the original image; None when absent or unreadable.
    seg_index: 0-based ordinal of this target's ``[SEG]`` among all ``[SEG]`` in the text
        (the i-th [SEG] hidden state belongs to the target with ``seg_index == i``).
    span: ``(start, end)`` character span of the target's markup in the text (from ``<ref>``
        or the bare tag to the last tag read); targets of one phrase with several boxes share it.
    note: what was wrong with the target's text (a box clipped to the image, unreadable JSON...), or None.
    """

    phrase: str | None
    box: Box | None
    seg_index: int | None
    span: tuple[int, int]
    note: str | None = None


class QuestionPrompts(NamedTuple):
    """Visual prompts written into a question: pixel points and pixel xyxy boxes."""

    points: list[Point]
    boxes: list[Box]


# ----------------------------------------------------------------------------- helpers


def _size(image_size: Sequence[float]) -> tuple[float, float]:
    """Validate ``(H, W)``; a wrong size is a programming error, not a parse failure."""
    try:
        h, w = (float(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (H, W), got {image_size!r}") from None
    if not (math.isfinite(h) and math.isfinite(w) and h > 0 and w > 0):
        raise ValueError(f"image_size must be two positive numbers (H, W), got {image_size!r}")
    return h, w


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def _finite(values: Sequence[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} has a non-finite coordinate: {values!r}")
    return out


def _pixel_box(box: Sequence[float], h: float, w: float) -> Box:
    """Clamp a box to the image and order its corners."""
    x1, y1, x2, y2 = _finite(box, "box")
    xa, xb = sorted((_clamp(x1, 0.0, w), _clamp(x2, 0.0, w)))
    ya, yb = sorted((_clamp(y1, 0.0, h), _clamp(y2, 0.0, h)))
    return (xa, ya, xb, yb)


def _pixel_point(point: Sequence[float], h: float, w: float) -> Point:
    x, y = _finite(point, "point")
    return (_clamp(x, 0.0, w), _clamp(y, 0.0, h))


def _to_qwen(v: float, size: float) -> int:
    return int(_clamp(round(v / size * DIVISOR), 0, DIVISOR))


def _from_qwen(v: float, size: float) -> float:
    # Out-of-range values (models do write -3 or 1000) are clamped, not rejected.
    return _clamp(v, 0.0, DIVISOR) / DIVISOR * size


def _shikra_frame(h: float, w: float) -> tuple[float, float, float]:
    """Side of the padded square and the (x, y) offset of the image inside it.

    Shikra pads the short side on both ends (integer half of the difference first), so
    coordinates shift by that offset before normalising by the square's side.
    """
    side = max(h, w)
    return side, float((side - w) // 2), float((side - h) // 2)


# ----------------------------------------------------------------------------- formatting


def format_box(box: Sequence[float], image_size: tuple[int, int], fmt: str = "qwen") -> str:
    """Pixel xyxy box -> text: ``<box>(x1,y1),(x2,y2)</box>`` (qwen) or ``[x1,y1,x2,y2]`` (shikra).

    The box is clamped to the image and its corners ordered first. The formats of box-speaking VLMs
    (``llava``, ``qwen2-vl``, ``qwen2.5-vl``; ``grounding.text.box_formats``) are written there.
    """
    h, w = _size(image_size)
    x1, y1, x2, y2 = _pixel_box(box, h, w)
    if fmt == "qwen":
        q = (_to_qwen(x1, w), _to_qwen(y1, h), _to_qwen(x2, w), _to_qwen(y2, h))
        return f"{BOX_START}({q[0]},{q[1]}),({q[2]},{q[3]}){BOX_END}"
    if fmt == "shikra":
        return format_shikra_boxes([(x1, y1, x2, y2)], image_size)
    from grounding.text.box_formats import format_box_as
    return format_box_as((x1, y1, x2, y2), image_size, fmt)


def format_point(point: Sequence[float], image_size: tuple[int, int], fmt: str = "qwen") -> str:
    """Pixel ``(x, y)`` -> ``<point>(x,y)</point>`` (qwen, 0..999) or ``[x,y]`` (shikra)."""
    h, w = _size(image_size)
    x, y = _pixel_point(point, h, w)
    if fmt == "qwen":
        return f"{POINT_START}({_to_qwen(x, w)},{_to_qwen(y, h)}){POINT_END}"
    if fmt == "shikra":
        side, dx, dy = _shikra_frame(h, w)
        return "[" + _shikra_numbers(((x + dx) / side, (y + dy) / side)) + "]"
    from grounding.text.box_formats import format_point_as
    return format_point_as((x, y), image_size, fmt)


def format_ref(
    phrase: str,
    box: Sequence[float] | None = None,
    image_size: tuple[int, int] | None = None,
    seg: bool = False,
) -> str:
    """``<ref>phrase</ref>`` + optional Qwen-VL ``<box>..</box>`` + optional ``[SEG]``."""
    for token in (REF_START, REF_END, BOX_START, BOX_END, SEG):
        if token in phrase:
            # Such a phrase would change how the answer parses back.
            raise ValueError(f"phrase must not contain {token!r}: {phrase!r}")
    text = f"{REF_START}{phrase}{REF_END}"
    if box is not None:
        if image_size is None:
            raise ValueError("format_ref needs image_size to write a box")
        text += format_box(box, image_size)
    return text + (SEG if seg else "")


def _shikra_numbers(values: Sequence[float]) -> str:
    return ",".join(f"{_clamp(v, 0.0, 1.0):.{SHIKRA_DECIMALS}f}" for v in values)


def format_shikra_boxes(boxes: Sequence[Sequence[float]], image_size: tuple[int, int]) -> str:
    """Several pixel xyxy boxes of one phrase -> Shikra ``[b1;b2;...]``."""
    h, w = _size(image_size)
    side, dx, dy = _shikra_frame(h, w)
    parts = []
    for box in boxes:
        x1, y1, x2, y2 = _pixel_box(box, h, w)
        parts.append(_shikra_numbers(((x1 + dx) / side, (y1 + dy) / side, (x2 + dx) / side, (y2 + dy) / side)))
    return "[" + ";".join(parts) + "]"


# ----------------------------------------------------------------------------- Shikra parsing


def _shikra_groups(text: str, arity: int) -> list[list[list[float]]]:
    """Every ``[...]`` whose ``;``-separated parts all hold ``arity`` numbers."""
    groups = []
    for match in _SHIKRA_GROUP_RE.finditer(text):
        parts = []
        for chunk in match.group(1).split(";"):
            fields = chunk.split(",")
            nums = [_SHIKRA_NUM_RE.fullmatch(f) for f in fields]
            if len(fields) != arity or not all(nums):
                break
            parts.append([float(m.group(1)) for m in nums])
        else:
            groups.append(parts)
    return groups


def parse_shikra_boxes(text: str, image_size: tuple[int, int]) -> list[list[Box]]:
    """Shikra box groups in order: ``[b1;b2]`` -> ``[[box1, box2]]`` in pixel xyxy.

    Brackets that are not all four-number boxes (``[SEG]``, a point ``[x,y]``) are skipped.
    """
    h, w = _size(image_size)
    side, dx, dy = _shikra_frame(h, w)
    out = []
    for group in _shikra_groups(text, 4):
        boxes = []
        for x1, y1, x2, y2 in group:
            raw = [_clamp(v, 0.0, 1.0) * side for v in (x1, y1, x2, y2)]
            boxes.append(_pixel_box((raw[0] - dx, raw[1] - dy, raw[2] - dx, raw[3] - dy), h, w))
        out.append(boxes)
    return out


def parse_shikra_points(text: str, image_size: tuple[int, int]) -> list[Point]:
    """Shikra points ``[x,y]`` (or ``[p1;p2]``) in order, as pixel ``(x, y)``."""
    h, w = _size(image_size)
    side, dx, dy = _shikra_frame(h, w)
    return [
        _pixel_point((_clamp(x, 0.0, 1.0) * side - dx, _clamp(y, 0.0, 1.0) * side - dy), h, w)
        for group in _shikra_groups(text, 2)
        for x, y in group
    ]


# ----------------------------------------------------------------------------- Qwen-VL evaluator rule


def _first_qwen_eval_match(text: str) -> tuple[str, str] | None:
    """The groups of the first match of ``\\((.*?)\\),\\((.*?)\\)``, found in linear time.

    Equivalent to ``re.search`` with that pattern (``.`` stops at newlines): in a line, a
    match starts at the first ``(``, group 1 ends at the first ``),(`` after it and group 2
    at the first ``)`` after that; if a line has none, no later start in it can match either.
    The regex itself is quadratic on inputs such as ``"(" * 50000``.
    """
    for line in text.split("\n"):
        start = line.find("(")
        mid = line.find("),(", start + 1) if start >= 0 else -1
        end = line.find(")", mid + 3) if mid >= 0 else -1
        if end >= 0:
            return line[start + 1 : mid], line[mid + 3 : end]
    return None


def qwen_eval_box(text: str, image_size: tuple[int, int]) -> Box | None:
    """The box Qwen-VL's RefCOCO evaluator reads from an answer, in pixels; None = a miss.

    Rule: first match of ``\\((.*?)\\),\\((.*?)\\)``; each group split on ``,`` into exactly two
    numbers (as Python's ``float`` reads them); x -> ``v / 999 * W``, y -> ``v / 999 * H``.
    Like the evaluator, no clamping and no corner ordering; a non-finite value is a miss.
    """
    h, w = _size(image_size)
    groups = _first_qwen_eval_match(text)
    if groups is None:
        return None
    try:
        x1, y1 = (float(v) for v in groups[0].split(","))
        x2, y2 = (float(v) for v in groups[1].split(","))
    except ValueError:
        return None
    box = (x1 / DIVISOR * w, y1 / DIVISOR * h, x2 / DIVISOR * w, y2 / DIVISOR * h)
    return box if all(math.isfinite(v) for v in box) else None


# ----------------------------------------------------------------------------- Qwen-VL parsing


def _qwen_pair_box(m: re.Match, h: float, w: float) -> Box | None:
    """One ``(x1,y1),(x2,y2)`` match -> pixel box; None if it lies wholly outside 0..999."""
    x1, y1, x2, y2 = (float(g) for g in m.groups())
    # Slightly out-of-range values (-3, 1000) are clamped; a box with no part inside the
    # frame would clamp onto an edge line, which is not what the model meant: unreadable.
    if max(x1, x2) < 0 or min(x1, x2) > DIVISOR or max(y1, y2) < 0 or min(y1, y2) > DIVISOR:
        return None
    xa, xb = sorted((_from_qwen(x1, w), _from_qwen(x2, w)))
    ya, yb = sorted((_from_qwen(y1, h), _from_qwen(y2, h)))
    return (xa, ya, xb, yb)


def _parse_box_body(body: str, h: float, w: float) -> list[Box | None]:
    """Text between ``<box>`` and ``</box>`` -> one entry per ``(x,y),(x,y)`` pair; [None] if none."""
    boxes = [_qwen_pair_box(m, h, w) for m in _BOX_PAIR_RE.finditer(body)]
    return boxes or [None]


def _closed_bodies(text: str, token_re: re.Pattern, open_tok: str) -> list[str]:
    """Bodies of ``open ... close`` where the close is the very next tag; others are skipped."""
    tags = [(m.group(), m.start(), m.end()) for m in token_re.finditer(text)]
    return [
        text[end : tags[i + 1][1]]
        for i, (tok, _, end) in enumerate(tags)
        if tok == open_tok and i + 1 < len(tags) and tags[i + 1][0] != open_tok
    ]


def parse_points(text: str, image_size: tuple[int, int]) -> list[Point]:
    """``<point>(x,y)</point>`` (Qwen-VL 0..999) -> pixel points in order; unreadable ones skipped."""
    h, w = _size(image_size)
    points = []
    for body in _closed_bodies(text, _POINT_TOKEN_RE, POINT_START):
        m = _POINT_BODY_RE.fullmatch(body)
        if m:
            points.append((_from_qwen(float(m.group(1)), w), _from_qwen(float(m.group(2)), h)))
    return points


def parse_question_prompts(text: str, image_size: tuple[int, int]) -> QuestionPrompts:
    """The visual prompts a question carries: its ``<point>`` and ``<box>`` tags, in pixels.

    Unreadable tags are skipped (never raises on text).
    """
    h, w = _size(image_size)
    boxes = [
        box
        for body in _closed_bodies(text, _BOX_TOKEN_RE, BOX_START)
        for box in _parse_box_body(body, h, w)
        if box is not None
    ]
    return QuestionPrompts(points=parse_points(text, image_size), boxes=boxes)


# ----------------------------------------------------------------------------- answers


class _AnswerParser:
    """Single left-to-right pass over the special tags of an answer (no backtracking)."""

    def __init__(self, text: str, h: float, w: float) -> None:
        self.text, self.h, self.w = text, h, w
        self.tags = [(m.group(), m.start(), m.end()) for m in _ANSWER_TOKEN_RE.finditer(text)]
        self.seg_ordinal = 0
        self.targets: list[ParsedTarget] = []

    def _adjacent(self, i: int, pos: int, token: str) -> bool:
        """Is tag ``i`` the given token with only whitespace between ``pos`` and it?"""
        if i >= len(self.tags) or self.tags[i][0] != token:
            return False
        return not self.text[pos : self.tags[i][1]].strip()

    def _group(self, i: int, pos: int, phrase: str | None, start: int) -> int:
        """Read boxes then an optional [SEG] from tag ``i`` on; emit targets; return next tag."""
        boxes: list[Box | None] = []
        while self._adjacent(i, pos, BOX_START):
            body_start = self.tags[i][2]
            if i + 1 < len(self.tags) and self.tags[i + 1][0] == BOX_END:
                boxes += _parse_box_body(self.text[body_start : self.tags[i + 1][1]], self.h, self.w)
                pos, i = self.tags[i + 1][2], i + 2
            else:
                # Never closed: the body runs to the next tag; the target stays, without a box.
                boxes.append(None)
                pos = self.tags[i + 1][1] if i + 1 < len(self.tags) else len(self.text)
                i += 1
        seg_index = None
        if self._adjacent(i, pos, SEG):
            seg_index, pos, i = self.seg_ordinal, self.tags[i][2], i + 1
            self.seg_ordinal += 1
        # Several boxes of one phrase share one [SEG]: it goes to the first of them so that
        # each [SEG] belongs to exactly one target.
        for k, box in enumerate(boxes or [None]):
            self.targets.append(ParsedTarget(phrase, box, seg_index if k == 0 else None, (start, pos)))
        return i

    def run(self) -> list[ParsedTarget]:
        i = 0
        while i < len(self.tags):
            token, start, end = self.tags[i]
            if token == REF_START:
                if i + 1 < len(self.tags) and self.tags[i + 1][0] == REF_END:
                    phrase = self.text[end : self.tags[i + 1][1]]
                    i = self._group(i + 2, self.tags[i + 1][2], phrase, start)
                else:
                    i += 1  # unclosed or nested <ref>: dropped, what follows is read on its own
            elif token in (BOX_START, SEG):
                i = self._group(i, start, None, start)
            else:
                i += 1  # stray </ref> or </box>
        return self.targets


def parse_answer(text: str, image_size: tuple[int, int], box_format: str = "qwen",
                 input_size: tuple[int, int] | None = None) -> list[ParsedTarget]:
    """Targets of a model answer in order of appearance (see the module docstring's grammar).

    ``box_format`` names the answer's format: ``"qwen"`` (the grammar below, the default) or one of the
    box-speaking VLMs' formats read by ``grounding.text.box_formats`` (``shikra``, ``llava``, ``qwen2-vl``,
    ``qwen2.5-vl``; the last writes pixels of the model's resized input, ``input_size`` ``(h', w')``).

    Boxes are Qwen-VL ``(x1,y1),(x2,y2)`` in 0..999 (spaces allowed; values outside 0..999
    clamped), returned in pixel xyxy of the ``(H, W)`` image. Several pairs in one ``<box>``,
    or several adjacent ``<box>`` tags, are several targets with the same phrase; the
    ``[SEG]`` after them goes to the first. An unreadable, unclosed or empty box (or one
    wholly outside 0..999) gives ``box=None`` but keeps the target. Every ``[SEG]`` is in
    exactly one target. Never raises on any string; linear time.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    h, w = _size(image_size)
    if box_format != "qwen":
        from grounding.text.box_formats import parse_answer_as
        return parse_answer_as(text, image_size, box_format, input_size)
    return _AnswerParser(text, h, w).run()


# ----------------------------------------------------------------------------- metrics


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two pixel xyxy boxes with continuous area (no +1); zero-area boxes give 0."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    area_a = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0)
    area_b = max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0)
    if not (area_a > 0 and area_b > 0):  # also catches NaN
        return 0.0
    inter = max(min(ax2, bx2) - max(ax1, bx1), 0.0) * max(min(ay2, by2) - max(ay1, by1), 0.0)
    union = area_a + area_b - inter
    return inter / union if union > 0 and math.isfinite(union) else 0.0
