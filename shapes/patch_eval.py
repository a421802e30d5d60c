"""How much a vision tower knows about the objects under its tokens: stage 0's per-patch heads on a split.

    groundseg patch-eval --run runs/shapes-tiny/stage0 --data data/synth --split val

Prints, over the split's images, the share of cells whose object/background call is right, and on object cells
the accuracy of colour, kind, texture and size and the mean box L1 error (in units of the padded square).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from grounding.checkpoint import load_checkpoint
from shapes.scenes.patch_labels import ATTRIBUTES, SceneLabels
from grounding.data.refer import ReferDataset
from grounding.images import load_image
from grounding.processor import GroundingProcessor
from shapes.patch_heads import PatchHeads


@torch.no_grad()
def evaluate_patches(run: str | Path, data: str | Path, split: str = "val", limit: int | None = None) -> dict:
    run = Path(run)
    model, tokenizer = load_checkpoint(run / "model")
    heads = PatchHeads(model.llava_config.vision_config.hidden_size)
    heads.load_state_dict(load_file(str(run / "patch_heads.safetensors")))
    processor = GroundingProcessor(tokenizer, model.config, model.vision_image_size, model.num_image_tokens)
    ds = ReferDataset(data, "synth", "unc")
    labels = SceneLabels(ds, model.token_grid)
    image_ids = ds.images(split)[:limit]
    hits = {name: [] for name in ("object", *ATTRIBUTES)}
    box_err = []
    for i in range(0, len(image_ids), 32):
        ids = image_ids[i:i + 32]
        feats = model.vision_features(torch.stack([processor.vision_pixels(load_image(ds.image_path(j))) for j in ids]))
        truth = [labels(j) for j in ids]
        classes = np.stack([t.classes for t in truth])
        fg = classes[..., 0] > 0
        preds = [head(feats).argmax(-1).numpy() for head in heads.classifiers]
        hits["object"].append(((preds[0] > 0) == fg).ravel())
        for a, name in enumerate(ATTRIBUTES):
            hits[name].append(preds[a][fg] == classes[..., a][fg])
        boxes = heads.box(feats).sigmoid().numpy()
        box_err.append(np.abs(boxes[fg] - np.stack([t.boxes for t in truth])[fg]).mean(-1))
    result = {name: float(np.concatenate(h).mean()) for name, h in hits.items()}
    result["box_l1"] = float(np.concatenate(box_err).mean())
    result["images"] = len(image_ids)
    return result

