"""SAM image encoder attention through SDPA (segdecoder/sam_attention.py): same outputs, parameters, state-dict
keys and gradients as segment-anything's own attention. CPU only, small seeded random encoders."""
from __future__ import annotations

import copy
import os
from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention
from torch import nn

from segdecoder import build_decoder
from segdecoder.build import SAM_PRESETS
from segdecoder.sam import SamBackend, build_sam_model
from segdecoder.sam_attention import (SdpaAttention, compile_image_encoder, rel_pos_bias,
                                      use_sdpa_attention)

# 192 px / 16 = a 12 x 12 token grid; windows of 5 pad it to 15 x 15 (9 windows), blocks 1 and 3 global.
SIDE, WINDOW, GLOBAL = 192, 5, (1, 3)


def _encoder(seed: int = 0) -> ImageEncoderViT:
    """A small original encoder, with windowed and global blocks and non-zero rel-pos tables."""
    torch.manual_seed(seed)
    enc = ImageEncoderViT(img_size=SIDE, patch_size=16, embed_dim=64, depth=4, num_heads=4, out_chans=32,
                          norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          window_size=WINDOW, global_attn_indexes=GLOBAL)
    with torch.no_grad():   # SAM zero-initialises these; trained ones are not zero
        for name, param in enc.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                param.normal_(0.0, 0.5)
    return enc.eval()


def _input(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair() -> tuple[ImageEncoderViT, ImageEncoderViT]:
    original = _encoder()
    sdpa = copy.deepcopy(original)
    assert use_sdpa_attention(sdpa) == 4
    return original, sdpa


def test_swap_shares_parameters_and_is_idempotent():
    enc = _encoder()
    before = {id(p) for p in enc.parameters()}
    keys = {k: v.shape for k, v in enc.state_dict().items()}
    old = [(b.attn.qkv, b.attn.proj, b.attn.rel_pos_h, b.attn.rel_pos_w) for b in enc.blocks]
    assert use_sdpa_attention(enc) == 4
    assert all(type(b.attn) is SdpaAttention for b in enc.blocks)
    assert [(b.attn.qkv, b.attn.proj, b.attn.rel_pos_h, b.attn.rel_pos_w) for b in enc.blocks] == old
    assert {id(p) for p in enc.parameters()} == before
    assert {k: v.shape for k, v in enc.state_dict().items()} == keys
    assert use_sdpa_attention(enc) == 0
    # windowed blocks keep their window-sized tables, global ones the whole grid's
    assert [tuple(b.attn.rel_pos_h.shape) for b in enc.blocks] == [(9, 16), (23, 16), (9, 16), (23, 16)]


def test_rel_pos_bias_is_segment_anything_decomposed_rel_pos():
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    torch.manual_seed(0)
    B, n, H, W, d = 2, 3, 4, 5, 8
    q = torch.randn(B, n, H * W, d)
    rh, rw = torch.randn(2 * H - 1, d), torch.randn(2 * W - 1, d)
    zeros = torch.zeros(B * n, H * W, H * W)
    ref = add_decomposed_rel_pos(zeros, q.reshape(B * n, H * W, d), rh, rw, (H, W), (H, W))
    torch.testing.assert_close(rel_pos_bias(q, rh, rw, (H, W)), ref.view(B, n, H * W, H * W),
                               atol=1e-5, rtol=0)
    assert rel_pos_bias(q, rh, rw, (H, W), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_fp32_matches_original(pair):
    original, sdpa = pair
    x = _input()
    with torch.no_grad():
        ref, out = original(x), sdpa(x)
    assert out.shape == ref.shape == (2, 32, 12, 12)
    diff = (out - ref).abs().max().item()
    assert diff < 1e-4, diff   # measured ~2e-6


def test_single_attention_module_matches(pair):
    """Each block's attention alone, windowed (padded 5 x 5 windows) and global (12 x 12)."""
    original, sdpa = pair
    torch.manual_seed(2)
    for i, (a, b) in enumerate(zip(original.blocks, sdpa.blocks)):
        side = 12 if i in GLOBAL else WINDOW
        x = torch.randn(3, side, side, 64)
        with torch.no_grad():
            torch.testing.assert_close(b.attn(x), a.attn(x), atol=1e-5, rtol=0)


def test_original_state_dict_loads_into_sdpa_encoder(pair, tmp_path):
    original, _ = pair
    torch.save(original.state_dict(), tmp_path / "encoder.pth")
    other = _encoder(seed=7)            # different random weights until the file is loaded
    use_sdpa_attention(other)
    other.load_state_dict(torch.load(tmp_path / "encoder.pth", weights_only=True), strict=True)
    x = _input(batch=1, seed=3)
    with torch.no_grad():
        diff = (other(x) - original(x)).abs().max().item()
    assert diff < 1e-4, diff


def test_bf16_close_to_fp32_original(pair):
    original, sdpa = pair
    x = _input()
    with torch.no_grad():
        ref = original(x)
        ours = copy.deepcopy(sdpa).bfloat16()(x.bfloat16()).float()
        theirs = copy.deepcopy(original).bfloat16()(x.bfloat16()).float()
    diff, diff_theirs = (ours - ref).abs().max().item(), (theirs - ref).abs().max().item()
    # measured: sdpa bf16 ~0.033 max / ~0.007 mean, original bf16 ~0.038 max / ~0.007 mean (|out| <= ~3.6)
    assert diff < 0.1, diff
    assert (ours - ref).abs().mean().item() < 0.02
    assert diff < 2 * diff_theirs + 0.01, (diff, diff_theirs)


def test_gradients_match_original():
    original = _encoder()
    sdpa = copy.deepcopy(original)
    use_sdpa_attention(sdpa)
    x = _input(batch=1)
    for enc in (original, sdpa):
        enc.zero_grad()
        (enc(x) ** 2).mean().backward()
    grads = dict(sdpa.named_parameters())
    for name, p in original.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-5, rtol=1e-3, msg=name)


def test_compile_helper_keeps_module_and_keys():
    enc = _encoder()
    use_sdpa_attention(enc)
    keys = list(enc.state_dict())
    assert compile_image_encoder(enc) is enc      # in place and lazy: nothing compiles until a call
    assert list(enc.state_dict()) == keys


@pytest.mark.skipif(os.environ.get("GROUNDSEG_TEST_COMPILE") != "1",
                    reason="torch.compile takes ~1 min on a 2-core CPU; set GROUNDSEG_TEST_COMPILE=1")
def test_compiled_encoder_matches(pair):
    original, sdpa = pair
    compiled = compile_image_encoder(copy.deepcopy(sdpa))
    x = _input(batch=1)
    with torch.no_grad():
        assert (compiled(x) - original(x)).abs().max().item() < 1e-4


def test_default_sam_backend_uses_sdpa_and_loads_official_keys(tmp_path):
    decoder = build_decoder(backend="sam", preset="tiny")
    blocks = decoder.sam.image_encoder.blocks
    assert len(blocks) == 2 and all(type(b.attn) is SdpaAttention for b in blocks)
    assert not any(type(m) is Attention for m in decoder.modules())
    # an official-style file (a plain `Sam` state dict, original attention) loads unchanged
    torch.manual_seed(5)
    sam = build_sam_model(SAM_PRESETS["tiny"]).eval()
    assert all(type(b.attn) is Attention for b in sam.image_encoder.blocks)
    with torch.no_grad():
        for name, param in sam.image_encoder.named_parameters():
            if "rel_pos" in name:
                param.normal_(0.0, 0.5)
    torch.save(sam.state_dict(), tmp_path / "sam_tiny.pth")
    decoder.load_checkpoint(tmp_path / "sam_tiny.pth")
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (decoder.sam.image_encoder(x) - sam.image_encoder(x)).abs().max().item()
    assert diff < 1e-4, diff
    # and `SamBackend` can keep segment-anything's attention when asked
    plain = SamBackend(build_sam_model(SAM_PRESETS["tiny"]), preset="tiny", sdpa_attention=False)
    assert all(type(b.attn) is Attention for b in plain.sam.image_encoder.blocks)
