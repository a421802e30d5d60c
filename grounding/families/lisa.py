"""LISA checkpoints (dvlab-research/LISA: LISA-7B-v1, LISA-13B-llama2-v1, ...): LLaVA v1 with one Linear projector,
CLIP-L/14 at 224 px (256 image tokens), SAM ViT-H under ``model.visual_model.*``. Machinery: llava_v1.py
(glamm.py is its sibling)."""
from __future__ import annotations

from pathlib import Path

import torch

from grounding.families.base import ModelFamily, register_family
from grounding.families.llava_v1 import LlavaV1Layout, LlavaV1Processor, build_llava_v1
from grounding.families.slow_llama_tokenizer import SlowLlamaTokenizer

LISA = LlavaV1Layout(family="lisa", architecture="LISAForCausalLM", sam_prefix="model.visual_model.",
                     projector="linear", image_text="{image}\n")


class LlavaV1Family(ModelFamily):
    """A [SEG] family of llava_v1.py; subclasses give the layout."""
    layout: LlavaV1Layout

    def build(self, config, tokenizer, dtype: torch.dtype = torch.float32):
        return build_llava_v1(config, self.layout, tokenizer, dtype)

    def load_tokenizer(self, directory: Path, config) -> SlowLlamaTokenizer:
        return SlowLlamaTokenizer(config.vlm_path, legacy=self.layout.legacy)

    def processor(self, model, tokenizer) -> LlavaV1Processor:
        return LlavaV1Processor(tokenizer, model.config, model.vision_image_size, model.num_image_tokens,
                                self.layout, model.llava_config.image_token_id)


@register_family
class LisaFamily(LlavaV1Family):
    name = "lisa"
    layout = LISA
