"""LLaVA-1.5 (transformers' ``llava-1.5-*-hf`` folders) as a box-speaking family: no ``[SEG]``; each box it answers
is decoded into a mask by a SAM / SAM2 decoder (``masks_from_boxes``).

Assembled from official files by a model directory holding only ``groundseg.json``::

    {"family": "llava-1.5", "vlm_path": "/models/llava-1.5-7b-hf",
     "decoder": {"backend": "sam", "preset": "vit_h"}, "decoder_checkpoint": "/models/sam_vit_h_4b8939.pth"}

What the model reads is what the folder's own ``AutoProcessor`` produces: its chat template, its tokenizer and its
image processor. The image is first padded to a centred square with the image mean colour (LLaVA-1.5's "pad"
mode, ``expand2square``): the boxes it was trained on (RefCOCO, ``[x1, y1, x2, y2]`` with 2 decimals) are relative
to that square, and the folder's resize + centre crop of a square keeps all of it. The VLM is a transformers
LLaVA, so the core's Grounder and PrefixEngine drive it as they drive the native family's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from grounding.errors import CheckpointError, QuestionError
from grounding.families.base import ModelFamily, register_family
from grounding.processor import IGNORE_INDEX, EncodedText, GroundingProcessor
from grounding.text.boxes import parse_answer


def vlm_folder(config, what: str) -> Path:
    """``config.vlm_path`` as a folder holding ``config.json``, or one clear error naming the path looked at."""
    if not config.vlm_path:
        raise CheckpointError(f"a {what} checkpoint is assembled from a transformers folder: set \"vlm_path\" in "
                              "groundseg.json (see weights/README.md)")
    folder = Path(config.vlm_path).expanduser()
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no {what} model at {folder} (looked for {folder / 'config.json'}); "
                              "see weights/README.md for the files to place there")
    return folder


def load_hf_processor(folder: Path):
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the processor of {folder}: {exc}") from exc


def pad_to_square(image: np.ndarray, mean: tuple[float, float, float]) -> np.ndarray:
    """uint8 ``H x W x 3`` -> ``S x S x 3``, S = max(H, W), the image centred (offsets ``(S - W) // 2``,
    ``(S - H) // 2``, as the box frame of ``grounding.text.box_formats`` assumes) on ``mean`` (0..1) colour."""
    h, w = image.shape[:2]
    side = max(h, w)
    square = np.empty((side, side, 3), np.uint8)
    square[:] = tuple(int(v * 255) for v in mean)
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = image
    return square


class Llava15Processor(GroundingProcessor):
    """``GroundingProcessor``'s interface over a llava-hf folder's ``AutoProcessor``: the folder's chat template and
    image processor; the prompt's ids as ``LlavaProcessor`` makes them (BOS, ``<image>`` expanded)."""

    def __init__(self, hf_processor, tokenizer, config, num_image_tokens: int):
        image_processor = hf_processor.image_processor
        size = getattr(image_processor, "crop_size", None) or image_processor.size
        side = size.get("height") or size.get("shortest_edge")
        super().__init__(tokenizer, config, side, num_image_tokens)
        self.hf_processor = hf_processor
        self.seg_token_id = -1   # no [SEG]: no id may match it
        self._pad_mean = tuple(image_processor.image_mean)

    def vision_pixels(self, image: np.ndarray) -> torch.Tensor:
        """uint8 ``H x W x 3`` -> the folder's ``pixel_values[0]`` ``[3, s, s]`` of the padded square."""
        square = Image.fromarray(pad_to_square(image, self._pad_mean))
        return self.hf_processor.image_processor(images=[square], return_tensors="pt")["pixel_values"][0]

    def build_prompt(self, question: str, visual_prompts: str = "") -> str:
        """The folder's chat template on one user turn (the image, then the question), generation prompt added."""
        text = question.strip() + (f" {visual_prompts}" if visual_prompts else "")
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.hf_processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def encode(self, prompt: str, answer: str | None = None) -> EncodedText:
        """The prompt's ids as ``LlavaProcessor`` makes them (``<image>`` repeated once per image token, then the
        tokenizer with its own special tokens, e.g. Llama's BOS); a given answer after it as the native processor
        tokenises one (ending with EOS)."""
        image = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        ids = self.tokenizer(prompt.replace(image, image * self.num_image_tokens))["input_ids"] if prompt else []
        labels = [IGNORE_INDEX] * len(ids)
        if answer is not None:
            answer_ids = self._ids(" " + answer.strip()) + [self.tokenizer.eos_token_id]
            ids, labels = ids + answer_ids, labels + answer_ids
        if len(ids) > self.config.max_length:
            raise QuestionError(f"the question is too long: {len(ids)} tokens with the image, the model accepts "
                                f"{self.config.max_length}")
        return EncodedText(ids, labels)


@register_family
class Llava15Family(ModelFamily):
    name = "llava-1.5"
    masks_from_boxes = True
    box_format = "llava"

    def build(self, config, tokenizer, dtype: torch.dtype = torch.float32):
        from transformers import LlavaForConditionalGeneration

        from grounding.model import GroundingModel
        from segdecoder import build_decoder

        folder = vlm_folder(config, "LLaVA-1.5")
        config.box_format = self.box_format   # visual prompts in the question are written the way it reads boxes
        decoder = build_decoder(**config.decoder, checkpoint=config.decoder_checkpoint)
        vlm = LlavaForConditionalGeneration.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        model = GroundingModel(config, vlm, decoder, seg_token_id=-1, ref_token_ids=(-1, -1))
        model.hf_processor = load_hf_processor(folder)
        return model.to(dtype)

    def load_tokenizer(self, directory: Path, config):
        return load_hf_processor(vlm_folder(config, "LLaVA-1.5")).tokenizer

    def processor(self, model, tokenizer) -> Llava15Processor:
        return Llava15Processor(model.hf_processor, tokenizer, model.config, model.num_image_tokens)

    def parse_answer(self, text: str, size: tuple[int, int], config):
        return parse_answer(text, size, self.box_format)
