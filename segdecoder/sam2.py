"""Mask-decoder backend on ``sam2`` (SAM 2 / 2.1), image mode.

Frames of reference (all ``(x, y)`` pixel coordinates):
- original: the user's ``H x W`` image;
- input: the image resized straight to ``S x S`` (``S = image_size``, aspect ratio NOT kept,
  no padding), as ``SAM2ImagePredictor`` does.
Points and boxes go original -> input by ``x / W * S``, ``y / H * S``; low-res logits
(``S/4`` square) go back by one bilinear resize to ``H x W``.

Image features (``encode``): the stride-16 map ``[1, C, S/16, S/16]`` with ``no_mem_embed``
added (what SAM2 does for a frame without memory), plus, when the model uses high-res features,
the stride-4 and stride-8 maps already passed through the decoder's ``conv_s0`` / ``conv_s1``
(``[1, C/8, S/4, S/4]``, ``[1, C/4, S/8, S/8]``). Because those two convolutions run inside the
no-grad ``encode``, fine-tuning the mask decoder leaves them unchanged.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam2_base import SAM2Base
from sam2.modeling.sam.transformer import RoPEAttention
from torch import nn

from .base import ImageEmbedding
from .build import SamFamilyBackend, check_image
from .sam_attention import compile_image_encoder, keep_fp32_islands

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # on 0..1 pixels
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE_STRIDE = 16


def build_sam2_model(spec: dict[str, Any], image_size: int | None = None,
                     model_cls: type[SAM2Base] = SAM2Base, **overrides: Any) -> SAM2Base:
    """A ``SAM2Base`` (or subclass, e.g. ``SAM2VideoPredictor``) with random weights.

    Built in Python from a preset spec (see ``build.py``), mirroring the packaged
    ``configs/sam2.1/*.yaml`` without hydra. ``overrides`` replace ``SAM2Base`` keyword flags.
    """
    side = int(image_size or spec["image_size"])
    first_window = spec["window_spec"][0]
    # Hiera's windowed position embedding tiles the stride-4 map by the first window size,
    # and the trunk goes down to stride 32.
    step = max(32, 4 * first_window)
    if side <= 0 or side % step:
        raise ValueError(f"sam2 image_size must be a positive multiple of {step}, got {side}")
    d, e, mem = spec["prompt_dim"], spec["trunk_embed_dim"], spec["mem_dim"]
    trunk = Hiera(
        embed_dim=e, num_heads=spec["trunk_num_heads"], stages=tuple(spec["trunk_stages"]),
        global_att_blocks=tuple(spec["trunk_global_att_blocks"]),
        window_pos_embed_bkg_spatial_size=tuple(spec["window_pos_embed_bkg_spatial_size"]),
        window_spec=tuple(spec["window_spec"]),
    )
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(num_pos_feats=d, normalize=True, scale=None,
                                                temperature=10000, image_size=side),
        d_model=d, backbone_channel_list=[8 * e, 4 * e, 2 * e, e],
        fpn_top_down_levels=[2, 3], fpn_interp_model="nearest",
    )
    feat = side // BACKBONE_STRIDE

    def rope(**extra: Any) -> RoPEAttention:
        return RoPEAttention(rope_theta=10000.0, feat_sizes=[feat, feat], embedding_dim=d,
                             num_heads=1, downsample_rate=1, dropout=0.1, **extra)

    layer = MemoryAttentionLayer(
        activation="relu", d_model=d, dim_feedforward=spec["mem_attention_ffn_dim"],
        dropout=0.1, pos_enc_at_attn=False, pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False, self_attention=rope(),
        cross_attention=rope(rope_k_repeat=True, kv_in_dim=mem),
    )
    memory_attention = MemoryAttention(d_model=d, pos_enc_at_input=True, layer=layer,
                                       num_layers=spec["mem_attention_layers"])
    memory_encoder = MemoryEncoder(
        out_dim=mem, in_dim=d,
        position_encoding=PositionEmbeddingSine(num_pos_feats=mem, normalize=True, scale=None,
                                                temperature=10000, image_size=side),
        mask_downsampler=MaskDownSampler(embed_dim=d, kernel_size=3, stride=2, padding=1),
        fuser=Fuser(CXBlock(dim=d, kernel_size=7, padding=3, layer_scale_init_value=1e-6,
                            use_dwconv=True), num_layers=spec["mem_fuser_layers"]),
    )
    flags = copy.deepcopy(spec["flags"])
    flags.update(overrides)
    return model_cls(
        image_encoder=ImageEncoder(trunk=trunk, neck=neck, scalp=1),
        memory_attention=memory_attention, memory_encoder=memory_encoder,
        image_size=side, backbone_stride=BACKBONE_STRIDE, **flags,
    )


class Sam2Backend(SamFamilyBackend, nn.Module):
    """``MaskDecoderBackend`` over a ``sam2.modeling.sam2_base.SAM2Base`` held as ``self.sam2``.

    ``features`` are ``[1, prompt_dim, S/16, S/16]``; low-res logits ``[N, M, S/4, S/4]``.

    Hiera's ``MultiScaleAttention`` already calls ``scaled_dot_product_attention`` in sam2 1.1.0 (it
    has no relative-position bias), so nothing is swapped there. ``fp32_islands`` (default on; a no-op
    in float32) keeps ``LayerNorm2d`` and the random positional encodings in float32 under bf16
    weights (``sam_attention.keep_fp32_islands``); ``compile_encoder`` (off by default) wraps the image
    encoder (trunk + FPN neck) in ``torch.compile``, default mode, compiled on first use (sam2's own
    ``compile_image_encoder`` flag does the same with ``max-autotune`` at model build time).
    """

    backend_name = "sam2"

    def __init__(self, sam2: SAM2Base, preset: str = "custom", spec: dict[str, Any] | None = None,
                 fp32_islands: bool = True, compile_encoder: bool = False):
        nn.Module.__init__(self)
        self.sam2 = sam2
        if fp32_islands:
            keep_fp32_islands(sam2)
        if compile_encoder:
            compile_image_encoder(sam2.image_encoder)
        self._describe(preset, spec, sam2.image_size, sam2.sam_prompt_embed_dim)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], preset: str = "custom", image_size: int | None = None,
                  compile_encoder: bool = False) -> "Sam2Backend":
        return cls(build_sam2_model(spec, image_size), preset=preset, spec=spec, compile_encoder=compile_encoder)

    def official_model(self) -> nn.Module:
        return self.sam2

    def trainable_decoder_module(self) -> nn.Module:
        return self.sam2.sam_mask_decoder

    def frozen_image_encoder_module(self) -> nn.Module:
        return self.sam2.image_encoder

    # ---- images ---------------------------------------------------------------------------

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 ``H x W x 3`` -> (float32 ``[3, S, S]`` normalised input; ``(S, S)``)."""
        check_image(image)
        dev = self.sam2.no_mem_embed.device
        side = self.image_size
        x = torch.from_numpy(np.ascontiguousarray(image)).to(dev).permute(2, 0, 1).float() / 255.0
        # antialiased bilinear on float pixels, what torchvision's Resize does in SAM2Transforms
        x = F.interpolate(x[None], (side, side), mode="bilinear", align_corners=False,
                          antialias=True)[0]
        mean = torch.tensor(IMAGENET_MEAN, device=dev).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=dev).view(3, 1, 1)
        return (x - mean) / std, (side, side)

    def encode_with_grad(self, images: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """``encode`` that keeps the autograd graph: for pretraining the image encoder itself (stage 1)."""
        dtype = self.sam2.no_mem_embed.dtype
        out: list[ImageEmbedding] = []
        for start in range(0, len(images), self.encode_batch_size):
            chunk = images[start:start + self.encode_batch_size]
            x = torch.stack([self.preprocess(im)[0] for im in chunk]).to(dtype)
            with self.autocast():
                backbone = self.sam2.forward_image(x)
                _, feats, _, sizes = self.sam2._prepare_backbone_features(backbone)
                if self.sam2.directly_add_no_mem_embed:
                    feats[-1] = feats[-1] + self.sam2.no_mem_embed
            # [h*w, B, C] sequences -> [B, C, h, w] maps, finest first; sizes read from the
            # model (SAM2ImagePredictor hard-codes them for 1024 inputs)
            # (sam2's FPN upcasts to float32: hand the decoder its own dtype back)
            maps = [f.permute(1, 2, 0).reshape(len(chunk), -1, h, w).to(dtype)
                    for f, (h, w) in zip(feats, sizes)]
            for i, im in enumerate(chunk):
                per = [m[i:i + 1].clone() if len(chunk) > 1 else m for m in maps]
                out.append(ImageEmbedding(per[-1], (self.image_size, self.image_size),
                                          (int(im.shape[0]), int(im.shape[1])),
                                          high_res=tuple(per[:-1])))
        return out

    # ---- prompts -> masks -----------------------------------------------------------------

    def to_input_frame(self, xy: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
        """Pixel ``(x, y)`` (last dim 2) in the original image -> the ``S x S`` input frame."""
        H, W = embedding.original_size
        size = torch.tensor([W, H], dtype=torch.float32, device=xy.device)
        return xy / size * self.image_size   # same float32 ops, same order as SAM2Transforms

    def prompt_embeddings(
        self,
        embedding: ImageEmbedding,
        seg_embeddings: torch.Tensor | None = None,   # [N, prompt_dim]
        points: torch.Tensor | None = None,           # [N, K, 2] pixel xy, original image
        point_labels: torch.Tensor | None = None,     # [N, K] 1 fg / 0 bg / -1 padding
        boxes: torch.Tensor | None = None,            # [N, 4] pixel xyxy, original image
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse ``[N, T, C]``, dense ``[N, C, S/16, S/16]``) prompt embeddings.

        Tokens, like SAM2ImagePredictor: box corners as points labelled 2/3, then clicks, then
        the not-a-point padding SAM2's prompt encoder appends; then one ``[SEG]`` token per
        prompt. With only ``[SEG]`` the prompt encoder is not asked for points.
        """
        n, seg, pts, labels, box = self.check_prompts(embedding, seg_embeddings, points,
                                                      point_labels, boxes)
        enc = self.sam2.sam_prompt_encoder
        xy, lab = [], []
        if box is not None:
            xy.append(box.reshape(-1, 2, 2))
            lab.append(torch.tensor([[2, 3]], dtype=torch.int32, device=box.device).repeat(n, 1))
        if pts is not None:
            xy.append(pts)
            lab.append(labels)
        encoded = None
        if xy:
            coords = self.to_input_frame(torch.cat(xy, dim=1), embedding)
            encoded = enc(points=(coords, torch.cat(lab, dim=1)), boxes=None, masks=None)
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

        One batched decoder call (``repeat_image=True`` repeats the image embedding across N).
        In eval mode and without ``multimask`` the decoder may swap in its best multimask output
        when the single mask is unstable (``dynamic_multimask_via_stability`` of the preset, as
        sam2's ``build_sam2`` sets it); in train mode it never does. The object-score head is
        ignored, as SAM2ImagePredictor ignores it. With a [SEG] embedding in the prompt the swap is
        off: the decoder learnt that prompt in train mode, where the swap never happens.
        """
        decoder = self.sam2.sam_mask_decoder
        dynamic = decoder.dynamic_multimask_via_stability
        decoder.dynamic_multimask_via_stability = dynamic and seg_embeddings is None
        try:
            return self._mask_logits(embedding, seg_embeddings, points, point_labels, boxes, multimask)
        finally:
            decoder.dynamic_multimask_via_stability = dynamic

    def _mask_logits(self, embedding, seg_embeddings, points, point_labels, boxes, multimask):
        with self.autocast():
            sparse, dense = self.prompt_embeddings(embedding, seg_embeddings, points,
                                                   point_labels, boxes)
            if sparse.shape[0] == 0:
                return self.no_masks(embedding, sparse, multimask)
            dtype = embedding.features.dtype
            low, iou, _, _ = self.sam2.sam_mask_decoder(
                image_embeddings=embedding.features,
                image_pe=self.sam2.sam_prompt_encoder.get_dense_pe().to(dtype),
                sparse_prompt_embeddings=sparse.to(dtype),
                dense_prompt_embeddings=dense.to(dtype),
                multimask_output=multimask,
                repeat_image=True,
                high_res_features=list(embedding.high_res) or None,
            )
        return low, iou

    def upscale(self, low_res_logits: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
        """Differentiable: ``[N, M, S/4, S/4]`` -> float32 ``[N, M, H, W]`` (one bilinear resize of the
        logits upcast to float32, as ``SamBackend.upscale``)."""
        return F.interpolate(low_res_logits.float(), embedding.original_size, mode="bilinear",
                             align_corners=False)

    def clamp_low_res(self, low: torch.Tensor) -> torch.Tensor:
        # SAM2ImagePredictor clamps the low-res logits it hands back for a next prompt
        return low.clamp(-32.0, 32.0)
