"""Size presets (data) and ``build_decoder``, the one way to make a mask-decoder backend.

A preset names an architecture; weights come separately from a local checkpoint file, or from a
parent model's state dict. The official presets carry the hyper-parameters of Meta's releases so
that their checkpoints load unchanged; ``tiny`` presets exist for tests and the small embedded
default model (random or self-trained weights only).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ImageEmbedding, MaskDecoderBackend, MaskPrediction
from .errors import CheckpointError, ImageError, PromptError

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM21_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"

# segment_anything: ViT image encoder + prompt encoder + two-way-transformer mask decoder.
_SAM_OFFICIAL_HEADS: dict[str, Any] = {
    "image_size": 1024, "patch_size": 16, "window_size": 14, "prompt_dim": 256,
    "decoder_depth": 2, "decoder_mlp_dim": 2048, "decoder_num_heads": 8,
    "iou_head_hidden_dim": 256, "mask_in_chans": 16,
}
SAM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "image_size": 256, "patch_size": 16, "window_size": 8, "prompt_dim": 64,
        "encoder_embed_dim": 64, "encoder_depth": 2, "encoder_num_heads": 2,
        "encoder_global_attn_indexes": [1],
        "decoder_depth": 2, "decoder_mlp_dim": 128, "decoder_num_heads": 4,
        "iou_head_hidden_dim": 64, "mask_in_chans": 16,
        "checkpoint_file": None, "checkpoint_url": None,
    },
    "vit_b": {
        **_SAM_OFFICIAL_HEADS, "encoder_embed_dim": 768, "encoder_depth": 12,
        "encoder_num_heads": 12, "encoder_global_attn_indexes": [2, 5, 8, 11],
        "checkpoint_file": "sam_vit_b_01ec64.pth", "checkpoint_url": _SAM_URL + "sam_vit_b_01ec64.pth",
    },
    "vit_l": {
        **_SAM_OFFICIAL_HEADS, "encoder_embed_dim": 1024, "encoder_depth": 24,
        "encoder_num_heads": 16, "encoder_global_attn_indexes": [5, 11, 17, 23],
        "checkpoint_file": "sam_vit_l_0b3195.pth", "checkpoint_url": _SAM_URL + "sam_vit_l_0b3195.pth",
    },
    "vit_h": {
        **_SAM_OFFICIAL_HEADS, "encoder_embed_dim": 1280, "encoder_depth": 32,
        "encoder_num_heads": 16, "encoder_global_attn_indexes": [7, 15, 23, 31],
        "checkpoint_file": "sam_vit_h_4b8939.pth", "checkpoint_url": _SAM_URL + "sam_vit_h_4b8939.pth",
    },
}

# sam2: Hiera trunk + FPN neck, memory attention/encoder (video only, but part of the checkpoint),
# SAM-style heads. Values follow the packaged configs/sam2.1/*.yaml; `dynamic_multimask_via_stability`
# is what sam2's own `build_sam2(apply_postprocessing=True)` adds for image prediction.
_SAM2_FLAGS: dict[str, Any] = {
    "num_maskmem": 7, "sigmoid_scale_for_mem_enc": 20.0, "sigmoid_bias_for_mem_enc": -10.0,
    "use_mask_input_as_output_without_sam": True, "directly_add_no_mem_embed": True,
    "no_obj_embed_spatial": True, "use_high_res_features_in_sam": True,
    "multimask_output_in_sam": True, "iou_prediction_use_sigmoid": True,
    "use_obj_ptrs_in_encoder": True, "add_tpos_enc_to_obj_ptrs": True,
    "proj_tpos_enc_in_obj_ptrs": True, "use_signed_tpos_enc_to_obj_ptrs": True,
    "only_obj_ptrs_in_the_past_for_eval": True, "pred_obj_scores": True,
    "pred_obj_scores_mlp": True, "fixed_no_obj_ptr": True, "multimask_output_for_tracking": True,
    "use_multimask_token_for_obj_ptr": True, "multimask_min_pt_num": 0, "multimask_max_pt_num": 1,
    "use_mlp_for_obj_ptr_proj": True, "compile_image_encoder": False,
    "sam_mask_decoder_extra_args": {
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    },
}
_SAM2_OFFICIAL_MEMORY: dict[str, Any] = {
    "image_size": 1024, "prompt_dim": 256, "window_pos_embed_bkg_spatial_size": [7, 7],
    "window_spec": [8, 4, 14, 7], "mem_dim": 64, "mem_attention_layers": 4,
    "mem_attention_ffn_dim": 2048, "mem_fuser_layers": 2,
}
SAM2_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "image_size": 256, "prompt_dim": 64, "trunk_embed_dim": 16, "trunk_num_heads": 1,
        "trunk_stages": [1, 1, 2, 1], "trunk_global_att_blocks": [3],
        "window_pos_embed_bkg_spatial_size": [4, 4], "window_spec": [8, 4, 4, 2],
        "mem_dim": 16, "mem_attention_layers": 1, "mem_attention_ffn_dim": 128,
        "mem_fuser_layers": 1, "flags": _SAM2_FLAGS,
        "checkpoint_file": None, "checkpoint_url": None,
    },
    "hiera_t": {
        **_SAM2_OFFICIAL_MEMORY, "trunk_embed_dim": 96, "trunk_num_heads": 1,
        "trunk_stages": [1, 2, 7, 2], "trunk_global_att_blocks": [5, 7, 9], "flags": _SAM2_FLAGS,
        "checkpoint_file": "sam2.1_hiera_tiny.pt", "checkpoint_url": _SAM21_URL + "sam2.1_hiera_tiny.pt",
    },
    "hiera_s": {
        **_SAM2_OFFICIAL_MEMORY, "trunk_embed_dim": 96, "trunk_num_heads": 1,
        "trunk_stages": [1, 2, 11, 2], "trunk_global_att_blocks": [7, 10, 13], "flags": _SAM2_FLAGS,
        "checkpoint_file": "sam2.1_hiera_small.pt", "checkpoint_url": _SAM21_URL + "sam2.1_hiera_small.pt",
    },
    "hiera_b+": {
        **_SAM2_OFFICIAL_MEMORY, "window_pos_embed_bkg_spatial_size": [14, 14],
        "trunk_embed_dim": 112, "trunk_num_heads": 2,
        "trunk_stages": [2, 3, 16, 3], "trunk_global_att_blocks": [12, 16, 20], "flags": _SAM2_FLAGS,
        "checkpoint_file": "sam2.1_hiera_base_plus.pt",
        "checkpoint_url": _SAM21_URL + "sam2.1_hiera_base_plus.pt",
    },
    "hiera_l": {
        **_SAM2_OFFICIAL_MEMORY, "window_pos_embed_bkg_spatial_size": [7, 7],
        "window_spec": [8, 4, 16, 8], "trunk_embed_dim": 144, "trunk_num_heads": 2,
        "trunk_stages": [2, 6, 36, 4], "trunk_global_att_blocks": [23, 33, 43], "flags": _SAM2_FLAGS,
        "checkpoint_file": "sam2.1_hiera_large.pt", "checkpoint_url": _SAM21_URL + "sam2.1_hiera_large.pt",
    },
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"sam": SAM_PRESETS, "sam2": SAM2_PRESETS}


def preset_spec(backend: str, preset: str) -> dict[str, Any]:
    """The hyper-parameters of ``backend``/``preset``; ValueError listing the choices otherwise."""
    if backend not in PRESETS:
        raise ValueError(f"unknown mask decoder backend {backend!r}; choose one of {sorted(PRESETS)}")
    if preset not in PRESETS[backend]:
        raise ValueError(
            f"unknown {backend} preset {preset!r}; choose one of {sorted(PRESETS[backend])}")
    return PRESETS[backend][preset]


def build_decoder(
    backend: str,
    preset: str,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    compile_encoder: bool = False,
) -> MaskDecoderBackend:
    """Build a backend (``"sam"`` or ``"sam2"``) of a preset size, in eval mode on the CPU.

    ``checkpoint``: local path of an official weights file (SAM ``.pth`` state dict, SAM2 ``.pt``
    with the state dict under ``"model"``); ``None`` keeps random weights (tests, or weights that
    a parent model's state dict will bring). ``image_size`` overrides the preset's square input
    side (SAM: changes position-embedding shapes, so official weights need 1024; SAM2: any
    multiple of 32 works with the same weights). ``compile_encoder`` wraps the image encoder in
    ``torch.compile`` (compiled on the first ``encode``; off by default). Raises ``CheckpointError`` for a missing or
    mismatching file, ``ValueError`` for an unknown backend/preset or a bad ``image_size``.
    """
    spec = preset_spec(backend, preset)
    if checkpoint is not None:   # fail before allocating a model that may be gigabytes
        check_checkpoint_path(checkpoint, backend=backend, preset=preset, spec=spec)
    # Imported here so that `import segdecoder` does not pull in sam2 (hydra init) or
    # segment_anything until a backend is actually built.
    if backend == "sam":
        from .sam import SamBackend as cls
    else:
        from .sam2 import Sam2Backend as cls
    model = cls.from_spec(spec, preset=preset, image_size=image_size, compile_encoder=compile_encoder)
    if checkpoint is not None:
        model.load_checkpoint(checkpoint)
    return model.eval()


# ---- plumbing shared by both backends -------------------------------------------------------

def where_to_get(spec: dict[str, Any], backend: str, preset: str) -> str:
    """Human hint on where the official file of a preset comes from."""
    if spec.get("checkpoint_url"):
        return f"get {spec['checkpoint_file']} from {spec['checkpoint_url']}"
    return (f"{backend} preset {preset!r} has no official weights; save one with "
            f"torch.save(backend.state_dict(), path) or build without a checkpoint")


def check_checkpoint_path(path: str | Path, *, backend: str, preset: str,
                          spec: dict[str, Any]) -> Path:
    """The path as a ``Path``; ``CheckpointError`` naming it and its source if it is no file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} ({where_to_get(spec, backend, preset)})")
    return path


def read_state_dict(path: str | Path, *, backend: str, preset: str, spec: dict[str, Any]) -> dict:
    """Load a checkpoint file into a plain ``{name: tensor}`` dict (never unpickles code).

    Accepts a bare state dict, one wrapped under ``"model"`` (SAM2 release files), and a
    ``state_dict()`` of our own backend (keys prefixed ``sam.`` / ``sam2.``).
    """
    path = check_checkpoint_path(path, backend=backend, preset=preset, spec=spec)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / non-weights files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from err
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    prefix = backend + "."
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_checked(module, state: dict, *, path: str | Path, backend: str, preset: str) -> None:
    """``module.load_state_dict(state)`` that fails with one clear line instead of a wall of keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)}!={tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{name} {len(keys)} (e.g. {', '.join(keys[:3])})"
                 for name, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("shape mismatch", wrong)) if keys]
        raise CheckpointError(f"checkpoint {path} does not match {backend} preset {preset!r}: "
                              + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def check_image(image) -> None:
    """Raise ``ImageError`` unless ``image`` is a non-empty ``uint8`` ``H x W x 3`` array."""
    if (not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3
            or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0):
        got = (f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray)
               else type(image).__name__)
        raise ImageError(f"expected a uint8 H x W x 3 RGB array, got {got}")


class SamFamilyBackend:
    """What the SAM and SAM2 backends share: prompt checking, best-of-3 choice, ``decode``.

    Mixed into ``torch.nn.Module`` subclasses that define ``backend_name`` (and call ``_describe`` for
    ``preset``, ``spec``, ``prompt_dim``, ``image_size``), ``official_model()`` (the wrapped ``Sam`` / ``SAM2Base``, what
    official checkpoint files hold), ``encode_with_grad``, ``mask_logits`` and ``upscale``.
    """

    def _describe(self, preset: str, spec: dict[str, Any] | None, image_size: int, prompt_dim: int) -> None:
        """The attributes every backend has (call from ``__init__``, after ``nn.Module.__init__``)."""
        self.preset = preset
        self.spec = dict(spec or {})
        self.image_size = int(image_size)
        self.prompt_dim = int(prompt_dim)
        self.encode_batch_size = 4   # images per image-encoder call in `encode`

    def _prompt_tokens(self, enc, n: int, seg: torch.Tensor | None, encoded=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse, dense) from the prompt encoder ``enc``'s output ``encoded`` (None: no point or box, so
        no sparse token and the "no mask" dense embedding), then one ``[SEG]`` token per prompt appended."""
        if encoded is None:
            sparse = enc.no_mask_embed.weight.new_zeros((n, 0, self.prompt_dim))
            dense = enc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *enc.image_embedding_size)
        else:
            sparse, dense = encoded
        if seg is not None:
            sparse = torch.cat([sparse.to(seg.dtype), seg[:, None, :]], dim=1)
        return sparse, dense

    def config(self) -> dict[str, Any]:
        """Keyword arguments of ``build_decoder`` that rebuild this architecture (no weights)."""
        return {"backend": self.backend_name, "preset": self.preset, "image_size": self.image_size}

    def load_checkpoint(self, path: str | Path):
        """Load an official file (or our own ``state_dict()``) into ``official_model()``."""
        state = read_state_dict(path, backend=self.backend_name, preset=self.preset, spec=self.spec)
        load_checked(self.official_model(), state, path=path, backend=self.backend_name, preset=self.preset)
        return self

    @torch.no_grad()
    def encode(self, images) -> list[ImageEmbedding]:
        """Run the image encoder (no grad) on a batch of images; one embedding per image."""
        return self.encode_with_grad(images)

    def check_prompts(self, embedding: ImageEmbedding, seg_embeddings=None, points=None,
                      point_labels=None, boxes=None):
        """Validate and convert prompts; returns ``(N, seg, points, labels, boxes)``.

        seg ``[N, prompt_dim]`` (decoder dtype, keeps its autograd graph), points ``[N, K, 2]``
        float32 pixel xy, labels ``[N, K]`` int32 in {1 fg, 0 bg, -1 padding}, boxes ``[N, 4]``
        float32 pixel xyxy; all on the module's device; absent ones stay ``None``. N may be 0.
        """
        param = next(self.trainable_decoder_module().parameters())
        dev, dtype = param.device, param.dtype
        H, W = embedding.original_size
        sizes: dict[str, int] = {}
        if seg_embeddings is not None:
            seg_embeddings = torch.as_tensor(seg_embeddings)
            if seg_embeddings.ndim != 2 or seg_embeddings.shape[1] != self.prompt_dim:
                raise PromptError(f"seg_embeddings must be [N, {self.prompt_dim}], "
                                  f"got {list(seg_embeddings.shape)}")
            seg_embeddings = seg_embeddings.to(dev, dtype)
            sizes["seg_embeddings"] = seg_embeddings.shape[0]
        if points is not None or point_labels is not None:
            if points is None or point_labels is None:
                raise PromptError("points and point_labels must be given together")
            points = torch.as_tensor(points).to(dev, torch.float32)
            point_labels = torch.as_tensor(point_labels).to(dev, torch.int32)
            if points.ndim != 3 or points.shape[2] != 2 or point_labels.shape != points.shape[:2]:
                raise PromptError(f"points must be [N, K, 2] with point_labels [N, K], got "
                                  f"{list(points.shape)} and {list(point_labels.shape)}")
            if not bool(((point_labels >= -1) & (point_labels <= 1)).all()):
                raise PromptError("point_labels must be 1 (foreground), 0 (background) or -1 (padding)")
            real = points[point_labels >= 0]
            if real.numel() and not bool(((real >= 0).all() & (real[:, 0] <= W).all()
                                          & (real[:, 1] <= H).all())):
                raise PromptError(f"a point lies outside the {W}x{H} image")
            sizes["points"] = points.shape[0]
        if boxes is not None:
            boxes = torch.as_tensor(boxes).to(dev, torch.float32)
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise PromptError(f"boxes must be [N, 4] xyxy, got {list(boxes.shape)}")
            x1, y1, x2, y2 = boxes.unbind(1)
            if not bool(((x1 >= 0) & (y1 >= 0) & (x2 <= W) & (y2 <= H)
                         & (x2 >= x1) & (y2 >= y1)).all()):
                raise PromptError(f"boxes must be x1<=x2, y1<=y2 inside the {W}x{H} image")
            sizes["boxes"] = boxes.shape[0]
        if not sizes:
            raise PromptError("no prompt given: pass seg_embeddings, points or boxes")
        if len(set(sizes.values())) != 1:
            raise PromptError(f"prompts disagree on N: {sizes}")
        return next(iter(sizes.values())), seg_embeddings, points, point_labels, boxes

    def no_masks(self, embedding: ImageEmbedding, like: torch.Tensor,
                 multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``mask_logits`` for N = 0 prompts (an answer without [SEG]): empty, not an error."""
        m = 3 if multimask else 1
        h, w = embedding.features.shape[-2:]
        return like.new_zeros((0, m, 4 * h, 4 * w)), like.new_zeros((0, m))

    def decode(self, embedding: ImageEmbedding, seg_embeddings=None, points=None,
               point_labels=None, boxes=None, multimask: bool = False,
               threshold: float = 0.0) -> MaskPrediction:
        """No grad. One mask per prompt (best of 3 by predicted IoU with ``multimask``).

        Returns ``MaskPrediction``: masks ``[N, H, W]`` bool (logit > threshold), scores ``[N]``,
        low_res_logits ``[N, h', w']`` of the chosen mask.
        """
        with torch.no_grad():
            low, iou = self.mask_logits(embedding, seg_embeddings, points, point_labels, boxes,
                                        multimask=multimask)
            best = iou.argmax(dim=1) if multimask else torch.zeros_like(iou[:, 0], dtype=torch.long)
            rows = torch.arange(low.shape[0], device=low.device)
            low, iou = low[rows, best][:, None], iou[rows, best]
            # Upscaling is per channel, so upscaling only the chosen mask gives the same pixels.
            logits = self.upscale(low, embedding)[:, 0]
            return MaskPrediction(
                masks=(logits > threshold).cpu().numpy(),
                scores=iou.float().cpu().numpy(),
                low_res_logits=self.clamp_low_res(low[:, 0]),
            )

    def clamp_low_res(self, low: torch.Tensor) -> torch.Tensor:
        """Hook: how the chosen low-res logits are handed back (SAM: as they are)."""
        return low

    def autocast(self):
        """Autocast to the module's dtype when it is not float32: the official prompt encoders
        build float32 tensors internally, which would clash with bf16/fp16 weights."""
        param = next(self.trainable_decoder_module().parameters())
        if param.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(param.device.type, dtype=param.dtype)
