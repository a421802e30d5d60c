"""The presence add-on and its companions (shapes/presence.py, presence_review.py, ref_copy strict, question case):
a target whose object is not in the image becomes "There is no ...", a <ref> phrase is a run of the question's
words, and questions typed in any case read as the vocabulary's words."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from grounding.result import Prediction, Target
from shapes.presence import scene_phrases
from shapes.presence_review import (NoDenialStart, add_targets, denial, drop_absent, drop_targets, move_targets,
                                    rename_targets)
from shapes.question_language import CaseFolder
from shapes.ref_copy import TokenWords
from shapes.ref_strict import StrictCopy
from shapes.region_head import Vocabulary


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def shapes_tok():
    """The default model's word-level tokenizer."""
    from pathlib import Path

    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(Path(__file__).resolve().parent.parent / "weights/shapes-tiny/tokenizer")


def _allowed(tok, question: str, written: str, favour: dict[str, float] | None = None,
             nouns: frozenset[str] = frozenset(), known: frozenset[str] = frozenset()) -> set[str] | int:
    """The words StrictCopy allows next after ``written`` (the model's logits: 0, or ``favour`` for some tokens);
    the number of tokens allowed when it rules nothing out."""
    scores = torch.zeros(len(tok))
    for word, value in (favour or {}).items():
        scores[tok.convert_tokens_to_ids(word)] = value
    StrictCopy(TokenWords.of(tok), [_ids(tok, question)], [[]], nouns=nouns, known=known).adjust(
        0, _ids(tok, written), scores)
    allowed = torch.isfinite(scores).nonzero().flatten().tolist()
    return len(allowed) if len(allowed) == len(tok) else {t.lstrip("Ġ") for t in tok.convert_ids_to_tokens(allowed)}


def test_strict_copy_starts_at_the_earliest_likely_word_and_keeps_to_the_question(shapes_tok):
    tok = shapes_tok
    question = "Please segment the red square."
    # the model's favourite start is "square"; "the" is nearly as likely (within 3 nats) and comes first
    assert _allowed(tok, question, "<ref>", {"Ġsquare": 6.0, "Ġthe": 4.0, "the": 4.0}) == {"the"}
    assert _allowed(tok, question, "<ref>", {"Ġsquare": 6.0, "square": 6.0}) == {"square"}
    assert _allowed(tok, question, "<ref>the") == {"red"}                       # not after "the": no </ref>
    assert _allowed(tok, question, "<ref>the red") == {"square", "</ref>"}
    assert _allowed(tok, question, "<ref>the red square") == {"</ref>"}          # no "."
    # "picture" is spelt in pieces: never in a phrase, so "in this" cannot lead anywhere
    assert _allowed(tok, "Can you find the square in this picture?", "<ref>the square") == {"</ref>"}
    # but words joined by "-" or "'" are words: the phrase goes on through them and never ends inside one
    sized = "Please segment the medium-sized white shape."
    assert _allowed(tok, sized, "<ref>the medium") == {"-"}
    assert _allowed(tok, sized, "<ref>the medium-sized") == {"white", "</ref>"}
    assert _allowed(tok, "the rectangle which isn't white", "<ref>the rectangle which isn") == {"'t"}
    assert "that" in _allowed(tok, "Please segment the shape that has 4 corners.", "<ref>the shape")  # " 4" is 2 tokens
    assert _allowed(tok, question, "a large") == len(tok)                   # no phrase open: nothing ruled out
    # a phrase does not end before a noun it can go on with
    nouns = Vocabulary.of_scenes().nouns()
    plural = "Please segment the yellow circles."
    assert _allowed(tok, plural, "<ref>the yellow", nouns=nouns) == {"circles"}
    assert _allowed(tok, plural, "<ref>the yellow") == {"circles", "</ref>"}
    assert _allowed(tok, "the yellow circle in the top left", "<ref>the yellow circle", nouns=nouns) == {
        "in", "</ref>"}


def test_a_phrase_starts_at_what_is_asked_about_as_training_answers_spell_it(shapes_tok):
    tok = shapes_tok
    # " pentagon" is the model's favourite, but a phrase's first word is written without the space where it can be
    assert _allowed(tok, "Segment the big pentagon.", "<ref>", {"Ġpentagon": 6.0}) == {"pentagon"}
    # nor at a word that asks, however likely ("segment" at a question's start is spelt "se" "gm" "ent")
    for question in ("Please segment circle.", "segment circle", "Where is circle?"):
        assert _allowed(tok, question, "<ref>", {"Please": 6.0, "se": 6.0, "Where": 6.0}) == {"circle"}, question
    # nor at a linking word or the picture itself: "What is in the image?" has no phrase to copy, so the model names
    # one of its own, which may not end on "the" nor name the picture
    own = _allowed(tok, "What is in the image?", "<ref>")
    assert len(own) > 100 and "image" not in own
    assert "</ref>" not in _allowed(tok, "What is in the image?", "<ref>the")
    # inside a phrase each word is spelt as the question spells it: " the" after "in", not "the" ("inthe")
    ids = [tok.convert_tokens_to_ids(t) for t in ("the", "Ġthe")]
    scores = torch.zeros(len(tok))
    StrictCopy(TokenWords.of(tok), [_ids(tok, "Please segment the square in the image.")], [[]]).adjust(
        0, _ids(tok, "<ref>the square in"), scores)
    assert torch.isinf(scores[ids[0]]) and torch.isfinite(scores[ids[1]])
    # "est" is a whole token (a piece of "largest") but no training question's word: nothing to copy in French,
    # so the phrase is the model's own (below)
    french = "Où est le cercle jaune ?"
    assert _allowed(tok, french, "<ref>") == {"est"}
    assert len(_allowed(tok, french, "<ref>", known=frozenset({"the", "circle", "largest"}))) > 100
    # a question in another script is all byte pieces: the phrase is spelt in whole letters, never in those pieces
    chinese = _allowed(tok, "请分割黄色的圆", "<ref>")
    assert chinese and all(w.isascii() and w.isalpha() for w in chinese), sorted(chinese)[:10]
    assert "</ref>" in _allowed(tok, "请分割黄色的圆", "<ref>yellow")
    assert all(w.isascii() for w in _allowed(tok, "请分割黄色的圆", "<ref>yellow"))


def test_a_question_joining_two_phrases_with_and_gets_both(shapes_tok):
    tok = shapes_tok
    question = "Please segment the red square and the blue star."
    first = "<ref>the red square</ref><box>(1,2),(3,4)</box>[SEG]"
    assert _allowed(tok, question, first) == {"", "<ref>"}                      # the answer may not end here
    assert _allowed(tok, question, first + " ") == {"<ref>"}
    assert _allowed(tok, question, first + " <ref>") == {"the"}                  # after the "and"
    assert _allowed(tok, question, first + " <ref>the") == {"blue"}
    boxed = "<ref>the red square</ref><box>(1,2),(3,4)</box>"                 # a box answer, [SEG] or not
    assert _allowed(tok, question, boxed) == {"[SEG]", "", "<ref>"}
    second = first + " <ref>the blue star</ref><box>(5,6),(7,8)</box>[SEG]"
    assert _allowed(tok, question, second) == len(tok)                      # both asked: it may end
    # a repeated phrase ("all red shapes", one per object) may start where the last one did
    repeat = "Please segment all red shapes."
    once = "<ref>all red shapes</ref><box>(1,2),(3,4)</box>[SEG] <ref>"
    assert _allowed(tok, repeat, once, {"all": 5.0}) == {"all"}


def test_strict_generation_writes_the_questions_phrase_in_both_decoders(scene, tiny):
    from grounding import Grounder, PrefixEngine, Query

    image, _ = scene
    model, tok = tiny
    question = "Please segment the shape with five corners."
    ask = Query(image, question, answer_prefix="<ref>")
    strict = Grounder(model, tok, addons={"ref_copy": {"strict": True}})
    answer = strict.predict_batch([ask], max_new_tokens=8)[0].answer
    phrase = re.match(r"<ref>(.*?)(</ref>|$)", answer).group(1).strip()
    assert phrase and phrase.lower() in question.lower(), answer
    assert PrefixEngine(strict).predict_group(image, [ask], max_new_tokens=8)[0].answer == answer


def test_case_folding_reads_shouted_and_capitalised_words_as_the_vocabulary_has_them():
    from transformers import AutoTokenizer
    from pathlib import Path

    tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parent.parent / "weights/shapes-tiny/tokenizer")
    fold = CaseFolder(tok)
    assert fold("PLEASE SEGMENT THE YELLOW CIRCLE") == "Please segment the yellow circle"
    assert fold("Yellow Circle?") == "yellow circle?"
    assert fold("What is in <box>(10,20),(30,40)</box>?") == "What is in <box>(10,20),(30,40)</box>?"
    assert len(tok.tokenize(fold("WHERE IS THE CYAN SQUARE?"))) == 6          # one token a word, and "?"


def test_everyday_words_are_read_as_the_trained_words_they_mean():
    from shapes.question_language import SYNONYMS, read_synonyms

    known = frozenset("all shapes shape every grey object where is the how segment".split())
    assert read_synonyms("How many objects are there?", SYNONYMS, known) == (
        "How many shapes are there?", [("objects", "shapes")])
    assert read_synonyms("Everything, please. Each ITEM!", SYNONYMS, known)[0] == "All shapes, please. Every Shape!"
    assert read_synonyms("Where is the gray object?", SYNONYMS, known)[0] == "Where is the grey object?"   # known kept
    assert read_synonyms("the colored oval", SYNONYMS, known) == ("the colored oval", [])   # meanings not all known
    assert read_synonyms("What is in <box>(1,2),(3,4)</box>?", {"box": "shape"}, known)[0] == \
        "What is in <box>(1,2),(3,4)</box>?"


def test_only_a_question_in_another_language_gets_the_english_only_note():
    import json
    from pathlib import Path
    from shapes.question_language import language_note

    config = Path(__file__).resolve().parent.parent / "weights/shapes-tiny/groundseg.json"
    known = set(json.loads(config.read_text())["addons"]["question_language"]["words"])
    for english in ("How many shapes are there?", "Could you outline the turquoise polygon near the upper left?",
                    "Is there a dog in this photo?"):
        assert language_note(english, known, "English", 0.5) is None, english
    for other in ("Bitte segmentiere die Form Raute in der Farbe Orange.", "Por favor, segmenta el cuadrado rojo.",
                  "请分割黄色的圆", "Où est le cercle jaune ?"):
        assert "English only" in language_note(other, known, "English", 0.5), other


def test_a_question_asks_for_a_box_in_words_not_in_its_box_prompt():
    from shapes.question_language import asks_for_box

    assert asks_for_box("Where is the red circle? Answer with a box.")
    assert asks_for_box("Give the BOUNDING box of the star.") and asks_for_box("bboxes of all squares")
    assert not asks_for_box("How many squares are there?") and not asks_for_box("Please segment the boxy shape.")
    assert not asks_for_box("What is in <box>(10,20),(30,40)</box>?")


def test_the_denial_cannot_open_an_answer(tiny):
    _, tok = tiny
    words = TokenWords.of(tok)
    there = [i for i, w in enumerate(words.words) if w == "there"]
    assert there, "the tiny tokenizer spells 'There' as one token"
    space = [i for i, w in enumerate(words.words) if w == "" and tok.convert_ids_to_tokens(i) in ("Ġ", "▁")]
    rule = NoDenialStart(words, [[], [5]])
    for ids, banned in (([], True), (space[:1], True), (_ids(tok, "a"), False)):
        scores = torch.zeros(len(tok))
        rule.adjust(0, ids, scores)
        assert bool(torch.isinf(scores[there]).all()) == banned
    scores = torch.zeros(len(tok))
    rule.adjust(1, [], scores)                      # an answer prefix was given: the answer is the user's
    assert torch.isfinite(scores).all()


def _target(phrase: str, x: int) -> Target:
    mask = np.zeros((20, 30), bool)
    mask[2:8, x:x + 5] = True
    return Target(phrase=phrase, box=(x, 2, x + 5, 8), mask=mask, score=0.9, seg_index=0)


def test_dropping_an_absent_target_rewrites_the_answer():
    answer = ("<ref>the red star</ref><box>(1,2),(3,4)</box>[SEG] "
              "<ref>the blue ring</ref><box>(5,6),(7,8)</box>[SEG]")
    pred = Prediction(answer, [_target("the red star", 1), _target("the blue ring", 10)], (20, 30))
    out = drop_absent(pred, {"the blue ring": "the presence head finds no such object in the image (logit -3.00)"})
    assert [t.phrase for t in out.targets] == ["the red star"]
    assert out.answer == "<ref>the red star</ref><box>(1,2),(3,4)</box>[SEG] There is no blue ring in the image."
    assert any("the blue ring" in n and "-3.00" in n for n in out.notes)
    everything = drop_absent(pred, {"the red star": "-1.00", "the blue ring": "-3.00"})
    assert everything.targets == [] and everything.answer == (
        "There is no blue ring in the image. There is no red star in the image.")


def test_dropping_one_target_of_a_group_keeps_the_others_and_their_text():
    group = "<ref>all red shapes</ref><box>(1,2),(3,4)</box>[SEG]"
    pred = Prediction(" ".join([group.replace("1,2", "9,9")] + [group] * 2),
                      [_target("all red shapes", x) for x in (1, 10, 20)], (20, 30))
    out = drop_targets(pred, {1: "not red"})
    assert [t.box[0] for t in out.targets] == [1, 20]
    assert out.answer == " ".join([group.replace("1,2", "9,9"), group]), out.answer
    assert out.notes == ["target 2 ('all red shapes') dropped: not red"]   # counted from 1
    gone = drop_targets(pred, {0: "none", 1: "none", 2: "none"})
    assert not gone.targets and gone.answer == "There are no red shapes in the image."


def test_renaming_targets_rewrites_their_phrases_in_the_answer():
    one = "<ref>all triangle</ref><box>(1,2),(3,4)</box>[SEG]"
    pred = Prediction(f"{one} {one}", [_target("all triangle", x) for x in (1, 10)], (20, 30))
    out = rename_targets(pred, {1: "a small red square"})
    assert [t.phrase for t in out.targets] == ["all triangle", "a small red square"]
    assert out.answer == f"{one} " + one.replace("all triangle", "a small red square")


def test_moving_a_target_of_a_group_rewrites_its_own_box_text_only():
    """The second of three repeats moves (``Region.verify``'s outline check): its box, mask and score change, and
    the box text of its own ``<ref>`` span, which the answer's readers pair with it."""
    from grounding.text.boxes import format_box

    group = "<ref>all stars</ref><box>(1,2),(3,4)</box>[SEG]"
    pred = Prediction(" ".join([group] * 3), [_target("all stars", x) for x in (1, 10, 20)], (20, 30))
    mask = np.zeros((20, 30), bool)
    mask[10:15, 12:18] = True
    out = move_targets(pred, {1: ((12, 10, 18, 15), mask, 0.5)}, (20, 30), "target {number} ({phrase!r}) moved")
    assert out.targets[1].box == (12, 10, 18, 15) and out.targets[1].mask is mask and out.targets[1].score == 0.5
    assert [t.box[0] for t in out.targets] == [1, 12, 20]
    moved = group.replace("<box>(1,2),(3,4)</box>", format_box((12, 10, 18, 15), (20, 30)))
    assert out.answer == " ".join([group, moved, group]), out.answer
    assert out.notes == ["target 2 ('all stars') moved"]


@pytest.mark.parametrize("phrase, said", [
    ("the red star", "There is no red star in the image."),
    ("all the purple stars", "There are no purple stars in the image."),
    ("every pentagon", "There is no pentagon in the image."),
    ("the crosses", "There are no crosses in the image."),
    ("the cross", "There is no cross in the image."),
    ("the circle below the cyan shapes", "There is no circle below the cyan shapes in the image."),
    ("both squares", "There are no squares in the image."),
    ("all dotted square", "There is no dotted square in the image."),   # a model's phrase need not be English
])
def test_a_denial_speaks_in_the_phrases_number(phrase, said):
    assert denial(phrase) == said


def test_scene_phrases_name_what_is_there_and_what_is_not():
    objects = [{"colour": "red", "kind": "circle", "area": 90, "full_area": 100},
               {"colour": "blue", "kind": "star", "area": 80, "full_area": 100},
               {"colour": "green", "kind": "square", "area": 10, "full_area": 100}]   # mostly hidden
    kinds = {"circle": "circles", "star": "stars", "square": "squares", "ring": "rings"}
    present, absent = scene_phrases(objects, ["red", "blue", "green", "pink"], kinds, np.random.default_rng(0),
                                    per_side=100)
    assert "the red circle" in present and "blue star" in present and "all red shapes" in present
    assert not any("green" in p or "square" in p for p in present)              # hidden: not asked either way
    assert "the red star" in absent and "blue circle" in absent and "the ring" in absent
    assert not any(p.endswith(("red circle", "blue star", "green square")) for p in absent)
    assert not set(present) & set(absent)


@pytest.fixture(scope="module")
def presence_model():
    """The tiny random model with a fusion locator and a presence head (random weights)."""
    from grounding.presets import build_random

    model, tok = build_random("tiny", seed=3)
    model.add_addon("locator", {"kind": "fusion", "layers": 1, "click": False}, tok)
    model.add_addon("presence", {"mirror": False}, tok)
    return model.eval(), tok


@pytest.mark.parametrize("threshold, kept", [(-1e6, True), (1e6, False)])
def test_a_target_below_the_threshold_is_denied_in_both_decoders(scene, presence_model, threshold, kept):
    from grounding import Grounder, PrefixEngine, Query

    image, _ = scene
    model, tok = presence_model
    ask = Query(image, "Please segment the red circle.", answer_prefix="<ref>the red circle</ref>")
    grounder = Grounder(model, tok, addons={"presence": {"threshold": threshold, "mirror": False}})
    pred = grounder.predict_batch([ask], max_new_tokens=24)[0]
    assert (len(pred.targets) >= 1) == kept, pred.answer
    assert ("<ref>the red circle</ref>" in pred.answer) == kept          # the random model writes more after it
    assert pred.answer.endswith("There is no red circle in the image.") == (not kept)
    engine = PrefixEngine(grounder).predict_group(image, [ask], max_new_tokens=24)[0]
    assert engine.answer == pred.answer and len(engine.targets) == len(pred.targets)
    # a given answer (teacher forcing) is the user's: never rewritten
    given = grounder.predict_batch([Query(image, "Please segment the red circle.",
                                          answer="<ref>the red circle</ref>[SEG]")])[0]
    assert given.answer == "<ref>the red circle</ref>[SEG]" and len(given.targets) == 1


def test_train_presence_writes_a_model_that_loads_with_its_head(tmp_path, presence_model):
    """A few scenes, two epochs: the written model holds the trained head and the chosen threshold."""
    from grounding.checkpoint import load_checkpoint, save_checkpoint
    from shapes.presence import train_presence
    from shapes.scenes.synthetic import generate_dataset

    model, tok = presence_model
    base = tmp_path / "base"
    with_locator = dict(model.addons)
    del model.addons["presence"]
    save_checkpoint(model, tok, base)
    model.addons["presence"] = with_locator["presence"]
    data = generate_dataset(tmp_path / "synth", 16, seed=5, progress=False)
    report = train_presence(base, data, tmp_path / "out", epochs=2, progress=False)
    assert report["train_samples"] > 0 and 0.0 <= report["val"]["auc"] <= 1.0
    saved = json.loads((tmp_path / "out" / "presence_scores.json").read_text())
    loaded, _ = load_checkpoint(tmp_path / "out" / "model")
    assert loaded.addons["presence"].settings.threshold == pytest.approx(saved["threshold"], abs=1e-4)
    trained = {k: v for k, v in loaded.state_dict().items() if k.startswith("addons.presence.")}
    assert trained and not all(torch.equal(v, model.state_dict()[k]) for k, v in trained.items())


def test_auc_from_ranks_equals_counting_pairs():
    from shapes.presence import auc

    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(300, generator=gen) + 0.7, torch.randn(200, generator=gen)
    pairs = float((pos[:, None] > neg[None, :]).float().mean())
    assert auc(pos, neg) == pytest.approx(pairs, abs=1e-9)
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0


def test_adding_targets_to_a_group_writes_them_after_its_last_one():
    """``group_complete``'s edit: new objects of "all stars" go after the group's last target, before the next
    phrase, as the model writes one (box text and [SEG]); every target's seg_index is its [SEG]'s place again."""
    from grounding.text.boxes import format_box

    group = "<ref>all stars</ref><box>(1,2),(3,4)</box>[SEG]"
    ring = "<ref>the ring</ref><box>(5,6),(7,8)</box>[SEG]"
    targets = [_target("all stars", 1), _target("all stars", 10), _target("the ring", 20)]
    targets = [dataclasses.replace(t, seg_index=i) for i, t in enumerate(targets)]
    pred = Prediction(f"{group} {group} {ring}", targets, (20, 30))
    mask = np.zeros((20, 30), bool)
    mask[10:15, 12:18] = True
    out = add_targets(pred, "all stars", [((12, 10, 18, 15), mask, 0.7)], "target {number} ({phrase!r}) added")
    added = f"<ref>all stars</ref>{format_box((12, 10, 18, 15), (20, 30))}[SEG]"
    assert out.answer == f"{group} {group} {added} {ring}", out.answer
    assert [t.phrase for t in out.targets] == ["all stars"] * 3 + ["the ring"]
    assert out.targets[2].mask is mask and out.targets[2].box == (12, 10, 18, 15) and out.targets[2].score == 0.7
    assert [t.seg_index for t in out.targets] == [0, 1, 2, 3]
    assert out.notes == ["target 3 ('all stars') added"]
    boxes_only = Prediction("<ref>all stars</ref><box>(1,2),(3,4)</box>", [_target("all stars", 1)], (20, 30))
    out = add_targets(boxes_only, "all stars", [((12, 10, 18, 15), mask, 0.7)], "added")
    assert "[SEG]" not in out.answer and out.answer.count("<box>") == 2
