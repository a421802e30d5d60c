"""The evaluation harness on a tiny random checkpoint and a synthetic REFER folder: output files,
metrics equal to an independent recomputation, resume without duplicates, both modes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from eval.harness import (EvalError, evaluate, first_text_box, read_predictions, recompute_metrics)
from grounding.result import Prediction, Target

SCORES = ("cIoU", "gIoU", "acc@0.5", "n_sentences", "n_images")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from grounding.data.refer import ReferDataset
    from shapes.scenes.synthetic import generate_dataset

    root = generate_dataset(tmp_path_factory.mktemp("refer") / "synth", 4, seed=3, progress=False,
                            splits=(("val", 1.0),))
    return ReferDataset(root, "synth", "unc")


@pytest.fixture(scope="module")
def grounder(tiny_dir):
    from grounding import Grounder
    return Grounder.from_pretrained(tiny_dir, device="cpu", max_new_tokens=12)


@pytest.fixture(scope="module")
def forced_run(grounder, dataset, tmp_path_factory):
    """One teacher-forced run of task both over the whole split (shared by several tests)."""
    out = tmp_path_factory.mktemp("eval") / "forced"
    calls = grounder.encoder_calls
    metrics = evaluate(grounder, dataset, "val", task="both", mode="teacher-forced", out_dir=out,
                       batch_size=8, progress=False, model_name="tiny")
    return out, metrics, grounder.encoder_calls - calls


def _lines(out):
    return [json.loads(t) for t in (out / "predictions.jsonl").read_text().splitlines()]


def test_writes_the_three_files_and_one_line_per_sentence(forced_run, dataset):
    out, metrics, encoded = forced_run
    assert (out / "predictions.jsonl").is_file() and (out / "metrics.json").is_file()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = _lines(out)
    sents = dataset.sentences("val")
    assert sorted(line["sent_id"] for line in lines) == sorted(s.sent_id for s in sents)
    assert [line["image_id"] for line in lines] == sorted(line["image_id"] for line in lines)  # by image
    assert encoded == len(dataset.images("val"))  # each image through the decoder's encoder once
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert metrics["n_sentences"] == len(sents) and metrics["n_images"] == len(dataset.images("val"))
    assert (metrics["mode"], metrics["task"], metrics["rec_mode"], metrics["model"]) == \
        ("teacher-forced", "both", "teacher-forced", "tiny")
    assert metrics["teacher_answer"] == "<ref>{sent}</ref>[SEG]"
    for key in ("cIoU", "gIoU", "acc@0.5"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["wall_time_s"] > 0 and metrics["sentences_per_s"] > 0
    first = lines[0]
    for key in ("ref_id", "sent_id", "image_id", "sentence", "answer", "box", "mask", "mask_iou", "box_iou"):
        assert key in first


def test_teacher_forcing_gives_every_sentence_a_mask(forced_run, dataset):
    out, _, _ = forced_run
    for line in _lines(out):
        assert line["answer"].replace(" ", "") == f"<ref>{line['sentence']}</ref>[SEG]".replace(" ", "")
        assert line["mask"] is not None
        h, w = dataset.image_size(line["image_id"])
        assert line["mask"]["size"] == [h, w]  # original resolution
        assert line["rec_answer"] is not None  # REC was generated separately


def test_metrics_equal_an_independent_recomputation(forced_run, dataset):
    out, metrics, _ = forced_run
    again = recompute_metrics(out / "predictions.jsonl", dataset, "val")
    for key in SCORES:
        assert again[key] == pytest.approx(metrics[key], rel=1e-12, abs=0), key


@pytest.mark.parametrize("damage", ["drop_last_3", "cut_last_line"])
def test_resume_after_a_crash_gives_the_same_run(forced_run, grounder, dataset, tmp_path, damage):
    out, metrics, _ = forced_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    path = copy / "predictions.jsonl"
    text = path.read_text()
    kept = text.splitlines(keepends=True)
    if damage == "drop_last_3":
        path.write_text("".join(kept[:-3]))
    else:
        last = kept[-1]
        path.write_text("".join(kept[:-1]) + last[: len(last) // 2])  # a crash mid-line
        assert len(read_predictions(path)) == len(kept) - 1
    resumed = evaluate(grounder, dataset, "val", task="both", mode="teacher-forced", out_dir=copy,
                       batch_size=8, progress=False, model_name="tiny")
    ids = [line["sent_id"] for line in _lines(copy)]  # every line parses: the cut line is gone
    assert len(ids) == len(set(ids)) == metrics["n_sentences"]
    assert set(ids) == {s.sent_id for s in dataset.sentences("val")}
    assert resumed["n_new_sentences"] == (3 if damage == "drop_last_3" else 1)
    for key in SCORES:
        assert resumed[key] == metrics[key], key
    assert path.read_text() == text  # byte for byte what the uninterrupted run wrote

    # a run of another kind into the same folder is refused, not mixed in
    with pytest.raises(EvalError, match="mode"):
        evaluate(grounder, dataset, "val", task="both", mode="generate", out_dir=copy, progress=False,
                 model_name="tiny")


def test_generate_mode_with_limit(grounder, dataset, tmp_path):
    out = tmp_path / "gen"
    metrics = evaluate(grounder, dataset, "val", task="both", mode="generate", out_dir=out, limit=6,
                       batch_size=4, progress=False, model_name="tiny")
    lines = _lines(out)
    assert len(lines) == 6 == metrics["n_sentences"]
    assert metrics["rec_question"] == "Please segment {s}."  # one generated answer gives box and mask
    for line in lines:
        assert line["question"] == f"Please segment {line['sentence']}."
        assert line["rec_answer"] is None
        assert line["rec_hit"] is (line["rec_hit"] and line["box"] is not None)
    again = recompute_metrics(out / "predictions.jsonl", dataset, "val")
    for key in SCORES:
        assert again[key] == pytest.approx(metrics[key], rel=1e-12, abs=0), key
    # nothing left to do: a rerun predicts nothing and reports the same
    rerun = evaluate(grounder, dataset, "val", task="both", mode="generate", out_dir=out, limit=6,
                     batch_size=4, progress=False, model_name="tiny")
    assert rerun["n_new_sentences"] == 0 and all(rerun[k] == metrics[k] for k in SCORES)


def test_rec_only_task_scores_boxes_only(grounder, dataset, tmp_path):
    metrics = evaluate(grounder, dataset, "val", task="rec", mode="teacher-forced", out_dir=tmp_path / "rec",
                       limit=3, progress=False)
    assert metrics["cIoU"] is None and metrics["gIoU"] is None and metrics["acc@0.5"] is not None
    assert metrics["rec_mode"] == "teacher-forced" and metrics["rec_answer_prefix"] == "<ref>{sent}</ref><box>"
    lines = _lines(tmp_path / "rec")
    assert all(line["mask"] is None and line["question"].startswith("Where is") for line in lines)
    # the model wrote its answer after the given prefix
    assert all(line["answer"].startswith(f"<ref>{line['sentence']}</ref><box>") for line in lines)


def test_lisa_forced_answer_also_gives_masks(grounder, dataset, tmp_path):
    metrics = evaluate(grounder, dataset, "val", task="res", mode="teacher-forced", out_dir=tmp_path / "lisa",
                       limit=2, progress=False, teacher_answer="[SEG].")
    assert metrics["teacher_answer"] == "[SEG]." and metrics["acc@0.5"] is None and metrics["rec_mode"] is None
    lines = _lines(tmp_path / "lisa")
    assert all(line["mask"] is not None and line["box"] is None for line in lines)


def test_bad_options_are_user_errors(grounder, dataset, tmp_path):
    from grounding.errors import DatasetError

    with pytest.raises(DatasetError, match="split"):
        evaluate(grounder, dataset, "testC", out_dir=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    with pytest.raises(EvalError, match="task"):
        evaluate(grounder, dataset, "val", task="seg", out_dir=tmp_path, progress=False)
    with pytest.raises(EvalError, match="mode"):
        evaluate(grounder, dataset, "val", mode="forced", out_dir=tmp_path, progress=False)
    with pytest.raises(EvalError, match=r"\[SEG\]"):
        evaluate(grounder, dataset, "val", task="res", mode="teacher-forced", out_dir=tmp_path,
                 teacher_answer="<ref>{sent}</ref>", progress=False)


def test_rec_box_comes_from_the_text_never_from_the_mask():
    mask = np.zeros((10, 20), bool)
    mask[2:5, 3:9] = True
    # the first target has a mask but no text box: the predictor fills its box from the mask
    pred = Prediction(answer="<ref>a</ref>[SEG] <ref>b</ref><box>(0,0),(999,999)</box>",
                      targets=[Target("a", box=(3.0, 2.0, 9.0, 5.0), mask=mask, seg_index=0),
                               Target("b", box=(0.0, 0.0, 20.0, 10.0))], image_size=(10, 20))
    assert first_text_box(pred) is None
    pred = Prediction(answer="<ref>b</ref><box>(0,0),(999,999)</box>[SEG]",
                      targets=[Target("b", box=(0.0, 0.0, 20.0, 10.0), mask=mask, seg_index=0)], image_size=(10, 20))
    assert first_text_box(pred) == pytest.approx((0.0, 0.0, 20.0, 10.0))
    assert first_text_box(Prediction(answer="nothing", targets=[], image_size=(10, 20))) is None


def test_eval_command_runs_and_rejects_bad_options(tiny_dir, dataset, tmp_path):
    import typer
    from typer.testing import CliRunner

    from apps.eval_cmd import eval_command

    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)  # more than one command: "eval" is then a sub-command
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["eval", "--data-root", str(dataset.data_root), "--model", str(tiny_dir), "--task", "res",
                                      "--mode", "teacher-forced", "--limit", "2", "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["n_sentences"] == 2
    with pytest.raises(EvalError, match="task"):
        eval_command(dataset.data_root, model=tiny_dir, task="bogus", out=tmp_path / "x")


def test_rec_box_from_mask_scores_the_predicted_masks_box(tiny_dir, dataset, tmp_path):
    """--rec-box mask (GLaMM's practice): the REC box is the tight box of the predicted mask."""
    from grounding import Grounder
    from grounding.result import box_from_mask, rle_decode
    from eval.harness import evaluate
    g = Grounder.from_pretrained(tiny_dir, device="cpu")
    m = evaluate(g, dataset, "val", task="both", mode="teacher-forced", out_dir=tmp_path / "e", limit=6,
                 progress=False, rec_box="mask")
    assert m["rec_box"] == "mask" and m["n_sentences"] == 6
    for line in map(json.loads, (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()):
        mask = rle_decode(line["mask"])
        expected = box_from_mask(mask)
        assert (line["box"] is None) == (expected is None)
        if expected is not None:
            assert line["box"] == pytest.approx(list(expected))


COMPARED = ("sent_id", "image_id", "answer", "rec_answer", "box", "mask", "intersection", "union", "rec_hit")


@pytest.mark.parametrize("mode", ["generate", "teacher-forced"])
def test_grouped_engine_gives_the_naive_lines(grounder, overfit, dataset, tmp_path, mode):
    """The prefix-sharing engine (one image prefix, its sentences batched) writes what the one-sentence-
    at-a-time path writes: same answers, boxes, masks and scores. Generation uses the model trained to
    answer with a [SEG] (a random one writes none), so the masks of generated answers are compared too."""
    from grounding import Grounder

    if mode == "generate":
        grounder = Grounder(overfit["model"], overfit["tokenizer"], max_new_tokens=16)
    runs = {}
    for engine in ("naive", "grouped"):
        runs[engine] = evaluate(grounder, dataset, "val", task="both", mode=mode, out_dir=tmp_path / engine,
                                batch_size=16, progress=False, engine=engine)
    naive, grouped = _lines(tmp_path / "naive"), _lines(tmp_path / "grouped")
    assert len(naive) == len(grouped) == len(dataset.sentences("val"))
    for a, b in zip(naive, grouped):
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}
    for key in ("cIoU", "gIoU", "acc@0.5"):
        assert runs["naive"][key] == runs["grouped"][key]
    assert any(line["mask"] is not None for line in grouped)


def test_two_processes_give_the_single_process_run(tiny_dir, dataset, forced_run, tmp_path):
    """--num-procs 2 (gloo, spawned processes, images sharded) writes the same predictions.jsonl and
    metrics as one process; an interrupted sharded run's per-rank files are resumed, not redone."""
    from apps.eval_cmd import run_shard
    from eval.distributed import spawn

    single_out, single, _ = forced_run
    out = tmp_path / "two"
    options = dict(data_root=dataset.data_root, dataset="synth", split_by="unc", split="val", model_dir=tiny_dir,
                   device="cpu", task="both", mode="teacher-forced", out=out, limit=None, batch_size=8,
                   rec_box="text", engine="grouped", max_new_tokens=12)
    # an interrupted earlier run left the first image's lines in a rank file (and a cut line)
    first_image = [line for line in _lines(single_out) if line["image_id"] == _lines(single_out)[0]["image_id"]]
    out.mkdir()
    run = json.loads((single_out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "model": str(tiny_dir.resolve())}))
    (out / "predictions.rank1.jsonl").write_text("".join(json.dumps(line) + "\n" for line in first_image) + '{"sent')
    spawn(run_shard, 2, options)
    metrics = json.loads((out / "metrics.json").read_text())
    assert not list(out.glob("predictions.rank*"))
    assert metrics["num_procs"] == 2 and metrics["n_resumed_sentences"] == len(first_image)
    for key in SCORES:
        assert metrics[key] == single[key], key
    assert [{k: a[k] for k in COMPARED} for a in _lines(out)] == [{k: a[k] for k in COMPARED} for a in _lines(single_out)]
