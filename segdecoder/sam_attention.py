"""SAM image-encoder attention through ``torch.nn.functional.scaled_dot_product_attention``.

``segment_anything``'s ``Attention`` (ViTDet-style, used by every ``ImageEncoderViT`` block) computes
the full score matrix ``q @ k^T``, adds the decomposed relative-position terms to it
(``add_decomposed_rel_pos``, two more score-sized tensors), runs a separate softmax and a second matmul. ``SdpaAttention`` does the
same maths with one fused SDPA call: the rel-pos terms become SDPA's additive float ``attn_mask``.

Shapes (``B``: images, or images x windows in a windowed block; ``n``: heads; ``d``: head dim;
``H x W``: the token grid of the block, the window ``w x w`` or the whole ``S/16 x S/16`` image)::

    x                  [B, H, W, n*d]
    q, k, v            [B, n, H*W, d]          (q unscaled; SDPA applies d**-0.5 itself)
    Rh, Rw             [H, H, d], [W, W, d]    (get_rel_pos: rel_pos_h/w gathered per (q_i, k_i))
    rel_h              [B, n, H, W, H]         rel_h[b, n, qh, qw, kh] = q[b, n, (qh, qw)] . Rh[qh, kh]
    rel_w              [B, n, H, W, W]         rel_w[b, n, qh, qw, kw] = q[b, n, (qh, qw)] . Rw[qw, kw]
    bias (attn_mask)   [B, n, H*W, H*W]        rel_h[..., :, None] + rel_w[..., None, :], flattened
    out                [B, H, W, n*d]          after proj

so ``softmax(q k^T / sqrt(d) + bias) v`` equals SAM's ``softmax(add_decomposed_rel_pos(q*scale @ k^T))
@ v``. SDPA takes one mask tensor, so the sum of the two broadcast terms is materialised once (the
same size as the score matrix the original builds; a fused kernel then avoids the second copy and
the separate softmax pass).

Numerics: ``rel_h``/``rel_w`` and their sum are computed in float32 (autocast off) from the query
and the rel-pos tables, whatever the encoder's dtype, and only the finished bias is cast to the
query's dtype, as SDPA wants ``attn_mask`` in the dtype of ``q``. SDPA's kernels accumulate the
scores and the softmax in float32. Measured on CPU (tests/test_sam_attention.py: seeded random
weights with non-zero rel-pos tables, 192 px input, 4 blocks, 5 x 5 windows with padding and global):
float32 SDPA vs float32 original: max abs difference 1.7e-6 on the encoder output (|out| <= 3.6;
test bound 1e-4); bfloat16 SDPA vs float32 original: max abs 0.033 (mean 0.0068), slightly better
than bfloat16 *original* vs float32 original (max 0.038, mean 0.0067); test bound 0.1.

``use_sdpa_attention(encoder)`` swaps the attention of every block in place, reusing the very same
``qkv``/``proj`` Linear modules and ``rel_pos_h``/``rel_pos_w`` Parameters under the same attribute
names, so ``state_dict`` keys, shapes and already-loaded weights are unchanged, and checkpoints load
before or after the swap. ``compile_image_encoder(encoder)`` adds ``torch.compile`` (default mode)
in place, on request only (``build_decoder(..., compile_encoder=True)``).

bf16 / fp16 weights: ``keep_fp32_islands(model)`` (SAM and SAM2 alike; the backends call it) keeps the
few places that lose most in half precision in float32, by swapping the class of the modules in place
(same parameters, buffers and state-dict keys; in float32 the maths is unchanged, op for op):

- ``LayerNorm2d`` (the encoder neck, the mask decoder's upscaling; SAM2's too) computes its mean and
  variance by hand in the input's dtype: done in float32, the result cast back to the input's dtype;
- ``PositionEmbeddingRandom`` (point / box / dense positional encodings: ``sin(2 pi x G)`` with
  arguments up to ~20 rad, where bf16's 8-bit mantissa is off by ~0.1 rad) keeps its Gaussian matrix in
  float32 through ``.to(bfloat16)`` and encodes in float32 with autocast off; callers cast the
  encodings to the decoder's dtype where they meet bf16 tensors (``SamBackend.mask_logits`` does).

``nn.LayerNorm`` needs nothing: its bf16 kernels accumulate in float32. The attention bias is built in
float32 (above) and the SDPA kernels accumulate the softmax in float32. The backends upcast the low-res
mask logits to float32 before upscaling them, as LISA does, so thresholds see no bf16 rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos
from torch import nn

__all__ = ["SdpaAttention", "rel_pos_bias", "use_sdpa_attention", "compile_image_encoder",
           "keep_fp32_islands"]


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 grid: tuple[int, int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """SAM's decomposed relative-position bias as an additive SDPA mask.

    q ``[B, n, H*W, d]`` (unscaled query), rel_pos_h ``[Lh, d]``, rel_pos_w ``[Lw, d]``, grid
    ``(H, W)`` (queries and keys share the grid) -> ``[B, n, H*W, H*W]`` with
    ``bias[b, n, (qh, qw), (kh, kw)] = q . Rh[qh, kh] + q . Rw[qw, kw]`` (``Rh = get_rel_pos(H,
    H, rel_pos_h)``, likewise ``Rw``). Both terms and their sum are computed in float32 (autocast
    off); the sum is rounded once to ``dtype`` (default float32). Without autograd it is written
    straight into the returned tensor, with no float32 copy of the full ``[.., H*W, H*W]`` bias.
    """
    H, W = grid
    B, n, _, d = q.shape
    with torch.autocast(q.device.type, enabled=False):
        rh = get_rel_pos(H, H, rel_pos_h.float())            # [H, H, d]
        rw = get_rel_pos(W, W, rel_pos_w.float())            # [W, W, d]
        q5 = q.float().reshape(B, n, H, W, d)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", q5, rh)     # [B, n, H, W, H]
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q5, rw)     # [B, n, H, W, W]
        dtype = dtype or torch.float32
        if torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and (rel_h.requires_grad or rel_w.requires_grad)):
            # out= has no autograd; under torch.compile inductor fuses the add and the cast itself
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).to(dtype)
        else:
            bias = torch.empty((B, n, H, W, H, W), dtype=dtype, device=q.device)
            torch.add(rel_h[..., :, None], rel_w[..., None, :], out=bias)
    return bias.reshape(B, n, H * W, H * W)


class SdpaAttention(nn.Module):
    """Drop-in for ``segment_anything``'s image-encoder ``Attention``, computed with SDPA.

    Built from an existing ``Attention`` and sharing its modules and parameters (``qkv``,
    ``proj``, and with ``use_rel_pos`` ``rel_pos_h`` / ``rel_pos_w``), so the state-dict keys are
    the original's. ``forward``: ``[B, H, W, C]`` -> ``[B, H, W, C]``, as the original.
    """

    def __init__(self, attn: Attention):
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.qkv = attn.qkv
        self.proj = attn.proj
        self.use_rel_pos = attn.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = attn.rel_pos_h
            self.rel_pos_w = attn.rel_pos_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        # [B, H*W, 3, n, d] -> [3, B, n, H*W, d]
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = None
        if self.use_rel_pos:
            bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W), dtype=q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        # [B, n, H*W, d] -> [B, H, W, n*d]
        out = out.transpose(1, 2).reshape(B, H, W, -1)
        return self.proj(out)


def use_sdpa_attention(image_encoder: ImageEncoderViT) -> int:
    """Swap every block's ``Attention`` for an ``SdpaAttention`` sharing its weights, in place.

    Works for windowed and global blocks alike (windowing happens in the block, around the
    attention). Returns how many blocks changed; blocks already on SDPA are left alone (0 the
    second time). State-dict keys and values are unchanged.
    """
    changed = 0
    for block in image_encoder.blocks:
        if isinstance(block.attn, Attention):
            block.attn = SdpaAttention(block.attn)
            changed += 1
    return changed


def compile_image_encoder(encoder: nn.Module) -> nn.Module:
    """``torch.compile`` (default mode) of the encoder's forward, in place; returns the encoder.

    ``nn.Module.compile`` keeps the module itself (no ``_orig_mod.`` wrapper), so state-dict keys
    and checkpoint loading are unaffected. Compilation happens lazily on the first call and again
    for each new input shape / dtype. Opt-in: nothing in the project calls it by default.
    """
    encoder.compile()
    return encoder


# ---- float32 islands for bf16 / fp16 weights ------------------------------------------------------------

class _Fp32LayerNorm2d:
    """Mixin for a ``LayerNorm2d`` (``[B, C, H, W]``, normalised over C): the original's formula in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        x32 = x.float()
        u = x32.mean(1, keepdim=True)
        s = (x32 - u).pow(2).mean(1, keepdim=True)
        y = (x32 - u) / torch.sqrt(s + self.eps)
        y = self.weight.float()[:, None, None] * y + self.bias.float()[:, None, None]
        return y.to(x.dtype)


class _Fp32PositionEmbedding:
    """Mixin for a ``PositionEmbeddingRandom``: the Gaussian matrix stays float32 through dtype casts (device
    moves still apply) and the encoding runs in float32 with autocast off; outputs are float32."""

    def _apply(self, fn, recurse=True):
        keep = self.positional_encoding_gaussian_matrix
        out = super()._apply(fn, recurse)
        moved = self.positional_encoding_gaussian_matrix
        if keep.is_floating_point() and moved.dtype != keep.dtype:
            self.positional_encoding_gaussian_matrix = keep.to(device=moved.device, dtype=torch.float32)
        return out

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        with torch.autocast(coords.device.type, enabled=False):
            coords = 2 * coords.float() - 1
            coords = coords @ self.positional_encoding_gaussian_matrix.float()
            coords = 2 * math.pi * coords
            return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)


_SWAPPED: dict[type, type] = {}


def _swap(module: nn.Module, mixin: type) -> bool:
    cls = type(module)
    if issubclass(cls, mixin):
        return False
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"Fp32{cls.__name__}", (mixin, cls), {"__module__": __name__})
    module.__class__ = _SWAPPED[cls]
    return True


def keep_fp32_islands(model: nn.Module) -> int:
    """Swap every ``LayerNorm2d`` and ``PositionEmbeddingRandom`` of a segment_anything / sam2 model for their
    float32-computing versions, in place (see the module docstring). Returns how many changed (0 the second time).
    Call it before casting the model to bf16 so that the positional Gaussian matrix is never rounded."""
    from segment_anything.modeling.common import LayerNorm2d as SamLayerNorm2d
    from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom as SamPE

    norms, encodings = [SamLayerNorm2d], [SamPE]
    try:   # sam2 is optional here: SAM alone does not need it
        from sam2.modeling.position_encoding import PositionEmbeddingRandom as Sam2PE
        from sam2.modeling.sam2_utils import LayerNorm2d as Sam2LayerNorm2d
        norms.append(Sam2LayerNorm2d)
        encodings.append(Sam2PE)
    except ImportError:
        pass
    changed = 0
    for module in model.modules():
        if isinstance(module, tuple(norms)):
            changed += _swap(module, _Fp32LayerNorm2d)
        elif isinstance(module, tuple(encodings)):
            changed += _swap(module, _Fp32PositionEmbedding)
    return changed
