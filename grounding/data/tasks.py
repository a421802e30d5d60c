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
  phrasing   "segment the yellow circle" / "yellow circle please" / "Mark the cyan square and the red star" /
             "Which shape is marked here? <box>..</box>" -> the forms of the kinds above, asked as people type
             (not in the default kinds; built from the synthetic ``scenes.json``: each object's colour and kind)
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

# The "phrasing" kind's wordings. They are kept apart from benchmarks/phrasing_suite.py's held-out forms ("Where is
# the X?", "Can you find the X in this picture?", the bare "the X" / "X", "What is in this region?", "What is
# this?"): a model that answers those has generalised, not memorised. Two open with the phrase, as a typed request
# often does; region questions put the box after the words, as an app appends it.
ASKED_SEG_QUESTIONS = ("Segment {s}.", "Could you segment {s}?", "I need the mask of {s}.", "Outline {s} for me.",
                       "Mark {s}.", "Highlight {s}.", "Select {s} please.", "{s} please.", "{s}: segment it.",
                       "Where do you see {s}?", "Is there {s}? Segment it.", "Give me a mask for {s}.")
ASKED_MULTI_QUESTIONS = ("Segment {s}.", "Mark {s}.", "Highlight {s}.", "I need the masks of {s}.",
                         "Could you segment {s}?")
REGION_AFTER_QUESTIONS = ("Describe this object. {r}", "Which shape is marked here? {r}", "Name the object here {r}",
                          "What object is shown? {r}", "Tell me about this area: {r}")


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
    if "phrasing" in kinds:
        out += _phrasing_conversations(ds, split, rng, with_masks, seg_box_fraction)
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


def _typed(rng: np.random.Generator, text: str) -> str:
    """Case and end punctuation as people type a request: lower case, upper case, a capital first letter; the full
    stop dropped or turned into "!" / "?"."""
    r = rng.random()
    if r < 0.3:
        text = text.lower()
    elif r < 0.4:
        text = text.upper()
    elif r < 0.6:
        text = text[:1].upper() + text[1:]
    r = rng.random()
    if r < 0.3:
        text = text.rstrip(".?!")
    elif r < 0.4:
        text = text.rstrip(".?!") + "!"
    return text


def _phrasing_conversations(ds: ReferDataset, split: str, rng: np.random.Generator, with_masks: bool,
                            seg_box_fraction: float) -> list[Conversation]:
    """Per image of ``split`` (objects' colour and kind from the data root's ``scenes.json``): up to three objects
    whose colour and kind name them alone, asked as "the {colour} {kind}" or bare "{colour} {kind}" (half in the
    ``SEG_QUESTIONS`` wordings, half in ``ASKED_SEG_QUESTIONS``); one colour and kind the image lacks, in the new
    wordings ("There is no ..."); two such objects asked together ("the X and the Y": one target each); a region
    question with the box after the words (an object the ``extra.json`` region samples describe). Questions in
    ``_typed`` case; the answer's phrase is the asked phrase in lower case.

    Why: the referring expressions name an object with as few words as make it unique, while most denials
    (no_target) are near misses "the {colour} {kind}" asked in ``SEG_QUESTIONS`` -- a model trained on those denies
    a present object asked that way, as people ask (benchmarks/phrasing_suite.py). Positives and denials are spread
    over both sets of wordings alike: with positives in the new wordings only, the model learnt the wording (every
    "Please segment the {colour} {kind}." denied, every "Segment the ..." answered; weights/shapes-tiny/MODEL_CARD.md,
    v11)."""
    path = ds.data_root / "scenes.json"
    if not path.is_file():
        return []
    scenes = {r["image_id"]: r["objects"] for r in json.loads(path.read_text())["images"]}
    wanted = set(ds.images(split))
    extra = ds.data_root / "extra.json"
    regions: dict[int, list[dict]] = {}
    for sample in json.loads(extra.read_text())["samples"] if extra.is_file() else []:
        if sample["kind"] == "region" and sample.get("split") == split:
            regions.setdefault(sample["image_id"], []).append(sample)
    colours = sorted({o["colour"] for objs in scenes.values() for o in objs})
    kinds = sorted({o["kind"] for objs in scenes.values() for o in objs})
    out: list[Conversation] = []
    for image_id in sorted(wanted & set(scenes)):
        objs, size = scenes[image_id], ds.image_size(image_id)
        pairs = [(o["colour"], o["kind"]) for o in objs]
        unique = [o for o, p in zip(objs, pairs) if pairs.count(p) == 1]
        phrases: list[tuple[str, int]] = []
        for i in rng.permutation(len(unique))[:3]:
            o = unique[int(i)]
            phrase = f"{o['colour']} {o['kind']}"
            phrases.append((phrase if rng.random() < 0.4 else f"the {phrase}", o["ann_id"]))
        for phrase, ann in phrases:
            box = ds.box_xyxy(ann)
            wordings = SEG_QUESTIONS if rng.random() < 0.5 else ASKED_SEG_QUESTIONS
            question = _typed(rng, _pick(rng, wordings).format(s=phrase))
            if with_masks:
                out.append(Conversation(image_id, question, _seg_answer(rng, phrase, box, size, seg_box_fraction),
                                        "phrasing", (ann,)))
            else:
                out.append(Conversation(image_id, question, _ref(phrase, box, size, False), "phrasing"))
        present_c, present_k = {c for c, _ in pairs}, {k for _, k in pairs}
        near = [(c, k) for c in colours for k in kinds
                if (c, k) not in pairs and (c in present_c or k in present_k)]
        if near:   # a near miss in the new wordings (no_target asks its own in SEG_QUESTIONS)
            c, k = near[int(rng.integers(len(near)))]
            phrase = f"{c} {k}" if rng.random() < 0.4 else f"the {c} {k}"
            out.append(Conversation(image_id, _typed(rng, _pick(rng, ASKED_SEG_QUESTIONS).format(s=phrase)),
                                    f"There is no {c} {k} in the image.", "phrasing"))
        if len(unique) >= 2:
            a, b = (unique[int(i)] for i in rng.permutation(len(unique))[:2])
            pa, pb = f"the {a['colour']} {a['kind']}", f"the {b['colour']} {b['kind']}"
            question = _typed(rng, _pick(rng, ASKED_MULTI_QUESTIONS).format(s=f"{pa} and {pb}"))
            answer = " ".join(_ref(p, ds.box_xyxy(o["ann_id"]), size, with_masks) for p, o in ((pa, a), (pb, b)))
            out.append(Conversation(image_id, question, answer, "phrasing",
                                    (a["ann_id"], b["ann_id"]) if with_masks else ()))
        if regions.get(image_id):
            sample = regions[image_id][int(rng.integers(len(regions[image_id])))]
            region = format_box(ds.box_xyxy(sample["ann_id"]), size)
            out.append(Conversation(image_id, _pick(rng, REGION_AFTER_QUESTIONS).format(r=region),
                                    sample["description"], "phrasing"))
    return out
