"""Qwen2-VL and Qwen2.5-VL (transformers folders) as box-speaking families: no ``[SEG]``; each box they answer is
decoded into a mask by a SAM / SAM2 decoder (``masks_from_boxes``).

Assembled from official files by a model directory holding only ``groundseg.json``::

    {"family": "qwen2.5-vl", "vlm_path": "/models/Qwen2.5-VL-7B-Instruct",
     "decoder": {"backend": "sam2", "preset": "hiera_l"}, "decoder_checkpoint": "/models/sam2.1_hiera_large.pt"}

The folder's own ``AutoProcessor`` builds every input: its chat template, its tokenizer, and its image processor,
which resizes each image to ``smart_resize`` multiples of 28 (between its min and max pixels) and cuts it into
patches whose number varies with the image. Boxes come back as
  - Qwen2-VL: ``<|object_ref_start|>p<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``, 0..1000 of the
    image's sides;
  - Qwen2.5-VL: JSON ``{"bbox_2d": [x1, y1, x2, y2], "label": p}`` in pixels of the RESIZED input, mapped back
    through the same ``smart_resize`` (``input_size``).

Qwen's VLMs take image patches and 3-D rotary positions, not LLaVA's inputs (``llava_inputs = False``): the
family generates batches itself (left padding, greedy) and ``PrefixEngine`` answers its questions through
``Grounder.predict_batch`` without sharing an image prefix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList

from grounding.families.base import ModelFamily, register_family
from grounding.families.llava15 import load_hf_processor, vlm_folder
from grounding.processor import IGNORE_INDEX, EncodedText
from grounding.text.box_formats import format_box_as, format_point_as
from grounding.text.boxes import parse_answer


class QwenGroundingModel(nn.Module):
    """A Qwen2-VL / Qwen2.5-VL ``vlm``, the folder's ``hf_processor`` and a SAM / SAM2 ``mask_decoder``.
    ``family``: the family bound to this processor's resize (``QwenFamily.bound``)."""

    def __init__(self, config, vlm: nn.Module, mask_decoder: nn.Module, hf_processor, family: "QwenFamily"):
        super().__init__()
        self.config, self.vlm, self.mask_decoder = config, vlm, mask_decoder
        self.hf_processor = hf_processor
        self.addons = nn.ModuleDict()   # no add-on weights; mask steps may still be turned on
        self._family = family

    @property
    def family(self) -> "QwenFamily":
        return self._family


class QwenChatProcessor:
    """The parts of ``GroundingProcessor``'s interface the core uses, over a Qwen folder's ``AutoProcessor``."""

    def __init__(self, hf_processor, config, stop_ids: Sequence[int]):
        self.hf_processor = hf_processor
        self.tokenizer = hf_processor.tokenizer
        self.config = config
        self.image_token_id = hf_processor.image_token_id
        self.seg_token_id = -1   # no [SEG]
        self.stop_ids = tuple(dict.fromkeys(int(t) for t in stop_ids if t is not None))

    def vision_pixels(self, image: np.ndarray) -> np.ndarray:
        """The image itself: the folder's processor resizes and patches it with the text of each batch."""
        return image

    def build_prompt(self, question: str, visual_prompts: str = "") -> str:
        """The folder's chat template on one user turn (the image, then the question), generation prompt added."""
        text = question.strip() + (f" {visual_prompts}" if visual_prompts else "")
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.hf_processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def model_inputs(self, texts: list[str], images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """One chat text (with its image slot) per image -> the VLM's inputs, left-padded, as the folder's
        processor makes them (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ...)."""
        return dict(self.hf_processor(text=texts, images=[Image.fromarray(a) for a in images], padding=True,
                                      padding_side="left", return_tensors="pt"))

    def encode(self, prompt: str, answer: str | None = None) -> EncodedText:
        """Text ids (no image expansion; used for given answers and answer prefixes), the answer ending in EOS."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        labels = [IGNORE_INDEX] * len(ids)
        if answer is not None:
            answer_ids = self.tokenizer.encode(answer.strip(), add_special_tokens=False) + [self.stop_ids[0]]
            ids, labels = ids + answer_ids, labels + answer_ids
        return EncodedText(ids, labels)

    def decode_answer(self, ids: list[int]) -> str:
        """Answer ids -> text, the box tokens kept verbatim; stops at the first end-of-turn id."""
        kept = []
        for t in ids:
            if t in self.stop_ids:
                break
            kept.append(t)
        return self.tokenizer.decode(kept, skip_special_tokens=False).strip()


class QwenFamily(ModelFamily):
    """What Qwen2-VL and Qwen2.5-VL share; subclasses name the VLM class and the box format."""

    masks_from_boxes = True
    llava_inputs = False
    box_format = ""
    vlm_class = ""

    def __init__(self, resize: tuple[int, int, int] | None = None):
        self.resize = resize   # (factor, min_pixels, max_pixels) of the bound processor; None: the class defaults

    def bound(self, image_processor) -> "QwenFamily":
        """This family reading answers with ``image_processor``'s resize (the model's own copy of it)."""
        size = image_processor.size
        factor = image_processor.patch_size * image_processor.merge_size
        return type(self)((factor, int(size["shortest_edge"]), int(size["longest_edge"])))

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
        if self.resize is None:
            from transformers import Qwen2VLImageProcessor
            self.resize = self.bound(Qwen2VLImageProcessor()).resize
        factor, lo, hi = self.resize
        return smart_resize(int(size[0]), int(size[1]), factor=factor, min_pixels=lo, max_pixels=hi)

    # ---- loading ----------------------------------------------------------------------------------------
    def build(self, config, tokenizer, dtype: torch.dtype = torch.float32) -> QwenGroundingModel:
        import transformers
        from segdecoder import build_decoder

        folder = vlm_folder(config, self.name)
        config.box_format = self.box_format
        decoder = build_decoder(**config.decoder, checkpoint=config.decoder_checkpoint)
        hf = load_hf_processor(folder)
        vlm = getattr(transformers, self.vlm_class).from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        return QwenGroundingModel(config, vlm, decoder, hf, self.bound(hf.image_processor)).to(dtype)

    def load_tokenizer(self, directory: Path, config):
        return load_hf_processor(vlm_folder(config, self.name)).tokenizer

    def processor(self, model: QwenGroundingModel, tokenizer) -> QwenChatProcessor:
        gen_eos = model.vlm.generation_config.eos_token_id
        gen_eos = list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos]
        tok = model.hf_processor.tokenizer
        return QwenChatProcessor(model.hf_processor, model.config, [tok.eos_token_id, *gen_eos, tok.pad_token_id])

    def parse_answer(self, text: str, size: tuple[int, int], config):
        return parse_answer(text, size, self.box_format, self.input_size(size))

    # ---- answering --------------------------------------------------------------------------------------
    def visual_prompt_text(self, size, points, point_labels, boxes) -> str:
        """Clicks (positive only) and boxes of a question, written the way the model writes boxes."""
        frame = self.input_size(size)
        parts = [format_point_as(p, size, self.box_format, frame)
                 for p, lab in zip([] if points is None else points, [] if point_labels is None else point_labels)
                 if int(lab) == 1]
        parts += [format_box_as(b, size, self.box_format, frame) for b in ([] if boxes is None else boxes)]
        return " ".join(parts)

    def answer_ids(self, steps, queries, preps, max_new_tokens: int) -> list[list[int]]:
        from grounding.inference.prepared import check_prompts
        from grounding.inference.steps import AnswerRulesProcessor

        proc: QwenChatProcessor = steps.processor
        answers = [steps.given_answer_ids(q) for q in queries]   # teacher forcing: the text is all that is read
        todo = [i for i, a in enumerate(answers) if a is None]
        if not todo:
            return answers
        texts, prefixes = [], []
        for i in todo:
            q, p = queries[i], preps[i]
            pts, labels, bxs = check_prompts(p.size, q.points, q.point_labels, q.boxes)
            prompt = proc.build_prompt(steps.question_text(q), self.visual_prompt_text(p.size, pts, labels, bxs))
            texts.append(prompt + (q.answer_prefix or ""))
            prefixes.append(steps.answer_prefix_ids(q))
        inputs = proc.model_inputs(texts, [preps[i].pixels for i in todo])
        inputs = {k: (v.to(steps.device, steps.dtype) if v.is_floating_point() else v.to(steps.device))
                  for k, v in inputs.items()}
        width = inputs["input_ids"].shape[1]
        rules = steps.logits_rules([queries[i] for i in todo], [preps[i] for i in todo], prefixes) if steps.addons else []
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=list(proc.stop_ids), pad_token_id=proc.tokenizer.pad_token_id)
        with torch.no_grad():
            out = steps.model.vlm.generate(**inputs, generation_config=config, logits_processor=LogitsProcessorList(
                [AnswerRulesProcessor(width, rules)] if rules else []))
        for i, prefix, ids in zip(todo, prefixes, out[:, width:].tolist()):
            cut = next((k for k, t in enumerate(ids) if t in proc.stop_ids), len(ids))
            answers[i] = prefix + ids[:cut]
        return answers


@register_family
class Qwen2VLFamily(QwenFamily):
    name = "qwen2-vl"
    box_format = "qwen2-vl"
    vlm_class = "Qwen2VLForConditionalGeneration"


@register_family
class Qwen25VLFamily(QwenFamily):
    name = "qwen2.5-vl"
    box_format = "qwen2.5-vl"
    vlm_class = "Qwen2_5_VLForConditionalGeneration"
