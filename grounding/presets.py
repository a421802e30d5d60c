"""Size presets of the VLM, as data. ``tiny`` is for tests and for trying the CLI before trained weights exist."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from grounding.checkpoint import save_checkpoint
from grounding.config import GroundingConfig
from grounding.model import GroundingModel
from grounding.text.tokenizer import train_tokenizer

_SMALL_TEXT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)

VLM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=64, patch_size=16, projection_dim=32),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False),
        "max_length": 512,
    },
    # ~6M parameters (~24 MB fp32), fast enough to train on a 2-core CPU: the default model's first sizes, with
    # CLIP's patch embedding at 128 px.
    "small": {
        "vision": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                       image_size=128, patch_size=16, projection_dim=192),
        "text": _SMALL_TEXT,
        "max_length": 512,
    },
    # The embedded default model (weights/shapes-tiny): ``small``'s language model; the tower reads 256 px
    # through a convolutional stem (the ``vision_stem`` add-on, shapes/vision_stem.py) into the same 8x8 = 64
    # tokens, so that a 10-pixel star is still a star, and the language model reads its LAST layer (stage 0
    # trains it there).
    "shapes": {
        "vision": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                       image_size=256, patch_size=32, projection_dim=192),
        "text": _SMALL_TEXT,
        "max_length": 512,
        "addons": {"vision_stem": {"kind": "conv"}, "projector_norm": {}},
        "vision_feature_layer": -1,
    },
    # LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px -> 576 image tokens; Llama-2-7B), for benchmarks with
    # random weights. Real weights come from a local llava-1.5-7b-hf folder (GroundingConfig.vlm_path).
    "llava-1.5-7b": {
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
        "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False),
        "max_length": 2048,
    },
}


def vlm_config(preset: str, vocab_size: int, image_token_id: int, pad_token_id: int) -> dict[str, Any]:
    """A ``LlavaConfig`` kwargs dict (vision + text configs as plain dicts, as ``LlavaConfig.to_dict`` gives)."""
    if preset not in VLM_PRESETS:
        raise ValueError(f"unknown VLM preset {preset!r}; choose one of {', '.join(VLM_PRESETS)}")
    p = VLM_PRESETS[preset]
    vision = dict(model_type="clip_vision_model", **p["vision"])
    text = dict(model_type="llama", vocab_size=vocab_size, pad_token_id=pad_token_id, **p["text"])
    n_tokens = (p["vision"]["image_size"] // p["vision"]["patch_size"]) ** 2
    return dict(vision_config=vision, text_config=text, image_token_id=image_token_id, image_seq_length=n_tokens,
                vision_feature_select_strategy="default", vision_feature_layer=p.get("vision_feature_layer", -2))


def build_random(vlm_preset: str = "tiny", decoder: dict[str, Any] | None = None, seed: int = 0,
                 seg_state: str = "seg", corpus: Iterable[str] | None = None,
                 vocab_size: int = 512) -> tuple[GroundingModel, Any]:
    """A random-weight model of the given sizes and a tokenizer trained on ``corpus`` (default: a word list)."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus, vocab_size) if corpus is not None else train_tokenizer()
    config = GroundingConfig(
        vlm=vlm_config(vlm_preset, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id),
        decoder=decoder or {"backend": "sam", "preset": "tiny"}, addons=VLM_PRESETS[vlm_preset].get("addons", {}),
        seg_state=seg_state, max_length=VLM_PRESETS[vlm_preset]["max_length"],
    )
    return GroundingModel.build(config, tokenizer), tokenizer


def init_tiny(directory: str | Path, seed: int = 0, backend: str = "sam") -> Path:
    """Write a tiny random checkpoint (for tests, and to try the CLI before trained weights exist)."""
    model, tokenizer = build_random("tiny", {"backend": backend, "preset": "tiny"}, seed)
    return save_checkpoint(model, tokenizer, directory)
