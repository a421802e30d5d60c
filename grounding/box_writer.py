"""BoxWriter: the box an answer writes comes from the [SEG] locator, not from the language model's digits.

A model with a ``FusionLocator`` reads each phrase against the image and finds its object's box (val Acc@0.5
55% for the default model) far better than a small language model writes box coordinates as text (0.5%).
So, while decoding greedily, every ``<ref>phrase</ref>`` an answer writes is followed by ``<box>`` and the tokens
``(x1,y1),(x2,y2)</box>`` of the locator's box for that phrase: the answer's box and its mask then come from the
same place. Training answers carry a box after half of their phrases, so the language model alone would toss a
coin (and each stage 2 moved it: the default model wrote a box in 42% of segment answers in v7, 62% in v8, 33% in
v9); the product's answers name every object with its box, as Qwen-VL's do. Qwen-VL box text only
(``box_format="qwen"``).
"""
from __future__ import annotations

import torch

from grounding.boxes import format_box
from grounding.tokens import BOX_START, REF_END, REF_START


class BoxWriter:
    """Per answer row: its image (a ``PreparedImage`` whose ``locator_features`` are computed, and
    ``mirrored_features`` with ``mirror_table``: grounding/locator_mirror.py) and the ids of any answer prefix
    given in the prompt; ``next_token(row, ids)`` gives the token to force after the generated ``ids`` so far (or
    None to let the model choose). Call it once per generated token."""

    def __init__(self, model, tokenizer, images: list, prefixes: list[list[int]],
                 mirror_table: torch.Tensor | None = None):
        self.model, self.tokenizer, self.images, self.prefixes = model, tokenizer, images, prefixes
        self.mirror_table = mirror_table
        self.ref_start, self.ref_end, self.box_start = (tokenizer.convert_tokens_to_ids(t)
                                                        for t in (REF_START, REF_END, BOX_START))
        self.queue: list[list[int]] = [[] for _ in images]

    @classmethod
    def applies_to(cls, model) -> bool:
        return model.has_fusion_locator and model.config.box_format == "qwen"

    def next_token(self, row: int, ids: list[int]) -> int | None:
        if self.queue[row]:
            return self.queue[row].pop(0)
        ids = self.prefixes[row] + ids
        if ids and ids[-1] == self.ref_end:
            return self.box_start
        if len(ids) < 3 or ids[-1] != self.box_start or ids[-2] != self.ref_end:
            return None
        start = max((i for i, t in enumerate(ids[:-2]) if t == self.ref_start), default=None)
        if start is None or start + 1 >= len(ids) - 2:
            return None
        box = self.box(row, ids[start + 1:len(ids) - 2])
        text = format_box(box, self.images[row].size)[len(BOX_START):]        # "(x1,y1),(x2,y2)</box>"
        self.queue[row] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.queue[row].pop(0)

    @torch.no_grad()
    def box(self, row: int, phrase_ids: list[int]) -> list[float]:
        """Pixel xyxy box of the phrase's object: the locator's box at its best cell."""
        m, image = self.model, self.images[row]
        like = m.vlm.get_input_embeddings().weight
        phrases = m.phrases([torch.tensor(phrase_ids, device=like.device)], self.mirror_table)
        found = m.locate(like.new_zeros((1, m.llava_config.text_config.hidden_size)), image.locator_features,
                         phrases, image.size, mirrored_states=image.mirrored_features)
        return found.boxes[0].tolist()
