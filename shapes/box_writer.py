"""BoxWriter: the box an answer writes comes from the [SEG] locator, not from the language model's digits.

A ``FusionLocator`` reads each phrase against the image and finds its object's box far better than a small
language model writes box coordinates as text (weights/shapes-tiny/MODEL_CARD.md). So, while decoding greedily,
every ``<ref>phrase</ref>`` an answer writes is followed by ``<box>`` and the tokens ``(x1,y1),(x2,y2)</box>`` of
the locator's box for that phrase: the answer's box and its mask then come from the same place, and every object
an answer names gets its box, as Qwen-VL's answers do. Qwen-VL box text only (``box_format="qwen"``).

Given the questions, each box is then followed by ``[SEG]`` unless the question asks for a box (``asks_for_box``):
the model was taught box-only answers for "Answer with a box." alone, yet writes them for unseen forms too ("How
many squares are there?"), which would leave a user of a segmentation service with boxes and no masks.
"""
from __future__ import annotations

import torch

from grounding.addons.base import ref_repeats
from grounding.text.boxes import format_box
from grounding.text.tokens import BOX_END, BOX_START, REF_END, REF_START, SEG
from shapes.question_language import asks_for_box


def ref_phrase_ids(tokenizer, phrase: str) -> list[int]:
    """The token ids of ``phrase`` as an answer's ``<ref>phrase</ref>`` spells it (its first word after ``<ref>``,
    not at the start of a text)."""
    return tokenizer(f"{REF_START}{phrase}{REF_END}", add_special_tokens=False)["input_ids"][1:-1]


class BoxWriter:
    """Per answer row: its image (a ``PreparedImage`` the ``locator`` add-on has read), the ids of any answer
    prefix given in the prompt and, optionally, its question. A logits rule: ``adjust(row, ids, scores)`` forces the
    next token where a box is being written, and the ``[SEG]`` after it (``next_token``)."""

    def __init__(self, locator, model, tokenizer, images: list, prefixes: list[list[int]],
                 questions: list[str] | None = None):
        self.locator, self.model, self.tokenizer, self.images, self.prefixes = locator, model, tokenizer, images, prefixes
        self.ref_start, self.ref_end, self.box_start, self.box_end, self.seg = (
            tokenizer.convert_tokens_to_ids(t) for t in (REF_START, REF_END, BOX_START, BOX_END, SEG))
        self.seg_after_box = ([not asks_for_box(q) for q in questions] if questions is not None
                              else [False] * len(images))
        self.queue: list[list[int]] = [[] for _ in images]

    def adjust(self, row: int, ids: list[int], scores: torch.Tensor) -> None:
        token = self.next_token(row, ids)
        if token is not None:
            scores[:] = float("-inf")
            scores[token] = 0.0

    def next_token(self, row: int, ids: list[int]) -> int | None:
        """The token to force after the generated ``ids`` so far (None: the model chooses). Call it once per
        generated token."""
        if self.queue[row]:
            return self.queue[row].pop(0)
        ids = self.prefixes[row] + ids
        if ids and ids[-1] == self.ref_end:
            return self.box_start
        if ids and ids[-1] == self.box_end and self.seg_after_box[row]:
            return self.seg
        if len(ids) < 3 or ids[-1] != self.box_start or ids[-2] != self.ref_end:
            return None
        start = max((i for i, t in enumerate(ids[:-2]) if t == self.ref_start), default=None)
        if start is None or start + 1 >= len(ids) - 2:
            return None
        phrase = ids[start + 1:len(ids) - 2]
        box = self.box(row, phrase, self.repeats(ids[:start], phrase))
        text = format_box(box, self.images[row].size)[len(BOX_START):]        # "(x1,y1),(x2,y2)</box>"
        self.queue[row] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.queue[row].pop(0)

    def repeats(self, ids: list[int], phrase: list[int]) -> int:
        """How many ``<ref>..</ref>`` spans of ``ids`` hold exactly ``phrase``: the [SEG]s of "all red shapes" each
        repeat it, and the k-th repeat must name the k-th object, as its mask does (``SegRead.repeats``)."""
        return ref_repeats(ids, phrase, (self.ref_start, self.ref_end))

    @torch.no_grad()
    def box(self, row: int, phrase_ids: list[int], rank: int = 0) -> list[float]:
        """Pixel xyxy box of the phrase's object: the locator's box at its best cell (``rank`` k > 0: at its score
        map's k-th peak, ``peak_cells``, or its k-th distinct box, ``distinct_cells``)."""
        m, image, locator = self.model, self.images[row], self.locator
        like = m.vlm.get_input_embeddings().weight
        phrases = locator.phrases(m, [torch.tensor(phrase_ids, device=like.device)], locator.settings.mirror)
        found = locator.locate(m, like.new_zeros((1, m.llava_config.text_config.hidden_size)),
                               image.extras["locator"], phrases, image.size,
                               ranks=torch.tensor([rank]) if rank else None)
        return found.boxes[0].tolist()
