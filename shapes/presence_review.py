"""How the ``presence`` add-on changes an answer: the first answer token may not open the denial, and targets whose
object the presence head does not find are turned into "There is no ... in the image."

The language model keeps writing what it writes (the phrase, its box, its [SEG]); whether the phrase's object is
there is the presence head's decision (shapes/presence.py), read on the image instead of the wording.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from grounding.text.boxes import format_box, parse_answer
from grounding.text.tokens import SEG
from shapes.region_verify import ARTICLES, QUANTIFIERS


class NoDenialStart:
    """Logits rule: an answer (with no answer prefix) may not begin with "There", the denial's first word (a
    whitespace token before it does not count as a beginning)."""

    def __init__(self, words, prefixes: list[list[int]]):
        self.words, self.prefixes = words.words, prefixes
        self.banned = [i for i, w in enumerate(self.words) if w == "there"]

    def adjust(self, row: int, ids: list[int], scores: torch.Tensor) -> None:
        if self.banned and not self.prefixes[row] and all(not self.words[t].strip() for t in ids):
            scores[self.banned] = float("-inf")


# words after which a phrase's head noun has been named ("the circle below ...", "the shape that has ...")
_LINKS = frozenset({"above", "below", "beside", "behind", "between", "by", "closest", "covering", "from", "in",
                    "left", "near", "next", "of", "on", "right", "that", "to", "under", "which", "with"})


def denial(phrase: str) -> str:
    """The training answers' denial of ``phrase``, in the number of its head noun: "the red star" -> "There is no
    red star in the image.", "all the purple stars" -> "There are no purple stars in the image.", "every pentagon"
    -> "There is no pentagon in the image."."""
    words = phrase.split()
    if words and words[0].lower() in QUANTIFIERS:
        words = words[1:]
    if words and words[0].lower() in ARTICLES:
        words = words[1:]
    head = next((w for w, after in zip(words, words[1:] + [""]) if after.lower() in _LINKS or not after), "").lower()
    plural = head.endswith("s") and not head.endswith(("ss", "us", "is"))
    return f"There {'are' if plural else 'is'} no {' '.join(words)} in the image."


def _ref_spans(text: str, phrase: str) -> list[re.Match]:
    """Each ``<ref>phrase</ref>`` of ``text`` with its box and [SEG]: the k-th is the phrase's k-th target."""
    span = re.escape(f"<ref>{phrase}</ref>") + r"(?:<box>.*?</box>)?\s*(?:" + re.escape(SEG) + r")?"
    return list(re.finditer(span, text))


def rename_targets(prediction, names: dict[int, str]):
    """The Prediction with target ``i`` named ``names[i]``, in its ``phrase`` and its ``<ref>`` span of the answer."""
    targets, text = list(prediction.targets), prediction.answer
    for phrase in dict.fromkeys(targets[i].phrase for i in names):
        mine = [i for i, t in enumerate(targets) if t.phrase == phrase]
        spans = _ref_spans(text, phrase)
        if len(spans) == len(mine):          # the k-th span is the phrase's k-th target
            for i, m in reversed(list(zip(mine, spans))):
                if i in names:
                    tail = m.group()[m.group().index("</ref>"):]   # its box and [SEG]
                    text = text[:m.start()] + f"<ref>{names[i]}" + tail + text[m.end():]
        for i in mine:
            if i in names:
                targets[i] = dataclasses.replace(targets[i], phrase=names[i])
    return dataclasses.replace(prediction, answer=text, targets=targets)


def move_targets(prediction, moves: dict[int, tuple], image_size: tuple[int, int], note: str):
    """The Prediction with target ``i`` on another object: ``moves[i]`` is its new (pixel xyxy box, bool ``H x W``
    mask, score), written into the box text of its ``<ref>`` span too; each move gets ``note`` (formatted with the
    target's number and phrase)."""
    targets, text, notes = list(prediction.targets), prediction.answer, list(prediction.notes)
    for phrase in dict.fromkeys(targets[i].phrase for i in moves):
        mine = [i for i, t in enumerate(targets) if t.phrase == phrase]
        spans = _ref_spans(text, phrase)
        for i, m in reversed(list(zip(mine, spans)) if len(spans) == len(mine) else []):
            if i in moves:
                span = re.sub(r"<box>.*?</box>", lambda _: format_box(moves[i][0], image_size), m.group(), count=1)
                text = text[:m.start()] + span + text[m.end():]
    for i, (box, mask, score) in moves.items():
        targets[i] = dataclasses.replace(targets[i], box=box, mask=mask, score=score)
        notes.append(note.format(number=i + 1, phrase=targets[i].phrase))
    return dataclasses.replace(prediction, answer=text, targets=targets, notes=notes)


def moved_and_dropped(prediction, image_size: tuple[int, int], moved: dict[int, tuple], dropped: dict[int, str],
                      evidence: str):
    """``prediction`` with the targets of ``moved`` on their new objects (``move_targets``, noted as moved because
    the mask its first box got has the ``evidence``, "outline" or "silhouette", of another kind) and those of
    ``dropped`` taken out (``drop_targets``)."""
    if moved:
        prediction = move_targets(prediction, moved, image_size,
                                  "target {number} ({phrase!r}) moved to another of the locator's candidates: the "
                                  f"mask its first box got has the {evidence} of another kind")
    return drop_targets(prediction, dropped) if dropped else prediction


def add_targets(prediction, phrase: str, added: list[tuple], note: str):
    """The Prediction with more targets of ``phrase``: each of ``added`` (pixel xyxy box, bool ``H x W`` mask,
    score) goes after the phrase's last target, in the answer text as the model writes one
    (``<ref>phrase</ref><box>..</box>[SEG]``, the [SEG] only where the phrase's targets have one); ``note`` (formatted
    with the target's number and phrase) says why."""
    targets, text, notes = list(prediction.targets), prediction.answer, list(prediction.notes)
    last = max(i for i, t in enumerate(targets) if t.phrase == phrase)
    end = [m for m in _ref_spans(text, phrase) if "</box>" in m.group() or SEG in m.group()][-1]
    seg = SEG if end.group().rstrip().endswith(SEG) else ""
    spans = "".join(f" <ref>{phrase}</ref>{format_box(box, prediction.image_size)}{seg}" for box, _, _ in added)
    text = text[:end.end()] + spans + text[end.end():]
    new = [dataclasses.replace(targets[last], box=box, mask=mask, score=score) for box, mask, score in added]
    targets[last + 1:last + 1] = new
    notes += [note.format(number=last + 2 + k, phrase=phrase.strip()) for k in range(len(new))]
    text = re.sub(r" {2,}", " ", text)
    return _renumbered(dataclasses.replace(prediction, answer=text, targets=targets, notes=notes))


def _renumbered(prediction):
    """The Prediction with each target's ``seg_index`` its [SEG]'s place in the (edited) answer text, where the
    text's targets are the Prediction's, in order."""
    parsed = parse_answer(prediction.answer, prediction.image_size)
    if [p.phrase for p in parsed] != [t.phrase for t in prediction.targets]:
        return prediction
    return dataclasses.replace(prediction, targets=[dataclasses.replace(t, seg_index=p.seg_index)
                                                    for t, p in zip(prediction.targets, parsed)])


def drop_targets(prediction, reasons: dict[int, str]):
    """The Prediction without the targets whose index is a key of ``reasons``. Their ``<ref>`` spans leave the
    answer text; a phrase that loses every target is denied ("There is no ..."), with one note giving the reason,
    while a group that keeps some ("all red shapes") gets a note for each target dropped."""
    targets = prediction.targets
    text, denied, notes = prediction.answer, [], list(prediction.notes)
    for phrase in dict.fromkeys(targets[i].phrase for i in reasons):
        mine = [i for i, t in enumerate(targets) if t.phrase == phrase]
        gone = [k for k, i in enumerate(mine) if i in reasons]
        spans = _ref_spans(text, phrase)
        if len(gone) == len(mine):
            cut = range(len(spans))
        else:                                # the k-th span is the phrase's k-th target
            cut = gone if len(spans) == len(mine) else []
        for k in reversed(cut):
            text = text[:spans[k].start()] + text[spans[k].end():]
        if len(gone) == len(mine):
            denied.append(phrase)
            notes.append(f"target {phrase.strip()!r} dropped: {reasons[mine[0]]}")
        else:
            notes += [f"target {i + 1} ({phrase.strip()!r}) dropped: {reasons[i]}" for i in mine if i in reasons]
    text = " ".join([re.sub(r"\s{2,}", " ", text).strip()] + [denial(p) for p in sorted(denied)]).strip()
    kept = [t for i, t in enumerate(targets) if i not in reasons]
    return _renumbered(dataclasses.replace(prediction, answer=text, targets=kept, notes=notes))


def drop_absent(prediction, reasons: dict[str, str]):
    """The Prediction without every target whose phrase is a key of ``reasons`` (see ``drop_targets``)."""
    return drop_targets(prediction, {i: reasons[t.phrase] for i, t in enumerate(prediction.targets)
                                     if t.phrase in reasons})
