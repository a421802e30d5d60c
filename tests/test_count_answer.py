"""The count add-on (shapes/count_answer.py): a "How many ..." answer starts with the number of its targets, named
by the question's own words."""
from __future__ import annotations

import pytest

from grounding.result import Prediction, Target
from shapes.addons import CountAnswer
from shapes.count_answer import count_sentence, counted_noun, singular


@pytest.mark.parametrize("question, noun", [
    ("How many shapes are there?", "shapes"), ("how many red circles can you see", "red circles"),
    ("How many objects are in the image?", "objects"), ("How many are there?", ""), ("HOW MANY CROSSES?", "CROSSES"),
    ("Segment all the squares.", None), ("", None)])
def test_the_counted_noun_is_the_questions_own(question, noun):
    assert counted_noun(question) == noun


def test_one_object_is_counted_in_the_singular():
    assert [singular(w) for w in ("shapes", "red crosses", "boxes", "sheep", "lilies", "glass")] == [
        "shape", "red cross", "box", "sheep", "lily", "glass"]
    assert count_sentence("How many crosses are there?", 1) == "There is 1 cross: "
    assert count_sentence("HOW MANY CROSSES?", 4) == "There are 4 crosses: "
    assert count_sentence("How many are there?", 2) == "There are 2: "
    assert count_sentence("How many stars are there?", 0) is None
    assert count_sentence("Please segment the stars.", 2) is None


def test_the_add_on_counts_the_targets_left_after_the_other_reviews():
    answer = "<ref>squares</ref><box>(1,1),(9,9)</box>[SEG] <ref>squares</ref><box>(20,20),(30,30)</box>[SEG]"
    targets = [Target("squares", (1, 1, 9, 9)), Target("squares", (20, 20, 30, 30))]
    counted = CountAnswer().review(None, None, None, None,
                                   Prediction(answer, targets, (40, 40), question="How many squares are there?"))
    assert counted.answer == "There are 2 squares: " + answer and counted.targets == targets
    denied = Prediction("There are no stars in the image.", [], (40, 40), question="How many stars are there?")
    assert CountAnswer().review(None, None, None, None, denied).answer == "There are no stars in the image."
