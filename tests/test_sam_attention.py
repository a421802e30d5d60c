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
from segdecoder.build import SAM2_PRESETS, SAM_PRESETS
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


# ---- ViT-B-shaped blocks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [14, 0], ids=["windowed-14", "global"])
def test_vit_b_shaped_block_matches(window):
    """One ViT-B block (768 wide, 12 heads of 64, rel-pos) on a 20 x 20 token grid: 14 x 14 windows (padded to
    28 x 28, 4 windows) or global attention over all 400 tokens; fp32, within 1e-4 of segment-anything's."""
    from segment_anything.modeling.image_encoder import Block

    torch.manual_seed(4)
    grid = 20
    block = Block(dim=768, num_heads=12, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                  use_rel_pos=True, window_size=window, input_size=(grid, grid)).eval()
    with torch.no_grad():
        block.attn.rel_pos_h.normal_(0.0, 0.5)
        block.attn.rel_pos_w.normal_(0.0, 0.5)
    ours = copy.deepcopy(block)
    ours.attn = SdpaAttention(ours.attn)
    x = torch.randn(1, grid, grid, 768)
    with torch.no_grad():
        ref, out = block(x), ours(x)
    diff = (out - ref).abs().max().item()
    assert diff < 1e-4, diff   # measured ~1e-6


# ---- compile flag -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sam", "sam2"])
def test_compile_flag_wraps_the_encoder_lazily(backend):
    plain = build_decoder(backend=backend, preset="tiny")
    compiled = build_decoder(backend=backend, preset="tiny", compile_encoder=True)
    encoder = compiled.frozen_image_encoder_module()
    assert getattr(encoder, "_compiled_call_impl", None) is not None
    assert getattr(plain.frozen_image_encoder_module(), "_compiled_call_impl", None) is None
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.skipif(os.environ.get("GROUNDSEG_TEST_COMPILE") != "1",
                    reason="torch.compile takes ~1 min on a 2-core CPU; set GROUNDSEG_TEST_COMPILE=1")
@pytest.mark.parametrize("backend", ["sam", "sam2"])
def test_compiled_backend_encodes_the_same(backend):
    import numpy as np

    plain = build_decoder(backend=backend, preset="tiny")
    compiled = build_decoder(backend=backend, preset="tiny", compile_encoder=True)
    compiled.load_state_dict(plain.state_dict())
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    a, b = plain.encode([image])[0], compiled.encode([image])[0]
    assert (a.features - b.features).abs().max().item() < 1e-4


# ---- bf16 with float32 islands ------------------------------------------------------------------------------

def test_fp32_islands_are_exact_in_fp32_and_keep_the_pe_matrix():
    from segment_anything.modeling.common import LayerNorm2d
    from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom

    from segdecoder.sam_attention import keep_fp32_islands

    torch.manual_seed(0)
    sam = build_sam_model(SAM_PRESETS["tiny"]).eval()
    ours = copy.deepcopy(sam)
    n = keep_fp32_islands(ours)
    assert n == sum(isinstance(m, (LayerNorm2d, PositionEmbeddingRandom)) for m in sam.modules()) >= 4
    assert keep_fp32_islands(ours) == 0
    assert list(ours.state_dict()) == list(sam.state_dict())
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(ours.image_encoder(x), sam.image_encoder(x))          # same maths in fp32
        assert torch.equal(ours.prompt_encoder.get_dense_pe(), sam.prompt_encoder.get_dense_pe())
    ours.bfloat16()
    pe = ours.prompt_encoder.pe_layer
    assert pe.positional_encoding_gaussian_matrix.dtype == torch.float32       # not rounded by .bfloat16()
    assert ours.prompt_encoder.point_embeddings[0].weight.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = ours.prompt_encoder.get_dense_pe()
    torch.testing.assert_close(dense, sam.prompt_encoder.get_dense_pe(), atol=1e-6, rtol=0)
    # plain bf16 is off by ~0.09 on the same encodings (sin/cos of arguments up to ~20 rad)
    plain = copy.deepcopy(sam).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = plain.prompt_encoder.get_dense_pe()
    assert (rounded.float() - sam.prompt_encoder.get_dense_pe()).abs().max() > 0.02


def test_fp32_layernorm2d_halves_the_bf16_error():
    from segment_anything.modeling.common import LayerNorm2d

    from segdecoder.sam_attention import keep_fp32_islands

    torch.manual_seed(0)
    ln = LayerNorm2d(256)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.2)
        ln.bias.normal_(0.0, 0.2)
    x = torch.randn(1, 256, 32, 32) * 3 + 5          # channels with a large common offset, like the neck's
    ref = ln(x)
    plain = copy.deepcopy(ln).bfloat16()(x.bfloat16())
    ours = copy.deepcopy(ln)
    keep_fp32_islands(ours)
    out = ours.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # measured: plain bf16 0.091 max, float32 island 0.044 (the input and output roundings remain)
    assert (out.float() - ref).abs().max() < 0.6 * (plain.float() - ref).abs().max()


@pytest.mark.parametrize("backend", ["sam", "sam2"])
def test_bf16_backend_close_to_fp32(backend):
    """The whole backend in bf16 (SDPA, float32 islands, logits upcast before upscaling) vs float32, same weights.
    Measured (random tiny weights, 200 x 260 image, 3 clicks): SAM features max 0.039 / mean 0.0063 (|f| <= 3.8),
    low-res logits max 0.0026, 99.5% of mask pixels agree; SAM2 features max 0.024 / mean 0.0044 (|f| <= 2.2),
    logits max 0.0041, 99.7% agree. Bounds: features max 0.1 / mean 0.015, logits 0.01, 98% of pixels."""
    import numpy as np

    torch.manual_seed(0)
    ref = build_decoder(backend=backend, preset="tiny")
    if backend == "sam":
        with torch.no_grad():
            for name, param in ref.named_parameters():
                if "rel_pos" in name:
                    param.normal_(0.0, 0.5)
    half = copy.deepcopy(ref).bfloat16()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (200, 260, 3), dtype=np.uint8)
    image[50:150, 60:180] = (200, 40, 40)
    points = torch.tensor([[[100.0, 100.0]], [[30.0, 30.0]], [[200.0, 170.0]]])
    labels = torch.ones(3, 1, dtype=torch.long)
    e32, e16 = ref.encode([image])[0], half.encode([image])[0]
    assert e16.features.dtype == torch.bfloat16                     # the embedding in the decoder's dtype
    feat = (e16.features.float() - e32.features).abs()
    assert feat.max() < 0.1 and feat.mean() < 0.015, (feat.max(), feat.mean())
    with torch.no_grad():
        low32, _ = ref.mask_logits(e32, points=points, point_labels=labels, multimask=True)
        low16, _ = half.mask_logits(e16, points=points, point_labels=labels, multimask=True)
        up32, up16 = ref.upscale(low32, e32), half.upscale(low16, e16)
    assert up16.dtype == torch.float32                               # upcast before upscaling
    assert (low16.float() - low32).abs().max() < 0.01
    assert ((up16 > 0) == (up32 > 0)).float().mean() > 0.98
    pred = half.decode(e16, points=points, point_labels=labels)
    assert pred.masks.shape == (3, 200, 260) and pred.masks.dtype == bool


def test_sam2_hiera_attention_already_uses_sdpa(monkeypatch):
    """sam2 1.1.0's Hiera ``MultiScaleAttention`` calls ``F.scaled_dot_product_attention`` itself (no rel-pos bias
    to fold in): one call per trunk block, nothing to swap."""
    import numpy as np
    from sam2.modeling.backbones import hieradet

    calls = []
    real = hieradet.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    backend = build_decoder(backend="sam2", preset="tiny")
    monkeypatch.setattr(hieradet.F, "scaled_dot_product_attention", spy)
    backend.encode([np.zeros((64, 64, 3), np.uint8)])
    assert len(calls) == len(backend.sam2.image_encoder.trunk.blocks) == sum(SAM2_PRESETS["tiny"]["trunk_stages"])
