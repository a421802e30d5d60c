"""What kind of shape a mask is, read from its silhouette by a small network (the ``silhouette`` add-on, registered in
shapes/addons.py), and its training (``groundseg train-silhouette``).

The region head reads kinds from the vision tower's features, which carry the scene's colours and rendering; the
outline rules (shapes/outline_kind.py) read only masks that are clean. A mask's silhouette alone says much of its
kind, whatever the image: a pentagon's mask is no circle's even when it is a little ragged. The network reads the
mask cut to its tight box, centred in a square ``SIDE`` cells across (so that its aspect is kept), and gives a
probability per kind. It learns from the synthetic scenes' true masks (partly hidden objects included), roughened
the way decoded masks are: outlines blurred and cut at another level, read at a lower resolution, bitten by an
occluder, or grown by a neighbour.
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIDE = 32          # cells a side of the square a silhouette is read on
FILL = 0.85        # share of the square's side the silhouette's longer side takes
SURE = 0.9         # a probability of a kind at which the network's reading stands for a clear outline of it


def silhouette(mask: np.ndarray) -> np.ndarray | None:
    """``mask`` (bool ``H x W``) cut to its tight box, scaled (area-averaged) so that its longer side is ``FILL``
    of ``SIDE`` and centred: float32 ``[SIDE, SIDE]`` in 0-1. None for an empty mask."""
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask, dtype=bool).view(np.uint8))
    if not w:
        return None
    return _placed(mask[y:y + h, x:x + w].astype(np.float32))


def _placed(crop: np.ndarray) -> np.ndarray:
    """A tight crop (float ``h x w``) scaled and centred on the ``SIDE`` square, as ``silhouette`` places it."""
    h, w = crop.shape
    scale = FILL * SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.zeros((SIDE, SIDE), np.float32)
    top, left = (SIDE - size[1]) // 2, (SIDE - size[0]) // 2
    out[top:top + size[1], left:left + size[0]] = small
    return out


class SilhouetteNet(nn.Module):
    """Kind logits ``[B, kinds]`` of silhouettes ``[B, 1, SIDE, SIDE]`` (0-1): three conv blocks (each halving the
    grid), then two linear layers on the ``SIDE / 8`` grid's features (where, not only whether, a corner is)."""

    def __init__(self, kinds: int, width: int = 32):
        super().__init__()
        blocks, channels = [], 1
        for out in (width // 2, width, 2 * width):
            blocks += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*blocks)
        self.classify = nn.Sequential(nn.Flatten(), nn.Linear(channels * (SIDE // 8) ** 2, 128), nn.ReLU(),
                                      nn.Dropout(0.2), nn.Linear(128, kinds))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


@torch.no_grad()
def kind_probabilities(net: SilhouetteNet, masks: list[np.ndarray]) -> np.ndarray:
    """Probabilities ``[N, kinds]`` of the kinds of ``masks`` (bool ``H x W`` each); an empty mask's row is 0."""
    out = np.zeros((len(masks), net.classify[-1].out_features), np.float32)
    read = [(i, s) for i, m in enumerate(masks) if m is not None and (s := silhouette(m)) is not None]
    if read:
        like = next(net.parameters())
        x = torch.from_numpy(np.stack([s for _, s in read]))[:, None].to(like.device, like.dtype)
        out[[i for i, _ in read]] = net.eval()(x).float().softmax(-1).cpu().numpy()
    return out


def sure_of(model, mask: np.ndarray | None, kind: str) -> bool:
    """Whether the ``silhouette`` network of ``model`` (if it has one) reads the bool ``H x W`` ``mask`` as ``kind``
    with probability ``SURE``: where the outline rules say nothing, such a reading stands for a clear outline."""
    addon = model.addons["silhouette"] if "silhouette" in model.addons else None
    return (addon is not None and mask is not None and kind in addon.settings.kinds
            and addon.probability(mask, kind) >= SURE)


def shows_kind(model, mask: np.ndarray | None, kind: str) -> bool:
    """Whether the bool ``H x W`` ``mask`` clearly has ``kind``: by its outline (``outline_kind``) or ``sure_of``."""
    from shapes.outline_kind import outline_kind

    return mask is not None and (outline_kind(mask) == kind or sure_of(model, mask, kind))


# ---------------------------------------------------------------------------------------------------- training
def roughened(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tight bool crop ``h x w`` of a true mask made to look decoded (float ``h' x w'`` in 0-1, tight again):
    mirrored; at random read at a lower resolution, its outline blurred and cut at another level (which also grows
    or shrinks it), bitten by an ellipse, or grown by one at its edge."""
    m = crop.astype(np.float32)
    if rng.random() < 0.5:
        m = np.ascontiguousarray(m[:, ::-1])
    h, w = m.shape
    side = max(h, w)
    if rng.random() < 0.3:   # a coarse decoder grid
        f = rng.uniform(2, 5)
        small = cv2.resize(m, (max(2, round(w / f)), max(2, round(h / f))), interpolation=cv2.INTER_AREA)
        m = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    pad = max(2, side // 4)
    m = np.pad(m, pad)
    ys, xs = np.nonzero(m > 0.5)
    if len(ys) and rng.random() < 0.25:   # a neighbour bites it, or is taken in
        blob = np.zeros(m.shape, np.float32)
        k = int(rng.integers(len(ys)))
        axes = (max(1, int(side * rng.uniform(0.1, 0.35))), max(1, int(side * rng.uniform(0.1, 0.35))))
        cv2.ellipse(blob, (int(xs[k]), int(ys[k])), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        m = np.minimum(m, 1 - blob) if rng.random() < 0.6 else np.maximum(m, blob)
    if rng.random() < 0.7:   # a soft outline, cut at another level
        sigma = rng.uniform(0.3, 0.04 * side + 0.5)
        m = cv2.GaussianBlur(m, (0, 0), sigma)
        m = (m >= rng.uniform(0.3, 0.7)).astype(np.float32)
    x, y, bw, bh = cv2.boundingRect((m > 0.5).astype(np.uint8))
    return m[y:y + bh, x:x + bw] if bw else crop.astype(np.float32)


def gather_masks(folders: list[str | Path], split: str, kinds: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """The tight bool crops of every object's visible mask (of 30 pixels or more) in ``split`` of each synthetic REFER
    folder, and their kinds' indices in ``kinds``."""
    from shapes.scenes.synthetic import split_scenes

    crops, labels = [], []
    for folder in folders:
        ds, scenes = split_scenes(folder, split)
        for scene in scenes:
            for o in scene["objects"]:
                m = ds.mask(o["ann_id"])
                x, y, w, h = cv2.boundingRect(m.astype(np.uint8))
                if w and m.sum() >= 30:
                    crops.append(m[y:y + h, x:x + w].astype(bool))
                    labels.append(kinds.index(o["kind"]))
    return crops, np.array(labels)


def train_silhouette(crops: list[np.ndarray], labels: np.ndarray, kinds: int, steps: int = 3000, batch: int = 256,
                     lr: float = 2e-3, seed: int = 0, progress: bool = True) -> tuple[SilhouetteNet, dict]:
    """A ``SilhouetteNet`` trained on roughened copies of ``crops`` (tight bool masks) of kinds ``labels``: AdamW,
    warm-up then cosine. Returns it and a report (steps, seconds, final loss)."""
    from grounding.progress import progress_bar
    from grounding.trainer import warmup_cosine

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SilhouetteNet(kinds)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps, steps // 20)
    start, losses = time.time(), []
    net.train()
    with progress_bar(steps, "silhouette kinds", enabled=progress) as advance:
        for _ in range(steps):
            idx = rng.integers(len(crops), size=batch)
            x = torch.from_numpy(np.stack([_placed(roughened(crops[i], rng)) for i in idx]))[:, None]
            loss = F.cross_entropy(net(x), torch.from_numpy(labels[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            advance()
    return net.eval(), {"steps": steps, "seconds": round(time.time() - start, 1),
                        "final_loss": float(np.mean(losses[-50:]))}


def decoded_masks(grounder, data_root: str | Path, split: str, scenes: int, rng: np.random.Generator,
                  augment: float = 0.5, grey: float = 0.3, camouflage: float = 0.3,
                  progress: bool = True) -> tuple[list, np.ndarray]:
    """Masks as the model decodes them: each object (of 30 pixels or more) of the first ``scenes`` scenes of
    ``split``, decoded with the model's mask steps from its true box (each side moved by up to 5% of the box) on the
    scene corrupted (probability ``augment``), made grey (``grey``) and then camouflaged (``camouflage``). Returns
    the masks' tight bool crops and their kinds' indices in the region vocabulary's kinds."""
    from grounding.progress import progress_bar
    from shapes.scenes.synthetic import split_scenes

    kinds = list(grounder.model.addons["region"].vocab.kinds)
    ds, records = split_scenes(data_root, split)
    crops, labels = [], []
    with progress_bar(min(scenes, len(records)), f"{split} masks decoded", enabled=progress) as advance:
        for scene in records[:scenes]:
            crops_, labels_ = _decoded_scene(grounder, ds, scene, kinds, rng, augment, grey, camouflage)
            crops, labels = crops + crops_, labels + labels_
            advance()
    return crops, np.array(labels)


def _decoded_scene(grounder, ds, scene: dict, kinds: list[str], rng: np.random.Generator, augment: float,
                   grey: float, camouflage: float) -> tuple[list, list]:
    """``decoded_masks`` of one scene: (tight bool crops, kind indices)."""
    from grounding.images import load_image
    from shapes.addons import Region
    from shapes.augment import camouflage as camouflaged, corrupt_regions, grey as grey_copy

    image = load_image(ds.image_path(scene["image_id"]))
    masks = [ds.mask(o["ann_id"]).astype(bool) for o in scene["objects"]]
    if rng.random() < augment:
        image = corrupt_regions(image, masks, rng)
    if rng.random() < grey:
        image = grey_copy(image, rng)
        if rng.random() < camouflage:
            image = camouflaged(image, masks, rng)
    prepared = grounder.prepare([image])[0]
    H, W = image.shape[:2]
    crops, labels = [], []
    for o, m in zip(scene["objects"], masks):
        if m.sum() < 30:
            continue
        x, y, w, h = cv2.boundingRect(m.astype(np.uint8))
        box = np.array([x, y, x + w, y + h], float) + 0.05 * np.array([w, h, w, h]) * rng.uniform(-1, 1, 4)
        decoded = Region.marked_mask(grounder.model, prepared, box=np.clip(box, 0, [W, H, W, H]).tolist())
        bx, by, bw, bh = cv2.boundingRect(decoded.astype(np.uint8))
        if bw:
            crops.append(decoded[by:by + bh, bx:bx + bw])
            labels.append(kinds.index(o["kind"]))
    return crops, labels


@torch.no_grad()
def calibrate_level(grounder, data_root: str | Path, split: str = "val", share: float = 0.02, seed: int = 0,
                    augment: float = 0.5, grey: float = 0.3, limit: int | None = None, progress: bool = True) -> dict:
    """The ``silhouette`` add-on's ``level``: under it fall ``share`` of the probabilities the network gives the
    named kind on the masks of the model's right answers (mask IoU >= 0.5 with the phrase's object) to "Please
    segment {phrase}." for the present objects' plain phrases of ``split`` (``val_phrases``), on each scene, a
    corrupted copy (probability ``augment``) and a grey one (``grey``). A wrong answer lost to the check is no loss,
    so those are counted apart. Masks whose outline already says a kind (``outline_kind``) are not read: the check
    is not made on them. Returns {"level", "right", "wrong", "wrong_under_level", "quantiles"}."""
    from grounding.images import load_image
    from grounding.inference.prepared import Query
    from grounding.progress import progress_bar
    from shapes.augment import corrupt, grey as grey_copy
    from shapes.outline_kind import outline_kind
    from shapes.region_verify import plain_names, val_phrases
    from shapes.scenes.synthetic import split_scenes

    rng = np.random.default_rng(seed)
    ds, scenes = split_scenes(data_root, split)
    scenes = scenes[:limit] if limit else scenes
    silhouettes, vocab = grounder.model.addons["silhouette"], grounder.model.addons["region"].vocab
    right, wrong = [], []
    with progress_bar(len(scenes), f"{split} silhouettes", enabled=progress) as advance:
        for scene in scenes:
            phrases = val_phrases(scene)
            image = load_image(ds.image_path(scene["image_id"]))
            views = [image] + ([corrupt(image, rng)] if rng.random() < augment else [])
            views += [grey_copy(image, rng)] if rng.random() < grey else []
            for view in views:
                preds = grounder.predict_batch([Query(view, f"Please segment {p}.") for p in phrases])
                for phrase, pred in zip(phrases, preds):
                    mask = pred.targets[0].mask if pred.targets else None
                    if mask is None or not mask.any() or outline_kind(mask) is not None:
                        continue
                    colours, (kind,) = plain_names(phrase, vocab)
                    truth = ds.mask(next(o for o in scene["objects"] if o["kind"] == kind and
                                         (not colours or o["colour"] == colours[0]))["ann_id"]).astype(bool)
                    iou = (mask & truth).sum() / max((mask | truth).sum(), 1)
                    (right if iou >= 0.5 else wrong).append(silhouettes.probability(mask, kind))
            advance()
    if not right:
        raise ValueError(f"no right answers' masks to read in {split} of {data_root}")
    level = float(np.quantile(right, share))
    return {"level": level, "right": len(right), "wrong": len(wrong),
            "wrong_under_level": int((np.array(wrong) < level).sum()),
            "quantiles": {q: float(np.quantile(right, q)) for q in (0.005, 0.01, 0.02, 0.05, 0.1)}}


def accuracy(net: SilhouetteNet, crops: list[np.ndarray], labels: np.ndarray) -> float:
    """The share of ``crops`` whose most probable kind is their label."""
    return round(float((kind_probabilities(net, crops).argmax(1) == labels).mean()), 4)


def train_silhouette_addon(model_dir: str | Path, data: str | Path, out: str | Path, extra_data: list = (),
                           decoded_scenes: int = 1000, decoded_repeat: int = 3, steps: int = 1500, lr: float = 2e-3,
                           seed: int = 0, share: float = 0.02, eval_scenes: int = 300, limit: int | None = None,
                           progress: bool = True) -> dict:
    """Give the model at ``model_dir`` a ``silhouette`` add-on: the network trained on the true masks of the train
    scenes of ``data`` and ``extra_data`` (the first ``limit`` of them, for a quick try) and on the masks the model
    decodes for the first ``decoded_scenes`` train scenes of the last folder (``decoded_masks``; each counted
    ``decoded_repeat`` times), then its ``level`` set on ``data``'s val answers (``calibrate_level`` at ``share``).
    Scored on val's true masks and decoded masks (first ``eval_scenes`` scenes). Writes ``out/model`` and
    ``out/silhouette.json``."""
    from grounding import Grounder
    from grounding.checkpoint import load_checkpoint, save_run

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    model, tokenizer = load_checkpoint(model_dir)
    model.float().eval()
    if "region" not in model.addons:
        raise ValueError(f"the silhouette add-on reads the region head's kinds; the model at {model_dir} has none")
    kinds = list(model.addons["region"].vocab.kinds)
    grounder = Grounder(model, tokenizer, torch.device("cpu"), torch.float32)
    folders = [Path(data), *map(Path, extra_data)]
    crops, labels = gather_masks(folders, "train", kinds)
    crops, labels = crops[:limit], labels[:limit]
    decoded, decoded_labels = decoded_masks(grounder, folders[-1], "train", decoded_scenes, rng, progress=progress)
    held, held_labels = gather_masks([Path(data)], "val", kinds)
    held_decoded, held_decoded_labels = decoded_masks(grounder, data, "val", eval_scenes,
                                                      np.random.default_rng(seed + 1), progress=progress)
    net, report = train_silhouette(crops + decoded * decoded_repeat,
                                   np.r_[labels, np.tile(decoded_labels, decoded_repeat)], len(kinds), steps=steps,
                                   lr=lr, seed=seed, progress=progress)
    report.update(model=str(model_dir), data=[str(f) for f in folders], true_masks=len(crops),
                  decoded_masks=len(decoded), decoded_repeat=decoded_repeat, lr=lr, seed=seed,
                  val={"true masks": accuracy(net, held, held_labels),
                       "decoded masks": accuracy(net, held_decoded, held_decoded_labels)})
    addon = model.add_addon("silhouette", {"kinds": kinds, "level": 0.0}, tokenizer)
    addon.net.load_state_dict(net.state_dict())
    report["calibration"] = calibrate_level(grounder, data, share=share, seed=seed, limit=limit, progress=progress)
    # its review comes right after the region head's, before the add-ons that add targets or count them
    order = [n for n in model.addons if n != "silhouette"]
    order.insert(order.index("region") + 1, "silhouette")
    final = addon.with_settings({"level": report["calibration"]["level"]})
    model.addons = nn.ModuleDict({n: final if n == "silhouette" else model.addons[n] for n in order})
    report["wall_s"] = round(time.perf_counter() - start, 1)
    save_run(model, tokenizer, out, "silhouette", report)
    return report
