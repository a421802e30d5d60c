"""The checkpoint directory: save then load gives identical outputs; merged LoRA equals unmerged."""
from __future__ import annotations

import json

import pytest
import torch

from grounding.errors import CheckpointError
from tests.conftest import ANSWER, QUESTION


def outputs(model, tok, image, answer=ANSWER):
    """Last-layer logits and mask logits of a teacher-forced forward pass."""
    from grounding.data.collate import collate, make_sample
    from grounding.processor import GroundingProcessor
    proc = GroundingProcessor(tok, model.config, model.vision_image_size, model.num_image_tokens)
    n = answer.count("[SEG]")
    batch = collate([make_sample(proc, image, QUESTION, answer, [image[..., 0] > 0] * n)], proc, model)
    batch.pop("gt_masks")
    with torch.no_grad():
        out = model.vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"])
        masks = model(**batch).mask_logits[0]
    return out.logits, masks


def test_save_load_identical_outputs_with_lora_adapter(overfit, tmp_path):
    from grounding.checkpoint import load_checkpoint, save_checkpoint
    model, tok, image = overfit["model"], overfit["tokenizer"], overfit["image"]
    path = save_checkpoint(model, tok, tmp_path / "ckpt")
    assert (path / "adapter" / "adapter_config.json").is_file()
    assert json.loads((path / "groundseg.json").read_text())["lora"]["r"] == 8
    loaded, tok2 = load_checkpoint(path)
    assert tok2.get_vocab() == tok.get_vocab()
    a, b = outputs(model, tok, image), outputs(loaded, tok2, image)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_merged_equals_unmerged(overfit, tmp_path):
    from grounding.checkpoint import load_checkpoint, save_checkpoint
    from grounding.lora import merge_lora
    model, tok, image = overfit["model"], overfit["tokenizer"], overfit["image"]
    reference = outputs(model, tok, image)
    merged_dir = save_checkpoint(model, tok, tmp_path / "merged", merge_lora=True)
    assert not (merged_dir / "adapter").exists()
    assert torch.equal(outputs(model, tok, image)[0], reference[0]), "saving merged changed the model in memory"
    loaded, _ = load_checkpoint(merged_dir)
    got = outputs(loaded, tok, image)
    torch.testing.assert_close(got[0], reference[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], reference[1], atol=1e-3, rtol=1e-4)
    in_memory, _ = load_checkpoint(save_checkpoint(model, tok, tmp_path / "again"))
    merge_lora(in_memory)
    torch.testing.assert_close(outputs(in_memory, tok, image)[0], reference[0], atol=1e-4, rtol=1e-4)


def test_tiny_checkpoint_round_trip(tiny_dir, scene):
    from grounding import Grounder
    g1, g2 = Grounder.from_pretrained(tiny_dir, device="cpu"), Grounder.from_pretrained(tiny_dir, device="cpu")
    p1, p2 = g1.predict(scene[0], QUESTION), g2.predict(scene[0], QUESTION)
    assert p1.answer == p2.answer


def test_missing_checkpoint_names_the_path(tmp_path):
    from grounding.checkpoint import load_checkpoint
    with pytest.raises(CheckpointError, match=str(tmp_path / "nowhere")):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_weights_file_names_the_path(tiny_dir, tmp_path):
    import shutil
    from grounding.checkpoint import load_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(broken)


def test_missing_llava_folder_names_the_path(tmp_path):
    from grounding.checkpoint import load_checkpoint
    from grounding.config import GroundingConfig
    from grounding.text.tokenizer import train_tokenizer
    d = tmp_path / "assembled"
    d.mkdir()
    GroundingConfig(vlm_path=str(tmp_path / "llava-1.5-7b-hf")).save(d)
    train_tokenizer().save_pretrained(d / "tokenizer")
    with pytest.raises(CheckpointError, match="llava-1.5-7b-hf"):
        load_checkpoint(d)


def test_checkpoint_files_get_the_users_permissions(tiny_dir):
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert (tiny_dir.stat().st_mode & 0o777) == 0o777 & ~umask
    assert ((tiny_dir / "model.safetensors").stat().st_mode & 0o777) == 0o666 & ~umask
