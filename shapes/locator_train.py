"""Train a ``FusionLocator`` (shapes/locator.py) on a trained model's cached image features.

``groundseg train-locator --model M --data D --out O`` keeps every weight of M and gives it a new [SEG] locator
that reads each [SEG]'s phrase with the image. The locator reads the vision tower's patch features, which do not
depend on the text: they are computed once per image, and then a step costs a locator pass instead of a full
forward pass, so thousands of steps fit in minutes on a CPU. The cache holds images x g*g x width float32 values
(the default model's tower: 64 x 192 per image, 49 kB; a CLIP-L tower's 576 x 1024 on RefCOCO's 17k images
would need ~40 GB: use ``limit``). Its targets are those of the locator loss in training: the token-grid cells
each referred object covers (``mask_cells``), and on those cells the object's box (DETR's L1 + generalised IoU
loss); a "multi" phrase ("all red shapes") targets the union of its objects' cells, with no box. ``extra_data``
folders add their train phrases: the locator learns from phrases alone, and on a few thousand scenes it learns
their phrases by heart (the model card measures what more scenes gave).

Top-1 (the best cell lies on the referred object) is reported on the evaluation split, per expression category
where the data has ``scenes.json`` (the synthetic sets), also at step 0 when the model's own fusion locator of as many
layers trains on (a warm restart); the last step's locator is kept (no selection on it).
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grounding.checkpoint import load_checkpoint, save_checkpoint
from grounding.data.refer import ReferDataset
from grounding.data.tasks import _no_article
from grounding.images import load_image
from grounding.model import GroundingModel
from grounding.processor import GroundingProcessor
from grounding.progress import progress_bar
from grounding.text.tokens import SEG
from grounding.trainer import batch_indices, plot_losses, warmup_cosine
from shapes.locator import FusionLocator, Phrases, box_loss, box_iou_at, locator_loss, mask_cells, square_boxes


@dataclass
class LocatorSamples:
    """Phrases of one split with their image rows and target cells.

    image_states ``[images, g*g, width]`` (float32); rows ``[n]`` index into it; phrase_ids[i] ``[L_i]`` token ids;
    targets bool ``[n, g*g]``; boxes ``[n, 4]`` the object's box as fractions of the padded square (zeros for a
    several-object phrase, whose cells carry no box target); categories[i] the expression's category ("" when
    unknown)."""
    image_states: torch.Tensor
    rows: torch.Tensor
    phrase_ids: list[torch.Tensor]
    targets: torch.Tensor
    boxes: torch.Tensor
    categories: list[str]

    def __len__(self) -> int:
        return len(self.phrase_ids)

    @classmethod
    def concat(cls, parts: list["LocatorSamples"]) -> "LocatorSamples":
        """One sample set from several (their image rows renumbered)."""
        offsets = np.cumsum([0] + [len(p.image_states) for p in parts[:-1]])
        return cls(torch.cat([p.image_states for p in parts]),
                   torch.cat([p.rows + int(o) for p, o in zip(parts, offsets)]),
                   [i for p in parts for i in p.phrase_ids], torch.cat([p.targets for p in parts]),
                   torch.cat([p.boxes for p in parts]), [c for p in parts for c in p.categories])


def _categories(data_root: Path) -> dict[int, str]:
    """sent_id -> expression category from a synthetic set's ``scenes.json`` (empty for other data)."""
    path = data_root / "scenes.json"
    if not path.is_file():
        return {}
    return {s["sent_id"]: s.get("category", "") for im in json.loads(path.read_text())["images"]
            for s in im["sentences"]}


@torch.no_grad()
def locator_keys(model: GroundingModel, processor: GroundingProcessor, images: list[np.ndarray],
                 batch_size: int = 32) -> torch.Tensor:
    """``[len(images), g*g, width]`` float32: what the model's ``FusionLocator`` scores for each image (the
    vision tower's patch features), computed as at inference."""
    like = model.seg_projection.net[0].weight
    return torch.cat([model.vision_features(torch.stack([processor.vision_pixels(im) for im in
                                                         images[i:i + batch_size]]).to(like)).float()
                      for i in range(0, len(images), batch_size)])


def phrase_token_ids(model: GroundingModel, processor: GroundingProcessor, phrase: str) -> torch.Tensor:
    """The token ids of ``phrase`` as the locator sees it in an answer ``<ref>phrase</ref>[SEG]``."""
    ids = torch.tensor([processor.encode("", f"<ref>{phrase}</ref>{SEG}").answer_ids])
    return model.read_segs(ids.new_zeros((*ids.shape, 1)), ids)[0].phrase_ids[0]


def build_samples(model: GroundingModel, processor: GroundingProcessor, ds: ReferDataset, split: str,
                  limit: int | None = None, progress: bool = True) -> LocatorSamples:
    """Every sentence of ``split`` (and its "multi" samples from ``extra.json``) as locator samples."""
    grid = model.token_grid
    cats = _categories(ds.data_root)
    items: list[tuple[int, str, tuple[int, ...], str]] = [
        (s.image_id, s.text, (s.ann_id,), cats.get(s.sent_id, "")) for s in ds.sentences(split)]
    extra = ds.data_root / "extra.json"
    for s in json.loads(extra.read_text())["samples"] if extra.is_file() else []:
        if s.get("split") == split and s["kind"] == "multi":
            items.append((s["image_id"], _no_article(s["sent"]), tuple(s["ann_ids"]), "multi"))
    items = items[:limit] if limit else items
    image_ids = sorted({i for i, *_ in items})
    row_of = {im: r for r, im in enumerate(image_ids)}
    images = []
    with progress_bar(len(image_ids), f"{split} images", enabled=progress) as advance:
        for i in image_ids:
            images.append(load_image(ds.image_path(i)))
            advance()
    states = locator_keys(model, processor, images)
    phrase_ids, targets, boxes = [], [], []
    with progress_bar(len(items), f"{split} phrases", enabled=progress) as advance:
        for _, text, ann_ids, _ in items:
            phrase_ids.append(phrase_token_ids(model, processor, text))
            masks = torch.from_numpy(np.stack([ds.mask(a) for a in ann_ids]))
            targets.append(mask_cells(masks, grid).any(0))
            boxes.append(square_boxes(masks)[0] if len(ann_ids) == 1 else torch.zeros(4))
            advance()
    return LocatorSamples(states, torch.tensor([row_of[i] for i, *_ in items]), phrase_ids, torch.stack(targets),
                          torch.stack(boxes), [c for *_, c in items])


def _phrases(samples: LocatorSamples, index: np.ndarray | list[int], embed: torch.Tensor) -> Phrases:
    return Phrases.stack([embed[samples.phrase_ids[i]] for i in index], embed.shape[1], embed)


@torch.no_grad()
def top1(locator: FusionLocator, samples: LocatorSamples, embed: torch.Tensor,
         batch_size: int = 256) -> dict[str, float]:
    """Fraction of samples whose best cell lies on the referred object, overall and per category; and
    ``box_acc``: of the one-object samples, the fraction whose box at the best cell has IoU >= 0.5."""
    locator.eval()
    hits, box_hits = [], []
    for i in range(0, len(samples), batch_size):
        index = list(range(i, min(i + batch_size, len(samples))))
        scores, boxes = locator.locate(None, samples.image_states[samples.rows[index]], _phrases(samples, index, embed))
        best = scores.argmax(-1, keepdim=True)
        hits.append(samples.targets[index].gather(1, best)[:, 0])
        one = samples.boxes[index].any(-1)
        box_hits.append(box_iou_at(boxes, best[:, 0], samples.boxes[index])[one] >= 0.5)
    locator.train()
    hit = torch.cat(hits).float().numpy()
    by_cat: dict[str, list[float]] = defaultdict(list)
    for h, c in zip(hit, samples.categories):
        if c:
            by_cat[c].append(h)
    return {"top1": float(hit.mean()), **{f"top1_{c}": float(np.mean(v)) for c, v in sorted(by_cat.items())},
            "box_acc": float(torch.cat(box_hits).float().mean())}


def train_locator(model_dir: str | Path, data: str | Path, out: str | Path, steps: int = 3000, batch_size: int = 64,
                  lr: float = 1e-3, layers: int = 2, seed: int = 0, eval_split: str = "val", eval_every: int = 500,
                  dataset: str = "synth", split_by: str = "unc", limit: int | None = None,
                  extra_data: list[str | Path] = (), progress: bool = True) -> dict[str, float]:
    """Train a FusionLocator for the model at ``model_dir`` and write the model with it to ``out`` (atomically),
    on the train split of ``data`` and of each ``extra_data`` folder (scored on ``data``'s ``eval_split``), with
    ``locator_log.jsonl`` / ``loss_locator.png`` (losses per step), ``locator_eval.jsonl`` / ``locator_top1.png``
    (scores per evaluation) and ``locator_scores.json``. Returns the last evaluation."""
    torch.manual_seed(seed)
    model, tokenizer = load_checkpoint(model_dir)
    had = model.addons["locator"] if "locator" in model.addons else None
    # a fusion locator of as many layers carries on from its weights: scored at step 0 too
    continued = had is not None and had.fusion and had.settings.layers == layers
    # a fusion locator reads text-independent features: computed once per image
    model.add_addon("locator", {"kind": "fusion", "layers": layers}, tokenizer)
    processor = GroundingProcessor(tokenizer, model.config, model.vision_image_size, model.num_image_tokens)
    ds = ReferDataset(data, dataset=dataset, split_by=split_by)
    sources = [ds] + [ReferDataset(e, dataset=dataset, split_by=split_by) for e in extra_data]
    train_set = LocatorSamples.concat([build_samples(model, processor, d, "train", limit, progress) for d in sources])
    eval_set = build_samples(model, processor, ds, eval_split, limit, progress)
    embed = model.vlm.get_input_embeddings().weight.detach().float()
    locator = model.addons["locator"].net.float()
    optimizer = torch.optim.AdamW(locator.parameters(), lr=lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps, steps // 20)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path, eval_path = out / "locator_log.jsonl", out / "locator_eval.jsonl"
    log_path.write_text("")
    eval_path.write_text("")
    scores_now: dict[str, float] = {}
    if continued:
        scores_now = top1(locator, eval_set, embed)
        eval_path.write_text(json.dumps({"step": 0, **scores_now}) + "\n")
    start = time.perf_counter()
    with progress_bar(steps, "locator", enabled=progress, fields={"top1": "top-1 {}"}) as advance:
        for step in range(steps):
            index = batch_indices(step, len(train_set), batch_size, seed)
            scores, boxes = locator.locate(None, train_set.image_states[train_set.rows[index]],
                                           _phrases(train_set, index, embed))
            targets = train_set.targets[index]
            locate = locator_loss(scores, targets)
            box = box_loss(boxes, train_set.boxes[index], targets & train_set.boxes[index].any(-1, keepdim=True))
            loss = locate + (box if box is not None else 0)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(locator.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            record = {"step": step + 1, "locate_loss": locate.item(),
                      "box_loss": box.item() if box is not None else 0.0, "time_s": time.perf_counter() - start}
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                scores_now = top1(locator, eval_set, embed)
                with eval_path.open("a") as f:
                    f.write(json.dumps({"step": step + 1, **scores_now}) + "\n")
            advance(top1=f"{scores_now['top1']:.3f}" if scores_now else "-")
    save_checkpoint(model, tokenizer, out / "model")
    plot_losses(log_path, out / "loss_locator.png")
    plot_scores(eval_path, out / "locator_top1.png", eval_split)
    (out / "locator_scores.json").write_text(json.dumps(
        {"model": str(model_dir), "data": str(data), "extra_data": [str(e) for e in extra_data],
         "eval_split": eval_split, "steps": steps, "batch_size": batch_size, "lr": lr, "layers": layers, "seed": seed,
         "train_samples": len(train_set), "eval_samples": len(eval_set),
         "wall_s": round(time.perf_counter() - start, 1), eval_split: scores_now}, indent=2))
    return scores_now


def plot_scores(eval_path: Path, png_path: Path, split: str) -> Path:
    """Top-1 per expression category and the box Acc@0.5 against the step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in eval_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in (k for k in records[0] if k != "step"):
        label = {"top1": "top-1, all", "box_acc": "box Acc@0.5 at the best cell"}.get(key, key.replace("top1_", ""))
        ax.plot(steps, [100 * r[key] for r in records], marker="o", lw=2.5 if key == "top1" else 1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{split} %")
    ax.set_title("[SEG] locator: best cell on the referred object")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
