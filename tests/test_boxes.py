"""Tests of grounding.text.boxes: text <-> geometry round trips, the answer parser, IoU.

Sizes are (H, W); boxes are pixel xyxy in the original image.
"""
from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from grounding.text import boxes as B
from grounding.text.boxes import (
    DIVISOR,
    ParsedTarget,
    box_iou,
    format_box,
    format_point,
    format_ref,
    format_shikra_boxes,
    parse_answer,
    parse_points,
    parse_question_prompts,
    parse_shikra_boxes,
    parse_shikra_points,
    qwen_eval_box,
)
from grounding.text.tokens import SEG, SPECIAL_TOKENS

# Encoding rounds x / size * 999 to an integer: an error of at most 0.5 units, i.e.
# 0.5 / 999 * size pixels after decoding with value / 999 * size. That is < 1 px for every
# size < 1998 and exactly 1 px at 1998, the largest size tested here.
MAX_SIZE = 1998
ONE_PX = 1.0 + 1e-9  # float slack only


def qwen_bound(size: float) -> float:
    return 0.5 / DIVISOR * size + 1e-9


@st.composite
def image_and_box(draw, max_size=MAX_SIZE):
    h = draw(st.integers(1, max_size))
    w = draw(st.integers(1, max_size))
    coord = lambda hi: st.floats(0, hi, allow_nan=False, allow_infinity=False)  # noqa: E731
    box = (draw(coord(w)), draw(coord(h)), draw(coord(w)), draw(coord(h)))
    return (h, w), box


def ordered(box):
    x1, y1, x2, y2 = box
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


# ----------------------------------------------------------------------------- round trips


@given(image_and_box())
@example(((1998, 1998), (1998 * 0.5 / 999, 0.0, 1998.0, 1998 * 998.5 / 999)))  # worst rounding
@example(((1, 1), (0.0, 0.0, 1.0, 1.0)))
@example(((1, 1998), (0.3, 0.2, 1997.9, 0.8)))
def test_qwen_box_round_trip_through_the_evaluator_rule(case):
    (h, w), box = case
    back = qwen_eval_box(format_box(box, (h, w)), (h, w))
    assert back is not None
    for got, want, size in zip(back, ordered(box), (w, h, w, h)):
        assert abs(got - want) <= qwen_bound(size) <= ONE_PX


@given(image_and_box())
def test_qwen_box_round_trip_through_parse_answer(case):
    (h, w), box = case
    text = format_ref("thing", box, (h, w), seg=True)
    [target] = parse_answer(text, (h, w))
    assert (target.phrase, target.seg_index, target.span) == ("thing", 0, (0, len(text)))
    for got, want, size in zip(target.box, ordered(box), (w, h, w, h)):
        assert abs(got - want) <= qwen_bound(size)


@given(image_and_box())
def test_qwen_point_round_trip(case):
    (h, w), (x, y, _, _) = case
    [(px, py)] = parse_points(format_point((x, y), (h, w)), (h, w))
    assert abs(px - x) <= qwen_bound(w) and abs(py - y) <= qwen_bound(h)


@given(image_and_box())
def test_shikra_round_trip(case):
    (h, w), box = case
    # 3 decimals of the padded square's side: at most 0.0005 * max(H, W) pixels off.
    bound = 0.0005 * max(h, w) + 1e-9
    text = format_box(box, (h, w), fmt="shikra")
    assert re.fullmatch(r"\[\d\.\d{3},\d\.\d{3},\d\.\d{3},\d\.\d{3}\]", text)
    [[back]] = parse_shikra_boxes(text, (h, w))
    for got, want in zip(back, ordered(box)):
        assert abs(got - want) <= bound
    [(px, py)] = parse_shikra_points(format_point(box[:2], (h, w), fmt="shikra"), (h, w))
    assert abs(px - box[0]) <= bound and abs(py - box[1]) <= bound


def test_shikra_pads_to_a_centred_square():
    # 100 high, 200 wide: the square is 200, the image sits 50 px down.
    assert format_box((0, 0, 200, 100), (100, 200), fmt="shikra") == "[0.000,0.250,1.000,0.750]"
    assert format_point((100, 50), (100, 200), fmt="shikra") == "[0.500,0.500]"
    two = format_shikra_boxes([(0, 0, 100, 100), (100, 0, 200, 100)], (100, 200))
    assert two == "[0.000,0.250,0.500,0.750;0.500,0.250,1.000,0.750]"
    assert parse_shikra_boxes("a " + two + " b [SEG] [0.5,0.5]", (100, 200)) == [
        [(0.0, 0.0, 100.0, 100.0), (100.0, 0.0, 200.0, 100.0)]
    ]
    # Values outside [0, 1] and outside the image part of the square are clamped to the image.
    assert parse_shikra_boxes("[-0.2,0.0,1.3,1.0]", (100, 200)) == [[(0.0, 0.0, 200.0, 100.0)]]


# ----------------------------------------------------------------------------- formatting


def test_format_examples_clamp_and_order():
    assert format_box((0, 0, 640, 480), (480, 640)) == "<box>(0,0),(999,999)</box>"
    assert format_box((700, 500, -10, -5), (480, 640)) == "<box>(0,0),(999,999)</box>"
    assert format_box((320, 240, 320, 240), (480, 640)) == "<box>(500,500),(500,500)</box>"
    assert format_point((320, 240), (480, 640)) == "<point>(500,500)</point>"
    assert format_ref("cup") == "<ref>cup</ref>"
    assert format_ref("cup", seg=True) == "<ref>cup</ref>[SEG]"
    assert format_ref("cup", (0, 0, 640, 480), (480, 640), seg=True) == (
        "<ref>cup</ref><box>(0,0),(999,999)</box>[SEG]"
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: format_box((0, 0, 1, 1), (0, 10)),
        lambda: format_box((0, 0, 1, 1), (10,)),
        lambda: format_box((0, float("nan"), 1, 1), (10, 10)),
        lambda: format_box((0, 0, 1, 1), (10, 10), fmt="kosmos"),
        lambda: format_ref("cup", (0, 0, 1, 1)),
        lambda: format_ref("a </ref> b"),
    ],
)
def test_format_rejects_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


# ----------------------------------------------------------------------------- Qwen evaluator rule


def test_qwen_eval_rule_examples():
    assert qwen_eval_box("(100,200),(300,400)", (999, 999)) == (100, 200, 300, 400)
    # x scales with the width, y with the height; image_size is (H, W).
    assert qwen_eval_box("<ref>a</ref><box>(999,999),(0,0)</box>", (500, 1000)) == (1000, 500, 0, 0)
    assert qwen_eval_box("first (1,2),(3,4) then (5,6),(7,8)", (999, 999)) == (1, 2, 3, 4)
    assert qwen_eval_box("( 10 , 20 ),(30,40)", (999, 999)) == (10, 20, 30, 40)
    # Out of range values are kept as they are: the evaluator neither clamps nor orders.
    assert qwen_eval_box("(-999,0),(1998,0)", (10, 10)) == (-10, 0, 20, 0)
    for miss in ["", "no box", "(1,2)", "(1,2),(3)", "(1,ab),(3,4)", "(1,2,3),(4,5)", "(1,2),\n(3,4)",
                 "(nan,1),(2,3)"]:
        assert qwen_eval_box(miss, (999, 999)) is None, miss


@settings(max_examples=300)
@given(st.text(alphabet="(),1 a\n-.", max_size=40))
def test_qwen_eval_match_equals_the_regex(text):
    want = re.search(r"\((.*?)\),\((.*?)\)", text)
    assert B._first_qwen_eval_match(text) == (want.groups() if want else None)


# ----------------------------------------------------------------------------- parse_answer


SIZE = (999, 999)  # (H, W) where 0..999 units are pixels


def test_several_targets_each_with_its_seg():
    text = (
        "<ref>the man</ref><box>(10,20),(30,40)</box>[SEG] holds "
        "<ref>the white cup</ref> <box>(388,270),(455,352)</box> [SEG] in his left hand"
    )
    targets = parse_answer(text, SIZE)
    assert [(t.phrase, t.box, t.seg_index) for t in targets] == [
        ("the man", (10, 20, 30, 40), 0),
        ("the white cup", (388, 270, 455, 352), 1),
    ]
    first, second = targets
    assert text[slice(*first.span)] == "<ref>the man</ref><box>(10,20),(30,40)</box>[SEG]"
    assert text[slice(*second.span)].startswith("<ref>the white cup")
    assert text[slice(*second.span)].endswith("[SEG]")


def test_ref_with_box_and_no_seg_and_ref_alone():
    targets = parse_answer("<ref>dog</ref><box>(0,0),(999,999)</box> and <ref>cat</ref> here", (100, 200))
    assert targets == [
        ParsedTarget("dog", (0.0, 0.0, 200.0, 100.0), None, (0, 40)),
        ParsedTarget("cat", None, None, (45, 59)),
    ]


def test_bare_segs_and_bare_box():
    text = "Sure, [SEG] and [SEG]. Also <box>(1,2),(3,4)</box>[SEG]"
    targets = parse_answer(text, SIZE)
    assert [(t.phrase, t.box, t.seg_index) for t in targets] == [
        (None, None, 0),
        (None, None, 1),
        (None, (1, 2, 3, 4), 2),
    ]
    assert [text[slice(*t.span)] for t in targets[:2]] == [SEG, SEG]


def test_seg_not_adjacent_to_its_ref_is_bare():
    targets = parse_answer("<ref>cup</ref> is on the left [SEG]", SIZE)
    assert [(t.phrase, t.seg_index) for t in targets] == [("cup", None), (None, 0)]


@pytest.mark.parametrize(
    "box_text",
    [
        "<box>(12,ab)</box>",
        "<box></box>",
        "<box>(1,2),(3</box>",
        "<box>(1200,5),(1500,9)</box>",  # wholly outside the 0..999 frame
        "<box>(-9,-9),(-1,40)</box>",
        "<box>(1,2),(3,4)",  # never closed
    ],
)
def test_broken_box_keeps_phrase_and_seg_index(box_text):
    text = f"[SEG] <ref>the cup</ref>{box_text}[SEG] then <ref>a dog</ref>[SEG]"
    targets = parse_answer(text, SIZE)
    assert [(t.phrase, t.box, t.seg_index) for t in targets] == [
        (None, None, 0),
        ("the cup", None, 1),
        ("a dog", None, 2),
    ]


def test_out_of_range_values_and_spaces_are_clamped():
    [t] = parse_answer("<ref>a</ref><box>( -5 , 10 ) , ( 1200, 2000 )</box>", (100, 100))
    assert t.box == (0.0, pytest.approx(1000 / 999), 100.0, 100.0)
    [t] = parse_answer("<box>(300,400),(100,200)</box>", SIZE)  # corners get ordered
    assert t.box == (100, 200, 300, 400)


def test_box_with_two_pairs_is_two_targets_sharing_the_phrase():
    text = "<ref>two cups</ref><box>(1,2),(3,4),(5,6),(7,8)</box>[SEG]"
    targets = parse_answer(text, SIZE)
    assert [(t.phrase, t.box, t.seg_index) for t in targets] == [
        ("two cups", (1, 2, 3, 4), 0),
        ("two cups", (5, 6, 7, 8), None),
    ]
    # Qwen-VL also writes one <box> per instance after a single ref.
    text = "<ref>two cups</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box> [SEG]"
    assert [(t.phrase, t.box, t.seg_index) for t in parse_answer(text, SIZE)] == [
        ("two cups", (1, 2, 3, 4), 0),
        ("two cups", (5, 6, 7, 8), None),
    ]


@pytest.mark.parametrize("phrase", ["白色的杯子", "الكوب الأبيض", "the 🐶 on the left", "  spaced  "])
def test_non_english_phrases(phrase):
    text = f"答案：<ref>{phrase}</ref><box>(0,0),(10,10)</box>[SEG]。"
    [t] = parse_answer(text, SIZE)
    assert (t.phrase, t.box, t.seg_index) == (phrase, (0, 0, 10, 10), 0)
    assert text[slice(*t.span)] == format_ref(phrase, (0, 0, 10, 10), SIZE, seg=True)


@pytest.mark.parametrize(
    "text, expected",
    [
        # nested ref: the outer, unclosed one is dropped
        ("<ref>a <ref>b</ref>[SEG]", [("b", None, 0)]),
        # ref never closed: its [SEG] stands alone
        ("<ref>a [SEG]", [(None, None, 0)]),
        # stray closing tags are ignored
        ("</ref></box>[SEG]</ref>", [(None, None, 0)]),
        # a [SEG] inside the phrase breaks the ref
        ("<ref>a[SEG]b</ref>[SEG]", [(None, None, 0), (None, None, 1)]),
        # box tags inside a ref
        ("<ref>a<box>(1,2),(3,4)</box></ref>[SEG]", [(None, (1, 2, 3, 4), None), (None, None, 0)]),
        # unclosed box swallowed by the next box opening
        ("<ref>a</ref><box>(1,2<box>(1,2),(3,4)</box>[SEG]", [("a", None, 0), ("a", (1, 2, 3, 4), None)]),
        ("<box><box></box>", [(None, None, None), (None, None, None)]),
        ("", []),
        ("no tags at all (1,2),(3,4)", []),
    ],
)
def test_nested_and_unbalanced_tags(text, expected):
    assert [(t.phrase, t.box, t.seg_index) for t in parse_answer(text, SIZE)] == expected


TOKENS = list(SPECIAL_TOKENS) + ["(", ")", ",", "),(", "-", "1000", "12", " ", "\n", "x", "猫"]
answer_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(TOKENS), st.text(alphabet="0123456789(),- ab", max_size=6)),
             max_size=60).map("".join),
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(answer_text, st.integers(1, 3000), st.integers(1, 3000))
def test_parse_answer_never_raises_and_accounts_for_every_seg(text, h, w):
    targets = parse_answer(text, (h, w))
    seg_indices = [t.seg_index for t in targets if t.seg_index is not None]
    # Every [SEG] belongs to exactly one target, in order.
    assert seg_indices == list(range(text.count(SEG)))
    for t in targets:
        assert 0 <= t.span[0] <= t.span[1] <= len(text)
        if t.box is not None:
            x1, y1, x2, y2 = t.box
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
    starts = [t.span[0] for t in targets]
    assert starts == sorted(starts)
    parse_points(text, (h, w))
    parse_question_prompts(text, (h, w))
    parse_shikra_boxes(text, (h, w))
    qwen_eval_box(text, (h, w))


@pytest.mark.parametrize(
    "text",
    [
        "<box>(" * 20000,
        "(" * 50000 + ",",
        "<box>(" + "1" * 100000 + "</box>",
        "<ref>" * 25000 + SEG * 25000,
        "<box>" + "(1," * 33000 + "</box>",
        "(1,2)," * 16000 + "\n",
        "[" * 50000 + "0.1,",
        "<point>(" * 14000,
    ],
)
def test_adversarial_100k_strings_parse_fast(text):
    start = time.perf_counter()
    targets = parse_answer(text, (480, 640))
    parse_points(text, (480, 640))
    parse_question_prompts(text, (480, 640))
    parse_shikra_boxes(text, (480, 640))
    qwen_eval_box(text, (480, 640))
    assert time.perf_counter() - start < 1.0
    assert len([t for t in targets if t.seg_index is not None]) == text.count(SEG)


def test_parse_answer_rejects_bad_arguments():
    with pytest.raises(TypeError):
        parse_answer(b"[SEG]", SIZE)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        parse_answer("[SEG]", (0, 0))


# ----------------------------------------------------------------------------- question prompts


def test_question_prompts():
    q = "Where is the cup? <point>(500,500)</point> near <box>(0,0),(999,999)</box> <point>(x,1)</point>"
    prompts = parse_question_prompts(q, (480, 640))
    assert prompts.points == [(pytest.approx(640 * 500 / 999), pytest.approx(480 * 500 / 999))]
    assert prompts.boxes == [(0.0, 0.0, 640.0, 480.0)]
    points, boxes = parse_question_prompts("nothing here", (480, 640))
    assert points == [] and boxes == []
    assert parse_points("<point>( -4 , 1200 )</point>", (10, 20)) == [(0.0, 10.0)]


# ----------------------------------------------------------------------------- IoU


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0  # touching corners
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)  # continuous area, no +1
    assert box_iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0  # zero area
    assert box_iou((5, 5, 5, 5), (0, 0, 10, 10)) == 0.0
    assert box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # reversed corners have no area
    assert box_iou((0, 0, float("nan"), 10), (0, 0, 10, 10)) == 0.0


@given(image_and_box(), image_and_box())
def test_box_iou_is_symmetric_and_bounded(a, b):
    iou = box_iou(a[1], b[1])
    assert 0.0 <= iou <= 1.0
    assert iou == pytest.approx(box_iou(b[1], a[1]))


def test_the_spaces_inside_a_ref_are_not_part_of_the_name():
    """A phrase whose first token carries its space ("Ġsquares") reads "<ref>squares</ref>" to the user."""
    from grounding.inference.steps import tidy_phrases
    from grounding.result import Prediction, Target

    answer = "<ref> squares </ref><box>(1,2),(3,4)</box>[SEG] <ref>the red  circle</ref>[SEG]"
    pred = tidy_phrases(Prediction(answer=answer, targets=[Target(" squares ", (1, 2, 3, 4)),
                                                           Target("the red  circle", (5, 6, 7, 8))],
                                   image_size=(10, 10)))
    assert pred.answer == "<ref>squares</ref><box>(1,2),(3,4)</box>[SEG] <ref>the red  circle</ref>[SEG]"
    assert [t.phrase for t in pred.targets] == ["squares", "the red  circle"]
