"""GroundingModel: a LLaVA VLM whose [SEG] hidden states become prompts for a SAM / SAM2 mask decoder.

    image ──► vision tower ─► projector ─┐
    text ─────────────────────────────────► language model ─► last hidden state at each [SEG] (or before it)
                                                                   │ seg_projection: h -> h -> prompt_dim
    image ──► mask decoder's image encoder (frozen) ─► mask decoder ◄┘ one sparse prompt token per [SEG]

Add-ons (grounding/addons/) that a checkpoint names live in ``addons`` and may add decoder prompts beside each
[SEG] (and a loss for them in training).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from grounding.addons import AddOn, DecoderPrompts, SegRead, addon_class, build_addons
from grounding.config import GroundingConfig
from grounding.errors import CheckpointError
from grounding.text.tokens import IMAGE, REF_END, REF_START, SEG
from segdecoder import ImageEmbedding, MaskDecoderBackend, build_decoder


class SegProjection(nn.Module):
    """``[n, hidden]`` -> ``[n, prompt_dim]``: Linear(h, h) -> ReLU -> Linear(h, prompt_dim), as in LISA."""

    def __init__(self, hidden_size: int, prompt_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, prompt_dim))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.net(states)


@dataclass
class GroundingOutput:
    """Losses are scalars (``addon_losses``: each add-on's, before its weight); ``mask_logits[i]`` is
    ``[n_i, H_i, W_i]`` at sample i's original size (one per [SEG]); ``seg_embeddings[i]`` is ``[n_i, prompt_dim]``."""
    loss: torch.Tensor
    ce_loss: torch.Tensor
    bce_loss: torch.Tensor
    dice_loss: torch.Tensor
    addon_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_logits: list[torch.Tensor] = field(default_factory=list)
    seg_embeddings: list[torch.Tensor] = field(default_factory=list)


def dice_per_mask(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - DICE on sigmoid probabilities, per mask: ``[n, H, W]`` (or ``[n, HW]``) each -> ``[n]``."""
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    inter = (prob * target).sum(-1)
    return 1 - (2 * inter + smooth) / (prob.sum(-1) + target.sum(-1) + smooth)


def bce_per_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean BCE, per mask: ``[n, H, W]`` (or ``[n, HW]``) each -> ``[n]``."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return dice_per_mask(logits, target).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return bce_per_mask(logits, target).mean()


class GroundingModel(nn.Module):
    def __init__(self, config: GroundingConfig, vlm: LlavaForConditionalGeneration,
                 mask_decoder: MaskDecoderBackend, seg_token_id: int, ref_token_ids: tuple[int, int],
                 addons: list[AddOn] = ()):
        super().__init__()
        self.config = config
        self.vlm = vlm
        self.mask_decoder = mask_decoder
        self.seg_token_id = seg_token_id
        self.ref_token_ids = ref_token_ids  # <ref>, </ref>
        self.seg_projection = SegProjection(self.llava_config.text_config.hidden_size, mask_decoder.prompt_dim)
        self.addons = nn.ModuleDict({a.name: a for a in addons})

    def add_addon(self, name: str, settings: dict | None, tokenizer: PreTrainedTokenizerBase) -> AddOn:
        """Turn on add-on ``name`` with ``settings`` (a training run's); one the model has is ``grown`` from it,
        keeping its weights."""
        if name in self.addons:
            addon = self.addons[name].grown(self, tokenizer, settings or {})
        else:
            cls = addon_class(name)
            addon = cls(cls.parse_settings(settings))
            addon.attach(self, tokenizer)
            addon.to(self.seg_projection.net[0].weight)
        self.addons[name] = addon
        return addon

    def addon_settings(self) -> dict[str, dict]:
        """``{name: settings}`` of the add-ons the model has (what ``groundseg.json`` stores)."""
        return {name: a.settings_dict() for name, a in self.addons.items()}

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: GroundingConfig, tokenizer: PreTrainedTokenizerBase,
              dtype: torch.dtype = torch.float32) -> "GroundingModel":
        """A model with random weights (``config.vlm``) or the LLaVA folder at ``config.vlm_path``, the
        project's tokens added to its vocabulary, the decoder of ``config.decoder`` and the add-ons of
        ``config.addons``."""
        addons = build_addons(config.addons)
        if config.vlm_path:
            if not (Path(config.vlm_path) / "config.json").is_file():
                raise CheckpointError(
                    f"no LLaVA model at {config.vlm_path} (looked for {Path(config.vlm_path) / 'config.json'}); "
                    "see weights/README.md for the files to place there"
                )
            vlm = LlavaForConditionalGeneration.from_pretrained(config.vlm_path, local_files_only=True, dtype=dtype)
        else:
            vlm = LlavaForConditionalGeneration(LlavaConfig(**config.vlm))
            for addon in addons:
                addon.adapt_vlm(vlm)
            vlm = vlm.to(dtype)
        if len(tokenizer) > vlm.get_input_embeddings().num_embeddings:
            vlm.resize_token_embeddings(len(tokenizer), mean_resizing=config.vlm_path is not None)
        vlm.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
        decoder = build_decoder(**config.decoder, checkpoint=config.decoder_checkpoint)
        model = cls(config, vlm, decoder, tokenizer.convert_tokens_to_ids(SEG),
                    (tokenizer.convert_tokens_to_ids(REF_START), tokenizer.convert_tokens_to_ids(REF_END)), addons)
        for addon in addons:
            addon.attach(model, tokenizer)
        return model.to(dtype)

    @property
    def family(self):
        """The ``ModelFamily`` of this checkpoint (grounding/families/)."""
        from grounding.families import get_family
        return get_family(self.config.family)

    @property
    def llava_config(self) -> LlavaConfig:
        return self.vlm.config

    @property
    def vision_image_size(self) -> int:
        return self.llava_config.vision_config.image_size

    @property
    def token_grid(self) -> int:
        """Side of the vision tower's square patch grid (8 for 64 patch tokens)."""
        vc = self.llava_config.vision_config
        return vc.image_size // vc.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.token_grid ** 2 + (1 if self.llava_config.vision_feature_select_strategy == "full" else 0)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, s, s]`` -> the tower's patch tokens at the layer the VLM reads, ``[B, n, width]`` (no CLS)."""
        config = self.llava_config
        vlm = self.vlm.get_base_model() if hasattr(self.vlm, "get_base_model") else self.vlm   # under LoRA too
        hidden = vlm.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        feats = hidden[config.vision_feature_layer]
        return feats[:, 1:] if config.vision_feature_select_strategy == "default" else feats

    # ---- [SEG] states -----------------------------------------------------------------------------------
    def read_segs(self, last_hidden: torch.Tensor, input_ids: torch.Tensor,
                  mask: torch.Tensor | None = None) -> list[SegRead]:
        """last_hidden ``[B, T, h]``, input_ids ``[B, T]`` (and a bool ``mask [B, T]`` of the tokens whose [SEG]s
        count) -> per sample its [SEG]s in text order: the states ``[n_i, h]`` that stand for them
        (``config.seg_state`` says which) and where they are."""
        is_seg = input_ids == self.seg_token_id
        if mask is not None:
            is_seg &= mask.bool()
        out = []
        for b in range(input_ids.shape[0]):
            pos = is_seg[b].nonzero().flatten()
            state_pos = (pos - 1).clamp(min=0) if self.config.seg_state == "before" else pos  # LISA / GLaMM: the
            out.append(SegRead(last_hidden[b, state_pos], input_ids[b], pos, self.ref_token_ids))  # state before
        return out

    def seg_embeddings(self, last_hidden: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The [SEG] states projected into prompts: per sample ``[n_i, prompt_dim]``, in text order."""
        return [self.seg_projection(s.states) for s in self.read_segs(last_hidden, input_ids, attention_mask)]

    def decode_masks(self, embedding: ImageEmbedding, seg_embeddings: torch.Tensor,
                     prompts: DecoderPrompts | None = None) -> torch.Tensor:
        """Differentiable: ``[n, prompt_dim]`` (and an add-on's clicks / boxes for them) -> mask logits
        ``[n, H, W]`` at the image's original size."""
        p = prompts or DecoderPrompts()
        low_res, _ = self.mask_decoder.mask_logits(embedding, seg_embeddings=seg_embeddings, points=p.points,
                                                   point_labels=p.point_labels, boxes=p.boxes)
        return self.mask_decoder.upscale(low_res, embedding)[:, 0]

    # ---- training forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                decoder_embeddings: list[ImageEmbedding] | None = None,
                gt_masks: list[torch.Tensor] | None = None) -> GroundingOutput:
        """input_ids/attention_mask/labels ``[B, T]``; pixel_values ``[B, 3, s, s]`` (vision tower input);
        decoder_embeddings: one per sample (from ``mask_decoder.encode``); gt_masks[i]: ``[n_i, H_i, W_i]``
        aligned with the [SEG] tokens of sample i in order. Without gt_masks only the CE loss is computed."""
        out = self.vlm(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                       position_ids=position_ids, labels=labels, output_hidden_states=True)
        zero = out.logits.new_zeros(())
        ce = out.loss if labels is not None else zero
        segs = self.read_segs(out.hidden_states[-1], input_ids, attention_mask)
        embeddings = [self.seg_projection(s.states) for s in segs]
        readers = [(a, a.read_batch(self, pixel_values, out.hidden_states, input_ids)) for a in self.addons.values()]
        readers = [(a, images) for a, images in readers if images is not None]
        mask_logits: list[torch.Tensor] = []
        bce, dice = zero, zero
        addon_terms: dict[str, list[torch.Tensor]] = {a.name: [] for a, _ in readers}
        if decoder_embeddings is not None:
            preds, targets = [], []
            for i, (emb, seg) in enumerate(zip(decoder_embeddings, embeddings)):
                if gt_masks is not None and gt_masks[i].shape[0] != seg.shape[0]:
                    raise ValueError(f"sample {i}: {seg.shape[0]} [SEG] tokens but {gt_masks[i].shape[0]} masks")
                prompts = None
                for addon, images in readers:
                    if len(seg):
                        prompts = addon.seg_prompts(self, segs[i], images[i], emb.original_size,
                                                    gt_masks[i] if gt_masks is not None else None)
                        if prompts.loss is not None:
                            addon_terms[addon.name].append(prompts.loss)
                logits = (self.decode_masks(emb, seg, prompts) if len(seg)
                          else seg.new_zeros((0, *emb.original_size)))
                mask_logits.append(logits)
                if gt_masks is not None:
                    preds.append(logits.flatten(1).float())
                    targets.append(gt_masks[i].flatten(1).to(logits.device, torch.float32))
            # Masks of different images have different sizes: losses are per mask, then averaged.
            if preds and sum(p.shape[0] for p in preds):
                bce = torch.cat([bce_loss(p, t).reshape(1).expand(len(p)) for p, t in zip(preds, targets) if len(p)]).mean()
                dice = torch.cat([dice_loss(p, t).reshape(1).expand(len(p)) for p, t in zip(preds, targets) if len(p)]).mean()
        addon_losses = {name: torch.cat(terms).mean() if terms else zero for name, terms in addon_terms.items()}
        w = self.config.loss_weights
        loss = w.ce * ce + w.bce * bce + w.dice * dice
        for addon, _ in readers:
            loss = loss + addon.loss_weight * addon_losses[addon.name]
        return GroundingOutput(loss, ce, bce, dice, addon_losses, mask_logits, embeddings)
