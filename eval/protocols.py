"""Evaluation protocols: how each published model was asked and scored on RefCOCO, so that its numbers can be
reproduced with ``groundseg eval --protocol NAME``.

A protocol names the question asked per task (``{sent}`` is the referring sentence), whether the answer is
generated or teacher-forced (and with what text), which reader takes the REC box out of the answer, and the hit
rule (IoU >= 0.5 or > 0.5; whether the answer must hold exactly one box). RES always scores the mask of the first
target that has one (a box-speaking model's mask is its box decoded by SAM / SAM2); cIoU and gIoU as LISA defines
them (``eval.metrics``).

``groundseg`` is the harness's own behaviour (``eval.harness``: ``--mode`` and the groundseg questions) and stays
the default. The others:

=============  ==========================================================================================
qwen-vl        Qwen-VL's evaluator: the model completes ``<ref>{sent}</ref><box>`` (here: the answer is
               forced to start with it); the FIRST ``\\((.*?)\\),\\((.*?)\\)`` match of the generated text,
               divided by 999, no clamping; hit at IoU >= 0.5.
shikra         ``[x1,y1,x2,y2]`` on the padded square, plain digits; exactly one box or a miss; hit at IoU > 0.5.
llava-1.5      LLaVA-1.5's RefCOCO instruction; ``[x1, y1, x2, y2]`` with 2 decimals on the padded square; the first
               box; IoU >= 0.5 (LLaVA-1.5 published no REC evaluator: the usual rule).
qwen2-vl       ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on 0..1000 after the forced
               ``<|object_ref_start|>{sent}<|object_ref_end|>``; the first box; IoU >= 0.5.
qwen2.5-vl     "Locate every {sent} in the image and output the bbox coordinates in JSON format."; the first
               ``bbox_2d`` (pixels of the resized input, mapped back); IoU >= 0.5.
lisa           LISA's ``validate()``: RES only, ``What is {sent} in this image? Please output segmentation mask.``
               with the sentence stripped and lower-cased, the answer forced to ``[SEG].``.
=============  ==========================================================================================
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from grounding.text.box_formats import parse_qwen2, parse_qwen25, parse_square, square_to_pixels
from grounding.text.boxes import box_iou, qwen_eval_box

Box = tuple[float, float, float, float]
# reader(generated text, image (H, W), model input (H', W')) -> (box or None, a note saying why not, or None)
Reader = Callable[[str, tuple[int, int], tuple[int, int]], tuple["Box | None", "str | None"]]

# Shikra's boxes as its evaluator reads them: plain digits, no signs, no spaces.
_SHIKRA_DIGITS = r"\d+(?:\.\d+)?"
_SHIKRA_BOX = rf"{_SHIKRA_DIGITS}(?:,{_SHIKRA_DIGITS}){{3}}"
_SHIKRA_GROUP_RE = re.compile(rf"\[({_SHIKRA_BOX}(?:;{_SHIKRA_BOX})*)\]")


def _first(targets) -> tuple[Box | None, str | None]:
    for t in targets:
        if t.box is not None:
            return t.box, None
    notes = [t.note for t in targets if t.note]
    return None, notes[0] if notes else "no box in the answer"


def read_qwen_vl(text: str, size, input_size) -> tuple[Box | None, str | None]:
    box = qwen_eval_box(text, size)
    return box, None if box is not None else "no (x1,y1),(x2,y2) in the answer"


def read_shikra(text: str, size, input_size) -> tuple[Box | None, str | None]:
    boxes = [b for m in _SHIKRA_GROUP_RE.finditer(text) for b in m.group(1).split(";")]
    if len(boxes) != 1:
        return None, f"the answer holds {len(boxes)} boxes, Shikra's rule needs exactly one"
    return square_to_pixels([float(v) for v in boxes[0].split(",")], size), None


def read_llava(text: str, size, input_size) -> tuple[Box | None, str | None]:
    return _first(parse_square(text, size))


def read_qwen2(text: str, size, input_size) -> tuple[Box | None, str | None]:
    return _first(parse_qwen2(text, size))


def read_qwen25(text: str, size, input_size) -> tuple[Box | None, str | None]:
    return _first(parse_qwen25(text, size, input_size))


@dataclass(frozen=True)
class Protocol:
    """How one published model is asked and scored (see the module docstring)."""
    name: str
    tasks: tuple[str, ...]                  # the tasks it defines
    question: str                           # the one question per sentence, ``{sent}`` replaced
    mode: str                               # "generate" or "teacher-forced"
    teacher_answer: str | None = None       # the forced answer (teacher-forced RES)
    answer_prefix: str | None = None        # the start of the answer given, the model writes the rest
    reader: Reader | None = None            # the REC box out of the generated text
    strict: bool = False                    # hit at IoU > 0.5 (Shikra) instead of >= 0.5
    lowercase: bool = False                 # the sentence stripped and lower-cased first (LISA)

    def sentence(self, text: str) -> str:
        return text.strip().lower() if self.lowercase else text

    def question_for(self, text: str) -> str:
        return self.question.replace("{sent}", self.sentence(text))

    def prefix_for(self, text: str) -> str | None:
        return None if self.answer_prefix is None else self.answer_prefix.replace("{sent}", self.sentence(text))

    def answer_for(self, text: str) -> str | None:
        return None if self.teacher_answer is None else self.teacher_answer.replace("{sent}", self.sentence(text))

    def read_box(self, answer: str, size: tuple[int, int], input_size: tuple[int, int] | None = None,
                 prefix: str | None = None) -> tuple[Box | None, str | None]:
        """The REC box this protocol reads from ``answer`` (the given ``prefix`` cut off first: evaluators read
        what the model generated), or ``(None, why)``."""
        if self.reader is None:
            raise ValueError(f"protocol {self.name!r} reads no box")
        if prefix and answer.startswith(prefix):
            answer = answer[len(prefix):]
        return self.reader(answer, size, input_size or size)

    def hit(self, box: Sequence[float] | None, gt: Sequence[float]) -> bool:
        if box is None:
            return False
        iou = box_iou(box, gt)
        return iou > 0.5 if self.strict else iou >= 0.5


PROTOCOLS: dict[str, Protocol | None] = {
    "groundseg": None,   # eval.harness's own questions and modes
    "qwen-vl": Protocol("qwen-vl", ("rec", "res", "both"), "Where is {sent}? Answer with a box.", "generate",
                        answer_prefix="<ref>{sent}</ref><box>", reader=read_qwen_vl),
    "shikra": Protocol("shikra", ("rec", "res", "both"),
                       "Where is {sent} in the image? Answer with its bounding box coordinates.", "generate",
                       reader=read_shikra, strict=True),
    "llava-1.5": Protocol("llava-1.5", ("rec", "res", "both"),
                          "Please provide the bounding box coordinate of the region this sentence describes: {sent}",
                          "generate", reader=read_llava),
    "qwen2-vl": Protocol("qwen2-vl", ("rec", "res", "both"), "Output the bounding box of {sent} in the image.",
                         "generate", answer_prefix="<|object_ref_start|>{sent}<|object_ref_end|>", reader=read_qwen2),
    "qwen2.5-vl": Protocol("qwen2.5-vl", ("rec", "res", "both"),
                           "Locate every {sent} in the image and output the bbox coordinates in JSON format.",
                           "generate", reader=read_qwen25),
    "lisa": Protocol("lisa", ("res",), "What is {sent} in this image? Please output segmentation mask.",
                     "teacher-forced", teacher_answer="[SEG].", lowercase=True),
}


def get_protocol(name: str) -> Protocol | None:
    """The protocol called ``name`` (None for ``groundseg``, the harness's own); unknown names raise ValueError."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
