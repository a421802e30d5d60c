"""A patch embedding of its own for grayscale images in the vision tower (the ``grey_tower`` add-on, registered in
shapes/addons.py), and its training (``groundseg train-grey-tower``).

The default model's vision tower learnt every kind from colour scenes. On a grayscale image its features carry the
kinds poorly (the region head reads an object's kind right in 68% of grey val views, 84% in colour), and every
reader of those features goes wrong with them: the locator's candidates for "all the triangles", the presence
head, the region head. The tower's convolutional stem (shapes/vision_stem.py) is where colour enters it, so a
second stem is trained on grey views, distilled: its tower's features of a grey copy of a training scene are
regressed on the colour tower's features of the scene itself. (Training the transformer layers instead gained
nothing; the numbers are in weights/shapes-tiny/MODEL_CARD.md.) The rest of the tower is shared.

Which stem reads an image is decided on the tower's input ``[B, 3, s, s]`` (normalised), per image: it is grey when
every pixel lies in the plane of the greys and the processor's fill colour (the padding around a non-square image,
and the blend of the two where the image is resized), within ``GREY_TOLERANCE``. Colour images go through the colour
stem as before, bit for bit when a batch holds no grey image.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# how far (on the 0-1 scale) a pixel may lie off the plane of greys and the fill colour and still count as grey: the
# resize rounds each channel to 8 bits (off by up to 0.5 / 255 a channel), and bf16 pixel values by about 0.004
GREY_TOLERANCE = 0.01


def grey_images(pixel_values: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Bool ``[B]``: which of the normalised tower inputs ``[B, 3, s, s]`` (``(x - mean) / std`` of 0-1 pixels, padded
    with the fill colour ``round(mean * 255)``) show a grayscale image."""
    dev = pixel_values.device
    mean_t, std_t = torch.tensor(mean, device=dev), torch.tensor(std, device=dev)
    fill = torch.tensor([round(v * 255) / 255 for v in mean], device=dev)
    normal = torch.linalg.cross(fill, torch.ones(3, device=dev))
    pixels = pixel_values.float() * std_t[:, None, None] + mean_t[:, None, None]
    off_plane = torch.einsum("bchw,c->bhw", pixels, normal / normal.norm()).abs()
    return off_plane.flatten(1).amax(1) < GREY_TOLERANCE


def tower_of(vlm) -> nn.Module:
    """The CLIP vision tower of a (possibly LoRA-wrapped) LLaVA ``vlm``."""
    base = vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm
    return base.model.vision_tower


def install(addon: nn.Module, model) -> None:
    """Give ``addon`` (``addon.stem``) a copy of ``model``'s vision-tower patch embedding and make the tower embed
    grayscale images with it (the colour stem's ``forward`` is replaced on the instance, so that its weights keep
    their names)."""
    colour = tower_of(model.vlm).embeddings.patch_embedding
    addon.stem = copy.deepcopy(colour)
    embed_colour = type(colour).forward
    mean, std = list(model.config.image_mean), list(model.config.image_std)

    def routed(pixel_values: torch.Tensor) -> torch.Tensor:
        grey = grey_images(pixel_values, mean, std)
        if not grey.any():
            return embed_colour(colour, pixel_values)
        if grey.all():
            return addon.stem(pixel_values)
        out = embed_colour(colour, pixel_values[~grey])
        merged = out.new_empty((len(pixel_values), *out.shape[1:]))
        merged[~grey] = out
        merged[grey] = addon.stem(pixel_values[grey])
        return merged

    colour.forward = routed


# ---- training ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def region_scores(model, scenes, sizes: list[tuple[int, int]], states: torch.Tensor) -> dict[str, float]:
    """The region head's reading of each mostly visible object of ``scenes`` (``SceneViews`` items; images of
    ``sizes``, tower features ``states``) from its exact box: the share of colours, kinds and both read right."""
    from shapes.region_head import RegionSamples, accuracy, region_box

    vocab = model.addons["region"].vocab
    rows, boxes, labels = [], [], []
    for r, (_, _, objects) in enumerate(scenes):
        for o in objects:
            if o["area"] < 0.5 * max(o["full_area"], 1):
                continue
            rows.append(r)
            boxes.append(region_box(sizes[r], box=o["box_xyxy"]))
            labels.append(vocab.labels(o))
    report = accuracy(model.addons["region"].head,
                      RegionSamples(states, torch.tensor(rows), torch.stack(boxes), torch.tensor(labels)))
    return {name: round(report[name], 4) for name in ("colour", "kind", "named")}


def train_grey_tower(model_dir: str | Path, data: str | Path, out: str | Path, extra_data: list[str | Path] = (),
                     steps: int = 1500, batch_size: int = 16, lr: float = 1e-3, augment: float = 0.5,
                     camouflage: float = 0.3, seed: int = 0, eval_scenes: int = 150, limit: int | None = None,
                     progress: bool = True) -> dict:
    """Train the ``grey_tower`` stem of the model at ``model_dir`` (added if it has none, from its colour stem) on
    grey views of the train scenes of ``data`` and ``extra_data``: each scene corrupted (probability ``augment``,
    shapes/augment.py), made grey, and camouflaged (probability ``camouflage``); the tower's features of the view
    regressed on the colour tower's features of the clean scene. Only the stem trains. Scored by the region head on
    grey views of ``data``'s val scenes (and their colour originals), before and after; writes ``out/model`` and
    ``out/grey_tower.json``."""
    from grounding.checkpoint import load_checkpoint, save_run
    from grounding.processor import GroundingProcessor
    from grounding.progress import progress_bar
    from grounding.trainer import warmup_cosine
    from shapes.augment import grey as grey_copy
    from shapes.locator_train import locator_keys
    from shapes.mask_robust import SceneViews

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    model, tokenizer = load_checkpoint(model_dir)
    model.float().eval()
    if "region" not in model.addons:
        raise ValueError(f"train-grey-tower scores with the region head; the model at {model_dir} has none")
    if "grey_tower" not in model.addons:
        model.add_addon("grey_tower", {}, tokenizer)
    stem = model.addons["grey_tower"].stem
    processor = GroundingProcessor(tokenizer, model.config, model.vision_image_size, model.num_image_tokens)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in stem.parameters():
        p.requires_grad_(True)

    train = SceneViews([Path(data), *map(Path, extra_data)], "train", limit)
    held = SceneViews([Path(data)], "val", limit)
    held.items = held.items[:eval_scenes]
    held_rng = np.random.default_rng(seed + 1)
    colour_views = [held.view(i, held_rng, zoom=0.0, augment=0.0).clean for i in range(len(held.items))]
    grey_views = [grey_copy(v, held_rng) for v in colour_views]
    sizes = [v.shape[:2] for v in colour_views]

    def scores() -> dict:
        colour, grey = (locator_keys(model, processor, views) for views in (colour_views, grey_views))
        return {"colour views": region_scores(model, held.items, sizes, colour),
                "grey views": region_scores(model, held.items, sizes, grey),
                "distill": round(float(F.mse_loss(grey, colour) / colour.var()), 5)}   # the training loss

    report = {"model": str(model_dir), "data": [str(data), *map(str, extra_data)], "steps": steps,
              "batch_size": batch_size, "lr": lr, "augment": augment, "camouflage": camouflage, "seed": seed,
              "train_scenes": len(train.items), "before": scores()}
    optimizer = torch.optim.AdamW(stem.parameters(), lr=lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps, min(100, steps // 10))
    curve = []
    stem.train()
    with progress_bar(steps, "grey stem", enabled=progress, fields={"distill": "distill {}"}) as advance:
        for step in range(steps):
            views = [train.view(int(i), rng, zoom=0.0, augment=augment, grey=1.0, camouflage=camouflage)
                     for i in rng.integers(len(train.items), size=batch_size)]
            with torch.no_grad():   # a colour batch: the colour stem
                target = model.vision_features(torch.stack([processor.vision_pixels(v.clean) for v in views]))
            features = model.vision_features(torch.stack([processor.vision_pixels(v.seen) for v in views]))
            loss = F.mse_loss(features, target) / target.var().clamp(min=1e-6)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(stem.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            curve.append(round(loss.item(), 5))
            advance(distill=f"{loss.item():.4f}")
    stem.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    report["after"] = scores()
    report["curve_every_50"] = curve[::50]
    report["wall_s"] = round(time.perf_counter() - start, 1)
    save_run(model, tokenizer, out, "grey_tower", report)
    return report
