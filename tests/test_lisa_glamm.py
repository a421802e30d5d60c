"""LISA and GLaMM checkpoints through ``groundseg convert``: token ids, CLIP pixels, hidden states, mask logits and
greedy answers equal their own code (transformers 4.31), recorded by tests/fixtures/make_lisa_fixtures.py and
make_glamm_fixtures.py on tiny random models (LISA's two token layouts, GLaMM's); then a converted model works in
every command; bad folders fail with one line naming the path."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from apps.convert_cmd import convert_checkpoint
from grounding import Grounder
from grounding.errors import CheckpointError
from grounding.inference.prepared import Query

FIXTURES = Path(__file__).parent / "fixtures" / "lisa"
CLIP = FIXTURES / "clip-vit-l14-shaped"
GLAMM = Path(__file__).parent / "fixtures" / "glamm"
VAL_QUESTION = "What is {} in this image? Please output segmentation mask."


@dataclass(frozen=True)
class Case:
    """One recorded checkpoint: its family, folder, CLIP folder, the pixels file, the image-token count, and a
    question + forced answer of its validation path (the fixture's first val row)."""
    family: str
    folder: Path
    clip: Path
    pixels: Path
    image_tokens: int
    val_question: str
    val_answer: str
    max_new_tokens: int


CASES = {
    "lisa-7b-v1": Case("lisa", FIXTURES / "lisa-7b-v1", CLIP, FIXTURES / "fixture_pixels.safetensors", 256,
                       VAL_QUESTION.format("the man on the left"), "[SEG].", 12),
    "lisa-13b-llama2": Case("lisa", FIXTURES / "lisa-13b-llama2", CLIP, FIXTURES / "fixture_pixels.safetensors", 256,
                            VAL_QUESTION.format("the man on the left"), "[SEG].", 12),
    "glamm": Case("glamm", GLAMM / "glamm", GLAMM / "clip-vit-l14-336-shaped", GLAMM / "glamm" / "fixture_pixels.safetensors",
                  576, "Can you segment the man on the left in this image?", "Sure, it is [SEG].", 6),
}


@pytest.fixture(scope="module", params=list(CASES))
def recorded(request, tmp_path_factory):
    """(case, converted model dir, Grounder, pixels)."""
    case = CASES[request.param]
    out = convert_checkpoint(case.family, case.folder, case.clip, tmp_path_factory.mktemp(request.param))
    g = Grounder.from_pretrained(out, device="cpu", max_new_tokens=case.max_new_tokens)
    return case, out, g, load_file(str(case.pixels))


@pytest.fixture(scope="module")
def lisa_7b(tmp_path_factory):
    """(case, converted model dir, Grounder) of the 7B-v1 layout: the one the commands are tried with."""
    case = CASES["lisa-7b-v1"]
    out = convert_checkpoint(case.family, case.folder, case.clip, tmp_path_factory.mktemp("lisa-commands"))
    return case, out, Grounder.from_pretrained(out, device="cpu", max_new_tokens=case.max_new_tokens)


def their_ids(ids: list[int], g: Grounder) -> list[int]:
    """LISA and GLaMM mark the image by one -200; groundseg by its image slots."""
    out = []
    for t in ids:
        out += [g.processor.image_token_id] * g.model.num_image_tokens if t == -200 else [t]
    return out


def test_token_ids_equal_their_slow_tokenizer(recorded):
    case, _, g, _ = recorded
    fixture = json.loads((case.folder / "fixture_tokens.json").read_text())
    tok = g.processor.tokenizer
    for token, value in fixture.get("added", {}).items():
        assert tok.convert_tokens_to_ids(token) == value
    for case_ in fixture["image_prompts"]:
        assert g.processor.encode(case_["prompt"]).input_ids == their_ids(case_["ids"], g)
    for case_ in fixture["texts"]:
        assert tok.encode(case_["text"]) == case_["ids"], case_["text"]


def test_prompt_template_and_clip_pixels_equal_theirs(recorded):
    case, _, g, pixels = recorded
    fixture = json.loads((case.folder / "fixture_tokens.json").read_text())
    chat = fixture["image_prompts"][-1 if case.family == "glamm" else -2]["prompt"]   # "Please segment the dog."
    assert g.processor.build_prompt("Please segment the dog.") == chat
    assert g.model.num_image_tokens == case.image_tokens
    for i in range(3):   # smaller and larger than the tower's side, portrait and landscape
        assert torch.equal(g.processor.vision_pixels(pixels[f"image{i}"].numpy()), pixels[f"clip{i}"])


def test_validate_path_hidden_states_and_mask_logits_match_theirs(recorded):
    """Their RES validation: each sentence teacher-forced, the state before [SEG] -> SAM."""
    case, _, g, pixels = recorded
    ref = load_file(str(case.folder / "fixture_val.safetensors"))
    image = pixels["image1"].numpy()
    prep = g.prepare([image])[0]
    model = g.model
    for b in range(ref["input_ids"].shape[0]):
        ids = their_ids(ref["input_ids"][b][ref["attention_mask"][b].bool()].tolist(), g)
        with torch.no_grad():
            hidden = model.vlm(input_ids=torch.tensor([ids]), pixel_values=prep.vision[None],
                               output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(hidden[0], ref["hidden"][b, :len(ids)], atol=1e-5, rtol=1e-5)
            seg = model.read_segs(hidden, torch.tensor([ids]))[0]
            logits = model.decode_masks(prep.embedding, model.seg_projection(seg.states))
        torch.testing.assert_close(logits[0], ref["mask_logits"][b], atol=1e-5, rtol=1e-5)
    assert 0.3 < float((ref["mask_logits"] > 0).float().mean()) < 0.7   # the masks say something
    # the same through the public API: the question and the forced answer give their mask
    pred = g.predict(image, case.val_question, answer=case.val_answer)
    assert len(pred.targets) == 1
    assert (pred.targets[0].mask == (ref["mask_logits"][0] > 0).numpy()).mean() > 0.999


def test_chat_path_greedy_answer_and_its_masks_match_theirs(recorded):
    """Their chat: greedy generation writes [SEG]s; each becomes a mask."""
    case, _, g, pixels = recorded
    ref = load_file(str(case.folder / "fixture_chat.safetensors"))
    image = pixels["image2"].numpy()
    query = Query(image, "Please segment the dog.")
    prep = g.prepare([image])[0]
    prompt = g.steps.encode_question(query, prep, case.max_new_tokens)
    assert prompt.input_ids == their_ids(ref["prompt_ids"][0].tolist(), g)
    answer = g._answers([query], [prompt], prep.vision[None], [prep], case.max_new_tokens)[0]
    theirs = ref["output_ids"][0, ref["prompt_ids"].shape[1]:].tolist()
    assert answer == [t for t in theirs if t != g.processor.tokenizer.eos_token_id]
    ids = prompt.input_ids + theirs[:-1]   # what their last generation step (no KV cache) read
    with torch.no_grad():
        hidden = g.model.vlm(input_ids=torch.tensor([ids]), pixel_values=prep.vision[None],
                             output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden[0], ref["hidden"][0], atol=1e-5, rtol=1e-5)
    pred = g.predict(image, "Please segment the dog.")
    assert len(pred.targets) == theirs.count(g.processor.seg_token_id) == ref["mask_logits"].shape[0]
    for target, logits in zip(pred.targets, ref["mask_logits"]):
        assert (target.mask == (logits > 0).numpy()).mean() > 0.999


def test_converted_lisa_answers_through_predict_eval_and_annotate(lisa_7b, tmp_path):
    from typer.testing import CliRunner

    from apps.cli import app
    from grounding.data.refer import ReferDataset
    from shapes.scenes.synthetic import generate_dataset

    case, model_dir, g = lisa_7b
    runner = CliRunner()
    image = Path(__file__).parents[1] / "examples" / "shapes.png"
    result = runner.invoke(app, ["predict", "--model", str(model_dir), "--image", str(image), "--device", "cpu",
                                 "--question", "the circle", "--answer", "Sure, it is [SEG].",
                                 "--mask-threshold", "0.5", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["targets"]) == 1 and saved["answer"].startswith("Sure, it is [SEG]")
    result = runner.invoke(app, ["predict", "--model", str(model_dir), "--image", str(image), "--device", "cpu",
                                 "--question", "the circle <box>(1,1),(5,5)</box>", "--points", "10,10"])
    assert result.exit_code != 0 and "read no clicks or boxes" in str(result.exception or result.output)

    root = generate_dataset(tmp_path / "synth", 2, seed=5, progress=False, splits=(("val", 1.0),))
    from eval.harness import evaluate
    metrics = evaluate(g, ReferDataset(root, "synth", "unc"), "val", task="res", out_dir=tmp_path / "eval",
                       limit=3, progress=False, protocol="lisa")
    assert metrics["protocol"] == "lisa" and metrics["n_sentences"] == 3 and 0.0 <= metrics["cIoU"] <= 1.0
    lines = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(x["answer"].startswith("[SEG]") for x in lines)
    naive = evaluate(g, ReferDataset(root, "synth", "unc"), "val", task="res", out_dir=tmp_path / "naive",
                     limit=3, progress=False, protocol="lisa", engine="naive")
    assert naive["cIoU"] == pytest.approx(metrics["cIoU"], abs=1e-6)   # the grouped engine gives LISA's masks too

    from apps.demo_handlers import DemoHandlers, DownloadFolder, ModelService
    web = DemoHandlers(ModelService(g), DownloadFolder(tmp_path / "downloads"), 12)
    answer = web.api_ground(str(image), "Please segment the circle.")
    assert answer["answer"] and len(answer["targets"]) == answer["answer"].count("[SEG]")
    clicked = web.api_segment(str(image), points=[[140, 80]], point_labels=[1])
    assert len(clicked["targets"]) == 1

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    Image.fromarray(load_file(str(case.pixels))["image2"].numpy()).save(images / "a.png")
    # "Please segment the dog." on this image: the recorded chat answer, whose [SEG]s give masks
    result = runner.invoke(app, ["annotate", str(images), "--out", str(tmp_path / "ann"), "--prompts", "the dog",
                                 "--model", str(model_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    coco_file, record = tmp_path / "ann" / "instances.json", tmp_path / "ann" / "results" / "a.png.json"
    coco = json.loads(coco_file.read_text())
    assert coco["images"] and coco["categories"][0]["name"] == "the dog" and coco["annotations"]
    before = json.loads(record.read_text())["signature"]
    result = runner.invoke(app, ["annotate", str(images), "--out", str(tmp_path / "ann"), "--prompts", "the dog",
                                 "--model", str(model_dir), "--device", "cpu", "--mask-threshold", "1e6"])
    assert result.exit_code == 0, result.output   # a new threshold redoes the masks: none passes this one
    assert json.loads(record.read_text())["signature"] != before
    assert json.loads(coco_file.read_text())["annotations"] == []


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_folders_fail_with_one_line_naming_the_path(tmp_path):
    good = FIXTURES / "lisa-13b-llama2"
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        convert_checkpoint("lisa", tmp_path / "nowhere", CLIP, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no CLIP vision tower at .*nope"):
        convert_checkpoint("lisa", good, tmp_path / "nope", tmp_path / "out")
    bad = copy_folder(good, tmp_path / "no-seg")
    added = json.loads((bad / "added_tokens.json").read_text())
    del added["[SEG]"]
    (bad / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(CheckpointError, match=r"unknown token layout, \[SEG\] missing"):
        convert_checkpoint("lisa", bad, CLIP, tmp_path / "out")
    bad = copy_folder(good, tmp_path / "no-spm")
    (bad / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="lacks tokenizer.model"):
        convert_checkpoint("lisa", bad, CLIP, tmp_path / "out")
    bad = copy_folder(good, tmp_path / "not-lisa")
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a lisa checkpoint"):
        convert_checkpoint("lisa", bad, CLIP, tmp_path / "out")
    bad = copy_folder(good, tmp_path / "no-weights")
    for f in bad.glob("pytorch_model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no weights in .*no-weights"):
        convert_checkpoint("lisa", bad, CLIP, tmp_path / "out")
    wide = copy_folder(CLIP, tmp_path / "wide-clip")
    config = json.loads((wide / "config.json").read_text())
    config["hidden_size"] = 48
    (wide / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="wrong CLIP folder"):
        convert_checkpoint("lisa", good, wide, tmp_path / "out")
    # a converted directory whose CLIP folder went away says where it looked
    out = convert_checkpoint("lisa", good, copy_folder(CLIP, tmp_path / "clip2"), tmp_path / "moved")
    shutil.rmtree(tmp_path / "clip2")
    with pytest.raises(CheckpointError, match="clip2"):
        Grounder.from_pretrained(out, device="cpu")


def test_copy_makes_a_self_contained_directory_with_the_same_outputs(tmp_path):
    pixels = load_file(str(FIXTURES / "fixture_pixels.safetensors"))
    out = convert_checkpoint("lisa", FIXTURES / "lisa-13b-llama2", CLIP, tmp_path / "copied", copy=True)
    assert list((out / "vlm").glob("*.safetensors")) and (out / "clip" / "config.json").is_file()
    moved = tmp_path / "elsewhere"
    out.rename(moved)   # relative paths: the directory can move
    g = Grounder.from_pretrained(moved, device="cpu")
    ref = load_file(str(FIXTURES / "lisa-13b-llama2" / "fixture_val.safetensors"))
    pred = g.predict(pixels["image1"].numpy(), VAL_QUESTION.format("the man on the left"), answer="[SEG].")
    assert (pred.targets[0].mask == (ref["mask_logits"][0] > 0).numpy()).mean() > 0.999


def test_quantize_without_cuda_is_one_clear_error():
    with pytest.raises(CheckpointError, match="needs a CUDA GPU"):
        Grounder.from_pretrained(FIXTURES / "nowhere", device="cpu", quantize="4bit")
    with pytest.raises(CheckpointError, match="unknown quantization"):
        Grounder.from_pretrained(FIXTURES / "nowhere", device="cpu", quantize="3bit")


def test_glamm_names_targets_by_their_phrase_and_refuses_region_questions(tmp_path):
    case = CASES["glamm"]
    with pytest.raises(CheckpointError, match="not a glamm checkpoint"):
        convert_checkpoint("glamm", FIXTURES / "lisa-13b-llama2", CLIP, tmp_path / "wrong")
    with pytest.raises(CheckpointError, match="not a lisa checkpoint"):
        convert_checkpoint("lisa", case.folder, case.clip, tmp_path / "wrong2")
    g = Grounder.from_pretrained(convert_checkpoint("glamm", case.folder, case.clip, tmp_path / "out"), device="cpu")
    assert g.processor.tokenizer.legacy   # its folder says "legacy": false; its numbers come from the legacy way
    image = load_file(str(case.pixels))["image1"].numpy()
    pred = g.predict(image, "Please segment the man and the car.",
                     answer="<p> the man </p> [SEG] and <p> a red car </p> [SEG].")
    assert [t.phrase for t in pred.targets] == ["the man", "a red car"]
    assert all(t.mask is not None and t.mask.shape == (120, 90) for t in pred.targets)
    assert not np.array_equal(pred.targets[0].mask, pred.targets[1].mask)
    with pytest.raises(Exception, match="read no clicks or boxes"):
        g.predict(image, "What is in this region?", boxes=[[1, 1, 40, 40]])
