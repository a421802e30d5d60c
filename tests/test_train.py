"""Training: both stages run on a tiny synthetic dataset; resume equals an uninterrupted run; stage 2 trains
only its list."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from shapes.scenes.synthetic import generate_dataset
    return generate_dataset(tmp_path_factory.mktemp("synth") / "data", 16, seed=3, progress=False)


def config(data_dir, out, **kw):
    from grounding.trainer import TrainConfig
    base = dict(data=str(data_dir), out=str(out), vlm_preset="tiny", steps=4, batch_size=2, save_every=2,
                warmup=1, vocab_size=400)
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def stage1(data_dir, tmp_path_factory):
    from grounding.trainer import train
    out = tmp_path_factory.mktemp("s1")
    return train(config(data_dir, out, stage=1), progress=False)


def weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_stage1_writes_model_log_and_loss_curve(stage1):
    out = stage1.parent
    records = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["prompt_loss"] > 0 and r["ce_loss"] > 0 for r in records)
    assert (out / "loss.png").stat().st_size > 1000
    assert (stage1 / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_resume_equals_uninterrupted(data_dir, stage1, tmp_path, stage):
    from grounding.trainer import train
    init = str(stage1) if stage == 2 else None
    full = train(config(data_dir, tmp_path / "full", stage=stage, init=init), progress=False)
    cut = config(data_dir, tmp_path / "cut", stage=stage, init=init, save_every=100)
    assert train(cut, progress=False, stop_after=2) is None
    with (tmp_path / "cut" / "log.jsonl").open("a") as f:  # a step logged after the last checkpoint, then killed
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    resumed = train(cut, resume=True, progress=False)
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the killed step's line is replaced, not repeated
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stage2_changes_only_its_trainable_parts(data_dir, stage1, tmp_path):
    from grounding.trainer import train
    final = train(config(data_dir, tmp_path / "s2", stage=2, init=str(stage1), merge_lora=False, lr=1e-2),
                  progress=False)
    before, after = weights(stage1), weights(final)
    frozen = [k for k in before if "vision_tower" in k or "image_encoder" in k or "prompt_encoder" in k
              or "multi_modal_projector" in k or "language_model.layers." in k or "embed_tokens" in k or "lm_head" in k]
    assert frozen
    for k in frozen:  # unmerged: base weights stay; LoRA, token rows and lm_head copy live in adapter/
        assert torch.equal(before[k], after[k]), k
    trained = [k for k in before if k.startswith("seg_projection.") or ".mask_decoder." in k]
    assert any(not torch.equal(before[k], after[k]) for k in trained if k.startswith("seg_projection."))
    assert any(not torch.equal(before[k], after[k]) for k in trained if ".mask_decoder." in k)
    assert (final / "adapter" / "adapter_model.safetensors").is_file()


def test_stage1_with_masks_trains_the_seg_path_too(data_dir, tmp_path):
    from grounding.trainer import train
    final = train(config(data_dir, tmp_path / "s1m", stage=1, masks=True, steps=2), progress=False)
    records = [json.loads(l) for l in (final.parent / "log.jsonl").read_text().splitlines()]
    assert all(r["bce_loss"] > 0 and r["dice_loss"] > 0 and r["prompt_loss"] > 0 for r in records)


def test_stage2_keeps_training_clicks_on_the_decoder_only(data_dir, stage1, tmp_path):
    from grounding.trainer import train
    final = train(config(data_dir, tmp_path / "s2p", stage=2, init=str(stage1), steps=2, merge_lora=False),
                  progress=False)
    records = [json.loads(l) for l in (final.parent / "log.jsonl").read_text().splitlines()]
    assert all(r["prompt_loss"] > 0 for r in records)
    before, after = weights(stage1), weights(final)
    assert all(torch.equal(before[k], after[k]) for k in before if "prompt_encoder" in k or "image_encoder" in k)


def test_stage2_freeze_keeps_the_mask_path_and_trains_the_language_model(data_dir, stage1, tmp_path):
    """freeze: a stage 2 that teaches answers (e.g. the category task) leaves SAM and the [SEG] projection alone."""
    from grounding.trainer import train
    final = train(config(data_dir, tmp_path / "s2frozen", stage=2, init=str(stage1), steps=2, merge_lora=False,
                         lr=1e-2, prompts=False, freeze=["mask_decoder", "seg_projection", "addons"]),
                  progress=False)
    before, after = weights(stage1), weights(final)
    mask_path = [k for k in before if k.startswith("seg_projection.") or ".mask_decoder." in k]
    assert mask_path and all(torch.equal(before[k], after[k]) for k in mask_path)
    adapter = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at zero
    with pytest.raises(ValueError, match="vision_tower"):
        train(config(data_dir, tmp_path / "bad", stage=2, init=str(stage1), freeze=["vision_tower"]), progress=False)


def test_category_answers_name_the_one_instance_or_deny_an_absent_category(data_dir):
    """"Please segment the {category}." gets the object when the image holds exactly one of it, and "There is no
    ..." for one category it lacks; categories with several instances are not asked about."""
    from collections import Counter
    from grounding.data.refer import ReferDataset
    from grounding.data.tasks import build_conversations

    ds = ReferDataset(data_dir, "synth", "unc")
    convs = build_conversations(ds, "train", seed=0, kinds=("category",))
    anns = ds.annotations_by_image()
    counts = {i: Counter(ds.category_name(a) for a in anns[i]) for i in ds.images("train")}
    assert {c.kind for c in convs} == {"category"}
    for image_id, count in counts.items():
        mine = [c for c in convs if c.image_id == image_id]
        denials = [c for c in mine if c.answer.startswith("There is no")]
        unique = sum(n == 1 for n in count.values())
        assert len(mine) - len(denials) == unique
        assert len(denials) == 1  # 11 shape kinds, at most 7 objects: some kind is always absent
        for c in denials:
            name = c.answer[len("There is no "):-len(" in the image.")]
            assert f"the {name}" in c.question and not c.ann_ids and name not in count
        for c in mine:
            if c not in denials:
                (ann,) = c.ann_ids
                name = ds.category_name(ann)
                assert c.answer.startswith(f"<ref>the {name}</ref>") and c.answer.endswith("[SEG]")
                assert f"the {name}" in c.question and count[name] == 1 and ds.mask(ann).any()
    assert "category" not in {c.kind for c in build_conversations(ds, "train", seed=0)}  # opt-in


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_seg_answers_carry_the_box_in_the_asked_fraction(data_dir, fraction):
    """seg_box_fraction decides how many [SEG] answers write the box first; 0 forces masks from the image."""
    from grounding.data.refer import ReferDataset
    from grounding.data.tasks import build_conversations

    convs = build_conversations(ReferDataset(data_dir, "synth", "unc"), "train", seed=0, seg_box_fraction=fraction)
    seg = [c for c in convs if c.kind == "seg"]
    boxed = sum("<box>" in c.answer for c in seg) / len(seg)
    assert len(seg) > 20 and abs(boxed - fraction) <= (0 if fraction in (0.0, 1.0) else 0.25)
    assert all(c.answer.endswith("[SEG]") for c in seg)


def test_patch_labels_name_the_object_covering_each_cell_and_mirror_with_the_image():
    import numpy as np
    from shapes.scenes.patch_labels import ATTRIBUTES, patch_labels

    h, w, grid = 40, 80, 4  # padded to 80 x 80 (20 rows on top), cells of 20 x 20
    left = np.zeros((h, w), bool)
    left[0:20, 0:20] = True    # square-frame rows 20..40, columns 0..20: cell (1, 0)
    right = np.zeros((h, w), bool)
    right[10:40, 50:80] = True  # rows 30..60, columns 50..80: mostly cells (1..2, 2..3)
    objects = [dict(colour="red", kind="circle", texture="solid", size="small"),
               dict(colour="blue", kind="star", texture="dots", size="large")]
    labels = patch_labels(objects, [left, right], grid)
    cls = labels.classes.reshape(grid, grid, len(ATTRIBUTES))
    colour = ATTRIBUTES["colour"]
    assert cls[1, 0, 0] == 1 + colour.index("red") and cls[1, 0, 1] == 1 + ATTRIBUTES["kind"].index("circle")
    assert cls[2, 3, 0] == 1 + colour.index("blue") and cls[2, 3, 3] == 1 + ATTRIBUTES["size"].index("large")
    assert (cls[0] == 0).all() and (cls[3] == 0).all()   # the padding rows and empty cells are background
    np.testing.assert_allclose(labels.boxes.reshape(grid, grid, 4)[1, 0], [0, 20 / 80, 20 / 80, 40 / 80])
    np.testing.assert_allclose(labels.boxes.reshape(grid, grid, 4)[2, 3], [50 / 80, 30 / 80, 1, 60 / 80])
    flipped = patch_labels(objects, [left, right], grid, flip=True)
    np.testing.assert_array_equal(flipped.classes.reshape(grid, grid, -1), cls[:, ::-1])
    np.testing.assert_allclose(flipped.boxes.reshape(grid, grid, 4)[1, 3], [60 / 80, 20 / 80, 1, 40 / 80])


@pytest.fixture(scope="module")
def stage0(data_dir, tmp_path_factory):
    from grounding.trainer import train
    out = tmp_path_factory.mktemp("s0")
    return train(config(data_dir, out, stage=0, vlm_preset="shapes", steps=3, lr=1e-2), progress=False)


def test_stage0_trains_the_tower_on_patch_labels_and_sam_on_prompts(data_dir, stage0):
    records = [json.loads(l) for l in (stage0.parent / "log.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert all(r["patch_ce"] > 0 and r["patch_box_l1"] > 0 and r["prompt_loss"] > 0 for r in records)
    assert "ce_loss" not in records[0]  # the language model does not train in stage 0
    from shapes.patch_eval import evaluate_patches
    scores = evaluate_patches(stage0.parent, data_dir, "train", limit=2)  # the heads were saved beside the model
    assert scores["images"] == 2 and all(0 <= scores[k] <= 1 for k in ("object", "colour", "kind", "box_l1"))


def test_stage1_keeps_frozen_parts_of_stage0(data_dir, stage0, tmp_path):
    from grounding.checkpoint import load_checkpoint
    from grounding.trainer import train
    final = train(config(data_dir, tmp_path / "s1f", stage=1, init=str(stage0), steps=2, masks=True, prompts=False,
                         freeze=["vision_tower", "mask_decoder"], lr=1e-2), progress=False)
    before, after = weights(stage0), weights(final)
    tower = [k for k in before if "vision_tower" in k]
    assert any("patch_embedding.net" in k for k in tower)  # the conv stem of the shapes preset
    assert all(torch.equal(before[k], after[k]) for k in tower)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("mask_decoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("seg_projection."))
    model, _ = load_checkpoint(final)  # the conv stem is rebuilt from groundseg.json
    assert model.addons["vision_stem"].settings.kind == "conv"


def test_stage1_with_stage0_heads_keeps_training_the_tower_on_patches(data_dir, stage0, tmp_path):
    from grounding.trainer import train
    final = train(config(data_dir, tmp_path / "s1p", stage=1, init=str(stage0), steps=2, masks=True, lr=1e-2,
                         patch_heads=str(stage0.parent / "patch_heads.safetensors"), freeze=["image_encoder"]),
                  progress=False)
    records = [json.loads(l) for l in (final.parent / "log.jsonl").read_text().splitlines()]
    assert all(r["ce_loss"] > 0 and r["patch_ce"] > 0 and r["bce_loss"] > 0 for r in records)
    before, after = weights(stage0), weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before if "vision_tower" in k)
    assert all(torch.equal(before[k], after[k]) for k in before if "image_encoder" in k)


def test_stage1_pointer_task_points_the_phrase_at_its_objects_tokens(data_dir, stage0, tmp_path):
    from grounding.trainer import train
    final = train(config(data_dir, tmp_path / "s1ptr", stage=1, init=str(stage0), steps=2, masks=True, batch_size=8,
                         pointer_loss=1.0, prompts=False), progress=False)
    records = [json.loads(l) for l in (final.parent / "log.jsonl").read_text().splitlines()]
    # -log(mass on the object's cells): positive, and at most log(64 cells) + a margin for a random start
    assert all(0 < r["pointer_loss"] < 6 for r in records)


def test_stage1_adds_a_seg_locator_that_pointer_and_seg_tasks_train_and_stage2_keeps(data_dir, stage0, tmp_path):
    from grounding.checkpoint import load_checkpoint
    from grounding.trainer import train
    final = train(config(data_dir, tmp_path / "s1loc", stage=1, init=str(stage0), steps=2, masks=True, batch_size=8,
                         pointer_loss=1.0, addons={"locator": {"kind": "seg"}}, prompts=False), progress=False)
    records = [json.loads(l) for l in (final.parent / "log.jsonl").read_text().splitlines()]
    assert all(0 < r["locator_loss"] < 6 and 0 < r["pointer_loss"] < 6 for r in records)
    model, _ = load_checkpoint(final)
    assert model.addons["locator"].settings.kind == "seg"
    s2 = train(config(data_dir, tmp_path / "s2loc", stage=2, init=str(final), steps=2, masks=True, batch_size=4,
                      lr=1e-2), progress=False)
    before, after = weights(final), weights(s2)
    locator = [k for k in after if k.startswith("addons.locator.")]
    assert locator and all(not torch.equal(before[k], after[k]) for k in locator)  # stage 2 trains it too


def test_stage2_trains_a_fusion_locator_under_lora(data_dir, stage1, tmp_path):
    """A fusion locator (as train-locator gives a model) in LISA's stage 2: it reads the tower through the LoRA
    wrapper, its cell and box losses are logged and it trains."""
    from grounding.checkpoint import load_checkpoint
    from shapes.locator import FusionLocator
    from grounding.trainer import train
    final = train(config(data_dir, tmp_path / "s2fusion", stage=2, init=str(stage1), steps=2, masks=True,
                         batch_size=4, lr=1e-2, addons={"locator": {"kind": "fusion", "layers": 1}}), progress=False)
    records = [json.loads(l) for l in (final.parent / "log.jsonl").read_text().splitlines()]
    assert all(0 < r["locator_loss"] < 20 for r in records)   # cells (~log 64) + DETR's box loss (< 5 + 4)
    model, _ = load_checkpoint(final)
    assert isinstance(model.addons["locator"].net, FusionLocator) and model.addons["locator"].settings.layers == 1
    after = weights(final)
    assert any(k.startswith("addons.locator.net.box.") for k in after)


def test_stage1_phrase_words_task_and_unit_scale_language_model(data_dir, stage0, tmp_path):
    from grounding.trainer import train
    final = train(config(data_dir, tmp_path / "s1words", stage=1, init=str(stage0), steps=2, batch_size=8,
                         phrase_words_loss=0.125, reinit_language_model=True, prompts=False), progress=False)
    records = [json.loads(l) for l in (final.parent / "log.jsonl").read_text().splitlines()]
    # BCE summed over the vocabulary: a random head starts near vocab * log(2), and every phrase has words
    assert all(r["phrase_words_loss"] > 1 for r in records)
    before, after = weights(stage0), weights(final)
    emb = next(k for k in after if k.endswith("language_model.embed_tokens.weight"))
    assert before[emb].std() < 0.1 and 0.8 < after[emb].std() < 1.2  # re-drawn at unit RMS, then 2 small steps


def test_unit_scale_init_gives_unit_embeddings_and_fan_in_linears():
    from torch import nn
    from shapes.text_init import unit_scale_init
    lm = nn.ModuleDict({"embed_tokens": nn.Embedding(500, 64), "q_proj": nn.Linear(64, 64), "o_proj": nn.Linear(64, 64)})
    unit_scale_init(lm, residual_scale=0.5)
    assert abs(lm["embed_tokens"].weight.std().item() - 1.0) < 0.05
    assert abs(lm["q_proj"].weight.std().item() - 64 ** -0.5) < 0.01
    assert abs(lm["o_proj"].weight.std().item() - 0.5 * 64 ** -0.5) < 0.01
    assert torch.all(lm["q_proj"].bias == 0)
