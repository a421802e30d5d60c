"""RefCopy: while an answer's ``<ref>`` phrase repeats words of the question, its next word leans to the question's.

Asked "Where is the shape with five corners?", a small language model can answer "<ref>the shape with four
corners</ref>": it copies a phrase imperfectly, and the locator then finds the object of the words it wrote. The
miscopied word is typically the model's choice by a small margin over the question's word (measured on the
default model in weights/shapes-tiny/MODEL_CARD.md). So, while decoding: when the phrase written since ``<ref>``
so far is a run of the question's words, every token that continues such a run, and ``</ref>``, gets ``bias``
added to its logit. The model still picks among them, and it keeps any other word it prefers by more than
``bias`` nats (a factor of ``e ** bias`` in probability); once the phrase leaves the question (a region's
description, an object the question does not name) nothing is pushed, and its first word never is.

Words are compared as lower-case token texts without their leading-space marker (``Ġ``/``▁``), so "the" at the
start of a phrase matches " the" inside the question. The ``ref_copy`` add-on (``bias``; shapes/addons.py); its
``strict`` setting rules out every other token instead (shapes/ref_strict.py).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from grounding.text.tokenizer import split_space_marker
from grounding.text.tokens import BOX_END, REF_END, REF_START, SEG


@dataclass
class TokenWords:
    """A vocabulary read as question words: ``words[id]`` each token's text in lower case without its leading-space
    marker, ``ids_of[word]`` the tokens that spell it, and the ``<ref>`` / ``</ref>`` ids. Built once per tokenizer."""
    words: list[str]
    ids_of: dict[str, list[int]]
    ref_start: int
    ref_end: int
    seg: int | None = None
    box_end: int | None = None
    spaced: list[bool] | None = None    # per id: the token opens with a space marker (a new word)

    @classmethod
    def of(cls, tokenizer) -> "TokenWords":
        pieces = [split_space_marker(p or "") for p in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
        words = [w.lower() for _, w in pieces]
        ids_of: dict[str, list[int]] = defaultdict(list)
        for index, word in enumerate(words):
            ids_of[word].append(index)
        return cls(words, dict(ids_of), *(tokenizer.convert_tokens_to_ids(t) for t in (REF_START, REF_END, SEG, BOX_END)),
                   [bool(m) for m, _ in pieces])

    def ref_phrases(self, ids: list[int]) -> tuple[list[list[int]], list[int] | None]:
        """(the closed ``<ref>`` phrases of ``ids``, as token ids; the open one, or None)."""
        done, current = [], None
        for t in ids:
            if t == self.ref_start:
                current = []
            elif t == self.ref_end and current is not None:
                done.append(current)
                current = None
            elif current is not None:
                current.append(t)
        return done, current


class RefCopy:
    """Per answer row: the question's token ids and the ids of any answer prefix in the prompt. ``adjust(row, ids,
    scores)`` adds the bias in place to ``scores`` ``[vocab]``, the next-token logits after the generated ``ids``."""

    def __init__(self, vocab: TokenWords, questions: list[list[int]], prefixes: list[list[int]], bias: float):
        self.vocab, self.prefixes, self.bias = vocab, prefixes, float(bias)
        self.questions = [[vocab.words[t] for t in q] for q in questions]

    def phrase(self, ids: list[int]) -> list[str] | None:
        """The words of the ``<ref>`` phrase still open at the end of ``ids`` (None when none is open)."""
        v = self.vocab
        start = max((i for i, t in enumerate(ids) if t == v.ref_start), default=None)
        if start is None or v.ref_end in ids[start:]:
            return None
        return [v.words[t] for t in ids[start + 1:]]

    def pushed(self, row: int, ids: list[int]) -> list[int]:
        """Token ids that continue the open phrase as a run of the question's words, and ``</ref>``; [] when no
        phrase is open, it is empty, or it has left the question."""
        phrase = self.phrase(self.prefixes[row] + ids)
        question = self.questions[row]
        n = len(phrase or ())
        starts = [j for j in range(len(question) - n + 1) if question[j:j + n] == phrase] if n else []
        if not starts:
            return []
        words = {question[j + n] for j in starts if j + n < len(question)}
        return [self.vocab.ref_end] + [i for w in words for i in self.vocab.ids_of.get(w, ())]

    def adjust(self, row: int, ids: list[int], scores: torch.Tensor) -> None:
        index = self.pushed(row, ids)
        if index:
            scores[index] += self.bias
