"""Training: ``groundseg train --config FILE [--resume]``.

Stages 0 and 1 stand in for the pretraining a user downloads (CLIP and SAM; LLaVA). Stage 0: the vision tower
learns dense per-patch labels of the synthetic scenes (grounding/data/patch_labels.py) and the whole mask decoder
learns click/box prompts. Stage 1: the VLM learns the text answers (boxes, descriptions, "there is no ...") and,
with ``masks: true``, the [SEG] answers; ``freeze`` keeps stage 0's parts as they are. Stage 2 is
LISA's recipe (reference §3): LoRA on the language model, new token rows, lm_head, [SEG] projection and SAM's
mask decoder; loss 1.0 CE + 2.0 BCE + 0.5 DICE. ``grounding/lora.py`` lists what trains in each stage.

Determinism and resume: the batch of optimizer step ``s`` is a pure function of (seed, s), and accelerate's
``save_state`` keeps model, optimizer, scheduler and RNG states, so a resumed run gives the same weights as
an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from grounding.checkpoint import load_checkpoint, save_checkpoint
from grounding.config import LoraSettings
from grounding.data.collate import collate, make_sample
from grounding.data.patch_labels import SceneLabels
from grounding.data.refer import ReferDataset
from grounding.data.tasks import Conversation, build_conversations
from grounding.images import load_image
from grounding.lora import apply_lora, new_token_ids, set_stage0_trainable, set_stage1_trainable
from grounding.model import bce_per_mask, dice_per_mask
from grounding.patch_heads import PatchHeads, vision_features
from grounding.presets import build_random
from grounding.processor import GroundingProcessor
from grounding.seg_locator import SegLocator, locator_loss
from grounding.text_init import unit_scale_init
from grounding.tokens import REF_END, REF_START


@dataclass
class TrainConfig:
    """data: a REFER folder (synthetic or real); init: checkpoint to start from (stage 2 starts from stage 1's
    ``model``), else a random model of ``vlm_preset`` + ``decoder``. Batches are per process."""
    data: str
    out: str
    stage: int = 2                  # 0: vision tower + SAM pretraining; 1: VLM pretraining; 2: LISA's recipe
    init: str | None = None
    dataset: str = "refcoco"
    split_by: str = "unc"
    split: str = "train"
    vlm_preset: str = "small"
    decoder: dict[str, Any] = field(default_factory=lambda: {"backend": "sam", "preset": "tiny"})
    kinds: tuple[str, ...] = ("seg", "rec", "no_target", "multi", "region")
    seg_box_fraction: float = 0.5   # seg answers that write the box before [SEG]; the others make the mask come
                                    # from the image alone (with the box in the text, the mask can copy it)
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup: int = 100
    save_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "auto"   # auto: bf16 on GPU, none on CPU
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompts_per_image: int = 3      # click/box prompts per image for the mask decoder
    prompt_images: int | None = None  # images of each batch that get them (default: all)
    masks: bool | None = None       # [SEG] answers with mask losses; default: stage 2 only. Stage 1 with masks
                                    # stands in for pretrained features that know where objects are
    prompts: bool = True            # SAM's click/box task too. In stage 2 it keeps the fine-tuned mask decoder
                                    # from forgetting clicks (trained on [SEG] alone, it does; the app needs both)
    vocab_size: int = 1024          # from scratch: size of the tokenizer trained on the data
    merge_lora: bool = True
    freeze: tuple[str, ...] = ()    # parts that keep their weights: stage 1 vision_tower, projector, mask_decoder,
                                    # image_encoder; stage 2 mask_decoder, seg_projection, seg_locator
    patch_loss_weights: tuple[float, float] = (1.0, 10.0)  # stage 0: per-attribute CE, box L1
    patch_heads: str | None = None  # stage 0's heads file: stage 1 keeps the tower on its per-patch task; a
    # further stage 0 starts from the heads it had (not from random ones, which cost its first ~100 steps)
    pointer_loss: float = 0.0       # stage 1 on synthetic data: weight of the pointer task: the state at </ref> (of
                                    # box answers too) points at its object's cells (the model's SegLocator if any)
    phrase_words_loss: float = 0.0  # stage 1: weight of the phrase-words task (the state at </ref> names the
                                    # words between <ref> and </ref>; it teaches a model from scratch to
                                    # gather a phrase into one state)
    reinit_language_model: bool = False  # stage 1 from a stage-0 checkpoint: text_init.unit_scale_init first
    seg_locator: bool = False       # stages 1-2: each [SEG] also clicks where its state points among the image
                                    # tokens (grounding/seg_locator.py); added if the init checkpoint has none
    seg_locator_words: bool = False  # ... and its query reads the <ref> phrase's words too (added likewise)
    seg_locator_layer: int | None = None  # ... and scores the image tokens at this layer (GroundingConfig's)
    seg_locator_fusion: int = 0      # ... or a FusionLocator of this many layers (grounding/seg_locator.py)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        self.kinds, self.betas, self.freeze = tuple(self.kinds), tuple(self.betas), tuple(self.freeze)
        self.patch_loss_weights = tuple(self.patch_loss_weights)
        if self.stage not in (0, 1, 2):
            raise ValueError(f"stage must be 0, 1 or 2, got {self.stage}")
        if self.masks is None:
            self.masks = self.stage == 2
        if self.reinit_language_model and (self.stage != 1 or not self.init):
            raise ValueError("reinit_language_model is for stage 1 from a stage-0 checkpoint (stage: 1, init: ...)")

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the (global) batch of ``step``: epochs are seeded permutations, concatenated."""
    start = step * batch_size
    out, pos = [], start
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[offset:offset + batch_size - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return np.asarray(out)


class _Data:
    """Conversations and the images and masks they need, with small LRU caches (decoding PNGs and polygons
    costs more than the tiny models' forward passes)."""

    def __init__(self, cfg: TrainConfig):
        self.ds = ReferDataset(cfg.data, dataset=cfg.dataset, split_by=cfg.split_by)
        self.conversations: list[Conversation] = build_conversations(
            self.ds, cfg.split, cfg.seed, with_masks=cfg.masks, kinds=cfg.kinds, seg_box_fraction=cfg.seg_box_fraction)
        if not self.conversations:
            raise ValueError(f"no training conversations in split {cfg.split!r} of {cfg.data}")
        self.anns_by_image: dict[int, list[int]] = {}
        for ref in self.ds.refs(cfg.split):
            anns = self.anns_by_image.setdefault(ref.image_id, [])
            if ref.ann_id not in anns:
                anns.append(ref.ann_id)
        self._images: OrderedDict[int, np.ndarray] = OrderedDict()
        self._masks: OrderedDict[int, np.ndarray] = OrderedDict()

    def image(self, image_id: int) -> np.ndarray:
        return _cached(self._images, image_id, lambda: load_image(self.ds.image_path(image_id)), 4096)

    def mask(self, ann_id: int) -> np.ndarray:
        return _cached(self._masks, ann_id, lambda: self.ds.mask(ann_id), 8192)


def _cached(cache: OrderedDict, key, make, limit: int):
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    cache[key] = value = make()
    if len(cache) > limit:
        cache.popitem(last=False)
    return value


def _prompt_loss(model, data: _Data, images: list[np.ndarray], image_ids: list[int], rng: np.random.Generator,
                 per_image: int) -> torch.Tensor:
    """SAM's task on click and box prompts, for whatever part of the mask decoder trains (all of it in stage 1,
    the light decoder in stage 2)."""
    backend = model.mask_decoder
    encoder_trains = any(p.requires_grad for p in backend.frozen_image_encoder_module().parameters())
    embeddings = backend.encode_with_grad(images) if encoder_trains else backend.encode(images)
    losses = []
    device = next(model.parameters()).device
    for emb, image_id in zip(embeddings, image_ids):
        anns = data.anns_by_image.get(image_id, [])
        for ann in rng.permutation(anns)[:per_image]:
            mask = data.mask(int(ann))
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            points = labels = boxes = None
            if rng.random() < 0.5:  # a box, jittered as a user would draw it
                x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                w, h = x2 - x1, y2 - y1
                box = np.array([x1, y1, x2, y2], np.float64) + 0.1 * np.array([w, h, w, h]) * rng.uniform(-1, 1, 4)
                H, W = mask.shape
                box = np.clip(box, 0, [W, H, W, H])
                box[2:] = np.maximum(box[2:], box[:2] + 1)  # keep x2 > x1 after clipping
                boxes = torch.tensor(box[None], dtype=torch.float32, device=device)
            else:  # 1-3 clicks inside the object
                k = int(rng.integers(1, 4))
                i = rng.integers(len(xs), size=k)
                points = torch.tensor(np.stack([xs[i], ys[i]], 1)[None] + 0.5, dtype=torch.float32, device=device)
                labels = torch.ones((1, k), dtype=torch.long, device=device)
            # SAM's recipe: one click is ambiguous, so it gets 3 masks and only the best one is penalised;
            # the IoU head learns each mask's real IoU (the predictor picks the best of 3 by it).
            multimask = points is not None and points.shape[1] == 1
            low, iou_pred = backend.mask_logits(emb, points=points, point_labels=labels, boxes=boxes, multimask=multimask)
            logits = backend.upscale(low, emb)[0].flatten(1).float()          # [M, H*W]
            target = torch.from_numpy(mask).to(device).flatten()[None].float().expand_as(logits)
            w = model.config.loss_weights
            per_mask = w.bce * bce_per_mask(logits, target) + w.dice * dice_per_mask(logits, target)
            with torch.no_grad():
                hard = logits > 0
                actual_iou = (hard & target.bool()).sum(-1) / (hard | target.bool()).sum(-1).clamp(min=1)
            losses.append(per_mask.min() + F.mse_loss(iou_pred[0].float(), actual_iou.float()))
    return torch.stack(losses).mean() if losses else torch.zeros((), device=device)


class _ConversationTask:
    """Stages 1 and 2: conversations (text answers; [SEG] masks when ``cfg.masks``), plus SAM's prompt task
    and, with ``cfg.patch_heads``, stage 0's per-patch task on the batch's images."""

    def __init__(self, cfg: TrainConfig, data: _Data, processor: GroundingProcessor, model):
        self.cfg, self.data, self.processor = cfg, data, processor
        self.size = len(data.conversations)
        self.patch = _PatchLoss(cfg, data, model, cfg.patch_heads) if cfg.patch_heads else None
        text = model.llava_config.text_config
        # the pointer task (on last-layer states) trains the model's own [SEG] locator when that one reads the
        # last layer too (more phrases for it to learn from), else a head of its own
        shared = model.seg_locator if model.config.seg_locator_layer == -1 and isinstance(model.seg_locator, SegLocator) \
            else None
        self.pointer = (shared or SegLocator(text.hidden_size)) if cfg.pointer_loss else None
        own_pointer = self.pointer if self.pointer is not shared else None
        self.words = nn.Linear(text.hidden_size, len(processor.tokenizer)) if cfg.phrase_words_loss else None
        self.modules: tuple[nn.Module, ...] = tuple(
            m for m in (self.patch and self.patch.heads, own_pointer, self.words) if m)
        if self.pointer:
            self.labels = self.patch.labels if self.patch else SceneLabels(data.ds, model.token_grid)
        self.ref_start = processor.tokenizer.convert_tokens_to_ids(REF_START)
        self.ref_end = processor.tokenizer.convert_tokens_to_ids(REF_END)

    def loss(self, model, raw, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        convs = [self.data.conversations[i] for i in idx]
        samples = [make_sample(self.processor, self.data.image(c.image_id), c.question, c.answer,
                               [self.data.mask(a) for a in c.ann_ids]) for c in convs]
        vlm = raw.vlm.model
        batch = collate(samples, self.processor, raw)
        with _catch_output(vlm.vision_tower if self.patch else None, _tower_select(raw)) as tower, \
                _catch_output(vlm.language_model.norm if self.pointer or self.words else None) as last:
            result = model(**batch)
        loss, parts = result.loss, {k: getattr(result, k).item() for k in ("ce_loss", "bce_loss", "dice_loss")}
        if raw.seg_locator is not None:
            parts["locate_loss"] = result.locate_loss.item()
        if self.patch:
            patch, patch_parts = self.patch(tower.value, [c.image_id for c in convs], [False] * len(convs))
            loss = loss + patch
            parts.update(patch_parts)
        if self.pointer and (pointer := self._pointer_loss(convs, batch["input_ids"], last.value)) is not None:
            loss = loss + self.cfg.pointer_loss * pointer
            parts["pointer_loss"] = pointer.item()
        if self.words and (words := self._phrase_words_loss(batch["input_ids"], last.value)) is not None:
            loss = loss + self.cfg.phrase_words_loss * words
            parts["phrase_words_loss"] = words.item()
        if self.cfg.prompts:
            n = self.cfg.prompt_images or len(samples)
            prompt = _prompt_loss(raw, self.data, [s.image for s in samples[:n]], [c.image_id for c in convs[:n]], rng,
                                  self.cfg.prompts_per_image)
            loss, parts["prompt_loss"] = loss + prompt, prompt.item()
        return loss, parts

    def _pointer_loss(self, convs: list[Conversation], input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
        """The pointer task on the batch's one-object conversations: query = the state at the answer's first
        ``</ref>``, targets = the image tokens whose cell that object covers most."""
        rows, queries, targets = [], [], []
        image_token = self.processor.image_token_id
        for b, conv in enumerate(convs):
            end = _first_index(input_ids[b], self.ref_end)
            if len(conv.ann_ids) != 1 or end is None:
                continue
            cells = self.labels(conv.image_id, mask=self.data.mask).objects
            target = torch.from_numpy(cells == self.labels.object_index(conv.image_id, conv.ann_ids[0]))
            if target.any():
                rows.append(b)
                queries.append(end)
                targets.append(target)
        if not rows:
            return None
        rows_t = torch.tensor(rows)
        image = torch.stack([hidden[b, input_ids[b] == image_token] for b in rows])
        scores = self.pointer(hidden[rows_t, torch.tensor(queries)][:, None], image)[:, 0]    # [rows, g*g]
        return locator_loss(scores, torch.stack(targets).to(hidden.device))

    def _phrase_words_loss(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
        """input_ids ``[B, T]``, hidden ``[B, T, h]`` (last layer): from the state at each row's first ``</ref>``,
        which tokens lie between it and the ``<ref>`` before it (multi-label BCE summed over the vocabulary,
        mean over phrases)."""
        queries, targets = [], []
        for b in range(len(input_ids)):
            start, end = _first_index(input_ids[b], self.ref_start), _first_index(input_ids[b], self.ref_end)
            if start is None or end is None or start >= end:
                continue
            target = hidden.new_zeros(self.words.out_features)
            target[input_ids[b, start + 1:end]] = 1.0
            queries.append(hidden[b, end])
            targets.append(target)
        if not queries:
            return None
        logits = self.words(torch.stack(queries))
        return F.binary_cross_entropy_with_logits(logits, torch.stack(targets), reduction="sum") / len(queries)


def _first_index(ids: torch.Tensor, token_id: int) -> int | None:
    """Position of ``token_id``'s first occurrence in the 1-D ``ids``, or None."""
    hits = (ids == token_id).nonzero()
    return int(hits[0]) if len(hits) else None


@contextmanager
def _catch_output(module: nn.Module | None, select=lambda output: output):
    """Within the block, ``.value`` is ``select(output)`` of the module's last forward (a forward hook: the
    training pass itself feeds the auxiliary heads, no second pass). ``module`` None catches nothing."""
    catch = SimpleNamespace(value=None)
    if module is None:
        yield catch
        return

    def hook(mod, args, output):
        catch.value = select(output)

    handle = module.register_forward_hook(hook)
    try:
        yield catch
    finally:
        handle.remove()


def _tower_select(model):
    """The tower's output -> its tokens at the VLM's feature layer, as ``vision_features`` gives them."""
    config = model.llava_config

    def select(output):
        feats = output.hidden_states[config.vision_feature_layer]
        return feats[:, 1:] if config.vision_feature_select_strategy == "default" else feats
    return select


class _PatchLoss:
    """Stage 0's per-patch task: heads on the vision tower's tokens against the scenes' labels (also an
    auxiliary task of stage 1 when ``patch_heads`` names stage 0's heads)."""

    def __init__(self, cfg: TrainConfig, data: _Data, model, heads: str | None = None):
        self.cfg, self.data = cfg, data
        self.labels = SceneLabels(data.ds, model.token_grid)
        self.heads = PatchHeads(model.llava_config.vision_config.hidden_size)
        if heads:
            self.heads.load_state_dict(load_file(heads))

    def __call__(self, features: torch.Tensor, image_ids: list[int], flips: list[bool]) -> tuple[torch.Tensor, dict[str, float]]:
        """features ``[B, n, width]`` (``vision_features``) of the images of ``image_ids``, mirrored where
        ``flips`` says."""
        labels = [self.labels(i, f, mask=self.data.mask) for i, f in zip(image_ids, flips)]
        classes = torch.from_numpy(np.stack([l.classes for l in labels])).to(features.device)
        boxes = torch.from_numpy(np.stack([l.boxes for l in labels])).to(features.device)
        ce, l1 = self.heads.losses(features, classes, boxes)
        w_ce, w_box = self.cfg.patch_loss_weights
        return w_ce * ce + w_box * l1, {"patch_ce": ce.item(), "patch_box_l1": l1.item()}


class _PatchTask:
    """Stage 0: the vision tower learns per-patch labels (images mirrored at random), SAM its prompt task."""

    def __init__(self, cfg: TrainConfig, data: _Data, processor: GroundingProcessor, model):
        self.cfg, self.data, self.processor = cfg, data, processor
        self.image_ids = data.ds.images(cfg.split)
        self.size = len(self.image_ids)
        self.patch = _PatchLoss(cfg, data, model, cfg.patch_heads)
        self.modules = (self.patch.heads,)

    def loss(self, model, raw, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        ids = [self.image_ids[i] for i in idx]
        flips = (rng.random(len(ids)) < 0.5).tolist()
        images = [self.data.image(i) for i in ids]
        pixels = torch.stack([self.processor.vision_pixels(np.ascontiguousarray(im[:, ::-1]) if f else im)
                              for im, f in zip(images, flips)]).to(next(raw.parameters()).device)
        loss, parts = self.patch(vision_features(raw, pixels), ids, flips)
        if self.cfg.prompts:
            n = self.cfg.prompt_images or len(ids)
            prompt = _prompt_loss(raw, self.data, images[:n], ids[:n], rng, self.cfg.prompts_per_image)
            loss, parts["prompt_loss"] = loss + prompt, prompt.item()
        return loss, parts


def _initial_model(cfg: TrainConfig, data: "_Data"):
    if cfg.init:
        model, tokenizer = load_checkpoint(cfg.init)
        if cfg.reinit_language_model:  # stage 0 never trains the language model: its weights are still random
            unit_scale_init(model.vlm.model.language_model)
    else:  # the tokenizer learns the words of the training text
        corpus = [t for c in data.conversations for t in (c.question, c.answer)]
        model, tokenizer = build_random(cfg.vlm_preset, cfg.decoder, seed=cfg.seed, corpus=corpus,
                                        vocab_size=cfg.vocab_size)
    if cfg.seg_locator or cfg.seg_locator_words or cfg.seg_locator_fusion:
        model.add_seg_locator(words=cfg.seg_locator_words, fusion=cfg.seg_locator_fusion)
    if cfg.seg_locator_layer is not None:
        model.config.seg_locator_layer = cfg.seg_locator_layer
    if cfg.stage == 0:
        set_stage0_trainable(model, prompts=cfg.prompts)
    elif cfg.stage == 1:
        set_stage1_trainable(model, seg=cfg.masks, freeze=cfg.freeze)
    else:
        apply_lora(model, cfg.lora, new_token_ids(model, tokenizer), freeze=cfg.freeze)
    return model, tokenizer


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return steps[-1] if steps else None


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> Path | None:
    """Run (or resume) one stage; returns the directory of the final checkpoint (``OUT/model``).

    stop_after: end this run after that global step, with its state saved (a time-boxed run that a later
    ``resume`` continues exactly); returns None then."""
    out = Path(cfg.out)
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    data = _Data(cfg)
    model, tokenizer = _initial_model(cfg, data)
    processor = GroundingProcessor(tokenizer, model.config, model.vision_image_size, model.num_image_tokens)
    task = (_PatchTask if cfg.stage == 0 else _ConversationTask)(cfg, data, processor, model)
    params = [p for p in model.parameters() if p.requires_grad] + [p for m in task.modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    model, *task.modules, optimizer, scheduler = accelerator.prepare(model, *task.modules, optimizer, scheduler)
    raw = accelerator.unwrap_model(model)
    start = 0
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        accelerator.load_state(str(ckpt))
        start = int(ckpt.name.split("_")[1])
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log_path = out / "log.jsonl"
    if accelerator.is_main_process and log_path.is_file():  # a resumed run redoes the steps after its checkpoint
        kept = [l for l in log_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start]
        log_path.write_text("".join(l + "\n" for l in kept))
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.batch_size * cfg.grad_accum
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (progress and accelerator.is_main_process),
               desc=f"stage {cfg.stage}", unit="step")
    t0 = time.time()
    for step in bar:
        model.train()
        idx = batch_indices(step, task.size, per_step * world, cfg.seed)
        idx = idx[rank * per_step:(rank + 1) * per_step]
        rng = np.random.default_rng([cfg.seed, step, rank, 7])
        parts: dict[str, float] = {"loss": 0.0}
        for micro in range(cfg.grad_accum):
            with accelerator.autocast():
                loss, micro_parts = task.loss(model, raw, idx[micro * cfg.batch_size:(micro + 1) * cfg.batch_size], rng)
            accelerator.backward(loss / cfg.grad_accum)
            for k, v in {"loss": loss.item(), **micro_parts}.items():
                parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if accelerator.is_main_process:
            record = {"step": step + 1, "lr": scheduler.get_last_lr()[0], "time_s": round(time.time() - t0, 2),
                      **{k: round(v, 5) for k, v in parts.items()}}
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{parts['loss']:.3f}")
        stopping = stop_after is not None and step + 1 >= stop_after and step + 1 < cfg.steps
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stopping:
            _save_state(accelerator, out, step + 1, cfg.keep_checkpoints)
            if accelerator.is_main_process:  # a usable model of the run so far, and its curve
                save_checkpoint(raw, tokenizer, out / "model", merge_lora=cfg.merge_lora)
                if getattr(task, "patch", None):  # the per-patch heads, for grounding/patch_eval.py and stage 1
                    save_file(task.patch.heads.state_dict(), str(out / "patch_heads.safetensors"))
                plot_losses(log_path, out / "loss.png")
        if stopping:
            return None
    accelerator.wait_for_everyone()
    return out / "model"  # written with the last step's state


def _save_state(accelerator: Accelerator, out: Path, step: int, keep: int) -> None:
    """A training state (model, optimizer, scheduler, RNG) per N steps; only the newest ``keep`` stay."""
    path = out / "checkpoints" / f"step_{step}"
    tmp = path.with_name(f".tmp_step_{step}")
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        tmp.rename(path)  # a crash mid-save leaves only a .tmp folder, which resume ignores
        olds = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-keep]
        import shutil
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)


def plot_losses(log_path: Path, png_path: Path) -> Path | None:
    """Loss curves of a ``log.jsonl`` as a PNG (a moving average over noisy steps)."""
    if not log_path.is_file():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = np.array([r["step"] for r in records])
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = list(dict.fromkeys(k for r in records for k in r if k not in ("step", "lr", "time_s")))
    for key in keys:
        values = np.array([r.get(key, 0.0) for r in records])
        if not values.any():
            continue
        k = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
