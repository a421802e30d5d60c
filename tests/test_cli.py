"""The groundseg CLI as a user runs it: JSON with RLE masks, overlays, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "apps.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory, scene):
    path = tmp_path_factory.mktemp("img") / "scene.jpg"
    Image.fromarray(scene[0]).save(path, quality=95)
    return path


def test_predict_question_writes_json_with_rle_and_overlay(tiny_dir, image_path, tmp_path):
    from pycocotools import mask as mask_utils
    out, overlay = tmp_path / "r.json", tmp_path / "o.png"
    r = run("predict", "--model", tiny_dir, "--image", image_path, "--question", "where is the red circle?",
            "--out", out, "--overlay", overlay, "--device", "cpu", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert "answer" in data and "targets" in data
    shown = np.asarray(Image.open(overlay))
    assert shown.shape[:2] == (72, 96)
    for t in data["targets"]:
        if t["mask"] is not None:
            assert mask_utils.decode(t["mask"]).shape == (72, 96)


def test_click_path_without_question(tiny_dir, image_path, tmp_path):
    from pycocotools import mask as mask_utils
    out = tmp_path / "click.json"
    r = run("predict", "--model", tiny_dir, "--image", image_path, "--points", "28,40,1", "--points", "80,20,0",
            "--out", out, "--overlay", tmp_path / "click.png")
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert len(data["targets"]) == 1
    assert mask_utils.decode(data["targets"][0]["mask"]).shape == (72, 96)
    assert (tmp_path / "click.png").stat().st_size > 0


@pytest.mark.parametrize("args,match", [
    (["--image", "{missing}", "--question", "q"], "missing.png"),
    (["--image", "{corrupt}", "--question", "q"], "corrupt.png"),
    (["--image", "{image}", "--question", "   "], "empty"),
    (["--image", "{image}", "--points", "1,x"], "not a list of numbers"),
    (["--image", "{image}", "--box", "1,2,3"], "4 comma-separated"),
    (["--image", "{image}"], "--question"),
    (["--image", "{image}", "--question", "q", "--model", "{nomodel}"], "nomodel"),
])
def test_bad_input_exits_non_zero_with_one_line(tiny_dir, image_path, tmp_path, args, match):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG garbage")
    subs = {"{missing}": tmp_path / "missing.png", "{corrupt}": corrupt, "{image}": image_path,
            "{nomodel}": tmp_path / "nomodel"}
    args = [str(subs.get(a, a)) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_dir)]
    r = run("predict", *args, "--out", tmp_path / "x.json")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and match in lines[0], r.stderr
    assert not (tmp_path / "x.json").exists()


def test_init_tiny_writes_a_loadable_checkpoint(tmp_path):
    r = run("init-tiny", tmp_path / "t", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t" / "model.safetensors").is_file()


def test_usage_errors_exit_non_zero_without_traceback(tmp_path):
    r = run("predict", "--bogus")
    assert r.returncode == 2 and "No such option" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("prefix", [None, "<ref>the circle</ref>"])
def test_a_bare_shape_name_gets_its_mask_with_or_without_an_answer_prefix(tmp_path, prefix):
    """"Please segment the circle." about examples/shapes.png gets the circle: v6 of the default model answered
    "There is no circle" (its card); v7 learnt bare names (the category task). Starting the answer with the
    phrase (--answer-prefix) skips the language model's yes/no altogether."""
    from pathlib import Path

    from grounding.text.boxes import box_iou

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "r.json"
    r = run("predict", "--image", root / "examples" / "shapes.png", "--question", "Please segment the circle.",
            *(("--answer-prefix", prefix) if prefix else ()), "--out", out, "--device", "cpu", cwd=root)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["answer"].startswith("<ref>the circle</ref>")
    (target,) = data["targets"]
    assert target["phrase"] == "the circle" and target["mask"] is not None
    # the orange circle of examples/shapes.png spans about x 171-249, y 108-189
    assert box_iou(target["box"], (171, 108, 249, 189)) > 0.7
    r = run("predict", "--image", root / "examples" / "shapes.png", "--points", "10,10", "--answer-prefix", "<ref>",
            cwd=root)
    assert r.returncode != 0 and "--answer-prefix goes with --question" in r.stderr
