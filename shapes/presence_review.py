"""How the ``presence`` add-on changes an answer: the first answer token may not open the denial, and targets whose
object the presence head does not find are turned into "There is no ... in the image."

The language model keeps writing what it writes (the phrase, its box, its [SEG]); whether the phrase's object is
there is the presence head's decision (shapes/presence.py), read on the image instead of the wording.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from grounding.text.tokens import SEG


class NoDenialStart:
    """Logits rule: an answer (with no answer prefix) may not begin with "There", the denial's first word (a
    whitespace token before it does not count as a beginning)."""

    def __init__(self, words, prefixes: list[list[int]]):
        self.words, self.prefixes = words.words, prefixes
        self.banned = [i for i, w in enumerate(self.words) if w == "there"]

    def adjust(self, row: int, ids: list[int], scores: torch.Tensor) -> None:
        if self.banned and not self.prefixes[row] and all(not self.words[t].strip() for t in ids):
            scores[self.banned] = float("-inf")


def _no_article(phrase: str) -> str:
    return re.sub(r"^(the|a|an)\s+", "", phrase.strip(), flags=re.IGNORECASE)


def denial(phrase: str) -> str:
    """The training answers' denial of ``phrase`` ("There is no red star in the image.")."""
    return f"There is no {_no_article(phrase)} in the image."


def drop_absent(prediction, reasons: dict[str, str]):
    """The Prediction without the targets whose phrase is a key of ``reasons``: their ``<ref>`` spans leave the
    answer text, which then says "There is no ..." of each; a note gives each one's reason."""
    kept = [t for t in prediction.targets if t.phrase not in reasons]
    text = prediction.answer
    for phrase in sorted(reasons):
        span = re.escape(f"<ref>{phrase}</ref>") + r"(?:<box>.*?</box>)?\s*(?:" + re.escape(SEG) + r")?"
        text = re.sub(span, "", text)
    text = " ".join([text.strip()] + [denial(p) for p in sorted(reasons)]).strip()
    notes = list(prediction.notes) + [f"target {p!r} dropped: {reasons[p]}" for p in sorted(reasons)]
    return dataclasses.replace(prediction, answer=text, targets=kept, notes=notes)
