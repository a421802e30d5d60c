"""Evaluation protocols: each reader agrees with the evaluator rule it mirrors (written here independently, from the
rules the published evaluators state), the hit rules differ where they should, and ``groundseg eval --protocol``
records the protocol it ran."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.protocols import PROTOCOLS, get_protocol

SIZE = (300, 500)   # H, W


# ---- the rules, independently -------------------------------------------------------------------------------
def qwen_vl_rule(text, size):
    """Qwen-VL: the first `\\((.*?)\\),\\((.*?)\\)` match, each side split on ',' into two floats, / 999, no clamp."""
    found = re.findall(r"\((.*?)\),\((.*?)\)", text)
    try:
        (x1, y1), (x2, y2) = [[float(v) for v in side.split(",")] for side in found[0]]
    except (IndexError, ValueError):
        return None
    h, w = size
    return (x1 / 999 * w, y1 / 999 * h, x2 / 999 * w, y2 / 999 * h)


def shikra_rule(text, size):
    """Shikra: boxes of plain digits on the centred square; exactly one or a miss."""
    boxes = re.findall(r"\d+(?:\.\d+)?,\d+(?:\.\d+)?,\d+(?:\.\d+)?,\d+(?:\.\d+)?", " ".join(
        re.findall(r"\[([\d.,;]+)\]", text)))
    if len(boxes) != 1:
        return None
    h, w = size
    side = max(h, w)
    x1, y1, x2, y2 = (float(v) * side for v in boxes[0].split(","))
    ox, oy = (side - w) // 2, (side - h) // 2
    return (x1 - ox, y1 - oy, x2 - ox, y2 - oy)


def qwen2_rule(text, size):
    m = re.search(r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>", text)
    if not m:
        return None
    h, w = size
    x1, y1, x2, y2 = (int(v) for v in m.groups())
    return (min(x1 / 1000 * w, w), min(y1 / 1000 * h, h), min(x2 / 1000 * w, w), min(y2 / 1000 * h, h))


def qwen25_rule(text, size, input_size):
    body = text.split("```json")[-1].split("```")[0]
    box = json.loads(body)[0]["bbox_2d"]
    (h, w), (ih, iw) = size, input_size
    return (box[0] * w / iw, box[1] * h / ih, box[2] * w / iw, box[3] * h / ih)


num = st.integers(0, 999)
frac = st.integers(0, 1000).map(lambda v: v / 1000)


@given(st.tuples(num, num, num, num), st.sampled_from(["", "the man (left) ", "sure: ", "(1,2) "]),
       st.sampled_from(["</box>", "", "),(3,4)"]))
def test_qwen_vl_reader_is_its_evaluators_rule(box, before, after):
    text = f"{before}({box[0]},{box[1]}),({box[2]},{box[3]}){after}"
    got, _ = get_protocol("qwen-vl").read_box(text, SIZE)
    assert got == pytest.approx(qwen_vl_rule(text, SIZE)) if got is not None else qwen_vl_rule(text, SIZE) is None


@given(st.lists(st.tuples(frac, frac, frac, frac), min_size=0, max_size=3), st.sampled_from(["", "a dog ", "[SEG] "]))
def test_shikra_reader_is_its_evaluators_rule(boxes, before):
    text = before + "[" + ";".join(",".join(f"{v:.3f}" for v in b) for b in boxes) + "]" if boxes else before
    got, why = get_protocol("shikra").read_box(text, SIZE)
    expected = shikra_rule(text, SIZE)
    if expected is None:
        assert got is None and why
    else:
        assert got == pytest.approx(expected)


@given(st.tuples(st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 1000)))
def test_qwen2_reader_is_its_rule(box):
    x1, x2 = sorted(box[::2])
    y1, y2 = sorted(box[1::2])
    text = f"<|object_ref_start|>a cat<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    got, _ = get_protocol("qwen2-vl").read_box(text, SIZE)
    expected = qwen2_rule(text, SIZE)
    if x2 == x1 or y2 == y1:
        assert got is None   # an empty box is no box
    else:
        assert got == pytest.approx(expected)


@settings(max_examples=30)
@given(st.tuples(st.integers(0, 200), st.integers(0, 100), st.integers(201, 448), st.integers(101, 252)))
def test_qwen25_reader_is_its_rule(box):
    frame = (252, 448)
    text = '```json\n[{"bbox_2d": [%d, %d, %d, %d], "label": "cat"}]\n```' % box
    got, _ = get_protocol("qwen2.5-vl").read_box(text, SIZE, frame)
    assert got == pytest.approx(qwen25_rule(text, SIZE, frame))


def test_hit_rules_differ_exactly_at_one_half():
    gt = (0.0, 0.0, 100.0, 100.0)
    half = (0.0, 0.0, 100.0, 50.0)   # IoU exactly 0.5
    assert get_protocol("qwen-vl").hit(half, gt) and get_protocol("llava-1.5").hit(half, gt)
    assert not get_protocol("shikra").hit(half, gt)
    assert not get_protocol("qwen-vl").hit(None, gt)


def test_lisa_asks_its_question_with_the_sentence_stripped_and_lower_cased():
    lisa = get_protocol("lisa")
    assert lisa.question_for("  The Man ON the Left ") == \
        "What is the man on the left in this image? Please output segmentation mask."
    assert lisa.answer_for("x") == "[SEG]." and lisa.mode == "teacher-forced" and lisa.tasks == ("res",)
    assert get_protocol("qwen-vl").read_box("<ref>a (b),(c)</ref><box>(1,2),(3,4)</box>", SIZE,
                                           prefix="<ref>a (b),(c)</ref><box>")[0] == pytest.approx(
        (1 / 999 * 500, 2 / 999 * 300, 3 / 999 * 500, 4 / 999 * 300))   # the given prefix is not read


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from grounding.data.refer import ReferDataset
    from shapes.scenes.synthetic import generate_dataset

    root = generate_dataset(tmp_path_factory.mktemp("refer") / "synth", 2, seed=3, progress=False,
                            splits=(("val", 1.0),))
    return ReferDataset(root, "synth", "unc")


def test_lisa_protocol_run_records_itself_and_scores_masks(tiny_dir, dataset, tmp_path):
    from eval.harness import EvalError, evaluate
    from grounding import Grounder

    grounder = Grounder.from_pretrained(tiny_dir, device="cpu", max_new_tokens=8)
    metrics = evaluate(grounder, dataset, "val", task="res", out_dir=tmp_path / "lisa", limit=3, progress=False,
                       protocol="lisa", model_name="tiny")
    run = json.loads((tmp_path / "lisa" / "run.json").read_text())
    assert metrics["protocol"] == run["protocol"] == "lisa" and metrics["mode"] == "teacher-forced"
    lines = [json.loads(t) for t in (tmp_path / "lisa" / "predictions.jsonl").read_text().splitlines()]
    assert all(line["question"] == f"What is {line['sentence'].strip().lower()} in this image? Please output "
               "segmentation mask." and line["answer"] == "[SEG]." and line["mask"] is not None for line in lines)
    with pytest.raises(EvalError, match="protocol"):   # resuming it under another protocol is refused
        evaluate(grounder, dataset, "val", task="res", out_dir=tmp_path / "lisa", limit=3, progress=False,
                 model_name="tiny")
    with pytest.raises(EvalError, match="scores res"):
        evaluate(grounder, dataset, "val", task="rec", out_dir=tmp_path / "x", progress=False, protocol="lisa")


def test_cli_takes_protocol_and_refuses_unknown_ones(tiny_dir, dataset, tmp_path):
    from typer.testing import CliRunner
    from apps.cli import app

    result = CliRunner().invoke(app, ["eval", "--data-root", str(tmp_path), "--protocol", "kosmos"])
    assert result.exit_code != 0 and "unknown --protocol 'kosmos'" in result.output + str(result.exception)
    assert set(PROTOCOLS) == {"groundseg", "qwen-vl", "shikra", "llava-1.5", "qwen2-vl", "qwen2.5-vl", "lisa"}
