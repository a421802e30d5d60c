"""Training stages: what a run of ``stage: N`` trains and how each step's loss is made.

The core has stage 2, LISA's recipe (grounding/trainer/conversations.py). Another package adds stages (the
default model's stand-in pretraining stages 0 and 1, shapes/stages.py) with ``@register_stage`` under the
``groundseg.stages`` entry point; a stage reads its own settings from ``TrainConfig.options``.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from grounding.plugins import registered

ENTRY_POINT_GROUP = "groundseg.stages"
_STAGES: dict[int, type["Stage"]] = {}


@dataclasses.dataclass
class NoOptions:
    pass


class Stage(ABC):
    """One stage of training. ``prepare_model`` sets what trains; ``loss`` is one (micro-)batch's loss; ``modules``
    are extra trained modules (heads) the optimizer also steps; ``save`` writes the stage's own files beside the
    run's model; ``size``: how many samples an epoch has."""

    number: ClassVar[int]
    Options: ClassVar[type] = NoOptions
    modules: tuple[nn.Module, ...] = ()
    size: int

    @classmethod
    def parse_options(cls, values: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"stage {cls.number} has no setting {', '.join(map(repr, unknown))}"
                             f"{'; its settings: ' + ', '.join(sorted(known)) if known else ''}")
        return cls.Options(**values)

    @classmethod
    def on_load(cls, model, cfg, options) -> None:
        """Change the model loaded from ``cfg.init`` before the run's add-ons are added (e.g. re-initialise a part)."""

    @classmethod
    def prepare_model(cls, model, tokenizer, cfg, options) -> None:
        """Set ``requires_grad`` (and wrap the model, e.g. LoRA) for this stage."""

    @abstractmethod
    def loss(self, model, raw, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of the samples ``idx`` and its parts (for the log)."""

    def save(self, out: Path) -> None:
        """Write the stage's own files into the run folder ``out`` (at every save)."""


def register_stage(cls: type[Stage]) -> type[Stage]:
    _STAGES[cls.number] = cls
    return cls


def stage_class(number: int) -> type[Stage]:
    if registered(_STAGES, number, ENTRY_POINT_GROUP) is None:
        raise ValueError(f"unknown training stage {number}; known: {', '.join(map(str, sorted(_STAGES)))}")
    return _STAGES[number]
