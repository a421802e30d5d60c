"""Mask-decoder backends (segdecoder): fidelity to Meta's predictors, shapes, gradients,
checkpoints and presets. CPU only, tiny presets with seeded random weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from grounding.errors import CheckpointError, ImageError, PromptError
from segdecoder import PRESETS, ImageEmbedding, MaskDecoderBackend, build_decoder

H, W = 90, 130   # non-square on purpose: exercises resize, padding and aspect handling


def _image(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """A smooth random picture (upscaled blobs plus noise), so that resizing is not pure noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(blobs).resize((w, h), Image.BICUBIC), dtype=np.float32)
    return np.clip(smooth + rng.normal(0, 8, size=(h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _image()


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_decoder("sam", "tiny")


@pytest.fixture(scope="module")
def sam2():
    torch.manual_seed(0)
    return build_decoder("sam2", "tiny")


@pytest.fixture(params=["sam", "sam2"])
def backend(request, sam, sam2):
    return {"sam": sam, "sam2": sam2}[request.param]


# Prompts in the predictors' numpy convention: one prompt set per call.
CASES = {
    "points": dict(point_coords=np.array([[30.0, 40.0], [100.0, 70.0]]), point_labels=np.array([1, 0])),
    "box": dict(box=np.array([12.0, 8.0, 110.0, 77.0])),
    "points+box": dict(point_coords=np.array([[60.0, 45.0]]), point_labels=np.array([1]),
                       box=np.array([20.0, 10.0, 120.0, 85.0])),
}


def _ours(case: dict) -> dict:
    """A predictor-style prompt set -> our keyword arguments with N = 1."""
    out = {}
    if "point_coords" in case:
        out["points"] = torch.tensor(case["point_coords"], dtype=torch.float32)[None]
        out["point_labels"] = torch.tensor(case["point_labels"])[None]
    if "box" in case:
        out["boxes"] = torch.tensor(case["box"], dtype=torch.float32)[None]
    return out


def _check_against(backend, emb, ref_predict, case, multimask):
    ref_logits, ref_iou, ref_low = ref_predict(**case, multimask_output=multimask, return_logits=True)
    low, iou = backend.mask_logits(emb, **_ours(case), multimask=multimask)
    np.testing.assert_allclose(iou[0].detach().numpy(), ref_iou, atol=1e-5)
    low_np = low[0].detach().numpy()
    if backend.backend_name == "sam2":
        low_np = np.clip(low_np, -32, 32)   # the predictor hands back clamped low-res logits
    np.testing.assert_allclose(low_np, ref_low, atol=1e-4)
    np.testing.assert_allclose(backend.upscale(low, emb)[0].detach().numpy(), ref_logits, atol=1e-4)
    out = backend.decode(emb, **_ours(case), multimask=multimask)
    best = int(ref_iou.argmax())
    sure = np.abs(ref_logits[best]) > 1e-3   # pixels a 1e-6 rounding cannot flip
    assert out.masks.shape == (1, H, W) and out.masks.dtype == bool
    assert np.array_equal(out.masks[0][sure], (ref_logits[best] > 0)[sure])
    np.testing.assert_allclose(out.scores, ref_iou[best:best + 1], atol=1e-5)


@pytest.mark.parametrize("multimask", [False, True])
def test_sam_matches_sam_predictor(sam, image, multimask):
    from segment_anything import SamPredictor

    ref = SamPredictor(sam.sam)
    ref.set_image(image)
    emb = sam.encode([image])[0]
    assert emb.original_size == (H, W) and emb.input_size == tuple(ref.input_size) == (177, 256)
    torch.testing.assert_close(emb.features, ref.features, atol=1e-5, rtol=0)
    for case in CASES.values():
        _check_against(sam, emb, ref.predict, case, multimask)


@pytest.mark.parametrize("multimask", [False, True])
def test_sam2_matches_sam2_image_predictor(sam2, image, multimask):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    ref = SAM2ImagePredictor(sam2.sam2)
    s = sam2.image_size
    ref._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]  # hard-coded 1024
    ref.set_image(image)
    emb = sam2.encode([image])[0]
    assert emb.input_size == (s, s) and emb.original_size == (H, W)
    torch.testing.assert_close(emb.features, ref._features["image_embed"], atol=1e-5, rtol=0)
    for ours, theirs in zip(emb.high_res, ref._features["high_res_feats"]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    for case in CASES.values():
        _check_against(sam2, emb, ref.predict, case, multimask)


def test_batched_boxes_match_predictors(sam, sam2, image):
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    from segment_anything import SamPredictor

    boxes = np.array([[12.0, 8.0, 110.0, 77.0], [0.0, 0.0, 60.0, 50.0], [70.0, 30.0, 130.0, 90.0]])
    ref = SamPredictor(sam.sam)
    ref.set_image(image)
    ref_logits, ref_iou, _ = ref.predict_torch(
        None, None, boxes=torch.as_tensor(ref.transform.apply_boxes(boxes, ref.original_size),
                                          dtype=torch.float32),
        multimask_output=False, return_logits=True)
    emb = sam.encode([image])[0]
    low, iou = sam.mask_logits(emb, boxes=torch.tensor(boxes, dtype=torch.float32))
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=0)
    torch.testing.assert_close(sam.upscale(low, emb), ref_logits, atol=1e-4, rtol=0)

    ref2 = SAM2ImagePredictor(sam2.sam2)
    s = sam2.image_size
    ref2._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    ref2.set_image(image)
    ref_logits, ref_iou, _ = ref2.predict(box=boxes, multimask_output=False, return_logits=True)
    emb = sam2.encode([image])[0]
    low, iou = sam2.mask_logits(emb, boxes=torch.tensor(boxes, dtype=torch.float32))
    np.testing.assert_allclose(iou.detach().numpy(), ref_iou, atol=1e-5)
    np.testing.assert_allclose(sam2.upscale(low, emb).detach().numpy(), ref_logits, atol=1e-4)


def _mixed_prompts(backend, n=3):
    torch.manual_seed(1)
    return dict(
        seg_embeddings=torch.randn(n, backend.prompt_dim),
        points=torch.tensor([[[30.0, 40.0], [0.0, 0.0]], [[60.0, 50.0], [100.0, 20.0]],
                             [[5.0, 5.0], [0.0, 0.0]]]),
        point_labels=torch.tensor([[1, -1], [1, 0], [0, -1]]),   # -1: padding of a short click list
        boxes=torch.tensor([[10.0, 10.0, 80.0, 60.0], [0.0, 0.0, 130.0, 90.0],
                            [50.0, 20.0, 120.0, 85.0]]),
    )


def test_mixed_prompts_shapes_and_best_of_three(backend, image):
    emb = backend.encode([image])[0]
    prompts = _mixed_prompts(backend)
    low, iou = backend.mask_logits(emb, **prompts, multimask=True)
    side = backend.image_size // 4
    assert low.shape == (3, 3, side, side) and iou.shape == (3, 3)
    pred = backend.decode(emb, **prompts, multimask=True)
    assert pred.masks.shape == (3, H, W) and pred.masks.dtype == np.bool_
    assert pred.scores.shape == (3,) and pred.low_res_logits.shape == (3, side, side)
    best = iou.argmax(dim=1)
    np.testing.assert_allclose(pred.scores, iou.max(dim=1).values.detach().numpy(), atol=1e-6)
    expected = backend.upscale(low, emb)[torch.arange(3), best] > 0
    assert np.array_equal(pred.masks, expected.numpy())
    # each prompt alone gives what its row of the batched call gave
    for i in range(3):
        one = {k: v[i:i + 1] for k, v in prompts.items()}
        low_i, iou_i = backend.mask_logits(emb, **one, multimask=True)
        torch.testing.assert_close(low_i, low[i:i + 1], atol=1e-4, rtol=0)
        torch.testing.assert_close(iou_i, iou[i:i + 1], atol=1e-5, rtol=0)


def test_seg_embedding_is_one_token_and_one_decoder_call(backend, image):
    emb = backend.encode([image])[0]
    seg = torch.randn(4, backend.prompt_dim)
    sparse, dense = backend.prompt_embeddings(emb, seg_embeddings=seg)
    assert sparse.shape == (4, 1, backend.prompt_dim) and torch.equal(sparse[:, 0], seg)
    assert dense.shape == (4, backend.prompt_dim, *emb.features.shape[-2:])
    # with clicks: their tokens (+ SAM's not-a-point pad), then the seg token last
    pts = dict(points=torch.tensor([[[30.0, 40.0]]] * 4), point_labels=torch.ones(4, 1))
    sparse, _ = backend.prompt_embeddings(emb, seg_embeddings=seg, **pts)
    assert sparse.shape == (4, 3, backend.prompt_dim) and torch.equal(sparse[:, -1], seg)
    calls = []
    hook = backend.trainable_decoder_module().register_forward_hook(lambda *a: calls.append(1))
    try:
        pred = backend.decode(emb, seg_embeddings=seg)
    finally:
        hook.remove()
    assert len(calls) == 1 and pred.masks.shape == (4, H, W)


def test_gradients_reach_seg_embeddings_and_decoder_only(backend, image):
    emb = backend.encode([image])[0]
    backend.zero_grad(set_to_none=True)
    backend.train()
    try:
        x = torch.randn(2, backend.prompt_dim, requires_grad=True)
        low, _ = backend.mask_logits(emb, seg_embeddings=x)
        logits = backend.upscale(low, emb)
        assert logits.shape == (2, 1, H, W)
        target = torch.zeros_like(logits)
        target[..., 20:60, 30:90] = 1
        torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
    finally:
        backend.eval()
    assert x.grad is not None and x.grad.abs().sum() > 0
    decoder_grads = [p.grad for p in backend.trainable_decoder_module().parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in decoder_grads)
    assert all(p.grad is None for p in backend.frozen_image_encoder_module().parameters())
    backend.zero_grad(set_to_none=True)


def test_encode_batches_and_sizes(backend):
    images = [_image(90, 130, 1), _image(130, 90, 2), _image(64, 64, 3)]
    backend.encode_batch_size = 2
    try:
        many = backend.encode(images)
    finally:
        backend.encode_batch_size = 4
    assert [e.original_size for e in many] == [(90, 130), (130, 90), (64, 64)]
    if backend.backend_name == "sam":
        assert [e.input_size for e in many] == [(177, 256), (256, 177), (256, 256)]
    for img, e in zip(images, many):
        alone = backend.encode([img])[0]
        assert isinstance(e, ImageEmbedding) and e.features.shape == alone.features.shape
        torch.testing.assert_close(e.features, alone.features, atol=1e-4, rtol=0)
        assert e.features.shape[:2] == (1, backend.prompt_dim)


def test_protocol_config_and_state_dict_names(backend):
    assert isinstance(backend, MaskDecoderBackend) and isinstance(backend, torch.nn.Module)
    config = backend.config()
    json.dumps(config)
    rebuilt = build_decoder(**config)
    rebuilt.load_state_dict(backend.state_dict())   # same architecture, same names
    owner = "sam" if backend.backend_name == "sam" else "sam2"
    decoder = "mask_decoder" if owner == "sam" else "sam_mask_decoder"
    assert any(k.startswith(f"{owner}.{decoder}.") for k in backend.state_dict())
    assert backend.trainable_decoder_module() is getattr(getattr(backend, owner), decoder)


def test_tiny_sam_is_small():
    model = build_decoder("sam", "tiny")
    assert sum(p.numel() for p in model.parameters()) * 4 < 2_000_000


# ---- checkpoints ---------------------------------------------------------------------------

def test_checkpoint_round_trip(sam, sam2, image, tmp_path):
    torch.save(sam.sam.state_dict(), tmp_path / "sam_tiny.pth")            # official layout
    torch.save({"model": sam2.sam2.state_dict()}, tmp_path / "sam2_tiny.pt")  # under "model"
    torch.save(sam.state_dict(), tmp_path / "ours.pth")                     # keys "sam.*"
    torch.manual_seed(123)   # different random init: the checkpoint must overwrite it all
    for original, path in ((sam, "sam_tiny.pth"), (sam2, "sam2_tiny.pt"), (sam, "ours.pth")):
        loaded = build_decoder(original.backend_name, "tiny", checkpoint=tmp_path / path)
        for (k, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), k
        emb = loaded.encode([image])[0]
        seg = torch.ones(1, loaded.prompt_dim)
        assert np.array_equal(loaded.decode(emb, seg_embeddings=seg).masks,
                              original.decode(original.encode([image])[0], seg_embeddings=seg).masks)


def test_missing_checkpoint_names_path_and_source(tmp_path):
    path = tmp_path / "nowhere" / "sam_vit_b_01ec64.pth"
    with pytest.raises(CheckpointError) as err:
        build_decoder("sam", "vit_b", checkpoint=path)   # fails before building 94M params
    assert str(path) in str(err.value) and "dl.fbaipublicfiles.com" in str(err.value)
    with pytest.raises(CheckpointError, match="no official weights"):
        build_decoder("sam2", "tiny", checkpoint=tmp_path / "x.pt")


def test_mismatched_checkpoint_is_a_clear_error(sam, sam2, tmp_path):
    torch.save(sam.sam.state_dict(), tmp_path / "sam_tiny.pth")
    torch.save({"model": sam2.sam2.state_dict()}, tmp_path / "sam2_tiny.pt")
    with pytest.raises(CheckpointError) as err:   # same keys, other shapes (pos_embed, rel_pos)
        build_decoder("sam", "tiny", checkpoint=tmp_path / "sam_tiny.pth", image_size=512)
    msg = str(err.value)
    assert "sam_tiny.pth" in msg and "'tiny'" in msg and "pos_embed" in msg and "\n" not in msg
    with pytest.raises(CheckpointError) as err:   # another family altogether
        build_decoder("sam", "tiny", checkpoint=tmp_path / "sam2_tiny.pt")
    assert "sam2_tiny.pt" in str(err.value) and "missing" in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        build_decoder("sam", "tiny", checkpoint=tmp_path / "junk.pth")


# ---- presets and input errors ---------------------------------------------------------------

def test_presets_listed():
    assert set(PRESETS["sam"]) == {"tiny", "vit_b", "vit_l", "vit_h"}
    assert set(PRESETS["sam2"]) == {"tiny", "hiera_t", "hiera_s", "hiera_b+", "hiera_l"}
    with pytest.raises(ValueError, match="vit_h"):
        build_decoder("sam", "vit_x")
    with pytest.raises(ValueError, match="sam2"):
        build_decoder("sam3", "tiny")
    with pytest.raises(ValueError, match="multiple of 32"):
        build_decoder("sam2", "tiny", image_size=100)


def test_official_sam_vit_b_matches_segment_anything():
    from segment_anything import sam_model_registry

    with torch.device("meta"):   # shapes only: no 94M-parameter allocation
        ours = build_decoder("sam", "vit_b")
        ref = sam_model_registry["vit_b"]()
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(93.7e6, rel=0.002)
    assert {k: v.shape for k, v in ours.sam.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.image_size == 1024 and ours.prompt_dim == 256


def test_official_sam2_hiera_t_matches_packaged_config():
    from sam2.build_sam import build_sam2

    ours = build_decoder("sam2", "hiera_t")   # Hiera cannot be built on 'meta'; 0.3 s on CPU
    ref = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", device="cpu")
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(38.9e6, rel=0.002)
    assert {k: v.shape for k, v in ours.sam2.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.image_size == 1024 and ours.prompt_dim == 256


def test_bad_inputs_raise_typed_errors(sam, image):
    emb = sam.encode([image])[0]
    with pytest.raises(ImageError):
        sam.encode([image.astype(np.float32)])
    with pytest.raises(ImageError):
        sam.preprocess(image[..., :2])
    bad = [
        {},                                                               # nothing
        dict(seg_embeddings=torch.randn(2, 7)),                           # wrong width
        dict(points=torch.zeros(1, 1, 2)),                                # labels missing
        dict(points=torch.zeros(1, 1, 2), point_labels=torch.tensor([[2]])),
        dict(points=torch.tensor([[[500.0, 5.0]]]), point_labels=torch.ones(1, 1)),
        dict(boxes=torch.tensor([[50.0, 5.0, 10.0, 60.0]])),              # x2 < x1
        dict(seg_embeddings=torch.randn(2, sam.prompt_dim), boxes=torch.zeros(3, 4)),
    ]
    for prompts in bad:
        with pytest.raises(PromptError):
            sam.decode(emb, **prompts)


def test_bfloat16_module_runs(image):
    torch.manual_seed(0)
    for name in ("sam", "sam2"):
        model = build_decoder(name, "tiny").to(torch.bfloat16)
        emb = model.encode([image])[0]
        assert emb.features.dtype == torch.bfloat16
        pred = model.decode(emb, **_mixed_prompts(model), multimask=True)
        assert pred.masks.shape == (3, H, W) and np.isfinite(pred.scores).all()


def test_zero_seg_embeddings_give_empty_results(backend, image):
    """An answer without [SEG] is a normal case: empty outputs, not an error."""
    emb = backend.encode([image])[0]
    low, iou = backend.mask_logits(emb, seg_embeddings=torch.zeros(0, backend.prompt_dim),
                                   multimask=True)
    assert low.shape[:2] == (0, 3) and iou.shape == (0, 3)
    assert backend.upscale(low, emb).shape == (0, 3, H, W)
    pred = backend.decode(emb, seg_embeddings=torch.zeros(0, backend.prompt_dim))
    assert pred.masks.shape == (0, H, W) and pred.scores.shape == (0,)


def test_masks_are_cut_to_their_grown_boxes():
    """A mask that spills beyond its box loses what lies past the box grown by the margin, and nothing else."""
    from segdecoder.masks import clip_to_boxes

    masks = np.zeros((2, 40, 60), bool)
    masks[0, 10:20, 10:50] = True                 # spills right of its box (x 10..30)
    masks[1, 5:15, 5:15] = True                   # inside its box
    boxes = np.array([[10, 10, 30, 20], [0, 0, 20, 20]], np.float64)
    out = clip_to_boxes(masks, boxes, 0.1)        # box 0 grows 2 px a side in x, 1 px in y
    assert out[0].any(0).nonzero()[0].tolist() == list(range(10, 32))
    assert (out[1] == masks[1]).all()
    assert (masks[0, 10:20, 10:50]).all()         # the input is left alone
    assert clip_to_boxes(masks, boxes, 0.0)[0].sum() == 10 * 20
