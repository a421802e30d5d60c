"""GLaMM checkpoints (mbzuai-oryx/groundingLMM: GLaMM-RefSeg, GLaMM-FullScope, ...): LLaVA v1 with a Linear-GELU-
Linear projector, CLIP-L/14 at 336 px (576 image tokens), SAM ViT-H under ``model.grounding_encoder.*``, extra tokens
``<bbox> <point> <p> </p>``. Its prompts put the image in "The <image> provides an overview of the picture.\\n";
grounded answers name each object as ``<p> phrase </p> [SEG]``. Its region encoder (RoIAlign over CLIP layers)
is not run: a question with a box or click is refused with one clear line. Machinery: llava_v1.py."""
from __future__ import annotations

import re

from grounding.families.base import register_family
from grounding.families.lisa import LlavaV1Family
from grounding.families.llava_v1 import LlavaV1Layout
from grounding.text.boxes import ParsedTarget

GLAMM = LlavaV1Layout(
    family="glamm", architecture="GLaMMForCausalLM", sam_prefix="model.grounding_encoder.",
    projector="mlp2x_gelu", image_text="The {image} provides an overview of the picture.\n",
    required_tokens=("[SEG]", "<im_start>", "<im_end>", "<bbox>", "<point>", "<p>", "</p>"),
    # its folders say "legacy": false, but its transformers (4.28.0.dev0) had no such switch: legacy tokenisation
    legacy=True, ignored_prefixes=("model.region_encoder.",))

_PHRASE = re.compile(r"<p>(.*?)</p>\s*$", re.S)


@register_family
class GlammFamily(LlavaV1Family):
    name = "glamm"
    layout = GLAMM

    def parse_answer(self, text: str, size: tuple[int, int], config) -> list[ParsedTarget]:
        """One target per ``[SEG]``, named by the ``<p> phrase </p>`` right before it (None for a bare one)."""
        targets, start = [], 0
        for i, match in enumerate(re.finditer(re.escape("[SEG]"), text)):
            phrase = _PHRASE.search(text, start, match.start())
            begin = phrase.start() if phrase else match.start()
            targets.append(ParsedTarget(phrase=phrase.group(1).strip() if phrase else None, box=None, seg_index=i,
                                        span=(begin, match.end())))
            start = match.end()
        return targets
