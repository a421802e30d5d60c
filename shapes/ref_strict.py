"""StrictCopy: a generated ``<ref>`` phrase is a run of the question's words, and a question that joins phrases
with "and" gets one target for each.

The default model's language model copies the question's phrase imperfectly when the question is worded in a way it
was not trained on: asked "yellow circle" it may write "<ref>purple circle</ref>", asked "red square" it starts at
"square" (weights/shapes-tiny/MODEL_CARD.md, v11). The ``ref_copy`` add-on with ``strict`` (shapes/addons.py)
therefore rules out, while decoding, every token but these:

  a phrase's first token  the question's earliest word whose logit is within ``start_margin`` nats of the best
                          question word's (a referring phrase keeps its modifiers), never punctuation, a word
                          that asks ("Please", "segment", "Where", ...) nor the picture ("the image");
  inside a phrase         the next question word of a run the phrase continues, or ``</ref>`` (not after "the",
                          "this", "of", "and"..., on which no noun phrase ends, nor before a noun the phrase can
                          go on with: "the yellow circles" does not end at "yellow", a word the model has seen
                          end phrases while "circles" it has not);
  in both                 only words the vocabulary holds whole (and the "-" of "medium-sized"), from which the
                          phrase can still reach an end ("the square in this picture": "picture" is spelt in
                          pieces, so the phrase ends at "square") and that the training questions used;
  no word to copy         (a question in another language) a phrase of the vocabulary's whole English words, in
                          the model's own choice, never a byte piece that decodes to "\ufffd";
  after a target         ([SEG], or a box with no [SEG]) while "and" follows the last copied phrase in the
                          question, no end of the answer: a space, then ``<ref>``; that next phrase starts after
                          the "and".

The model still chooses among what is allowed. An answer without ``<ref>`` (a region's description) is untouched.
Runs are matched on ``TokenWords`` (lower case, no space marker), from the start of the previous phrase on (a
repeated phrase, as "all red shapes" writes once per object, may start at the same place).
"""
from __future__ import annotations

import re

import torch

from shapes.ref_copy import TokenWords

# words a noun phrase does not start on: prepositions, conjunctions, verbs
LINKING_WORDS = frozenset({"of", "in", "on", "at", "to", "with", "and", "or", "is", "has", "which"})
# words a noun phrase does not end on: those and articles, determiners
CLOSED_WORDS = LINKING_WORDS | {"the", "a", "an", "this", "these", "those", "that", "its", "their", "my", "your",
                                "all", "every"}
# words that ask, never the start of what is asked about: "Please segment circle." names "circle", not "Please"
ASKING_WORDS = frozenset({"please", "segment", "find", "show", "locate", "highlight", "detect", "mark", "give",
                          "tell", "point", "describe", "identify", "select", "where", "what", "can", "could", "would",
                          "will", "you", "me", "is", "are"})
# the picture itself, never what a phrase is about ("Describe the image." names no object in it)
IMAGE_WORDS = frozenset({"image", "picture", "photo", "photograph", "scene"})


def _wordy(w: str) -> bool:
    return any(ch.isalnum() for ch in w)


class StrictCopy:
    """Per answer row: the question's token ids and the ids of any answer prefix in the prompt. ``adjust(row, ids,
    scores)`` sets every ruled-out token of ``scores [vocab]`` (the next-token logits after the generated ``ids``)
    to -inf in place."""

    def __init__(self, vocab: TokenWords, questions: list[list[int]], prefixes: list[list[int]],
                 start_margin: float = 3.0, nouns: frozenset[str] = frozenset(), known: frozenset[str] = frozenset()):
        self.vocab, self.prefixes, self.start_margin, self.nouns = vocab, prefixes, float(start_margin), nouns
        self.known = known
        self.questions = [[vocab.words[t] for t in q] for q in questions]
        self.spaced = [[vocab.spaced[t] for t in q] for q in questions]
        self.ands = [self.and_ends(q) for q in questions]
        self.reach, self.ends, self.opens = zip(*(self.reachable(q) for q in questions)) if questions else ((),) * 3
        self.spaces = [i for i in vocab.ids_of.get("", ())]
        # a phrase with no question word to copy ("请分割黄色的圆") is still spelt in whole letters, never in the
        # byte pieces of another script, which alone decode to "\ufffd"
        self.letters = [i for i, w in enumerate(vocab.words) if w.isascii() and w.isalpha() and w not in IMAGE_WORDS]

    def reachable(self, question: list[int]) -> tuple[list[bool], list[bool], list[bool]]:
        """Per question token: (a phrase may go on with it and from it still reach an end, a phrase may end after it, a
        phrase may start with it). Usable tokens spell letter runs the vocabulary holds whole ("medium",
        "sized", "isn", "4"; not "picture", which it spells in pieces and no training phrase held), in ASCII
        (not the byte pieces of another script) and, given ``known`` words, among them (not "est" of "Où est le
        cercle", a piece of "largest"), or the punctuation inside a word ("-" in "medium-sized"); a phrase ends
        after a letter run that ends a word, is not a word like "the" or "of", and is not followed by one of
        ``nouns`` the phrase can go on with; a phrase starts at the start of a word that does not ask
        (``ASKING_WORDS``; "se" opens "segment", spelt "se" "gm" "ent" at a question's start), link
        (``LINKING_WORDS``) nor name the picture itself (``IMAGE_WORDS``, or "the" before one)."""
        v = self.vocab
        texts = [(" " if v.spaced[t] else "") + v.words[t] for t in question]
        text = "".join(texts)
        known = [False] * len(text)
        for m in re.finditer(r"[^\W_]+", text):
            run = m.group()
            if run.isascii() and run in v.ids_of and (not self.known or not run.isalpha() or run in self.known):
                known[m.start():m.end()] = [True] * (m.end() - m.start())
        inner = [not c.isspace() and not c.isalnum() and 0 < k < len(text) - 1 and text[k - 1].isalnum()
                 and text[k + 1].isalnum() for k, c in enumerate(text)]
        usable, ends, words, at = [], [], [], 0
        for piece in texts:
            a, b = at + (len(piece) - len(piece.lstrip())), at + len(piece)
            at = b
            usable.append(all(known[k] or inner[k] for k in range(a, b)))   # a lone space passes through
            opens = a < b and text[a].isalnum() and (a == 0 or not (text[a - 1].isalnum() or inner[a - 1]))
            words.append(re.match(r"[^\W_]+", text[a:]).group() if opens else None)
            word = re.search(r"[^\W_]+$", text[:b])
            ends.append(usable[-1] and text[b - 1].isalnum() and (b == len(text) or not (text[b].isalnum() or inner[b]))
                        and word is not None and word.group() not in CLOSED_WORDS)
        for i in range(len(question) - 1):
            if ends[i] and usable[i + 1] and texts[i + 1][:1].isspace() and texts[i + 1].strip() in self.nouns:
                ends[i] = False
        reach = [False] * (len(question) + 1)
        for i in range(len(question) - 1, -1, -1):
            reach[i] = usable[i] and (ends[i] or reach[i + 1])
        starts = [i for i, w in enumerate(words) if w is not None]
        following = {i: words[j] for i, j in zip(starts, starts[1:])}   # per token opening a word: the next word
        opens = [r and w is not None and w not in ASKING_WORDS | IMAGE_WORDS | LINKING_WORDS
                 and not (w in CLOSED_WORDS and following.get(i) in IMAGE_WORDS)
                 for i, (r, w) in enumerate(zip(reach, words))]
        return reach[:-1], ends, opens

    def and_ends(self, question: list[int]) -> list[int]:
        """Token positions just past each word "and" of a question (a vocabulary without the word spells it in
        pieces: "Ġa" "nd")."""
        v, out, start = self.vocab, [], 0
        for i in range(1, len(question) + 1):
            if i == len(question) or v.spaced[question[i]] or not _wordy(v.words[question[i]]):
                if "".join(v.words[t] for t in question[start:i]).strip() == "and":
                    out.append(i)
                start = i
        return out

    @staticmethod
    def floor(question: list[str], ands: list[int], done: list[list[str]]) -> tuple[int, bool]:
        """(where the next phrase may start in ``question``, whether an "and" (ending at one of ``ands``) after the
        last copied phrase asks for another)."""
        start = end = 0
        for phrase in done:
            j = next((j for j in range(start, len(question) - len(phrase) + 1)
                      if question[j:j + len(phrase)] == phrase), None)
            if j is None:
                return start, False
            start, end = j, j + len(phrase)
        after = [a for a in ands if a > end and any(_wordy(w) for w in question[a:])] if done else []
        return (after[0], True) if after else (start, False)

    def allowed(self, row: int, ids: list[int], scores: torch.Tensor) -> list[int] | None:
        """The token ids allowed next, or None when the rule has nothing to say."""
        v, question = self.vocab, self.questions[row]
        seq = self.prefixes[row] + ids
        done, current = self.vocab.ref_phrases(seq)
        done = [[v.words[t] for t in p] for p in done]
        current = None if current is None else [v.words[t] for t in current]
        floor, more = self.floor(question, self.ands[row], done)
        if current is None:
            if not more or not seq:
                return None
            if seq[-1] == v.box_end:      # a box answer may go on with its [SEG], or with the next target
                return [v.seg] + self.spaces + [v.ref_start]
            if seq[-1] == v.seg:
                return self.spaces + [v.ref_start]
            if len(seq) > 1 and seq[-2] in (v.seg, v.box_end) and not v.words[seq[-1]].strip():
                return [v.ref_start]
            return None
        if not current:
            return self.earliest_start(question, self.opens[row], floor, scores) or self.letters
        n = len(current)
        starts = [j for j in range(floor, len(question) - n + 1) if question[j:j + n] == current and self.opens[row][j]]
        if not starts:   # the model's own phrase: it may end after a word that can end a noun phrase
            return ([] if current[-1] in CLOSED_WORDS else [v.ref_end]) + self.letters
        # the next question word, spelt with the question's space before it or without, as the question has it
        nxt = sorted({i for j in starts if j + n < len(question) and self.reach[row][j + n]
                      for i in v.ids_of[question[j + n]] if v.spaced[i] == self.spaced[row][j + n]})
        closes = any(self.ends[row][j + n - 1] for j in starts) or not nxt
        return ([v.ref_end] if closes else []) + nxt

    def earliest_start(self, question: list[str], opens: list[bool], floor: int, scores: torch.Tensor) -> list[int]:
        """The phrase's first token: the earliest question word from ``floor`` on (one a phrase may start with)
        whose logit is within ``start_margin`` of the best such word's, without a space marker where the
        vocabulary has it so."""
        best = {}
        for j in range(floor, len(question)):
            ids = self.vocab.ids_of.get(question[j], ()) if opens[j] else ()
            if ids:
                best[j] = max(ids, key=lambda i: float(scores[i]))
        if not best:
            return []
        top = max(float(scores[i]) for i in best.values())
        first = best[min(j for j, i in best.items() if float(scores[i]) >= top - self.start_margin)]
        # spelt as the training answers spell a phrase's first word: with no space after "<ref>" where it can be
        unspaced = [i for i in self.vocab.ids_of[self.vocab.words[first]] if not self.vocab.spaced[i]]
        return [max(unspaced, key=lambda i: float(scores[i]))] if unspaced else [first]

    def adjust(self, row: int, ids: list[int], scores: torch.Tensor) -> None:
        index = self.allowed(row, ids, scores)
        if index:
            keep = scores[index].clone()
            scores.fill_(float("-inf"))
            scores[index] = keep
