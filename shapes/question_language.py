"""Which questions the model can read: it was trained on English questions with a small vocabulary, so a question
mostly in words it never saw (another language) gets an answer about *something*, with no sign that the question
was not understood. The ``question_language`` add-on (shapes/addons.py) adds a note to such a Prediction.

The words are the model's own: every word of the questions it was trained on (``training_words``), stored with the
add-on's settings in ``groundseg.json``, with everyday English words beyond the names of things (``COMMON_ENGLISH``:
"How many are there?" is English); no list of another language's words, no rule about any one question.

A few everyday words the training questions lack are read as the trained words they mean (``SYNONYMS``, also in
``groundseg.json``): "objects" as "shapes", "everything" as "all shapes", "gray" as "grey"; the Prediction notes it.
"""
from __future__ import annotations

import re
from pathlib import Path

_WORD = re.compile(r"[^\W\d_]+")   # runs of letters in any script (a CJK sentence without spaces is one run)
_PROMPTS = re.compile(r"<(box|point)>.*?</\1>", re.IGNORECASE)   # box and point prompts written into a question
BOX_WORDS = frozenset({"box", "boxes", "bbox", "bboxes", "bounding"})


# Everyday words the training questions never used, each with the trained words it means: a generic name for the
# objects, American spellings, other names of the same shapes. Read only where the vocabulary lacks the word.
SYNONYMS = {"objects": "shapes", "items": "shapes", "item": "shape", "things": "shapes", "thing": "shape",
            "everything": "all shapes", "each": "every", "gray": "grey", "color": "colour", "colored": "coloured",
            "center": "centre", "disc": "circle", "disk": "circle", "discs": "circles", "disks": "circles",
            "oval": "ellipse", "ovals": "ellipses", "rhombus": "diamond"}


def words_of(text: str) -> list[str]:
    """Lower-case letter runs of ``text``; box and point tokens (``<box>(1,2),(3,4)</box>``) are left out."""
    return [w for w in _WORD.findall(_PROMPTS.sub(" ", text).lower()) if w not in ("box", "point")]


def asks_for_box(question: str) -> bool:
    """Whether ``question`` asks for a box ("Answer with a box.", "Give the bounding box of ..."): the training
    answers to such questions give a box and no [SEG]; every other answer's box is followed by its [SEG]."""
    return bool(BOX_WORDS & set(_WORD.findall(_PROMPTS.sub(" ", question).lower())))


def shares_a_word(phrase: str, question: str) -> bool:
    """Whether ``phrase`` has a word of ``question`` other than "the", "of" and the like: it names what the question
    asks about, rather than what the model chose itself."""
    from shapes.ref_strict import CLOSED_WORDS
    return bool(set(words_of(phrase)) & (set(words_of(question)) - CLOSED_WORDS))


def unknown_words(question: str, known: set[str]) -> tuple[int, int]:
    """(words of ``question`` not in ``known``, all its words)."""
    words = words_of(question)
    return sum(w not in known for w in words), len(words)


# Everyday English words a question about a picture is made of beyond the names of things: "How many are there?"
# is English though the training questions never used these words. A few are words of other languages too (German
# "was", "also"); the note counts a share of the words, so such a word does not hide a question in another language.
COMMON_ENGLISH = frozenset("""
    a an the this that these those there here is are was were be been am do does did have has had can could would
    will shall should may might must i me my we us our you your it its they them their he she him her his what which
    who whose where when why how many much some any all each every both either neither none no not nor and or but if
    then than so as at by for from into inside on onto of off out over under up down to with without within about
    above below near next between behind around across along among beside please thanks thank find show tell give
    get see look point mark highlight outline select detect locate identify segment count name picture image photo
    only just also too very more most less least other another same one two three four five six seven eight nine ten
    first second third last left right top bottom middle kind sort type let s t""".split())


def language_note(question: str, known: set[str], language: str, share: float) -> str | None:
    """A note when more than ``share`` of the question's words are neither words the model was trained on nor,
    for an English model, everyday English words (``COMMON_ENGLISH``): a question mostly in another language."""
    if language == "English":
        known = set(known) | COMMON_ENGLISH
    unknown, total = unknown_words(question, known)
    if not total or unknown <= share * total:
        return None
    return (f"the model understands {language} only, and {unknown} of this question's {total} words are not among "
            f"the words it was trained on: the answer may not be about what was asked")


def training_words(data_root: str | Path, kinds: tuple[str, ...] = ("seg", "rec", "no_target", "multi", "region",
                                                                    "category", "phrasing")) -> list[str]:
    """Every word of the training questions of ``data_root``'s train split (sorted)."""
    from grounding.data.refer import ReferDataset
    from grounding.data.tasks import build_conversations
    ds = ReferDataset(data_root, dataset="synth")
    words: set[str] = set()
    for c in build_conversations(ds, "train", seed=0, with_masks=True, kinds=kinds):
        words.update(words_of(c.question))
    return sorted(words)


def read_synonyms(text: str, synonyms: dict[str, str], known: frozenset[str]) -> tuple[str, list[tuple[str, str]]]:
    """``text`` with each word that ``known`` lacks and ``synonyms`` gives (in any case) replaced by its meaning,
    when every word of the meaning is known ("How many objects?" -> "How many shapes?"); box and point prompts
    are left alone. -> (the text, [(word as typed, meaning)] in the order read)."""
    read: list[tuple[str, str]] = []

    def swap(match: re.Match) -> str:
        word = match.group()
        meaning = synonyms.get(word.lower())
        if word.lower() in known or meaning is None or not set(meaning.split()) <= known:
            return word
        read.append((word, meaning))
        return meaning.capitalize() if word[0].isupper() else meaning

    return rewrite_words(text, swap), read


def rewrite_words(text: str, rewrite) -> str:
    """``text`` with each run of ASCII letters outside box and point prompts replaced by ``rewrite(match)``."""
    parts = re.split(r"(<(?:box|point)>.*?</(?:box|point)>)", text)
    return "".join(p if i % 2 else re.sub(r"[A-Za-z]+", rewrite, p) for i, p in enumerate(parts))


class CaseFolder:
    """A question's words in a case the tokenizer's vocabulary holds as one token.

    A word-level vocabulary learnt from training questions knows "yellow" and "Please" but spells "YELLOW" or
    "Yellow" letter by letter, which the model never read. Each letter run of a question is kept as typed when
    the vocabulary has it, else written in lower case, or capitalised, whichever the vocabulary has first (lower
    case when it has neither). Box and point tokens are left alone."""

    def __init__(self, tokenizer):
        vocab = tokenizer.get_vocab()
        self.known = {t.lstrip("Ġ▁") for t in vocab}

    def word(self, w: str) -> str:
        for candidate in (w, w.lower(), w.capitalize()):
            if candidate in self.known:
                return candidate
        return w.lower()

    def __call__(self, text: str) -> str:
        return rewrite_words(text, lambda m: self.word(m.group()))
