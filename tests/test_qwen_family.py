"""Qwen2-VL and Qwen2.5-VL families on tiny random folders built with transformers' own classes: what the family
feeds the model equals what the folder's processor makes, answers become targets whose masks come from their boxes,
batches answer as single questions do, and every user path (predict, eval, annotate) goes through it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import draw_scene

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]
# A small chat template of our own in Qwen's chat format (real folders bring theirs).
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
            "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTION = "Where is the red circle?"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator("user assistant where is the red circle bbox_2d label json locate every".split(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def make_qwen_folder(folder: Path, version: str) -> Path:
    """A tiny random Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) folder with its processor."""
    import transformers as tf

    torch.manual_seed(0)
    tok = _tokenizer()
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"])
    if version == "2.5":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        model = tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens))
        processor_class = tf.Qwen2_5_VLProcessor
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        model = tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens))
        processor_class = tf.Qwen2VLProcessor
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    # small min/max pixels: 64-128 px images become a few dozen patches
    images = tf.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    processor_class(image_processor=images, tokenizer=tok, video_processor=tf.Qwen2VLVideoProcessor(),
                    chat_template=TEMPLATE).save_pretrained(folder)
    return folder


def assemble(directory: Path, family: str, vlm_path: Path) -> Path:
    """A model dir holding only groundseg.json: the transformers folder plus a tiny SAM decoder."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "groundseg.json").write_text(json.dumps(
        {"family": family, "vlm_path": str(vlm_path), "decoder": {"backend": "sam", "preset": "tiny"}}))
    return directory


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def qwen_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = make_qwen_folder(root / "hf", "2.5" if request.param == "qwen2.5-vl" else "2")
    return request.param, assemble(root / "model", request.param, folder)


@pytest.fixture(scope="module")
def grounder(qwen_dir):
    from grounding import Grounder
    return Grounder.from_pretrained(qwen_dir[1], device="cpu", dtype="float32", max_new_tokens=6)


def force_answers(grounder, texts: list[str]):
    """Make the VLM 'generate' ``texts`` (one per row) after whatever it is given; records each call's inputs."""
    calls = []
    tok = grounder.processor.tokenizer
    stop = grounder.processor.stop_ids[0]

    def generate(**kwargs):
        calls.append(kwargs)
        ids = kwargs["input_ids"]
        rows = [tok.encode(t, add_special_tokens=False) + [stop] for t in texts[:len(ids)]]
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [stop] * (width - len(r)) for r in rows])
        return torch.cat([ids, new], dim=1)
    grounder.model.vlm.generate = generate
    return calls


def answer_for(family: str, box_text_px=(10, 20, 50, 60)) -> str:
    if family == "qwen2-vl":
        return "<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|>"
    return '```json\n[{"bbox_2d": [%d, %d, %d, %d], "label": "the red circle"}]\n```' % box_text_px


def test_the_family_feeds_the_model_what_the_folders_processor_makes(qwen_dir, grounder):
    from transformers import AutoProcessor

    family, directory = qwen_dir
    image, _ = draw_scene(72, 100)
    calls = force_answers(grounder, [answer_for(family)])
    try:
        grounder.predict(image, QUESTION)
    finally:
        del grounder.model.vlm.generate
    folder = json.loads((directory / "groundseg.json").read_text())["vlm_path"]
    hf = AutoProcessor.from_pretrained(folder, local_files_only=True)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    expected = hf(text=[hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)],
                  images=[Image.fromarray(image)], return_tensors="pt")
    (fed,) = calls
    assert set(expected) <= set(fed)
    for key in expected:
        assert torch.equal(fed[key].cpu(), expected[key]), key
    assert (expected["input_ids"] == hf.image_token_id).sum() > 4   # the image's patches are in the prompt


def test_predict_gives_targets_whose_masks_come_from_the_answered_boxes(qwen_dir, grounder):
    family, _ = qwen_dir
    image, _ = draw_scene(72, 100)
    h, w = image.shape[:2]
    answer = answer_for(family)
    force_answers(grounder, [answer])
    decode = grounder.model.mask_decoder.decode
    prompts = []
    grounder.model.mask_decoder.decode = lambda *a, **k: prompts.append(k) or decode(*a, **k)
    try:
        pred = grounder.predict(image, QUESTION)
    finally:
        del grounder.model.vlm.generate, grounder.model.mask_decoder.decode
    assert pred.answer == answer
    (target,) = pred.targets
    assert target.phrase == "the red circle"
    if family == "qwen2-vl":
        expected = [100 / 1000 * w, 200 / 1000 * h, 500 / 1000 * w, 600 / 1000 * h]
    else:   # pixels of the smart_resize'd input (multiples of 28) mapped back to the image
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
        ih, iw = smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 16)
        expected = [10 * w / iw, 20 * h / ih, 50 * w / iw, 60 * h / ih]
    assert target.box == pytest.approx(expected, abs=1e-6)
    (call,) = prompts
    assert "seg_embeddings" not in call or call["seg_embeddings"] is None
    torch.testing.assert_close(call["boxes"][0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
    again = decode(grounder.model.mask_decoder.encode([image])[0], boxes=call["boxes"]).masks[0]
    assert target.mask.shape == (h, w) and np.array_equal(target.mask, again)


def test_bad_answers_give_notes_not_crashes(qwen_dir, grounder):
    family, _ = qwen_dir
    image, _ = draw_scene(72, 100)
    bad = ("<|box_start|>(1200,1300),(1500,1600)<|box_end|>" if family == "qwen2-vl"
           else '```json\n[{"bbox_2d": [500, 500, 600, 600], "label": "far away"}')
    pred = grounder.predict(image, QUESTION, answer=bad)
    assert pred.targets == [] and any("outside" in n for n in pred.notes)
    pred = grounder.predict(image, QUESTION, answer="I cannot see it.")
    assert pred.targets == [] and pred.notes


def test_batches_answer_as_single_questions_do(grounder):
    image, _ = draw_scene(72, 100)
    other, _ = draw_scene(64, 128)
    queries = [(image, QUESTION), (other, "where is the red circle"), (image, "locate every red circle")]
    batch = [p.answer for p in grounder.predict_batch(queries, batch_size=3)]
    alone = [grounder.predict(*q).answer for q in queries]
    assert batch == alone and all(batch)


def test_the_prefix_engine_falls_back_to_whole_prompts(qwen_dir, grounder):
    from grounding import PrefixEngine, Query

    image, _ = draw_scene(72, 100)
    grouped = PrefixEngine(grounder).predict_group(image, [Query(None, QUESTION), Query(None, "where is red")])
    assert [p.answer for p in grouped] == [grounder.predict(image, QUESTION).answer,
                                           grounder.predict(image, "where is red").answer]


def test_a_missing_folder_is_one_clear_error(tmp_path):
    from grounding.checkpoint import load_checkpoint
    from grounding.errors import CheckpointError

    directory = assemble(tmp_path / "m", "qwen2.5-vl", tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=str(tmp_path / "nowhere" / "config.json").replace("\\", "\\\\")):
        load_checkpoint(directory)


def test_eval_scores_the_answered_box_and_its_mask(qwen_dir, grounder, tmp_path):
    from eval.harness import evaluate, recompute_metrics
    from grounding.data.refer import ReferDataset
    from shapes.scenes.synthetic import generate_dataset

    family, _ = qwen_dir
    root = generate_dataset(tmp_path / "synth", 2, seed=5, progress=False, splits=(("val", 1.0),))
    data = ReferDataset(root, "synth", "unc")
    sents = sorted(data.sentences("val"), key=lambda s: (s.image_id, s.sent_id))[:4]
    # each sentence answered with its own ground-truth box, written in the family's format
    from grounding.text.box_formats import format_qwen2, format_qwen25
    texts = []
    for s in sents:
        size, box = data.image_size(s.image_id), data.box_xyxy(s.ann_id)
        texts.append(format_qwen2(box, size) if family == "qwen2-vl"
                     else format_qwen25([box], [s.text], size, grounder.model.family.input_size(size)))
    answers = iter(texts)
    tok, stop = grounder.processor.tokenizer, grounder.processor.stop_ids[0]

    def generate(**kwargs):
        ids = kwargs["input_ids"]
        rows = [tok.encode(next(answers), add_special_tokens=False) + [stop] for _ in range(len(ids))]
        width = max(len(r) for r in rows)
        return torch.cat([ids, torch.tensor([r + [stop] * (width - len(r)) for r in rows])], dim=1)
    grounder.model.vlm.generate = generate
    try:
        metrics = evaluate(grounder, data, "val", task="both", out_dir=tmp_path / "out", limit=4, batch_size=1,
                           progress=False, protocol=family, model_name="tiny")
    finally:
        del grounder.model.vlm.generate
    assert metrics["protocol"] == family and json.loads((tmp_path / "out" / "run.json").read_text())["protocol"] == family
    assert metrics["acc@0.5"] == 1.0   # its own box, read back through the format, hits
    lines = [json.loads(t) for t in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert all(line["mask"] is not None and line["box_iou"] > 0.9 for line in lines)   # RES: the box's mask
    again = recompute_metrics(tmp_path / "out" / "predictions.jsonl", data, "val", protocol=family)
    assert again["acc@0.5"] == metrics["acc@0.5"] and again["cIoU"] == pytest.approx(metrics["cIoU"])


def test_annotate_runs_on_an_assembled_dir(qwen_dir, grounder, tmp_path):
    import cv2
    from apps.annotate import annotate_folder

    family, directory = qwen_dir
    (tmp_path / "in").mkdir()
    image, _ = draw_scene(72, 100)
    cv2.imwrite(str(tmp_path / "in" / "a.png"), image[..., ::-1])
    force_answers(grounder, [answer_for(family)] * 8)
    try:
        summary = annotate_folder(tmp_path / "in", ["the red circle"], tmp_path / "out", model_dir=directory,
                                  device="cpu", grounder_factory=_Same(grounder))
    finally:
        del grounder.model.vlm.generate
    coco = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert summary.done_now == 1 and len(coco["annotations"]) == 1
    assert coco["annotations"][0]["bbox"][2] > 0


class _Same:
    def __init__(self, grounder):
        self.grounder = grounder

    def __call__(self, model_dir, device):
        return self.grounder


def test_qwen25_with_a_sam2_decoder_masks_the_answered_box(tmp_path):
    """The assembly the issue names: a Qwen2.5-VL folder with a SAM2 decoder (tiny preset here)."""
    from grounding import Grounder

    folder = make_qwen_folder(tmp_path / "hf", "2.5")
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "groundseg.json").write_text(json.dumps(
        {"family": "qwen2.5-vl", "vlm_path": str(folder), "decoder": {"backend": "sam2", "preset": "tiny"}}))
    g = Grounder.from_pretrained(directory, device="cpu", dtype="float32", max_new_tokens=6)
    assert g.model.mask_decoder.backend_name == "sam2"
    image, _ = draw_scene(72, 100)
    force_answers(g, [answer_for("qwen2.5-vl")])
    (target,) = g.predict(image, QUESTION).targets
    expected = g.model.mask_decoder.decode(g.prepare([image])[0].embedding,
                                           boxes=torch.tensor([target.box], dtype=torch.float32)).masks[0]
    assert target.phrase == "the red circle" and np.array_equal(target.mask, expected)
