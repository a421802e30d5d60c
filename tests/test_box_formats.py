"""Box formats of box-speaking VLMs: the pixel <-> model-frame mappings round-trip over image sizes, text written in
each format reads back within its resolution, and bad model output gives notes, never exceptions."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grounding.text import box_formats as bf
from grounding.text.boxes import format_box, parse_answer

sizes = st.tuples(st.integers(16, 2000), st.integers(16, 2000))


@st.composite
def image_and_box(draw, max_side: int = 2000):
    h, w = draw(st.integers(16, max_side)), draw(st.integers(16, max_side))
    # a box inside the image, at least 4 px a side (a box clipped to nothing is no box: tested elsewhere)
    x1, y1 = draw(st.floats(0, w - 4, allow_nan=False)), draw(st.floats(0, h - 4, allow_nan=False))
    x2, y2 = draw(st.floats(x1 + 4, w, allow_nan=False)), draw(st.floats(y1 + 4, h, allow_nan=False))
    return (h, w), (x1, y1, x2, y2)


@given(image_and_box())
def test_square_frame_round_trips(case):
    size, box = case
    back = bf.square_to_pixels(bf.pixels_to_square(box, size), size)
    assert back == pytest.approx(box, abs=1e-6)


@given(image_and_box(), st.tuples(st.integers(28, 4000), st.integers(28, 4000)))
def test_resized_input_frame_round_trips(case, input_size):
    size, box = case
    back = bf.input_to_pixels(bf.pixels_to_input(box, size, input_size), size, input_size)
    assert back == pytest.approx(box, abs=1e-6)


@settings(max_examples=60)
@given(image_and_box(max_side=2000))
def test_text_round_trips_within_one_pixel(case):
    """Shikra (3 decimals of the square), Qwen2-VL (1/1000 of a side) resolve 1 px up to 2000 px images;
    Qwen2.5-VL writes integer pixels of its input, here the image itself."""
    size, box = case
    box = tuple(min(v, s) for v, s in zip(box, (size[1], size[0], size[1], size[0])))
    for fmt in ("shikra", "qwen2-vl"):
        (t,) = parse_answer(format_box(box, size, fmt), size, fmt)
        assert t.box == pytest.approx(box, abs=1.0 + 1e-6), fmt   # half a step at 2000 px, float rounding
    (t,) = parse_answer(bf.format_qwen25([box], ["x"], size), size, "qwen2.5-vl")
    assert t.box == pytest.approx(box, abs=1.0 + 1e-6) and t.phrase == "x"


@given(image_and_box(max_side=200))
def test_llava_two_decimals_resolve_one_pixel_up_to_200_px(case):
    size, box = case
    box = tuple(min(v, s) for v, s in zip(box, (size[1], size[0], size[1], size[0])))
    (t,) = parse_answer(format_box(box, size, "llava"), size, "llava")
    assert t.box == pytest.approx(box, abs=1.0 + 1e-6)   # half a step of 1/100 of a 200 px square, float rounding


PIECES = list('[]{}(),;.:"0123456789-+ abc\n`') + ["<|box_start|>", "<|box_end|>", "<|object_ref_start|>",
                                                    "<|object_ref_end|>", '"bbox_2d"', '"label"', "```json"]


@given(st.lists(st.sampled_from(PIECES), max_size=60).map("".join), sizes)
def test_no_text_makes_a_reader_raise(text, size):
    for fmt in ("shikra", "llava", "qwen2-vl", "qwen2.5-vl"):
        for t in parse_answer(text, size, fmt, (size[0] // 2 + 1, size[1] // 2 + 1)):
            if t.box is not None:
                x1, y1, x2, y2 = t.box
                assert 0 <= x1 < x2 <= size[1] and 0 <= y1 < y2 <= size[0]
                assert all(math.isfinite(v) for v in t.box)
            else:
                assert t.note


def test_qwen2_phrases_boxes_and_bad_boxes():
    size = (100, 200)
    text = ("<|object_ref_start|>two dogs<|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|>"
            "<|box_start|>(500,500),(1000,1000)<|box_end|> and <|box_start|>(10,10),(20,20)<|box_end|>"
            "<|box_start|>(1100,10),(1200,20)<|box_end|><|box_start|>(1,2)<|box_end|>")
    a, b, c, d, e = parse_answer(text, size, "qwen2-vl")
    assert (a.phrase, b.phrase, c.phrase) == ("two dogs", "two dogs", None)
    assert a.box == (0.0, 0.0, 100.0, 50.0) and b.box == (100.0, 50.0, 200.0, 100.0)
    assert d.box is None and "outside" in d.note
    assert e.box is None and "unreadable" in e.note


def test_qwen25_fenced_list_cut_json_and_other_shapes():
    size, frame = (100, 200), (56, 112)   # the model saw the image at 112 x 56
    good = '```json\n[{"bbox_2d": [0, 0, 56, 28], "label": "cat"}, {"bbox_2d": [56, 28, 112, 56], "label": "dog"}]\n```'
    a, b = parse_answer(good, size, "qwen2.5-vl", frame)
    assert (a.phrase, a.box, b.box) == ("cat", (0.0, 0.0, 100.0, 50.0), (100.0, 50.0, 200.0, 100.0))
    cut = '```json\n[{"bbox_2d": [0, 0, 56, 28], "label": "cat"}, {"bbox_2d": [56, 28'
    (t,) = parse_answer(cut, size, "qwen2.5-vl", frame)
    assert t.box == (0.0, 0.0, 100.0, 50.0) and "malformed JSON" in t.note
    (t,) = parse_answer('{"bbox_2d": [0, 0, "x", 2]}', size, "qwen2.5-vl", frame)
    assert t.box is None and "not four numbers" in t.note
    (t,) = parse_answer('{"bbox_2d": [-20, -10, 56, 28]}', size, "qwen2.5-vl", frame)
    assert t.box == (0.0, 0.0, 100.0, 50.0) and "clipped" in t.note
    assert parse_answer("There is no cat.", size, "qwen2.5-vl", frame) == []


def test_unknown_format_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown box format 'kosmos'"):
        parse_answer("x", (10, 10), "kosmos")
