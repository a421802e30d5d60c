"""SAM's image encoder made to read corrupted and zoomed-in images as it reads clean ones.

The default model's SAM learnt on clean colour renders only. On a noisy or JPEG-compressed scene its image
embedding is off, and masks from a right box come back at IoU 0.2-0.4 (benchmarks/phrasing_suite.py, noisy style);
the ``mask_zoom`` crops, upsampled to the decoder's input, magnify the noise further. A grayscale image loses it
too (mean IoU from the objects' boxes 0.93 -> 0.71 on the suite's plain scenes once grey). Here only the image encoder
trains, on two losses per view of a training scene (the whole image, or a zoom-like square around one object):

  distillation   the student's embedding of a corrupted and / or grey copy (shapes/augment.py; sometimes the
                 clean view)
                 regressed on the frozen original encoder's embedding of the clean view, so that every prompt the
                 decoder knows (boxes, clicks, the language model's [SEG] embeddings) keeps meaning what it meant;
  masks          SAM's box / click task on the corrupted view (binary cross-entropy + dice, as stage 0).

The prompt encoder, the mask decoder, the [SEG] projection and every other weight stay as they are.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class View:
    """A training view: ``clean`` and ``seen`` (maybe corrupted) uint8 ``h x w x 3`` crops, and its objects'
    boolean masks ``[k, h, w]`` (mostly visible objects only)."""
    clean: np.ndarray
    seen: np.ndarray
    masks: list[np.ndarray]


class SceneViews:
    """Views of the scenes of one or more synthetic REFER folders (``split`` of each)."""

    def __init__(self, folders: list[Path], split: str, limit: int | None = None):
        from shapes.scenes.synthetic import split_scenes

        self.items: list[tuple[object, int, list[dict]]] = []
        for folder in folders:
            ds, scenes = split_scenes(folder, split)
            self.items += [(ds, scene["image_id"], scene["objects"]) for scene in scenes if scene["objects"]]
        self.items = self.items[:limit] if limit else self.items
        if not self.items:
            raise ValueError(f"no {split} scenes with objects in {[str(f) for f in folders]}")

    def view(self, index: int, rng: np.random.Generator, zoom: float, augment: float, grey: float = 0.0,
             camouflage: float = 0.0) -> View:
        """Scene ``index`` whole, or (with probability ``zoom``) a square of 2-4 times one object's box side
        around it, as ``mask_zoom`` crops; corrupted with probability ``augment``, then made grey with probability
        ``grey``, and a grey view camouflaged (shapes/augment.py) with probability ``camouflage``."""
        from grounding.images import load_image
        from segdecoder.zoom import zoom_window
        from shapes.augment import camouflage as camouflaged, corrupt_regions, grey as grey_copy

        ds, image_id, objects = self.items[index]
        image = load_image(ds.image_path(image_id))
        H, W = image.shape[:2]
        every = [ds.mask(o["ann_id"]) for o in objects]
        if rng.random() < augment:
            seen = corrupt_regions(image, every, rng)
        else:
            seen = image
        if grey and rng.random() < grey:      # no draw at grey=0: the views of a run without it stay as they were
            seen = grey_copy(seen, rng)
            if camouflage and rng.random() < camouflage:   # no draw at 0, as for grey
                seen = camouflaged(seen, every, rng)
        masks = [m for m, o in zip(every, objects) if o["area"] >= 0.5 * max(o["full_area"], 1)]
        window = None
        if rng.random() < zoom:
            window = zoom_window(objects[int(rng.integers(len(objects)))]["box_xyxy"], (H, W), rng.uniform(2, 4))
        l, t, r, b = window or (0, 0, W, H)
        clean, seen = np.ascontiguousarray(image[t:b, l:r]), np.ascontiguousarray(seen[t:b, l:r])
        masks = [m[t:b, l:r] for m in masks]
        return View(clean, seen, [m for m in masks if m.sum() >= 16])


def _prompt(mask: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """A box (each side moved by up to 10% of the box) or 1-3 clicks on the mask, as stage 0 draws them."""
    ys, xs = np.nonzero(mask)
    if rng.random() < 0.5:
        x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        w, h = x2 - x1, y2 - y1
        box = np.array([x1, y1, x2, y2], np.float64) + 0.1 * np.array([w, h, w, h]) * rng.uniform(-1, 1, 4)
        H, W = mask.shape
        box[:2] = np.clip(box[:2], 0, [W - 1, H - 1])
        box[2:] = np.minimum(np.maximum(box[2:], box[:2] + 1), [W, H])
        return {"boxes": torch.tensor(box[None], dtype=torch.float32)}
    i = rng.integers(len(xs), size=int(rng.integers(1, 4)))
    points = torch.tensor(np.stack([xs[i], ys[i]], 1)[None] + 0.5, dtype=torch.float32)
    return {"points": points, "point_labels": torch.ones((1, len(i)), dtype=torch.long)}


def _encode(backend, encoder, images: list[np.ndarray]):
    """(features ``[B, C, h, w]``, [(input h, w)]) of uint8 images through ``encoder``."""
    prepared = [backend.preprocess(im) for im in images]
    return encoder(torch.stack([x for x, _ in prepared])), [s for _, s in prepared]


def mask_loss(model, backend, features: torch.Tensor, sizes, views: list[View], rng: np.random.Generator,
              per_view: int = 2) -> torch.Tensor:
    """Mean of BCE + dice (the model's weights) of the best of SAM's masks for up to ``per_view`` prompts a view."""
    from grounding.model import bce_per_mask, dice_per_mask
    from segdecoder.base import ImageEmbedding

    w = model.config.loss_weights
    losses = []
    for i, view in enumerate(views):
        emb = ImageEmbedding(features[i:i + 1], sizes[i], view.seen.shape[:2])
        for k in rng.permutation(len(view.masks))[:per_view]:
            prompt = _prompt(view.masks[k], rng)
            multimask = "points" in prompt and prompt["points"].shape[1] == 1
            low, _ = backend.mask_logits(emb, multimask=multimask, **prompt)
            logits = backend.upscale(low, emb)[0].flatten(1).float()
            target = torch.from_numpy(view.masks[k]).flatten()[None].float().expand_as(logits)
            losses.append((w.bce * bce_per_mask(logits, target) + w.dice * dice_per_mask(logits, target)).min())
    return torch.stack(losses).mean() if losses else features.sum() * 0


@torch.no_grad()
def box_iou_score(backend, views: list[View]) -> dict[str, float]:
    """Mean mask IoU of SAM from each object's exact box, on the clean views, the corrupted ones, grey copies of
    the clean ones (the luma weights 0.299, 0.587, 0.114), and those grey copies camouflaged (shapes/augment.py;
    the same draws for every model scored)."""
    import cv2

    from shapes.augment import camouflage

    def grey(image):
        return np.repeat(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)

    rng = np.random.default_rng(0)
    out = {}
    for name in ("clean", "seen", "grey", "camouflaged"):
        ious = []
        for view in views:
            image = (grey(view.clean) if name == "grey" else camouflage(grey(view.clean), view.masks, rng)
                     if name == "camouflaged" else getattr(view, name))
            emb = backend.encode([image])[0]
            for m in view.masks:
                ys, xs = np.nonzero(m)
                box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
                pred = backend.decode(emb, boxes=box).masks[0]
                ious.append((pred & m).sum() / max((pred | m).sum(), 1))
        out[name] = float(np.mean(ious)) if ious else float("nan")
    return out


def train_mask_encoder(model_dir: str | Path, data: str | Path, out: str | Path, extra_data: list[str | Path] = (),
                       steps: int = 1500, batch_size: int = 16, lr: float = 3e-4, distill: float = 1.0,
                       zoom: float = 0.5, augment: float = 0.7, grey: float = 0.2, camouflage: float = 0.0,
                       grey_encoder: bool = False, seed: int = 0,
                       eval_views: int = 150,
                       limit: int | None = None, progress: bool = True) -> dict:
    """Train the image encoder of the model at ``model_dir`` on views of ``data`` and ``extra_data`` (train splits;
    val of ``data`` scores it, before and after); write ``out/model`` and ``out/mask_robust.json``. With
    ``grey_encoder`` the trained weights become the ``grey_encoder`` add-on's (shapes/grey_encoder.py: grayscale
    images only) and SAM's own encoder is left as it was."""
    from grounding.checkpoint import load_checkpoint, save_run
    from grounding.progress import progress_bar
    from grounding.trainer import warmup_cosine

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    model, tokenizer = load_checkpoint(model_dir)
    model.float().eval()
    backend = model.mask_decoder
    encoder = backend.frozen_image_encoder_module()
    teacher = copy.deepcopy(encoder).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in encoder.parameters():
        p.requires_grad_(True)
    train = SceneViews([Path(data), *map(Path, extra_data)], "train", limit)
    held_rng = np.random.default_rng(seed + 1)
    held_scenes = SceneViews([Path(data)], "val", limit)
    held = [held_scenes.view(int(i), held_rng, zoom, augment=1.0)
            for i in held_rng.permutation(len(held_scenes.items))[:eval_views]]
    report = {"model": str(model_dir), "data": [str(data), *map(str, extra_data)], "steps": steps,
              "batch_size": batch_size, "lr": lr, "distill": distill, "zoom": zoom, "augment": augment, "grey": grey,
              "camouflage": camouflage, "grey_encoder": grey_encoder, "seed": seed,
              "train_scenes": len(train.items), "before": box_iou_score(backend, held)}
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps, min(100, steps // 10))
    curve = []
    encoder.train()
    with progress_bar(steps, "image encoder", enabled=progress,
                      fields={"distill": "distill {}", "masks": "masks {}"}) as advance:
        for step in range(steps):
            views = [train.view(int(i), rng, zoom, augment, grey, camouflage)
                     for i in rng.integers(len(train.items), size=batch_size)]
            with torch.no_grad():
                target, _ = _encode(backend, teacher, [v.clean for v in views])
            features, sizes = _encode(backend, encoder, [v.seen for v in views])
            d = F.mse_loss(features, target) / target.var().clamp(min=1e-6)
            m = mask_loss(model, backend, features, sizes, views, rng)
            loss = distill * d + m
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            curve.append((round(d.item(), 5), round(m.item(), 5)))
            advance(distill=f"{d.item():.4f}", masks=f"{m.item():.3f}")
    encoder.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if grey_encoder:
        if "grey_encoder" not in model.addons:
            model.add_addon("grey_encoder", {}, tokenizer)
        model.addons["grey_encoder"].encoder.load_state_dict(encoder.state_dict())
        encoder.load_state_dict(teacher.state_dict())
    report["after"] = box_iou_score(backend, held)
    report["curve_every_50"] = curve[::50]
    report["wall_s"] = round(time.perf_counter() - start, 1)
    save_run(model, tokenizer, out, "mask_robust", report)
    return report
