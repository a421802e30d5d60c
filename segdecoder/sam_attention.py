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
in place, on request only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos
from torch import nn

__all__ = ["SdpaAttention", "rel_pos_bias", "use_sdpa_attention", "compile_image_encoder"]


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
