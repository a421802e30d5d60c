"""Conversations for training: REFER sentences (+ the synthetic ``extra.json``) -> question / answer / masks.

Kinds (each with several phrasings, chosen by a seeded RNG):
  seg        "Please segment the red circle."     -> "<ref>the red circle</ref><box>(..),(..)</box>[SEG]"
                                                     or "<ref>the red circle</ref>[SEG]" (half of them)
  rec        "Where is the red circle? ..."       -> "<ref>the red circle</ref><box>(..),(..)</box>"
  no_target  "Please segment the purple star."    -> "There is no purple star in the image."
  multi      "Please segment all red shapes."     -> one "<ref>..</ref><box>..</box>[SEG]" per object
  region     "What is in <box>(..),(..)</box>?"   -> "a large red striped circle"
  category   "Please segment the circle."         -> "<ref>the circle</ref>..[SEG]" when the image has one circle,
                                                     "There is no circle in the image." about one absent one
                                                     (not in the default kinds; built from instances.json)
Masks are listed in the order of the answer's [SEG] tokens. Stage 1 (no mask decoder) drops the [SEG]s.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grounding.text.boxes import format_box, format_point
from grounding.data.refer import ReferDataset
from grounding.text.tokens import SEG

SEG_QUESTIONS = ("Please segment {s}.", "Can you segment {s} in this image?", "Where is {s}? Please give its mask.",
                 "Find {s}.", "Show me {s}.")
REC_QUESTIONS = ("Where is {s}? Answer with a box.", "Give the bounding box of {s}.", "Locate {s} with a box.")
REGION_QUESTIONS = ("What is in {r}?", "Describe the object at {r}.", "What shape is at {r}?")


@dataclass(frozen=True)
class Conversation:
    """image_id of a REFER dataset; ann_ids: the objects whose masks the answer's [SEG]s stand for, in order."""
    image_id: int
    question: str
    answer: str
    kind: str
    ann_ids: tuple[int, ...] = field(default=())


def _ref(phrase: str, box: tuple[float, ...], size: tuple[int, int], seg: bool) -> str:
    return f"<ref>{phrase}</ref>{format_box(box, size)}" + (SEG if seg else "")


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _seg_answer(rng: np.random.Generator, phrase: str, box: tuple[float, ...], size: tuple[int, int],
                seg_box_fraction: float) -> str:
    """"<ref>phrase</ref><box>..</box>[SEG]" for a ``seg_box_fraction`` of answers, else "<ref>phrase</ref>[SEG]".

    Some answers carry no box: otherwise the mask could be learnt from the box text alone, which at inference is the
    model's own (possibly wrong) box; and "<ref>s</ref>[SEG]" is the answer that teacher-forced RES evaluation gives."""
    boxed = rng.random() < seg_box_fraction
    return _ref(phrase, box, size, True) if boxed else f"<ref>{phrase}</ref>{SEG}"


def _no_article(sent: str) -> str:
    for article in ("the ", "a ", "an "):
        if sent.lower().startswith(article):
            return sent[len(article):]
    return sent


def build_conversations(ds: ReferDataset, split: str, seed: int, with_masks: bool = True,
                        extra: str | Path | None = None, kinds: tuple[str, ...] = ("seg", "rec", "no_target", "multi", "region"),
                        seg_box_fraction: float = 0.5) -> list[Conversation]:
    """Every sentence of ``split`` as a seg and a rec conversation, plus the extra samples of that split.

    with_masks=False (stage 1) keeps the boxes and drops [SEG] (and so the seg kind equals rec)."""
    rng = np.random.default_rng(seed)
    out: list[Conversation] = []
    for sent in ds.sentences(split):
        size, box = ds.image_size(sent.image_id), ds.box_xyxy(sent.ann_id)
        if "seg" in kinds and with_masks:
            answer = _seg_answer(rng, sent.text, box, size, seg_box_fraction)
            out.append(Conversation(sent.image_id, _pick(rng, SEG_QUESTIONS).format(s=sent.text), answer, "seg",
                                    (sent.ann_id,)))
        if "rec" in kinds:
            out.append(Conversation(sent.image_id, _pick(rng, REC_QUESTIONS).format(s=sent.text),
                                    _ref(sent.text, box, size, False), "rec"))
    if "category" in kinds:
        out += _category_conversations(ds, split, rng, with_masks, seg_box_fraction)
    extra = Path(extra) if extra is not None else ds.data_root / "extra.json"
    samples = json.loads(extra.read_text())["samples"] if extra.is_file() else []
    for s in samples:
        if s.get("split") != split or s["kind"] not in kinds:
            continue
        image_id, size = s["image_id"], ds.image_size(s["image_id"])
        if s["kind"] == "no_target":
            out.append(Conversation(image_id, _pick(rng, SEG_QUESTIONS).format(s=s["sent"]),
                                    f"There is no {_no_article(s['sent'])} in the image.", "no_target"))
        elif s["kind"] == "multi":
            ids = tuple(s["ann_ids"])
            phrase = _no_article(s["sent"])
            answer = " ".join(_ref(phrase, ds.box_xyxy(a), size, with_masks) for a in ids)
            out.append(Conversation(image_id, _pick(rng, SEG_QUESTIONS).format(s=s["sent"]), answer, "multi",
                                    ids if with_masks else ()))
        elif s["kind"] == "region":
            box = ds.box_xyxy(s["ann_id"])
            if rng.random() < 0.5:
                region = format_box(box, size)
            else:  # a click inside the object's mask, as a user would give it
                ys, xs = np.nonzero(ds.mask(s["ann_id"]))
                i = int(rng.integers(len(xs)))
                region = format_point((xs[i] + 0.5, ys[i] + 0.5), size)
            out.append(Conversation(image_id, _pick(rng, REGION_QUESTIONS).format(r=region), s["description"],
                                    "region"))
    return out


def _category_conversations(ds: ReferDataset, split: str, rng: np.random.Generator, with_masks: bool,
                            seg_box_fraction: float) -> list[Conversation]:
    """The bare category name asked about every image of ``split``: for each category the image holds exactly
    once, the answer is that object; for one category it lacks (drawn at random), "There is no ...".

    Why: referring expressions name an object with as many words as make it unique, so "the circle" rarely occurs
    as a positive, while the no-target phrases often are bare names; a model trained on those alone learns to
    deny short questions (weights/shapes-tiny/MODEL_CARD.md). A category with several instances has no single
    answer and is left out."""
    anns_by_image = ds.annotations_by_image()
    names = sorted(set(ds.categories.values()))
    out: list[Conversation] = []
    for image_id in ds.images(split):
        size, anns = ds.image_size(image_id), anns_by_image.get(image_id, [])
        by_name: dict[str, list[int]] = {}
        for a in anns:
            by_name.setdefault(ds.category_name(a), []).append(a)
        for name, ids in sorted(by_name.items()):
            if len(ids) != 1:
                continue
            phrase, box = f"the {name}", ds.box_xyxy(ids[0])
            if with_masks:
                answer = _seg_answer(rng, phrase, box, size, seg_box_fraction)
                question = _pick(rng, SEG_QUESTIONS)
            else:
                answer, question = _ref(phrase, box, size, False), _pick(rng, REC_QUESTIONS)
            out.append(Conversation(image_id, question.format(s=phrase), answer, "category",
                                    tuple(ids) if with_masks else ()))
        # one denial per image: as many denials as answers made the model deny present categories more often, not
        # absent ones more reliably (measured in weights/shapes-tiny/MODEL_CARD.md)
        absent = [n for n in names if n not in by_name]
        if absent:
            name = absent[int(rng.integers(len(absent)))]
            out.append(Conversation(image_id, _pick(rng, SEG_QUESTIONS).format(s=f"the {name}"),
                                    f"There is no {name} in the image.", "category"))
    return out
