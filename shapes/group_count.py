"""GroupCount: an "all ..." answer names as many objects as the image holds, read one candidate at a time.

The default model's language model writes "<ref>all blue shapes</ref>..[SEG]" about twice whatever the count
(most training groups have two members; weights/shapes-tiny/MODEL_CARD.md, v11), and the locator's score map cannot
count (its peaks merge). But the locator does say where the next candidate is (its k-th peak, or with its
``distinct_boxes`` its k-th cell boxing a new object, as the k-th repeat's box and mask already use), and the
region head says what is there. So after the k-th repeat of a group phrase ("all ...", "every ...", "both ...", or
a plural: "the green pentagons"), where the model would end its answer, this rule reads the region head at the
locator's box for candidate k: when that region is a new object (its box overlaps none of the earlier ones by more
than ``overlap`` IoU, nor holds one's centre) that the head is sure (``confidence``) has every colour and kind the
phrase names (or, the head unsure of the kind, the mask the box gets is one new object whose outline clearly has
it, ``outline_kind``; for a phrase of no colour or kind, "all shapes" or "all the objects": of some kind, or of a
clear outline), the answer goes on with the phrase once more. It only adds objects the model left out; the model's
own repeats stay.
"""
from __future__ import annotations

import torch

from grounding.result import box_from_mask
from grounding.text.boxes import box_iou
from shapes.outline_kind import outline_kind
from shapes.region_head import region_box
from shapes.region_verify import ARTICLES, KINDLESS, REPEAT_BOX_FIT, sureness


class GroupCount:
    """A logits rule of the ``region`` add-on. Per answer row: its image and the ids of any answer prefix.
    ``adjust(row, ids, scores)`` forces a repeat of the phrase, token by token, where the model would end the
    answer right after a group phrase's target (its ``[SEG]``, or its box when the answer gives boxes only)."""

    GROUP_WORDS = ("all", "every", "both")
    confidence = 0.5    # the head's probability that the region has the phrase's colour and kind (for "all shapes":
                        # its likeliest kind)
    overlap = 0.2       # a box overlapping an earlier one by more is the same object again

    def __init__(self, region, locator, model, tokenizer, words, images: list, prefixes: list[list[int]]):
        from shapes.box_writer import BoxWriter

        self.region, self.words, self.images, self.prefixes = region, words, images, prefixes
        self.boxes = BoxWriter(locator, model, tokenizer, images, prefixes)   # its box at a candidate rank
        self.eos = tokenizer.eos_token_id
        self.space = [i for i in words.ids_of.get("", ()) if tokenizer.convert_ids_to_tokens(i) in ("Ġ", "▁")][:1]
        self.kind_of = region.vocab.kind_words()
        self.plurals = {w for w in self.kind_of if w not in region.vocab.kinds} | {"shapes"}
        self.queue: list[list[int]] = [[] for _ in images]

    def adjust(self, row: int, ids: list[int], scores: torch.Tensor) -> None:
        token = self.next_token(row, ids, ends=int(scores.argmax()) == self.eos)
        if token is not None:
            scores[:] = float("-inf")
            scores[token] = 0.0

    def next_token(self, row: int, ids: list[int], ends: bool) -> int | None:
        """The token to force after ``ids`` (None: the model chooses); ``ends``: the model would end the answer
        here."""
        if self.queue[row]:
            return self.queue[row].pop(0)
        seq = self.prefixes[row] + ids
        if not ends or not seq or seq[-1] not in (self.words.seg, self.words.box_end):   # a target's end
            return None
        done, _ = self.words.ref_phrases(seq)
        if not done or not done[-1] or not self.is_group(done[-1]):
            return None
        phrase = done[-1]
        if not self.another(row, phrase, sum(p == phrase for p in done)):
            return None
        self.queue[row] = self.space + [self.words.ref_start, *phrase, self.words.ref_end]
        return self.queue[row].pop(0)

    def is_group(self, phrase: list[int]) -> bool:
        """Whether ``phrase`` names a group: it starts "all", "every" or "both", or names a plural ("the green
        pentagons", "red shapes")."""
        text = [self.words.words[t] for t in phrase]
        return text[0] in self.GROUP_WORDS or any(w in self.plurals for w in text)

    def names_every_object(self, text: list[str]) -> bool:
        """Whether a group phrase's words name objects of any kind ("all shapes", "all the objects")."""
        rest = [w for w in text if w not in self.GROUP_WORDS and w not in ARTICLES]
        return bool(rest) and all(w in KINDLESS for w in rest)

    @torch.no_grad()
    def another(self, row: int, phrase: list[int], k: int) -> bool:
        """Whether the locator's candidate ``k`` (0-based) for ``phrase`` is a new object the phrase names."""
        text = [self.words.words[t] for t in phrase]
        wanted = {"colour": {w for w in text if w in self.region.vocab.colours},
                  "kind": {self.kind_of[w] for w in text if w in self.kind_of}}
        every = not any(wanted.values())   # "all shapes": any object the head is sure is of some kind
        if every and not self.names_every_object(text):
            return False
        box = self.boxes.box(row, phrase, k)
        earlier = [self.boxes.box(row, phrase, j) for j in range(k)]
        if not new_object(box, earlier):   # the same object again, or a box around an earlier one and more
            return False
        image = self.images[row]
        keys = image.extras["locator"].keys
        square = region_box(image.size, box).to(keys.device, keys.dtype)
        if every:
            return (float(self.region.probabilities(keys, square)["kind"].max()) >= self.confidence
                    or self.clear_new_object(row, box, earlier))
        colours, kinds = sorted(wanted["colour"]), sorted(wanted["kind"])
        if sureness(self.region, keys, square, colours, kinds) >= self.confidence:
            return True
        # the head misreads kinds on scenes unlike its training (grey ones): a clear outline of the kind will do
        return (len(kinds) == 1 and sureness(self.region, keys, square, colours, []) >= self.confidence
                and self.clear_new_object(row, box, earlier, kinds[0]))

    def clear_new_object(self, row: int, box: list[float], earlier: list[list[float]], kind: str | None = None) -> bool:
        """Whether the mask that ``box`` gets is one new object of a clear outline (``outline_kind``; with ``kind``,
        that kind's): its own box fits ``box`` (IoU >= ``REPEAT_BOX_FIT``, as ``Region.verify`` asks of a repeat)
        and overlaps none of the ``earlier`` boxes by more than ``overlap``."""
        mask = self.region.marked_mask(self.boxes.model, self.images[row], box=box)
        read = outline_kind(mask) if mask.any() else None
        if read is None or (kind is not None and read != kind):
            return False
        own = box_from_mask(mask)
        return box_iou(own, box) >= REPEAT_BOX_FIT and all(box_iou(own, b) <= self.overlap for b in earlier)


def new_object(box: list[float], taken: list[list[float]]) -> bool:
    """Whether ``box`` is not one of the ``taken`` boxes again: it overlaps none by more than
    ``GroupCount.overlap`` IoU and holds none's centre."""
    for other in taken:
        cx, cy = (other[0] + other[2]) / 2, (other[1] + other[3]) / 2
        if box_iou(box, other) > GroupCount.overlap or (box[0] <= cx <= box[2] and box[1] <= cy <= box[3]):
            return False
    return True
