"""The native groundseg family: a transformers LLaVA VLM that writes Qwen-VL box text and ``[SEG]`` tokens,
with a SAM / SAM2 mask decoder; the checkpoint format of grounding/checkpoint.py."""
from __future__ import annotations

from pathlib import Path

import torch

from grounding.families.base import ModelFamily, register_family
from grounding.processor import GroundingProcessor


@register_family
class GroundsegFamily(ModelFamily):
    name = "groundseg"

    def build(self, config, tokenizer, dtype: torch.dtype = torch.float32):
        from grounding.model import GroundingModel
        return GroundingModel.build(config, tokenizer, dtype=dtype)

    def load_tokenizer(self, directory: Path, config):
        from grounding.checkpoint import load_tokenizer
        return load_tokenizer(directory, config)

    def processor(self, model, tokenizer) -> GroundingProcessor:
        return GroundingProcessor(tokenizer, model.config, model.vision_image_size, model.num_image_tokens)
