"""The LLaVA-1.5 family on a tiny random llava-hf folder built with transformers' own classes: the ids and pixels fed
to the model equal the folder processor's for the same chat (image padded to a centred square), answers in its
2-decimal form on that square become targets whose masks come from their boxes, and the prefix engine serves it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import draw_scene

QUESTION = "Where is the red circle?"
TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<image>\n{% endif %}{% endfor %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
            "{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def make_llava_folder(folder: Path) -> Path:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    from grounding.text.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer()
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=56, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=TEMPLATE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava15")
    folder = make_llava_folder(root / "hf")
    (root / "model").mkdir()
    (root / "model" / "groundseg.json").write_text(json.dumps(
        {"family": "llava-1.5", "vlm_path": str(folder), "decoder": {"backend": "sam", "preset": "tiny"}}))
    return root / "model", folder


@pytest.fixture(scope="module")
def grounder(llava_dir):
    from grounding import Grounder
    return Grounder.from_pretrained(llava_dir[0], device="cpu", dtype="float32", max_new_tokens=4)


def test_ids_and_pixels_equal_the_folders_processor_on_the_padded_square(llava_dir, grounder):
    from transformers import AutoProcessor

    image, _ = draw_scene(48, 80)
    calls = []
    generate = grounder.model.vlm.generate
    grounder.model.vlm.generate = lambda **k: calls.append(k) or generate(**k)
    try:
        grounder.predict(image, QUESTION)
    finally:
        del grounder.model.vlm.generate
    hf = AutoProcessor.from_pretrained(llava_dir[1], local_files_only=True)
    mean = tuple(int(v * 255) for v in hf.image_processor.image_mean)
    square = np.empty((80, 80, 3), np.uint8)
    square[:] = mean
    square[16:64] = image      # centred: (80 - 48) // 2 rows above
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    expected = hf(text=hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                  images=Image.fromarray(square), return_tensors="pt")
    (fed,) = calls
    assert torch.equal(fed["input_ids"].cpu(), expected["input_ids"])
    torch.testing.assert_close(fed["pixel_values"].cpu(), expected["pixel_values"], atol=0, rtol=0)


def test_a_two_decimal_answer_on_the_square_becomes_a_box_and_its_mask(grounder):
    image, _ = draw_scene(48, 80)
    pred = grounder.predict(image, QUESTION, answer="[0.10, 0.30, 0.50, 0.60]")
    (target,) = pred.targets
    # square side 80, the image 16 px down inside it
    assert target.box == pytest.approx((8.0, 0.3 * 80 - 16, 40.0, 0.6 * 80 - 16))
    boxes = torch.tensor([target.box], dtype=torch.float32)
    again = grounder.model.mask_decoder.decode(grounder.model.mask_decoder.encode([image])[0], boxes=boxes).masks[0]
    assert target.mask.shape == (48, 80) and np.array_equal(target.mask, again)
    clipped = grounder.predict(image, QUESTION, answer="[0.10, 0.00, 0.50, 0.60]")   # top edge in the padding
    assert clipped.targets[0].box[1] == 0.0 and any("clipped" in n for n in clipped.notes)


def test_the_prefix_engine_gives_the_grounders_answers(grounder):
    from grounding import PrefixEngine, Query

    image, _ = draw_scene(48, 80)
    questions = [QUESTION, "where is the blue square"]
    grouped = PrefixEngine(grounder).predict_group(image, [Query(None, q) for q in questions])
    assert [p.answer for p in grouped] == [grounder.predict(image, q).answer for q in questions]


def test_a_missing_folder_is_one_clear_error(tmp_path):
    from grounding.checkpoint import load_checkpoint
    from grounding.errors import CheckpointError

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "groundseg.json").write_text(json.dumps({"family": "llava-1.5", "vlm_path": str(tmp_path / "x")}))
    with pytest.raises(CheckpointError, match="no LLaVA-1.5 model at"):
        load_checkpoint(tmp_path / "m")
