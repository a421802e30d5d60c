"""GroundingModel: a LLaVA VLM whose [SEG] hidden states become prompts for a SAM / SAM2 mask decoder.

    image ──► vision tower ─► projector ─┐
    text ─────────────────────────────────► language model ─► last hidden state at each [SEG] (or before it)
                                                                   │ seg_projection: h -> h -> prompt_dim
    image ──► mask decoder's image encoder (frozen) ─► mask decoder ◄┘ one sparse prompt token per [SEG]

With ``config.seg_locator`` each [SEG] also brings a click: where its state points among the image tokens
(grounding/seg_locator.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from grounding.config import GroundingConfig
from grounding.errors import CheckpointError
from grounding.locator_mirror import combine, mirror_ids
from grounding.patch_heads import vision_features
from grounding.projector_norm import install_projector_norm
from grounding.seg_locator import (FusionLocator, Phrases, SegLocator, box_loss, cell_centres, locator_loss,
                                   mask_cells, peak_cells, square_boxes, square_to_pixels)
from grounding.tokens import IMAGE, REF_END, REF_START, SEG
from grounding.vision_stem import install_vision_stem
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
    """Losses are scalars; ``mask_logits[i]`` is ``[n_i, H_i, W_i]`` at sample i's original size (one per [SEG]);
    ``seg_embeddings[i]`` is ``[n_i, prompt_dim]``."""
    loss: torch.Tensor
    ce_loss: torch.Tensor
    bce_loss: torch.Tensor
    dice_loss: torch.Tensor
    locate_loss: torch.Tensor
    mask_logits: list[torch.Tensor] = field(default_factory=list)
    seg_embeddings: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Located:
    """What the [SEG] locator found for one image's n [SEG]s: ``scores [n, g*g]``; ``box_map [n, g*g, 4]`` (the
    box read at each cell, fractions of the padded square; None for a ``SegLocator``); the decoder prompts
    ``clicks [n, 1, 2]`` pixel xy and ``boxes [n, 4]`` pixel xyxy (or None)."""
    scores: torch.Tensor
    box_map: torch.Tensor | None
    clicks: torch.Tensor
    boxes: torch.Tensor | None

    def decoder_prompts(self, click: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(clicks, boxes) for the mask decoder: the click is left out when ``click`` is False and a box exists
        (``GroundingConfig.locator_click``)."""
        return (self.clicks if click or self.boxes is None else None), self.boxes


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
                 mask_decoder: MaskDecoderBackend, seg_token_id: int, ref_token_ids: tuple[int, int]):
        super().__init__()
        self.config = config
        self.vlm = vlm
        self.mask_decoder = mask_decoder
        self.seg_token_id = seg_token_id
        self.ref_token_ids = ref_token_ids  # <ref>, </ref>
        self.seg_projection = SegProjection(self.llava_config.text_config.hidden_size, mask_decoder.prompt_dim)
        self.seg_locator: SegLocator | FusionLocator | None = None
        hidden = self.llava_config.text_config.hidden_size
        if config.seg_locator and config.seg_locator_fusion:
            self.seg_locator = self._fusion_locator(config.seg_locator_fusion)
        elif config.seg_locator:
            self.seg_locator = SegLocator(hidden, words=config.seg_locator_words)

    def add_seg_locator(self, words: bool = False, fusion: int = 0) -> None:
        """Give a model built without them a (new, untrained) [SEG] locator / its phrase-words query, or a
        ``FusionLocator`` of ``fusion`` layers (which replaces any ``SegLocator``; a trained ``FusionLocator`` of
        fewer layers is kept and deepened, ``FusionLocator.deepened``)."""
        hidden = self.llava_config.text_config.hidden_size
        like = self.seg_projection.net[0].weight
        if fusion:
            have = self.config.seg_locator_fusion if isinstance(self.seg_locator, FusionLocator) else 0
            if 0 < have < fusion:  # a trained locator grows new layers that start as the identity
                self.seg_locator = self.seg_locator.deepened(fusion)
            elif have != fusion:
                self.seg_locator = self._fusion_locator(fusion).to(like)
            self.config.seg_locator, self.config.seg_locator_fusion, self.config.seg_locator_words = True, fusion, False
            return
        if isinstance(self.seg_locator, FusionLocator):
            return
        if self.seg_locator is None:
            self.config.seg_locator = True
            self.seg_locator = SegLocator(hidden).to(like)
        if words:
            self.config.seg_locator_words = True
            self.seg_locator.add_words()

    def _fusion_locator(self, layers: int) -> FusionLocator:
        return FusionLocator(self.llava_config.text_config.hidden_size, self.token_grid, layers=layers,
                             image_size=self.llava_config.vision_config.hidden_size)

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: GroundingConfig, tokenizer: PreTrainedTokenizerBase,
              dtype: torch.dtype = torch.float32) -> "GroundingModel":
        """A model with random weights (``config.vlm``) or the LLaVA folder at ``config.vlm_path``, the
        project's tokens added to its vocabulary, and the decoder of ``config.decoder``."""
        if config.vlm_path:
            from pathlib import Path
            if not (Path(config.vlm_path) / "config.json").is_file():
                raise CheckpointError(
                    f"no LLaVA model at {config.vlm_path} (looked for {Path(config.vlm_path) / 'config.json'}); "
                    "see weights/README.md for the files to place there"
                )
            vlm = LlavaForConditionalGeneration.from_pretrained(config.vlm_path, local_files_only=True, dtype=dtype)
        else:
            vlm = LlavaForConditionalGeneration(LlavaConfig(**config.vlm))
            install_vision_stem(vlm.model.vision_tower, config.vision_stem)
            if config.projector_norm:
                install_projector_norm(vlm.model.multi_modal_projector, vlm.config.vision_config.hidden_size)
            vlm = vlm.to(dtype)
        if len(tokenizer) > vlm.get_input_embeddings().num_embeddings:
            vlm.resize_token_embeddings(len(tokenizer), mean_resizing=config.vlm_path is not None)
        vlm.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
        decoder = build_decoder(**config.decoder, checkpoint=config.decoder_checkpoint)
        model = cls(config, vlm, decoder, tokenizer.convert_tokens_to_ids(SEG),
                    (tokenizer.convert_tokens_to_ids(REF_START), tokenizer.convert_tokens_to_ids(REF_END)))
        return model.to(dtype)

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

    # ---- [SEG] states -----------------------------------------------------------------------------------
    def seg_states(self, last_hidden: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """last_hidden ``[B, T, h]``, input_ids ``[B, T]`` -> per sample the states ``[n_i, h]`` that stand for
        its [SEG] tokens, in text order (``config.seg_state`` says which)."""
        is_seg = input_ids == self.seg_token_id
        if attention_mask is not None:
            is_seg &= attention_mask.bool()
        out = []
        for b in range(input_ids.shape[0]):
            pos = is_seg[b].nonzero().flatten()
            if self.config.seg_state == "before":  # LISA / GLaMM: the state that predicts [SEG]
                pos = (pos - 1).clamp(min=0)
            out.append(last_hidden[b, pos])
        return out

    def seg_embeddings(self, last_hidden: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The [SEG] states projected into prompts: per sample ``[n_i, prompt_dim]``, in text order."""
        return [self.seg_projection(s) for s in self.seg_states(last_hidden, input_ids, attention_mask)]

    def seg_phrase_ids(self, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> list[list[torch.Tensor]]:
        """Per sample, for each [SEG] (the same ones as ``seg_states``), the token ids ``[L]`` of the words of the
        last ``<ref>..</ref>`` before it (empty when there is none, as in LISA's "[SEG].")."""
        start_id, end_id = self.ref_token_ids
        is_seg = input_ids == self.seg_token_id
        if attention_mask is not None:
            is_seg &= attention_mask.bool()
        out = []
        for b, ids in enumerate(input_ids):
            starts, ends = (ids == start_id).nonzero().flatten().tolist(), (ids == end_id).nonzero().flatten().tolist()
            rows = []
            for pos in is_seg[b].nonzero().flatten().tolist():
                end = max((e for e in ends if e < pos), default=None)
                start = max((s for s in starts if end is not None and s < end), default=None)
                rows.append(ids[start + 1:end] if start is not None else ids[:0])
            out.append(rows)
        return out

    def seg_phrases(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    mirror_table: torch.Tensor | None = None) -> list[Phrases]:
        """Per sample, each [SEG]'s phrase (``seg_phrase_ids``) as input embeddings (grounding/seg_locator.py);
        with ``mirror_table`` (``locator_mirror.mirror_token_ids``) each also carries its mirrored phrase."""
        return [self.phrases(rows, mirror_table) for rows in self.seg_phrase_ids(input_ids, attention_mask)]

    def phrases(self, rows: list[torch.Tensor], mirror_table: torch.Tensor | None = None) -> Phrases:
        """Token ids ``[L_i]`` per phrase -> ``Phrases`` (and their mirrored twins with ``mirror_table``)."""
        embed = self.vlm.get_input_embeddings()
        out = Phrases.stack([embed(ids) for ids in rows], embed.weight.shape[1], embed.weight)
        if mirror_table is not None:
            out.mirrored = self.phrases([mirror_ids(ids, mirror_table) for ids in rows])
        return out

    @property
    def has_fusion_locator(self) -> bool:
        """Whether the [SEG] locator is a ``FusionLocator`` (which reads the tower's features, not LM states)."""
        return isinstance(self.seg_locator, FusionLocator)

    @property
    def reads_phrases(self) -> bool:
        """Whether the [SEG] locator reads each [SEG]'s phrase."""
        return self.seg_locator is not None and (self.config.seg_locator_words or self.config.seg_locator_fusion > 0)

    def image_states(self, hidden_states: tuple[torch.Tensor, ...], input_ids: torch.Tensor) -> torch.Tensor:
        """The states of the image's patch tokens at the language model's layer ``config.seg_locator_layer`` of
        ``hidden_states`` (each ``[B, T, h]``; 0 = its input, the projected vision features): ``[B, g*g, h]``,
        row-major over the token grid (a CLS token, with ``vision_feature_select_strategy="full"``, is dropped)."""
        states = hidden_states[self.config.seg_locator_layer]
        is_image = input_ids == self.llava_config.image_token_id
        return torch.stack([states[b, is_image[b]] for b in range(len(input_ids))])[:, -self.token_grid ** 2:]

    def locator_keys(self, hidden_states: tuple[torch.Tensor, ...] | None, input_ids: torch.Tensor,
                     pixel_values: torch.Tensor) -> torch.Tensor:
        """What the [SEG] locator scores, ``[B, g*g, width]``: for a ``FusionLocator`` the vision tower's patch
        features (the projector's input, which keep more of what the tower knows than the projector's output
        does: a bag-of-words locator trained 1,000 steps on each found the val objects 55% against 38% of the
        time), else ``image_states``."""
        if self.has_fusion_locator:
            return vision_features(self, pixel_values)
        return self.image_states(hidden_states, input_ids)

    def locate(self, states: torch.Tensor, image_states: torch.Tensor, phrases: Phrases | None,
               size: tuple[int, int], targets: torch.Tensor | None = None,
               ranks: torch.Tensor | None = None, mirrored_states: torch.Tensor | None = None) -> Located:
        """One image's [SEG]s (states ``[n, h]``, ``locator_keys`` ``[g*g, width]``, phrases) -> the locator's
        scores and prompts for the mask decoder in the ``size = (H, W)`` image: a click at the best cell's centre,
        and the box the locator reads there (a ``FusionLocator``). In training (``targets`` bool ``[n, g*g]``) the
        best cell *on* the object, so the decoder learns to segment what is under a click that is right.
        ``ranks`` ``[n]`` (``Phrases.repeats``): a [SEG] repeating an earlier one's phrase takes the next peak.
        ``mirrored_states`` (the ``locator_keys`` of the image flipped left-right) with ``phrases.mirrored``: a
        ``FusionLocator`` reads both and adds them (grounding/locator_mirror.py); scores are then log-probabilities."""
        if not len(states):
            return Located(states.new_zeros((0, self.token_grid ** 2)), None, states.new_zeros((0, 1, 2)),
                           states.new_zeros((0, 4)) if self.has_fusion_locator else None)
        scores, box_map = self.seg_locator.locate(states, image_states, phrases)
        if mirrored_states is not None and phrases is not None and phrases.mirrored is not None \
                and self.has_fusion_locator:
            scores, box_map = combine(scores, box_map, *self.seg_locator.locate(states, mirrored_states,
                                                                                phrases.mirrored), self.token_grid)
        pick = scores.detach()
        if targets is not None:
            pick = torch.where(targets.any(-1, keepdim=True) & ~targets, float("-inf"), pick)
        cells = pick.argmax(-1) if ranks is None else peak_cells(pick, self.token_grid, ranks)
        clicks = cell_centres(cells, self.token_grid, size)[:, None]
        boxes = None if box_map is None else square_to_pixels(box_map.detach()[torch.arange(len(cells)), cells], size)
        return Located(scores, box_map, clicks, boxes)

    def decode_masks(self, embedding: ImageEmbedding, seg_embeddings: torch.Tensor,
                     clicks: torch.Tensor | None = None, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable: ``[n, prompt_dim]`` (and clicks ``[n, 1, 2]`` pixel xy, boxes ``[n, 4]`` pixel xyxy) ->
        mask logits ``[n, H, W]`` at the image's original size."""
        labels = None if clicks is None else torch.ones(clicks.shape[:2], dtype=torch.long, device=clicks.device)
        low_res, _ = self.mask_decoder.mask_logits(embedding, seg_embeddings=seg_embeddings, points=clicks,
                                                   point_labels=labels, boxes=boxes)
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
        hidden = out.hidden_states[-1]
        states = self.seg_states(hidden, input_ids, attention_mask)
        segs = [self.seg_projection(s) for s in states]
        images = self.locator_keys(out.hidden_states, input_ids, pixel_values) if self.seg_locator is not None else None
        phrases = self.seg_phrases(input_ids, attention_mask) if self.reads_phrases else [None] * len(states)
        mask_logits: list[torch.Tensor] = []
        bce, dice, locate = zero, zero, zero
        if decoder_embeddings is not None:
            preds, targets, locate_terms = [], [], []
            for i, (emb, seg) in enumerate(zip(decoder_embeddings, segs)):
                if gt_masks is not None and gt_masks[i].shape[0] != seg.shape[0]:
                    raise ValueError(f"sample {i}: {seg.shape[0]} [SEG] tokens but {gt_masks[i].shape[0]} masks")
                clicks = boxes = None
                if images is not None and len(seg):
                    cells = mask_cells(gt_masks[i].to(seg.device), self.token_grid) if gt_masks is not None else None
                    found = self.locate(states[i], images[i], phrases[i], emb.original_size, cells)
                    if cells is not None and (term := locator_loss(found.scores, cells)) is not None:
                        if found.box_map is not None:
                            term = term + box_loss(found.box_map, square_boxes(gt_masks[i].bool().cpu()), cells)
                        locate_terms.append(term.reshape(1).expand(int(cells.any(-1).sum())))
                    clicks, boxes = found.decoder_prompts(self.config.locator_click)
                logits = (self.decode_masks(emb, seg, clicks, boxes) if len(seg)
                          else seg.new_zeros((0, *emb.original_size)))
                mask_logits.append(logits)
                if gt_masks is not None:
                    preds.append(logits.flatten(1).float())
                    targets.append(gt_masks[i].flatten(1).to(logits.device, torch.float32))
            # Masks of different images have different sizes: losses are per mask, then averaged.
            if preds and sum(p.shape[0] for p in preds):
                bce = torch.cat([bce_loss(p, t).reshape(1).expand(len(p)) for p, t in zip(preds, targets) if len(p)]).mean()
                dice = torch.cat([dice_loss(p, t).reshape(1).expand(len(p)) for p, t in zip(preds, targets) if len(p)]).mean()
            if locate_terms:
                locate = torch.cat(locate_terms).mean()
        w = self.config.loss_weights
        loss = w.ce * ce + w.bce * bce + w.dice * dice + w.locate * locate
        return GroundingOutput(loss, ce, bce, dice, locate, mask_logits, segs)
