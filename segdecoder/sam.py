"""Mask-decoder backend on Meta's ``segment_anything`` (SAM).

Frames of reference (all ``(x, y)`` pixel coordinates):
- original: the user's ``H x W`` image;
- input: the image resized so its longest side is ``S = image_size`` (``h x w``, rounded like
  ``ResizeLongestSide``), placed top-left in the ``S x S`` model input, zero padding bottom/right.
Points and boxes go original -> input by ``x * w / W``, ``y * h / H`` (as ``SamPredictor`` does);
low-res logits (``4 * S/16`` square) go back by upsampling to ``S``, cropping to ``h x w`` and
resizing to ``H x W`` (as ``Sam.postprocess_masks``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                       TwoWayTransformer)
from torch import nn

from .base import ImageEmbedding
from .build import SamFamilyBackend, check_image
from .sam_attention import compile_image_encoder, keep_fp32_islands, use_sdpa_attention

PIXEL_MEAN = (123.675, 116.28, 103.53)   # on 0..255 pixels
PIXEL_STD = (58.395, 57.12, 57.375)


def resized_shape(height: int, width: int, side: int) -> tuple[int, int]:
    """``(h, w)`` with the longest side scaled to ``side``, rounded half up like ``ResizeLongestSide``."""
    scale = side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def build_sam_model(spec: dict[str, Any], image_size: int | None = None) -> Sam:
    """A ``segment_anything`` ``Sam`` with random weights, from a preset spec (see ``build.py``).

    Its image encoder keeps segment-anything's own attention; ``SamBackend`` swaps in SDPA.
    """
    side = int(image_size or spec["image_size"])
    patch, dim = spec["patch_size"], spec["prompt_dim"]
    if side <= 0 or side % patch:
        raise ValueError(f"sam image_size must be a positive multiple of {patch}, got {side}")
    grid = side // patch
    encoder = ImageEncoderViT(
        img_size=side, patch_size=patch, embed_dim=spec["encoder_embed_dim"],
        depth=spec["encoder_depth"], num_heads=spec["encoder_num_heads"], mlp_ratio=4,
        out_chans=dim, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=spec["window_size"],
        global_attn_indexes=tuple(spec["encoder_global_attn_indexes"]),
    )
    prompts = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                            input_image_size=(side, side), mask_in_chans=spec["mask_in_chans"])
    decoder = MaskDecoder(
        transformer_dim=dim, num_multimask_outputs=3, iou_head_depth=3,
        iou_head_hidden_dim=spec["iou_head_hidden_dim"],
        transformer=TwoWayTransformer(depth=spec["decoder_depth"], embedding_dim=dim,
                                      mlp_dim=spec["decoder_mlp_dim"],
                                      num_heads=spec["decoder_num_heads"]),
    )
    return Sam(encoder, prompts, decoder, pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))


class SamBackend(SamFamilyBackend, nn.Module):
    """``MaskDecoderBackend`` over a ``segment_anything.modeling.Sam`` held as ``self.sam``.

    ``features`` are ``[1, prompt_dim, S/16, S/16]``; low-res logits ``[N, M, S/4, S/4]``.
    With ``sdpa_attention`` (the default) the image encoder's attention runs through
    ``scaled_dot_product_attention`` (``sam_attention.py``), in place on ``sam``: same parameters
    and state-dict keys, so official checkpoints load before or after. ``fp32_islands`` (default on;
    a no-op in float32) keeps the layer norms of the neck / upscaler and the positional encodings in
    float32 under bf16 weights (``keep_fp32_islands``). ``compile_encoder`` (off by default) wraps the
    image encoder in ``torch.compile`` (``compile_image_encoder``): compiled on the first ``encode``,
    again for each new batch size / dtype.
    """

    backend_name = "sam"

    def __init__(self, sam: Sam, preset: str = "custom", spec: dict[str, Any] | None = None,
                 sdpa_attention: bool = True, fp32_islands: bool = True, compile_encoder: bool = False):
        nn.Module.__init__(self)
        self.sam = sam
        if sdpa_attention:
            use_sdpa_attention(sam.image_encoder)
        if fp32_islands:
            keep_fp32_islands(sam)
        if compile_encoder:
            compile_image_encoder(sam.image_encoder)
        self._describe(preset, spec, sam.image_encoder.img_size, sam.prompt_encoder.embed_dim)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], preset: str = "custom", image_size: int | None = None,
                  compile_encoder: bool = False) -> "SamBackend":
        return cls(build_sam_model(spec, image_size), preset=preset, spec=spec, compile_encoder=compile_encoder)

    def official_model(self) -> nn.Module:
        return self.sam

    def trainable_decoder_module(self) -> nn.Module:
        return self.sam.mask_decoder

    def frozen_image_encoder_module(self) -> nn.Module:
        return self.sam.image_encoder

    # ---- images ---------------------------------------------------------------------------

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 ``H x W x 3`` -> (float32 ``[3, S, S]`` normalised, padded input; ``(h, w)``)."""
        check_image(image)
        h, w = resized_shape(image.shape[0], image.shape[1], self.image_size)
        # PIL bilinear (antialiased) on uint8, exactly what ResizeLongestSide.apply_image does.
        resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        dev = self.sam.pixel_mean.device
        x = torch.from_numpy(resized.copy()).to(dev).permute(2, 0, 1).float()
        # constants, not Sam's buffers: those turn bf16 (and lose digits) when the module does
        mean = torch.tensor(PIXEL_MEAN, device=dev).view(3, 1, 1)
        std = torch.tensor(PIXEL_STD, device=dev).view(3, 1, 1)
        x = (x - mean) / std
        x = F.pad(x, (0, self.image_size - w, 0, self.image_size - h))
        return x, (h, w)

    def image_encoder_for(self, image: np.ndarray) -> nn.Module:
        """The image encoder that reads uint8 ``H x W x 3`` ``image``: SAM's own. A checkpoint's add-on may route some
        images to another one (the default model's ``grey_encoder`` takes grayscale images)."""
        return self.sam.image_encoder

    def encode_with_grad(self, images: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """``encode`` that keeps the autograd graph: for pretraining the image encoder itself (stage 1). Images are
        batched by the encoder that reads them (``image_encoder_for``), in their order otherwise."""
        out: list[ImageEmbedding | None] = [None] * len(images)
        groups: dict[int, tuple[nn.Module, list[int]]] = {}
        for i, im in enumerate(images):
            encoder = self.image_encoder_for(im)
            groups.setdefault(id(encoder), (encoder, []))[1].append(i)
        for encoder, indices in groups.values():
            dtype = next(encoder.parameters()).dtype
            for start in range(0, len(indices), self.encode_batch_size):
                chunk = indices[start:start + self.encode_batch_size]
                prepared = [self.preprocess(images[i]) for i in chunk]
                with self.autocast():
                    feats = encoder(torch.stack([x for x, _ in prepared]).to(dtype))
                for j, (i, (_, size)) in enumerate(zip(chunk, prepared)):
                    # clone: a kept embedding must not pin the whole batch's storage
                    f = feats[j:j + 1].clone() if len(chunk) > 1 else feats
                    out[i] = ImageEmbedding(f, size, (int(images[i].shape[0]), int(images[i].shape[1])))
        return out

    # ---- prompts -> masks -----------------------------------------------------------------

    def to_input_frame(self, xy: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
        """Pixel ``(x, y)`` (last dim 2) in the original image -> the resized input frame."""
        (H, W), (h, w) = embedding.original_size, embedding.input_size
        # float64 like SamPredictor's numpy path, so results match it bit for bit
        scale = torch.tensor([w / W, h / H], dtype=torch.float64, device=xy.device)
        return (xy.double() * scale).float()

    def prompt_embeddings(
        self,
        embedding: ImageEmbedding,
        seg_embeddings: torch.Tensor | None = None,   # [N, prompt_dim]
        points: torch.Tensor | None = None,           # [N, K, 2] pixel xy, original image
        point_labels: torch.Tensor | None = None,     # [N, K] 1 fg / 0 bg / -1 padding
        boxes: torch.Tensor | None = None,            # [N, 4] pixel xyxy, original image
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse ``[N, T, C]``, dense ``[N, C, S/16, S/16]``) prompt embeddings.

        Tokens: the prompt encoder's points (padded with a not-a-point when there is no box, as
        in SAM) and box corners, then one ``[SEG]`` token per prompt. With only ``[SEG]`` the
        prompt encoder is not asked for points: the seg token is the only sparse token.
        """
        n, seg, pts, labels, box = self.check_prompts(embedding, seg_embeddings, points,
                                                      point_labels, boxes)
        enc = self.sam.prompt_encoder
        encoded = None
        if pts is not None or box is not None:
            encoded = enc(
                points=None if pts is None else (self.to_input_frame(pts, embedding), labels),
                boxes=None if box is None else
                self.to_input_frame(box.reshape(-1, 2, 2), embedding).reshape(-1, 4),
                masks=None)
        return self._prompt_tokens(enc, n, seg, encoded)

    def mask_logits(
        self,
        embedding: ImageEmbedding,
        seg_embeddings: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable: (low-res logits ``[N, M, S/4, S/4]``, predicted IoU ``[N, M]``).

        One batched decoder call: the mask decoder repeats the image embedding across the N
        prompts itself (``repeat_interleave``).
        """
        with self.autocast():
            sparse, dense = self.prompt_embeddings(embedding, seg_embeddings, points,
                                                   point_labels, boxes)
            if sparse.shape[0] == 0:
                return self.no_masks(embedding, sparse, multimask)
            dtype = embedding.features.dtype   # prompt encoder makes float32 pieces
            return self.sam.mask_decoder(
                image_embeddings=embedding.features,
                image_pe=self.sam.prompt_encoder.get_dense_pe().to(dtype),
                sparse_prompt_embeddings=sparse.to(dtype),
                dense_prompt_embeddings=dense.to(dtype),
                multimask_output=multimask,
            )

    def upscale(self, low_res_logits: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
        """Differentiable: ``[N, M, S/4, S/4]`` -> float32 ``[N, M, H, W]`` (upsample, crop padding, resize).
        bf16 logits are upcast first (as LISA does): the 4x-16x upsampling then adds no bf16 rounding."""
        x = F.interpolate(low_res_logits.float(), (self.image_size, self.image_size), mode="bilinear",
                          align_corners=False)
        h, w = embedding.input_size
        return F.interpolate(x[..., :h, :w], embedding.original_size, mode="bilinear",
                             align_corners=False)
