"""train-locator: a fusion [SEG] locator learnt on cached image features, written into a copy of the model."""
from __future__ import annotations

import json

import numpy as np
import torch


def test_train_locator_learns_the_training_phrases_and_keeps_every_other_weight(tiny_dir, tmp_path):
    from grounding.checkpoint import load_checkpoint
    from grounding.data.refer import ReferDataset
    from shapes.scenes.synthetic import generate_dataset
    from grounding.images import load_image
    from shapes.locator_train import train_locator
    from grounding import Grounder, Query
    from shapes.locator import FusionLocator

    data = generate_dataset(tmp_path / "data", 6, seed=5, progress=False)
    out = tmp_path / "run"
    scores = train_locator(tiny_dir, data, out, steps=150, batch_size=32, lr=3e-3, layers=1, eval_split="train",
                           eval_every=50, progress=False)
    # a random tiny tower still tells cells apart: the phrases it trained on are found (chance: ~1 cell in 5)
    assert scores["top1"] > 0.8, scores
    log = [json.loads(line) for line in (out / "locator_log.jsonl").read_text().splitlines()]
    assert len(log) == 150 and np.mean([r["locate_loss"] for r in log[-20:]]) < 0.5 * np.mean(
        [r["locate_loss"] for r in log[:20]])
    assert (out / "loss_locator.png").stat().st_size > 0 and (out / "locator_top1.png").stat().st_size > 0
    evals = [json.loads(line) for line in (out / "locator_eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [50, 100, 150] and evals[-1]["top1"] == scores["top1"]
    assert json.loads((out / "locator_scores.json").read_text())["train"] == scores
    assert scores["box_acc"] > 0.5, scores

    model, tok = load_checkpoint(out / "model")
    base, _ = load_checkpoint(tiny_dir)
    locator = model.addons["locator"]
    assert isinstance(locator.net, FusionLocator) and locator.settings.layers == 1
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in base.named_parameters())  # nothing else changed

    # trained on (a warm restart), it is scored before its first step too, where the first fit left it
    again = train_locator(out / "model", data, tmp_path / "again", steps=10, batch_size=32, lr=1e-4, layers=1,
                          eval_split="train", eval_every=10, progress=False)
    evals = [json.loads(line) for line in (tmp_path / "again" / "locator_eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [0, 10] and evals[0]["top1"] == scores["top1"], evals
    assert again["top1"] > 0.8, again

    # the saved model's locator gives the mask decoder a click inside the image
    ds = ReferDataset(data, dataset="synth")
    sent = ds.sentences("train")[0]
    image = load_image(ds.image_path(sent.image_id))
    calls = []
    decode = model.mask_decoder.decode
    model.mask_decoder.decode = lambda *a, **k: calls.append(k["points"]) or decode(*a, **k)
    Grounder(model, tok).predict_batch([Query(image, f"Please segment {sent.text}.",
                                              answer=f"<ref>{sent.text}</ref>[SEG]")])
    assert calls[0].shape == (1, 1, 2)
    (x, y), = calls[0][0].tolist()
    assert 0 <= x < image.shape[1] and 0 <= y < image.shape[0]


def test_extra_training_folders_keep_each_phrase_with_its_own_image(tiny_dir, tmp_path):
    from grounding.checkpoint import load_checkpoint
    from grounding.data.refer import ReferDataset
    from shapes.scenes.synthetic import generate_dataset
    from shapes.locator_train import LocatorSamples, build_samples
    from grounding.processor import GroundingProcessor

    model, tok = load_checkpoint(tiny_dir)
    model.add_addon("locator", {"kind": "fusion", "layers": 1}, tok)
    processor = GroundingProcessor(tok, model.config, model.vision_image_size, model.num_image_tokens)
    parts = [build_samples(model, processor, ReferDataset(generate_dataset(tmp_path / f"d{seed}", 4, seed=seed,
                                                                           progress=False), dataset="synth"),
                           "train", progress=False) for seed in (1, 2)]
    both = LocatorSamples.concat(parts)
    assert len(both) == len(parts[0]) + len(parts[1])
    assert len(both.image_states) == len(parts[0].image_states) + len(parts[1].image_states)
    # the second folder's phrases read the second folder's images, with their own targets and boxes
    for j in (0, len(parts[1]) - 1):
        i = len(parts[0]) + j
        assert torch.equal(both.image_states[both.rows[i]], parts[1].image_states[parts[1].rows[j]])
        assert torch.equal(both.targets[i], parts[1].targets[j]) and torch.equal(both.boxes[i], parts[1].boxes[j])
        assert torch.equal(both.phrase_ids[i], parts[1].phrase_ids[j])
