"""The model-family seam: what a family of checkpoints provides to the core.

A family knows how its checkpoints are built and loaded (the VLM and its tokenizer), how its prompts and images
are encoded (its processor: chat template, image preprocessing, tokenisation), how its answers are read into
targets (its box text format), and how a target becomes a mask-decoder prompt: the hidden state at a ``[SEG]``
(``GroundingConfig.seg_state`` says which, LISA's convention or Sa2VA's) projected into a sparse prompt, or, for
a family whose answers carry boxes and no ``[SEG]`` (``masks_from_boxes``), the answered box as a box prompt.

A checkpoint names its family in ``groundseg.json`` (``"family": "groundseg"``); families register themselves
with ``@register_family``, or from another package under the ``groundseg.families`` entry point.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

from grounding.text.boxes import ParsedTarget, parse_answer
from grounding.errors import CheckpointError
from grounding.plugins import registered

ENTRY_POINT_GROUP = "groundseg.families"
_FAMILIES: dict[str, "ModelFamily"] = {}


class ModelFamily(ABC):
    """A family of checkpoints (``families/native.py`` is the project's own)."""

    name: ClassVar[str] = ""
    masks_from_boxes: ClassVar[bool] = False   # answers carry boxes, no [SEG]: each box is decoded into its mask
    # The VLM takes LLaVA-style inputs: a stack of ``[3, s, s]`` images, the prompt's ids with its image tokens
    # expanded, 2-D position ids and a KV cache that ``PrefixEngine`` shares between the questions of one image.
    # A family whose VLM takes other inputs (Qwen2-VL: image patches of varying number, 3-D rotary positions)
    # sets False and answers batches itself in ``answer_ids``; ``PrefixEngine`` then falls back to
    # ``Grounder.predict_batch`` (the image prefix is not shared).
    llava_inputs: ClassVar[bool] = True

    @abstractmethod
    def build(self, config, tokenizer, dtype: torch.dtype = torch.float32):
        """A ``GroundingModel`` for ``config`` (random weights, or the files it points at)."""

    @abstractmethod
    def load_tokenizer(self, directory: Path, config) -> Any:
        """The tokenizer of the checkpoint in ``directory``."""

    @abstractmethod
    def processor(self, model, tokenizer) -> Any:
        """The object that turns images and text into the VLM's inputs (``GroundingProcessor``'s interface)."""

    def parse_answer(self, text: str, size: tuple[int, int], config) -> list[ParsedTarget]:
        """An answer's text -> its targets (phrase, box in original pixels, [SEG] index), in order."""
        return parse_answer(text, size)

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The ``(H, W)`` at which the VLM sees an image of ``size``; boxes that a model writes in pixels of its
        resized input (Qwen2.5-VL) map back through it. Default: the image's own size."""
        return size

    def answer_ids(self, steps, queries: list, preps: list, max_new_tokens: int) -> list[list[int]]:
        """For a family with ``llava_inputs = False``: each query's answer ids (a given answer's, or the answer
        prefix's followed by the generated ones; greedy, EOS cut), about ``preps[i]`` (``AnswerSteps`` ``steps``
        gives the model, its processor and the add-ons' rules)."""
        raise TypeError(f"family {self.name!r} takes LLaVA-style inputs: the Grounder answers for it, not the family")


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _FAMILIES[cls.name] = cls()
    return cls


def get_family(name: str) -> ModelFamily:
    if registered(_FAMILIES, name, ENTRY_POINT_GROUP) is None:
        raise CheckpointError(f"unknown model family {name!r}; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]
