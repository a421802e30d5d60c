"""Conversations with a VLM: stage 2, LISA's recipe (reference §3): LoRA on the language model, new token rows,
lm_head, the [SEG] projection (and add-ons' weights) and SAM's mask decoder; loss 1.0 CE + 2.0 BCE + 0.5 DICE
(+ each add-on's loss), plus SAM's own task on click and box prompts so that the decoder keeps clicks."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from grounding.data.collate import collate, make_sample
from grounding.lora import apply_lora, new_token_ids
from grounding.model import bce_per_mask, dice_per_mask
from grounding.trainer.data import TrainData
from grounding.trainer.stages import Stage, register_stage


def prompt_loss(model, data: TrainData, images: list[np.ndarray], image_ids: list[int], rng: np.random.Generator,
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


@register_stage
class ConversationStage(Stage):
    """Stage 2: the run's conversations (text answers; [SEG] masks when ``cfg.masks``) and SAM's prompt task. A
    stage that adds its own losses overrides ``watch`` (outputs to catch during the forward pass) and
    ``add_losses``."""

    number = 2

    def __init__(self, cfg, options, data: TrainData, processor, model):
        self.cfg, self.options, self.data, self.processor = cfg, options, data, processor
        self.size = len(data.conversations)

    @classmethod
    def prepare_model(cls, model, tokenizer, cfg, options) -> None:
        apply_lora(model, cfg.lora, new_token_ids(model, tokenizer), freeze=cfg.freeze)

    @contextmanager
    def watch(self, raw):
        yield None

    def add_losses(self, loss: torch.Tensor, parts: dict[str, float], raw, convs, batch: dict, seen: Any
                   ) -> torch.Tensor:
        """``loss`` with this stage's own losses added (their values logged in ``parts``)."""
        return loss

    def loss(self, model, raw, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        convs = [self.data.conversations[i] for i in idx]
        samples = [make_sample(self.processor, self.data.image(c.image_id), c.question, c.answer,
                               [self.data.mask(a) for a in c.ann_ids]) for c in convs]
        batch = collate(samples, self.processor, raw)
        with self.watch(raw) as seen:
            result = model(**batch)
        loss, parts = result.loss, {k: getattr(result, k).item() for k in ("ce_loss", "bce_loss", "dice_loss")}
        parts.update({f"{name}_loss": value.item() for name, value in result.addon_losses.items()})
        loss = self.add_losses(loss, parts, raw, convs, batch, seen)
        if self.cfg.prompts:
            n = self.cfg.prompt_images or len(samples)
            prompt = prompt_loss(raw, self.data, [s.image for s in samples[:n]], [c.image_id for c in convs[:n]], rng,
                                 self.cfg.prompts_per_image)
            loss, parts["prompt_loss"] = loss + prompt, prompt.item()
        return loss, parts
