"""The add-on seam: optional extras a checkpoint names, with their settings, in ``groundseg.json``.

    "addons": {"mask_zoom": {"context": 3.0}, "ref_copy": {"bias": 3.0}}

An add-on is an ``nn.Module`` (so one with trained weights saves and loads them as ``addons.<name>.*`` in
``model.safetensors``) whose hooks the core calls at fixed points; every hook does nothing by default:

  building:      ``adapt_vlm``  changes a VLM built from its config before its weights are read (e.g. another
                                patch stem);
                 ``attach``     creates the add-on's own weights once the model's sizes are known;
                 ``grown``      the add-on with new settings, for a training run that changes them.
  answering:     ``question``   the question as the model should read it (e.g. its words in the case the
                                vocabulary knows);
                 ``logits_rule`` a rule that adjusts next-token logits while an answer is generated;
                 ``review``     the finished Prediction of a generated answer, changed where the add-on knows
                                better (e.g. a target whose object is not in the image becomes "There is no ...");
                 ``notes``      notes the add-on adds to a Prediction (e.g. the question's language is not read);
  [SEG] prompts: ``read_image`` what the add-on reads of each image (once per image, cached with it;
                                ``read_batch`` the same in training);
                 ``seg_prompts`` clicks / boxes for the mask decoder beside each [SEG]'s projected state
                 (and, in training, a loss per [SEG]);
  masks:         ``refine``     a step applied to every decoded mask, in increasing ``mask_order``.

Coordinates follow ``segdecoder.base``: pixel xy / xyxy in the original image, bool masks ``[N, H, W]``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from segdecoder import ImageEmbedding, MaskDecoderBackend, MaskPrediction


@dataclass
class DecoderPrompts:
    """Prompts an add-on gives the mask decoder for one image's n [SEG]s: ``points [n, k, 2]`` pixel xy with
    ``point_labels [n, k]`` (1 object, 0 background), ``boxes [n, 4]`` pixel xyxy; any may be None. In training,
    ``loss [m]``: one term per [SEG] that had a target (None when none had)."""
    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    loss: torch.Tensor | None = None

    @staticmethod
    def concat(parts: Sequence["DecoderPrompts"]) -> "DecoderPrompts":
        """Several answers' prompts on one image, in order (each part's fields are all None or all given)."""
        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if not values or values[0] is None else torch.cat(values)
        return DecoderPrompts(cat("points"), cat("point_labels"), cat("boxes"))


@dataclass
class SegRead:
    """The [SEG]s of one answer: ``states [n, h]`` (the hidden states that stand for them, the family's
    convention), and ``input_ids [T]`` / ``answer_mask [T]`` bool of the sequence they were read from (only
    [SEG]s the answer wrote count), from which ``phrase_ids`` finds each [SEG]'s ``<ref>`` phrase."""
    states: torch.Tensor
    input_ids: torch.Tensor
    positions: torch.Tensor
    ref_ids: tuple[int, int]
    _phrases: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def phrase_ids(self) -> list[torch.Tensor]:
        """Per [SEG], the token ids ``[L]`` of the last ``<ref>..</ref>`` before it (empty when there is none, as
        in LISA's "[SEG].")."""
        if self._phrases is None:
            start_id, end_id = self.ref_ids
            ids = self.input_ids
            starts = (ids == start_id).nonzero().flatten().tolist()
            ends = (ids == end_id).nonzero().flatten().tolist()
            rows = []
            for pos in self.positions.tolist():
                end = max((e for e in ends if e < pos), default=None)
                start = max((s for s in starts if end is not None and s < end), default=None)
                rows.append(ids[start + 1:end] if start is not None else ids[:0])
            self._phrases = rows
        return self._phrases

    def repeats(self) -> torch.Tensor:
        """``[n]`` long: per [SEG], how many ``<ref>`` spans before its own hold the same (non-empty) phrase, boxed
        targets without a [SEG] included: the k-th repeat of "all red shapes" names the k-th object, as the box
        text written for it does (shapes/box_writer.py)."""
        ids = self.input_ids.tolist()
        out = []
        for pos, phrase in zip(self.positions.tolist(), self.phrase_ids):
            start = max((i for i in range(pos) if ids[i] == self.ref_ids[0]), default=0)
            out.append(ref_repeats(ids[:start], phrase.tolist(), self.ref_ids) if len(phrase) else 0)
        return torch.tensor(out, dtype=torch.long)


def ref_repeats(ids: Sequence[int], phrase: Sequence[int], ref_ids: tuple[int, int]) -> int:
    """How many ``<ref>..</ref>`` spans of ``ids`` hold exactly ``phrase`` (``ref_ids``: the two tokens' ids)."""
    count, start = 0, None
    for i, t in enumerate(ids):
        if t == ref_ids[0]:
            start = i
        elif t == ref_ids[1] and start is not None:
            count += int(list(ids[start + 1:i]) == list(phrase))
            start = None
    return count


@dataclass
class AnswerRows:
    """The rows of one generation batch, for ``logits_rule``: per row its image (a ``PreparedImage``), its
    question text, and the ids of any answer prefix already in the prompt; ``addons``: the add-ons active for this
    batch by name (the model's, with a predictor's changes), for a rule that reads another add-on."""
    model: Any
    tokenizer: Any
    images: list[Any]
    questions: list[str]
    prefixes: list[list[int]]
    addons: dict[str, Any] = field(default_factory=dict)


class LogitsRule(Protocol):
    def adjust(self, row: int, ids: list[int], scores: torch.Tensor) -> None:
        """Change ``scores [vocab]``, the next-token logits of ``row`` after its generated ``ids``, in place."""


@dataclass
class MaskContext:
    """What a mask step may read: the decoder and the image (``pixels`` uint8 ``H x W x 3``, its
    ``embedding``), the prompts the masks were decoded from (``MaskDecoderBackend.decode``'s keyword
    arguments), and ``source``: ``"answer"`` ([SEG]s or boxes of an answer), ``"prompt"`` (a user's clicks /
    boxes) or ``"video"`` (an object carried to the next frame from its last box).
    ``stats`` counts work (e.g. ``zoom_crops``)."""
    backend: MaskDecoderBackend
    embedding: ImageEmbedding
    pixels: np.ndarray
    prompts: dict[str, Any]
    source: str
    stats: dict[str, int]


class AddOn(nn.Module):
    """Base class. Subclasses set ``name`` and ``Settings`` (a dataclass; unknown keys are an error) and
    override the hooks they need (see the module docstring). ``settings`` holds the effective settings."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type] = dataclass(type("NoSettings", (), {}))
    mask_order: ClassVar[int | None] = None          # set by add-ons that override ``refine``
    reads_hidden_states: ClassVar[bool] = False      # ``read_image`` needs the language model's hidden states
    # part of the model itself (e.g. it changes how the mask decoder reads images, below every hook): it cannot be
    # turned off for one predictor, only left out of the checkpoint
    built_in: ClassVar[bool] = False

    def __init__(self, settings: Any = None):
        super().__init__()
        self.settings = settings if settings is not None else self.Settings()

    @classmethod
    def parse_settings(cls, values: dict[str, Any] | None) -> Any:
        known = {f.name for f in dataclasses.fields(cls.Settings)}
        unknown = sorted(set(values or {}) - known)
        if unknown:
            raise ValueError(f"no setting {', '.join(map(repr, unknown))} (its settings: "
                             f"{', '.join(sorted(known)) or 'none'})")
        return cls.Settings(**(values or {}))

    @property
    def loss_weight(self) -> float:
        """Training: the weight of this add-on's loss (its ``loss_weight`` setting, else 1)."""
        return float(getattr(self.settings, "loss_weight", 1.0))

    def settings_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.settings)

    def with_settings(self, values: dict[str, Any]) -> "AddOn":
        """The same add-on (sharing its weights) with ``values`` changed."""
        twin = copy.copy(self)
        for key in ("_parameters", "_buffers", "_modules"):   # its own registries, the same weights in them
            twin.__dict__[key] = type(self.__dict__[key])(self.__dict__[key])
        twin.settings = self.parse_settings({**self.settings_dict(), **values})
        return twin

    # ---- building ------------------------------------------------------------------------------------------
    def adapt_vlm(self, vlm: nn.Module) -> None:
        """Change the VLM's modules before its weights are loaded."""

    def attach(self, model: Any, tokenizer: Any) -> None:
        """Create this add-on's weights and tables (``model``'s sizes and ``tokenizer``'s vocabulary are known)."""

    def grown(self, model: Any, tokenizer: Any, values: dict[str, Any]) -> "AddOn":
        """The add-on a training run asks for with settings ``values``, keeping what this one learnt."""
        return self.with_settings(values)

    # ---- answering -----------------------------------------------------------------------------------------
    def question(self, text: str) -> str:
        """The question ``text`` (stripped, not empty) as the model should read it."""
        return text

    def logits_rule(self, rows: AnswerRows) -> LogitsRule | None:
        return None

    def review(self, model: Any, tokenizer: Any, image: Any, query: Any, prediction: Any) -> Any:
        """The ``Prediction`` of ``query`` (a ``Query`` whose answer the model generated) about ``image`` (a
        ``PreparedImage``), changed or as it is."""
        return prediction

    def notes(self, question: str, answer: str) -> list[str]:
        """Notes for the Prediction of ``question`` (as the prompt holds it), e.g. that the model does not read
        its language; ``answer`` is the decoded answer text."""
        return []

    # ---- [SEG] prompts -------------------------------------------------------------------------------------
    def read_image(self, model: Any, images: list[Any], hidden_states: tuple[torch.Tensor, ...] | None,
                   input_ids: torch.Tensor | None) -> list[Any] | None:
        """Per image (``PreparedImage``), what ``seg_prompts`` reads of it; ``hidden_states`` / ``input_ids``:
        a forward pass over each image's prompt (row i for image i; only given to ``reads_hidden_states``
        add-ons). None: this add-on gives no [SEG] prompts."""
        return None

    def read_batch(self, model: Any, pixel_values: torch.Tensor, hidden_states: tuple[torch.Tensor, ...],
                   input_ids: torch.Tensor) -> list[Any] | None:
        """Training: ``read_image`` of a batch's vision input ``[B, 3, s, s]`` and forward pass, with gradients."""
        return None

    def seg_prompts(self, model: Any, seg: SegRead, image: Any, size: tuple[int, int],
                    targets: torch.Tensor | None = None) -> DecoderPrompts | None:
        """Decoder prompts for the n [SEG]s of one answer about an image of ``size`` (H, W); ``image``: what
        ``read_image`` gave for it. ``targets`` (training): the ground-truth masks bool ``[n, H, W]``."""
        return None

    # ---- masks ---------------------------------------------------------------------------------------------
    def refine(self, pred: MaskPrediction, ctx: MaskContext) -> MaskPrediction:
        return pred
