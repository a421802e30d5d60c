"""Which questions the model can read: it was trained on English questions with a small vocabulary, so a question
mostly in words it never saw (another language) gets an answer about *something*, with no sign that the question
was not understood. The ``question_language`` add-on (shapes/addons.py) adds a note to such a Prediction.

The words are the model's own: every word of the questions it was trained on (``training_words``), stored with the
add-on's settings in ``groundseg.json``; no list of another language's words, no rule about any one question.
"""
from __future__ import annotations

import re
from pathlib import Path

_WORD = re.compile(r"[^\W\d_]+")   # runs of letters in any script (a CJK sentence without spaces is one run)
_PROMPTS = re.compile(r"<(box|point)>.*?</\1>", re.IGNORECASE)   # box and point prompts written into a question
BOX_WORDS = frozenset({"box", "boxes", "bbox", "bboxes", "bounding"})


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


def language_note(question: str, known: set[str], language: str, share: float) -> str | None:
    """A note when more than ``share`` of the question's words are not words the model was trained on."""
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
        parts = re.split(r"(<(?:box|point)>.*?</(?:box|point)>)", text)
        return "".join(p if i % 2 else re.sub(r"[A-Za-z]+", lambda m: self.word(m.group()), p)
                       for i, p in enumerate(parts))
