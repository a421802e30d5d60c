"""RegionHead: what object is in a region the user marked ("What is in this region?" with a box or a click).

The default model's language model answers such questions with a description it barely ties to the region
(weights/shapes-tiny/MODEL_CARD.md: on held-out scenes its description named the object in 1 of 32). The vision
tower's patch features do know what each cell shows (the locator reads them), so a small head reads the cells the
region covers and names the object's colour, kind, size, texture and outline; ``describe`` writes them as the
training descriptions are written ("a large red striped circle with a black outline"). Trained on cached tower
features (``train_region_head``; minutes on a CPU) from each scene's object list, with the boxes loosened or
tightened as people draw them, and clicks inside objects. The ``region`` add-on (shapes/addons.py) answers with it.

Geometry: regions are boxes as fractions of the centred padded square the processor feeds the tower (as the
locator's boxes, shapes/locator.py); ``g x g`` cells, row-major.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# what a click stands for: a box this many cells wide around it (an object is about one to three cells across)
CLICK_CELLS = 1.5


def cell_cover(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """Boxes ``[n, 4]`` xyxy fractions of the square -> ``[n, g*g]``: the share of each cell inside the box."""
    edges = torch.arange(grid + 1, dtype=boxes.dtype, device=boxes.device) / grid
    lo, hi = edges[:-1], edges[1:]

    def overlap(a, b):   # [n, g]: length of [a, b] inside each cell, over the cell's size
        return ((torch.minimum(b[:, None], hi) - torch.maximum(a[:, None], lo)).clamp(min=0) * grid)
    x, y = overlap(boxes[:, 0], boxes[:, 2]), overlap(boxes[:, 1], boxes[:, 3])
    return (y[:, :, None] * x[:, None, :]).flatten(1)


class RegionHead(nn.Module):
    """Cell features ``[n, g*g, width]`` and regions ``[n, 4]`` -> one logit vector per attribute
    (``classes``: attribute -> number of values)."""

    def __init__(self, width: int, grid: int, classes: dict[str, int], hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.grid, self.classes = grid, dict(classes)
        self.net = nn.Sequential(nn.LayerNorm(3 * width + 6), nn.Dropout(dropout), nn.Linear(3 * width + 6, hidden),
                                 nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, sum(classes.values())))

    def features(self, cells: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``[n, 3 * width + 6]``: the cells' mean weighted by how much of each the region covers, their
        channel-wise max over the cells it touches, the cell under its centre, and its geometry."""
        cover = cell_cover(boxes, self.grid).to(cells.dtype)
        mean = (cover[..., None] * cells).sum(1) / cover.sum(1, keepdim=True).clamp(min=1e-6)
        touched = torch.where(cover[..., None] > 0, cells, torch.finfo(cells.dtype).min).amax(1)
        centre = ((boxes[:, :2] + boxes[:, 2:]) / 2).clamp(0, 1 - 1e-6)
        index = (centre[:, 1] * self.grid).long() * self.grid + (centre[:, 0] * self.grid).long()
        middle = cells[torch.arange(len(cells)), index]
        size = boxes[:, 2:] - boxes[:, :2]
        return torch.cat([mean, touched, middle, boxes, size], -1)

    def forward(self, cells: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(self.features(cells, boxes))
        return dict(zip(self.classes, logits.split(list(self.classes.values()), -1)))


@dataclass
class Vocabulary:
    """The values each attribute can take, in the head's output order (stored with the add-on's settings)."""
    colours: list[str]
    kinds: list[str]
    sizes: list[str]
    textures: list[str]
    outlines: list[str]        # "" for none

    def classes(self) -> dict[str, int]:
        return {"colour": len(self.colours), "kind": len(self.kinds), "size": len(self.sizes),
                "texture": len(self.textures), "outline": len(self.outlines)}

    def values(self, name: str) -> list[str]:
        return {"colour": self.colours, "kind": self.kinds, "size": self.sizes, "texture": self.textures,
                "outline": self.outlines}[name]

    def labels(self, o: dict) -> list[int]:
        """A ``scenes.json`` object's value indices of colour, kind, size, texture and outline (the head's targets)."""
        return [self.colours.index(o["colour"]), self.kinds.index(o["kind"]), self.sizes.index(o["size"]),
                self.textures.index(o["texture"]), self.outlines.index(o["outline"] or "")]

    def kind_words(self) -> dict[str, str]:
        """Each word that names a kind, singular or plural ("cross", "crosses") -> the kind."""
        return {k: k for k in self.kinds} | {k + ("es" if k.endswith(("s", "x", "sh", "ch")) else "s"): k
                                             for k in self.kinds}

    def nouns(self) -> frozenset[str]:
        """The words that name objects: the kind words, "shape(s)" and "object(s)"."""
        return frozenset(self.kind_words()) | {"shape", "shapes", "object", "objects"}

    @classmethod
    def of_scenes(cls) -> "Vocabulary":
        from shapes.scenes.figures import COLOURS, SHAPE_KINDS, SIZE_WORD, TEXTURE_ADJECTIVE
        return cls(list(COLOURS), list(SHAPE_KINDS), list(SIZE_WORD), list(TEXTURE_ADJECTIVE), ["", "black", "white"])


def describe(values: dict[str, str]) -> str:
    """Attribute values -> the training data's description ("a small red dotted square with a white outline")."""
    from types import SimpleNamespace

    from shapes.scenes.expressions import region_description
    return region_description(SimpleNamespace(**{**values, "outline": values["outline"] or None}))


def brightness_word(levels: np.ndarray) -> str:
    """The colour word of an object in a grayscale image, from its pixels' grey ``levels`` (uint8): "black",
    "grey" or "white" by their median, split halfway between the training scenes' black (18), grey (128) and white
    (248). A grey image holds no other colour to name."""
    median = float(np.median(levels))
    return "black" if median < 73 else "white" if median > 188 else "grey"


def region_box(size: tuple[int, int], box=None, point=None) -> torch.Tensor:
    """A user's region in the ``size = (H, W)`` image -- a pixel box xyxy, or a click xy -- as ``[4]`` fractions of
    the padded square."""
    height, width = size
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
    else:
        half = CLICK_CELLS * side / 16
        x1, y1, x2, y2 = point[0] - half, point[1] - half, point[0] + half, point[1] + half
    return (torch.tensor([x1 + left, y1 + top, x2 + left, y2 + top], dtype=torch.float32) / side).clamp(0, 1)


# ---- training -----------------------------------------------------------------------------------------------------
@dataclass
class RegionSamples:
    """``image_states [images, g*g, width]``, ``rows [n]``, ``boxes [n, 4]`` (fractions of the square) and ``labels
    [n, 5]`` (value indices of colour, kind, size, texture, outline)."""
    image_states: torch.Tensor
    rows: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def concat(cls, parts: list["RegionSamples"]) -> "RegionSamples":
        """One sample set from several (their image rows renumbered)."""
        offsets = np.cumsum([0] + [len(p.image_states) for p in parts[:-1]])
        return cls(torch.cat([p.image_states for p in parts]), torch.cat([p.rows + int(o) for p, o in zip(parts, offsets)]),
                   torch.cat([p.boxes for p in parts]), torch.cat([p.labels for p in parts]))


def build_region_samples(model, processor, data_root: Path, split: str, vocab: Vocabulary, seed: int,
                         augment: float = 0.5, per_object: int = 3, limit: int | None = None,
                         progress: bool = True) -> RegionSamples:
    """Each mostly visible object of ``split`` (``scenes.json``), ``per_object`` times: its box with each side
    moved by -10% .. +25% of the box's side, or (one time in three) a click on a random pixel of its mask."""
    from shapes.locator_train import locator_keys
    from shapes.presence import load_rows
    from shapes.scenes.synthetic import split_scenes

    rng = np.random.default_rng(seed)
    ds, scenes = split_scenes(data_root, split)
    scenes = scenes[:limit] if limit else scenes
    images, rows = load_rows(ds, [s["image_id"] for s in scenes], rng, augment, f"{split} regions", progress)
    states = locator_keys(model, processor, images)
    out_rows, boxes, labels = [], [], []
    for scene in scenes:
        size = (scene["height"], scene["width"])
        for o in scene["objects"]:
            if o["area"] < 0.5 * max(o["full_area"], 1):
                continue
            label = vocab.labels(o)
            x1, y1, x2, y2 = o["box_xyxy"]
            mask = None
            for _ in range(per_object):
                if rng.random() < 1 / 3:
                    if mask is None:
                        mask = ds.mask(o["ann_id"])
                    ys, xs = np.nonzero(mask)
                    k = int(rng.integers(len(xs)))
                    region = region_box(size, point=(xs[k] + 0.5, ys[k] + 0.5))
                else:
                    w, h = x2 - x1, y2 - y1
                    d = rng.uniform(-0.1, 0.25, 4) * np.array([w, h, w, h])
                    region = region_box(size, box=(x1 - d[0], y1 - d[1], x2 + d[2], y2 + d[3]))
                for r in rows[scene["image_id"]]:
                    out_rows.append(r)
                    boxes.append(region)
                    labels.append(label)
    return RegionSamples(states, torch.tensor(out_rows), torch.stack(boxes), torch.tensor(labels))


def accuracy(head: RegionHead, samples: RegionSamples, batch_size: int = 1024) -> dict[str, float]:
    """Per attribute, and for colour and kind together ("named"), the share of samples read right."""
    head.eval()
    right = []
    with torch.no_grad():
        for i in range(0, len(samples.rows), batch_size):
            sl = slice(i, i + batch_size)
            out = head(samples.image_states[samples.rows[sl]], samples.boxes[sl])
            right.append(torch.stack([out[name].argmax(-1) == samples.labels[sl, k]
                                      for k, name in enumerate(head.classes)], -1))
    head.train()
    hits = torch.cat(right).float()
    report = {name: float(hits[:, k].mean()) for k, name in enumerate(head.classes)}
    report["named"] = float((hits[:, 0] * hits[:, 1]).mean())
    report["all"] = float(hits.prod(-1).mean())
    return report


def train_region_head(model_dir: str | Path, data: str | Path, out: str | Path, epochs: int = 20,
                      batch_size: int = 256, lr: float = 1e-3, seed: int = 0, eval_split: str = "val",
                      augment: float = 0.5, extra_data: list[str | Path] = (), limit: int | None = None,
                      progress: bool = True) -> dict:
    """Give the model at ``model_dir`` a region head trained on the synthetic REFER folder ``data`` and each
    ``extra_data`` folder (their train splits, plus corrupted copies of an ``augment`` share of the images); every
    other weight is kept. Writes
    ``out/model`` (atomically) and ``out/region_scores.json`` (accuracy on ``eval_split``)."""
    from dataclasses import asdict

    from grounding.checkpoint import load_checkpoint, save_checkpoint
    from grounding.processor import GroundingProcessor

    torch.manual_seed(seed)
    start = time.perf_counter()
    model, tokenizer = load_checkpoint(model_dir)
    vocab = Vocabulary.of_scenes()
    model.add_addon("region", asdict(vocab), tokenizer)
    head = model.addons["region"].head.float()
    processor = GroundingProcessor(tokenizer, model.config, model.vision_image_size, model.num_image_tokens)
    train = RegionSamples.concat([build_region_samples(model, processor, Path(d), "train", vocab, seed + 2 * k,
                                                       augment, limit=limit, progress=progress)
                                  for k, d in enumerate([data, *extra_data])])
    held = build_region_samples(model, processor, Path(data), eval_split, vocab, seed + 1, augment, limit=limit,
                                progress=progress)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(train.rows) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(train.rows), generator=generator).split(batch_size):
            out_logits = head(train.image_states[train.rows[index]], train.boxes[index])
            loss = sum(F.cross_entropy(out_logits[name], train.labels[index, k]) for k, name in enumerate(head.classes))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    head.eval()
    out = Path(out)
    save_checkpoint(model, tokenizer, out / "model")
    report = {"model": str(model_dir), "data": str(data), "extra_data": [str(e) for e in extra_data], "epochs": epochs, "lr": lr, "seed": seed, "augment": augment,
              "train_samples": len(train.rows), "held_samples": len(held.rows), "train": accuracy(head, train),
              eval_split: accuracy(head, held), "wall_s": round(time.perf_counter() - start, 1)}
    (out / "region_scores.json").write_text(json.dumps(report, indent=2))
    return report
