"""The default model's stand-in pretraining stages (no pretrained weights can be downloaded here), registered
with the core's training loop under the ``groundseg.stages`` entry point:

Stage 0 (for CLIP and SAM): the vision tower on dense per-patch labels of the synthetic scenes
(shapes/scenes/patch_labels.py), and the whole mask decoder backend (image encoder included) on click/box prompts.
Stage 1 (for LLaVA): the VLM on text answers and, with ``masks: true``, the [SEG] answers with the [SEG]
projection and add-ons; parts named in ``freeze`` (``vision_tower``, ``projector``, ``mask_decoder``,
``image_encoder``) keep their weights; auxiliary tasks keep the tower on its per-patch task (``patch_heads``),
point the phrase's end state at its object's tokens (``pointer_loss``) and make it name the phrase's words
(``phrase_words_loss``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from grounding.data.tasks import Conversation
from grounding.lora import model_part
from grounding.text.tokens import REF_END, REF_START
from grounding.trainer.conversations import ConversationStage, prompt_loss
from grounding.trainer.data import TrainData
from grounding.trainer.stages import Stage, register_stage
from shapes.locator import SegLocator, locator_loss
from shapes.patch_heads import PatchHeads
from shapes.scenes.patch_labels import SceneLabels
from shapes.text_init import unit_scale_init


@dataclass
class StageOptions:
    """patch_loss_weights: per-attribute CE and box L1 of the per-patch task. patch_heads: stage 0's heads file
    (stage 1 keeps the tower on its per-patch task; a further stage 0 starts from them rather than from random
    heads). pointer_loss (stage 1): weight of the pointer task: the state at </ref> points at its object's cells
    (the model's SegLocator when it reads the last layer). phrase_words_loss (stage 1): weight of the phrase-words
    task (the state at </ref> names the words between <ref> and </ref>). reinit_language_model (stage 1 from a
    stage-0 checkpoint): unit-scale init of the language model first (shapes/text_init.py)."""
    patch_loss_weights: tuple[float, float] = (1.0, 10.0)
    patch_heads: str | None = None
    pointer_loss: float = 0.0
    phrase_words_loss: float = 0.0
    reinit_language_model: bool = False

    def __post_init__(self):
        self.patch_loss_weights = tuple(self.patch_loss_weights)


class PatchLoss:
    """Stage 0's per-patch task: heads on the vision tower's tokens against the scenes' labels (also an
    auxiliary task of stage 1 when ``patch_heads`` names stage 0's heads)."""

    def __init__(self, options, data: TrainData, model, heads: str | None = None):
        self.options, self.data = options, data
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
        w_ce, w_box = self.options.patch_loss_weights
        return w_ce * ce + w_box * l1, {"patch_ce": ce.item(), "patch_box_l1": l1.item()}



@register_stage
class PatchStage(Stage):
    """Stage 0, the stand-in for CLIP's and SAM's pretraining: the vision tower learns per-patch labels of the
    scenes (images mirrored at random), the whole mask decoder SAM's click/box task."""

    number = 0
    Options = StageOptions

    def __init__(self, cfg, options, data: TrainData, processor, model):
        self.cfg, self.options, self.data, self.processor = cfg, options, data, processor
        self.image_ids = data.ds.images(cfg.split)
        self.size = len(self.image_ids)
        self.patch = PatchLoss(options, data, model, options.patch_heads)
        self.modules = (self.patch.heads,)

    def loss(self, model, raw, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        ids = [self.image_ids[i] for i in idx]
        flips = (rng.random(len(ids)) < 0.5).tolist()
        images = [self.data.image(i) for i in ids]
        pixels = torch.stack([self.processor.vision_pixels(np.ascontiguousarray(im[:, ::-1]) if f else im)
                              for im, f in zip(images, flips)]).to(next(raw.parameters()).device)
        loss, parts = self.patch(raw.vision_features(pixels), ids, flips)
        if self.cfg.prompts:
            n = self.cfg.prompt_images or len(ids)
            prompt = prompt_loss(raw, self.data, images[:n], ids[:n], rng, self.cfg.prompts_per_image)
            loss, parts["prompt_loss"] = loss + prompt, prompt.item()
        return loss, parts


    @classmethod
    def prepare_model(cls, model, tokenizer, cfg, options) -> None:
        """The vision tower trains, and the whole mask decoder backend when it learns click/box prompts; the
        language model does not."""
        for p in model.parameters():
            p.requires_grad_(False)
        for name in ("vision_tower",) + (("mask_decoder",) if cfg.prompts else ()):
            for p in model_part(model, name).parameters():
                p.requires_grad_(True)

    def save(self, out: Path) -> None:   # the per-patch heads, for shapes/patch_eval.py and stage 1
        save_file(self.patch.heads.state_dict(), str(out / "patch_heads.safetensors"))



@register_stage
class TextStage(ConversationStage):
    """Stage 1, the stand-in for LLaVA's pretraining: every weight trains but the ``freeze`` parts (the [SEG]
    projection and add-ons only with [SEG] answers), with the auxiliary tasks of ``StageOptions``."""

    number = 1
    Options = StageOptions

    def __init__(self, cfg, options, data: TrainData, processor, model):
        super().__init__(cfg, options, data, processor, model)
        self.patch = PatchLoss(options, data, model, options.patch_heads) if options.patch_heads else None
        text = model.llava_config.text_config
        # the pointer task (on last-layer states) trains the model's own [SEG] locator when that one reads the
        # last layer too (more phrases for it to learn from), else a head of its own
        locator = model.addons["locator"] if "locator" in model.addons else None
        shared = locator.net if locator is not None and isinstance(locator.net, SegLocator) \
            and locator.settings.layer == -1 else None
        self.pointer = (shared or SegLocator(text.hidden_size)) if options.pointer_loss else None
        own_pointer = self.pointer if self.pointer is not shared else None
        self.words = nn.Linear(text.hidden_size, len(processor.tokenizer)) if options.phrase_words_loss else None
        self.modules = tuple(m for m in (self.patch and self.patch.heads, own_pointer, self.words) if m)
        if self.pointer:
            self.labels = self.patch.labels if self.patch else SceneLabels(data.ds, model.token_grid)
        self.ref_start = processor.tokenizer.convert_tokens_to_ids(REF_START)
        self.ref_end = processor.tokenizer.convert_tokens_to_ids(REF_END)

    @classmethod
    def on_load(cls, model, cfg, options) -> None:
        if options.reinit_language_model:  # stage 0 never trains the language model: its weights are still random
            unit_scale_init(model.vlm.model.language_model)

    @classmethod
    def prepare_model(cls, model, tokenizer, cfg, options) -> None:
        if isinstance(model.vlm, PeftModel):
            raise ValueError("stage 1 trains the plain VLM; LoRA belongs to stage 2")
        if options.reinit_language_model and not cfg.init:
            raise ValueError("reinit_language_model is for stage 1 from a stage-0 checkpoint (stage: 1, init: ...)")
        for p in model.parameters():
            p.requires_grad_(True)
        for part in (model.seg_projection, model.addons):
            for p in part.parameters():
                p.requires_grad_(cfg.masks)
        for name in cfg.freeze:
            for p in model_part(model, name).parameters():
                p.requires_grad_(False)

    @contextmanager
    def watch(self, raw):
        vlm = raw.vlm.model
        with _catch_output(vlm.vision_tower if self.patch else None, _tower_select(raw)) as tower, \
                _catch_output(vlm.language_model.norm if self.pointer or self.words else None) as last:
            yield SimpleNamespace(tower=tower, last=last)

    def add_losses(self, loss, parts, raw, convs, batch, seen):
        if self.patch:
            patch, patch_parts = self.patch(seen.tower.value, [c.image_id for c in convs], [False] * len(convs))
            loss = loss + patch
            parts.update(patch_parts)
        if self.pointer and (pointer := self.pointer_loss(convs, batch["input_ids"], seen.last.value)) is not None:
            loss = loss + self.options.pointer_loss * pointer
            parts["pointer_loss"] = pointer.item()
        if self.words and (words := self.phrase_words_loss(batch["input_ids"], seen.last.value)) is not None:
            loss = loss + self.options.phrase_words_loss * words
            parts["phrase_words_loss"] = words.item()
        return loss

    def pointer_loss(self, convs: list[Conversation], input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
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

    def phrase_words_loss(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
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

