"""Conversation template and visual prompts written into the question as text.

The template is LLaVA-1.5's ("USER: <image>\\n{question} ASSISTANT:"), so converted LLaVA-1.5 checkpoints keep
working. Clicks and drawn boxes become ``<point>(x,y)</point>`` / ``<box>(x1,y1),(x2,y2)</box>`` in the
project's box format (reference §1), appended to the question.
"""
from __future__ import annotations

from typing import Sequence

from grounding.text.boxes import format_box, format_point
from grounding.text.tokens import IMAGE

ANSWER_PREFIX = " ASSISTANT:"


def visual_prompt_text(
    image_size: tuple[int, int],
    points: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
    boxes: Sequence[Sequence[float]] | None = None,
    fmt: str = "qwen",
) -> str:
    """Text for the user's clicks and boxes. Only positive clicks are written: a negative click says where
    the object is NOT, which a referring question cannot express; the click path still uses it."""
    points = [] if points is None else list(points)
    labels = [1] * len(points) if point_labels is None else list(point_labels)
    parts = [format_point(p, image_size, fmt=fmt) for p, lab in zip(points, labels) if int(lab) == 1]
    parts += [format_box(b, image_size, fmt=fmt) for b in ([] if boxes is None else boxes)]
    return " ".join(parts)


def build_prompt(question: str, visual_prompts: str = "") -> str:
    """The text before the answer. ``question`` must already be validated (non-empty)."""
    question = question.strip()
    if visual_prompts:
        question = f"{question} {visual_prompts}"
    return f"USER: {IMAGE}\n{question}{ANSWER_PREFIX}"
