"""Presence: is the object a phrase names in the image at all?

The default model's language model decides "There is no X in the image." from the question's wording more than
from the image (weights/shapes-tiny/MODEL_CARD.md, v10.1), and the ``FusionLocator`` cannot stand in: its scores
are a softmax over cells, which say where, never whether. ``PresenceHead`` reads the locator's fused sequence for
(phrase, image) -- its query token, the cell the scores pick, the strongest value of every cell channel, and how
peaked the scores are -- and gives one logit: the phrase names something in the image. It is trained on a
trained model's cached tower features with the locator frozen (``train_presence``; minutes on a CPU), on:

  present  every referring sentence of the REFER data, its "all ..." groups, and the colour / kind phrases of
           the objects each scene holds ("the red circle", "red circle", "the circle", "all red shapes"...);
  absent   the generator's "no target" phrases and, from each scene's object list, the same phrase forms
           about what it lacks: near misses (the colour and the kind are there, not together), absent kinds,
           absent colours.

The ``presence`` add-on (shapes/addons.py) uses it: answers may not open with the denial, and a target whose
phrase reads as absent is turned into "There is no ... in the image." (``review``).
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

from shapes.locator import FusionLocator, Phrases


class PresenceHead(nn.Module):
    """``fused [n, 1 + L + g*g, dim]`` (``FusionLocator.fuse``) and its ``scores [n, g*g]`` -> logit ``[n]``: the
    phrase names something in the image."""

    def __init__(self, dim: int, cells: int):
        super().__init__()
        self.cells = cells
        width = 3 * dim + 2
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, 1))

    def features(self, fused: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``[n, 3 * dim + 2]``: query state, best cell's state, per-channel max over cells, peak score and its
        log-softmax."""
        cells = fused[:, -self.cells:]
        best = scores.argmax(-1)
        peak = scores.amax(-1, keepdim=True)
        return torch.cat([fused[:, 0], cells[torch.arange(len(best)), best], cells.amax(1), peak,
                          peak - scores.logsumexp(-1, keepdim=True)], -1)

    def forward(self, fused: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(fused, scores))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)[:, 0]


def presence_features(locator: FusionLocator, head: PresenceHead, image_states: torch.Tensor,
                      phrases: Phrases) -> torch.Tensor:
    """Head features ``[n, 3 * dim + 2]`` of n phrases read with their images' features ``[n, g*g, width]`` (or
    one image's ``[g*g, width]``)."""
    fused = locator.fuse(image_states, phrases)
    return head.features(fused, locator.read(fused)[0])


# ---- training samples ---------------------------------------------------------------------------------------------
def scene_phrases(objects: list[dict], colours: list[str], kinds: dict[str, str],
                  rng: np.random.Generator, per_side: int = 5) -> tuple[list[str], list[str]]:
    """(present, absent) colour / kind phrases of one scene, ``per_side`` of each drawn at random (fewer when the
    scene offers fewer). ``objects``: ``scenes.json`` records (colour, kind, area, full_area); ``kinds``: kind ->
    plural. Objects mostly hidden (under half their area visible) name nothing either way."""
    seen = [o for o in objects if o["area"] >= 0.5 * max(o["full_area"], 1)]
    pairs = {(o["colour"], o["kind"]) for o in objects}
    here_c, here_k = {c for c, _ in pairs}, {k for _, k in pairs}
    present = {f"{art}{c} {k}" for c, k in {(o["colour"], o["kind"]) for o in seen} for art in ("the ", "")}
    present |= {f"{art}{o['kind']}" for o in seen for art in ("the ", "")}
    present |= {f"the {o['colour']} shape" for o in seen} | {f"all {o['colour']} shapes" for o in seen}
    present |= {f"all the {kinds[o['kind']]}" for o in seen}
    absent = {f"{art}{c} {k}" for c in colours for k in kinds if (c, k) not in pairs and (c in here_c or k in here_k)
              for art in ("the ", "")}
    absent |= {f"{art}{k}" for k in kinds if k not in here_k for art in ("the ", "")}
    absent |= {f"the {c} shape" for c in colours if c not in here_c}
    absent |= {f"all {c} shapes" for c in colours if c not in here_c}
    absent |= {f"all the {kinds[k]}" for k in kinds if k not in here_k}

    def draw(options: set[str]) -> list[str]:
        options = sorted(options)
        return [options[i] for i in rng.permutation(len(options))[:per_side]]
    return draw(present), draw(absent)


@dataclass
class PresenceSamples:
    """Phrases with their image rows: ``image_states [images, g*g, width]``, ``rows [n]``, ``phrase_ids[i] [L_i]``,
    ``labels [n]`` (1 present, 0 absent), ``sources[i]`` where the phrase came from (refer, multi, no_target,
    scene)."""
    image_states: torch.Tensor
    rows: torch.Tensor
    phrase_ids: list[torch.Tensor]
    labels: torch.Tensor
    sources: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.phrase_ids)


def build_presence_samples(model, processor, data_root: Path, split: str, seed: int, limit: int | None = None,
                           progress: bool = True, augment: float = 0.0, refer_per_image: int = 4) -> PresenceSamples:
    """The phrases of ``split`` of a synthetic REFER folder (``scenes.json``, ``extra.json``) as presence samples:
    ``refer_per_image`` referring sentences of each image, its "all ..." groups and "no target" phrase, and its
    colour / kind phrases (``scene_phrases``); an ``augment`` share of the images also gives a corrupted copy
    (shapes/augment.py) asked the same phrases."""
    from grounding.data.refer import ReferDataset
    from grounding.data.tasks import _no_article
    from shapes.locator_train import locator_keys, phrase_token_ids
    from shapes.scenes.figures import COLOURS, SHAPE_KINDS

    rng = np.random.default_rng(seed)
    ds = ReferDataset(data_root, dataset="synth", split_by="unc")
    scenes = {s["image_id"]: s for s in json.loads((Path(data_root) / "scenes.json").read_text())["images"]}
    by_image = ds.sentences_by_image(split)
    items: list[tuple[int, str, int, str]] = [   # a few referring sentences per image: they are the easy positives
        (image_id, sents[i].text, 1, "refer") for image_id, sents in sorted(by_image.items())
        for i in sorted(rng.permutation(len(sents))[:refer_per_image])]
    extra = Path(data_root) / "extra.json"
    for s in json.loads(extra.read_text())["samples"] if extra.is_file() else []:
        if s.get("split") == split and s["kind"] in ("multi", "no_target"):
            items.append((s["image_id"], _no_article(s["sent"]) if s["kind"] == "no_target" else s["sent"],
                          int(s["kind"] == "multi"), s["kind"]))
    image_ids = sorted({i for i, *_ in items})[:limit] if limit else sorted({i for i, *_ in items})
    kinds = {k.name: k.plural for k in SHAPE_KINDS.values()}
    for image_id in image_ids:
        present, absent = scene_phrases(scenes[image_id]["objects"], list(COLOURS), kinds, rng)
        items += [(image_id, p, 1, "scene") for p in present] + [(image_id, p, 0, "scene") for p in absent]
    keep = set(image_ids)
    items = [it for it in items if it[0] in keep]
    images, rows = load_rows(ds, image_ids, rng, augment, f"{split} images", progress)
    states = locator_keys(model, processor, images)
    items = [(r, text, label, src) for image_id, text, label, src in items for r in rows[image_id]]
    ids_of: dict[str, torch.Tensor] = {}
    for _, text, _, _ in items:
        if text not in ids_of:
            ids_of[text] = phrase_token_ids(model, processor, text)
    return PresenceSamples(states, torch.tensor([r for r, *_ in items]), [ids_of[t] for _, t, _, _ in items],
                           torch.tensor([label for _, _, label, _ in items], dtype=torch.float32),
                           [src for *_, src in items], [t for _, t, _, _ in items])


def load_rows(ds, image_ids: list[int], rng: np.random.Generator, augment: float, label: str,
              progress: bool) -> tuple[list[np.ndarray], dict[int, list[int]]]:
    """The images of ``image_ids`` (and, for an ``augment`` share of them, a corrupted copy each, appended) and
    ``{image_id: [its rows]}``."""
    from grounding.images import load_image
    from grounding.progress import progress_bar
    from shapes.augment import corrupt

    images: list[np.ndarray] = []
    rows: dict[int, list[int]] = {}
    with progress_bar(len(image_ids), label, enabled=progress) as advance:
        for i in image_ids:
            image = load_image(ds.image_path(i))
            rows[i] = [len(images)]
            images.append(image)
            if rng.random() < augment:
                rows[i].append(len(images))
                images.append(corrupt(image, rng))
            advance()
    return images, rows


@torch.no_grad()
def sample_features(locator: FusionLocator, head: PresenceHead, samples: PresenceSamples, embed: torch.Tensor,
                    batch_size: int = 256) -> torch.Tensor:
    """``[n, 3 * dim + 2]``: the head's features of every sample (the locator frozen)."""
    out = []
    for i in range(0, len(samples), batch_size):
        index = list(range(i, min(i + batch_size, len(samples))))
        phrases = Phrases.stack([embed[samples.phrase_ids[j]] for j in index], embed.shape[1], embed)
        out.append(presence_features(locator, head, samples.image_states[samples.rows[index]], phrases))
    return torch.cat(out)


def threshold_for(logits: torch.Tensor, labels: torch.Tensor, sources: list[str], denied: float) -> float:
    """The logit threshold under which at most a ``denied`` share of the present samples of each source fall (the
    simple colour / kind phrases, "scene", are harder than the referring sentences and count as much)."""
    present = labels == 1
    return min(float(torch.quantile(logits[present & torch.tensor([s == src for s in sources])], denied))
               for src in sorted({s for s, p in zip(sources, present.tolist()) if p}))


def rates(logits: torch.Tensor, labels: torch.Tensor, sources: list[str], threshold: float) -> dict[str, float]:
    """Present denied and absent denied at ``threshold`` (overall and per source), and the ROC AUC."""
    denied = logits < threshold
    out = {"present_denied": float(denied[labels == 1].float().mean()),
           "absent_denied": float(denied[labels == 0].float().mean())}
    for src in sorted(set(sources)):
        m = torch.tensor([s == src for s in sources])
        for name, lab in (("present", 1), ("absent", 0)):
            sel = m & (labels == lab)
            if sel.any():
                out[f"{name}_denied_{src}"] = float(denied[sel].float().mean())
    out["auc"] = auc(logits[labels == 1], logits[labels == 0])
    return out


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """ROC AUC of present logits ``pos`` against absent ``neg`` (Mann-Whitney, from ranks)."""
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = torch.cat([pos, neg]).argsort().argsort().double() + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def train_presence(model_dir: str | Path, data: str | Path, out: str | Path, epochs: int = 30,
                   batch_size: int = 512, lr: float = 1e-3, denied: float = 0.01, seed: int = 0,
                   eval_split: str = "val", limit: int | None = None, augment: float = 0.5,
                   extra_data: list[str | Path] = (), progress: bool = True) -> dict[str, float]:
    """Give the model at ``model_dir`` a presence head, trained on the train split of the synthetic REFER folder
    ``data`` and of each ``extra_data`` folder (plus corrupted copies of an ``augment`` share of their images) with
    every other weight frozen; its
    threshold is the logit under which ``denied`` of the ``eval_split`` present phrases of each source fall (clean
    and corrupted copies alike). Writes ``out/model`` (atomically) and ``out/presence_scores.json``."""
    from grounding.checkpoint import load_checkpoint, save_checkpoint
    from grounding.processor import GroundingProcessor

    torch.manual_seed(seed)
    start = time.perf_counter()
    model, tokenizer = load_checkpoint(model_dir)
    locator = model.addons["locator"]
    if not locator.fusion:
        raise ValueError(f"{model_dir}: the presence head reads a fusion locator; this model's is {locator.settings.kind!r}")
    model.add_addon("presence", {}, tokenizer)
    head = model.addons["presence"].head.float()
    net = locator.net.float().eval()
    processor = GroundingProcessor(tokenizer, model.config, model.vision_image_size, model.num_image_tokens)
    embed = model.vlm.get_input_embeddings().weight.detach().float()
    parts = [build_presence_samples(model, processor, Path(d), "train", seed + 2 * k, limit, progress, augment)
             for k, d in enumerate([data, *extra_data])]
    held = build_presence_samples(model, processor, Path(data), eval_split, seed + 1, limit, progress, augment)
    x_train = torch.cat([sample_features(net, head, p, embed) for p in parts])
    x_held = sample_features(net, head, held, embed)
    y, sources = torch.cat([p.labels for p in parts]), [s for p in parts for s in p.sources]
    pos_weight = (y == 0).sum() / (y == 1).sum().clamp(min=1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for index in torch.randperm(len(y), generator=generator).split(batch_size):
            loss = F.binary_cross_entropy_with_logits(head.classify(x_train[index]), y[index], pos_weight=pos_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    head.eval()
    with torch.no_grad():
        logits_train, logits_held = head.classify(x_train), head.classify(x_held)
    threshold = threshold_for(logits_held, held.labels, held.sources, denied)
    model.addons["presence"] = model.addons["presence"].with_settings({"threshold": round(threshold, 4)})
    out = Path(out)
    save_checkpoint(model, tokenizer, out / "model")
    report = {"model": str(model_dir), "data": str(data), "extra_data": [str(e) for e in extra_data],
              "epochs": epochs, "lr": lr, "seed": seed, "augment": augment,
              "threshold": threshold, "denied_target": denied, "train_samples": len(y),
              "held_samples": len(held), "train": rates(logits_train, y, sources, threshold),
              eval_split: rates(logits_held, held.labels, held.sources, threshold),
              "wall_s": round(time.perf_counter() - start, 1)}
    (out / "presence_scores.json").write_text(json.dumps(report, indent=2))
    return report
