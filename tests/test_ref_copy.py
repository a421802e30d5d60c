"""RefCopy: a generated <ref> phrase that repeats the question keeps to the question's words (grounding/ref_copy.py)."""
from __future__ import annotations

import torch

from shapes.ref_copy import RefCopy, TokenWords

QUESTION = "Where is the shape with five corners?"


def _copy(tok, prefix: str = "", bias: float = 3.0) -> RefCopy:
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    return RefCopy(TokenWords.of(tok), [ids(QUESTION)], [ids(prefix)], bias)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_only_the_next_question_token_and_the_phrase_end_are_pushed(tiny):
    _, tok = tiny
    ids = lambda text: _ids(tok, text)
    question, ref_end = ids(QUESTION), tok.convert_tokens_to_ids("</ref>")
    after = lambda text: question[len(ids(text))]         # the question's token after a run of its start
    copy = _copy(tok)
    assert copy.pushed(0, ids("<ref>the shape with")) == [ref_end, after("Where is the shape with")]
    assert copy.pushed(0, ids("<ref>the")) == [ref_end, after("Where is the")]
    assert copy.pushed(0, ids("<ref>")) == []                            # the first word is the model's own
    assert copy.pushed(0, ids("<ref>the shape with four")) == []         # the phrase has left the question
    assert copy.pushed(0, ids("<ref>the shape</ref> and")) == []         # no phrase open
    # an answer prefix in the prompt counts as written
    assert _copy(tok, prefix="<ref>the shape").pushed(0, ids(" with")) == [ref_end, after("Where is the shape with")]


def test_the_bias_overrides_an_unsure_choice_and_keeps_a_sure_one(tiny):
    _, tok = tiny
    written = _ids(tok, "<ref>the shape with")
    copied = _copy(tok).pushed(0, written)[-1]
    rival = next(i for i in range(len(tok)) if i not in _copy(tok).pushed(0, written))
    for margin, winner in ((2.0, copied), (4.0, rival)):
        scores = torch.zeros(len(tok))
        scores[rival] = margin                                           # the model prefers another token by `margin`
        _copy(tok).adjust(0, written, scores)
        assert scores.argmax().item() == winner


def test_generation_keeps_to_the_questions_words_in_both_decoders(scene, tiny):
    """A random tiny language model continues "<ref>the shape with" anyhow; pushed, it goes on with the question's
    words (or ends the phrase), in ``Grounder`` and in the prefix engine alike."""
    import re

    from grounding import PrefixEngine
    from grounding import Grounder, Query

    image, _ = scene
    model, tok = tiny
    ask = Query(image, QUESTION, answer_prefix="<ref>the shape with")
    phrase = lambda answer: re.match(r"<ref>(.*?)(</ref>|$)", answer).group(1)
    assert "ref_copy" not in model.addons   # a weightless add-on turned on for one predictor
    free = Grounder(model, tok).predict_batch([ask], max_new_tokens=6)[0].answer
    assert phrase(free) not in QUESTION, free
    pushed = Grounder(model, tok, addons={"ref_copy": {"bias": 50.0}})
    answer = pushed.predict_batch([ask], max_new_tokens=6)[0].answer
    assert phrase(answer) in QUESTION, answer
    assert PrefixEngine(pushed).predict_group(image, [ask], max_new_tokens=6)[0].answer == answer
