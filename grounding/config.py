"""GroundingConfig: everything needed to rebuild a GroundingModel, stored as ``groundseg.json``."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from grounding.errors import CheckpointError

CONFIG_NAME = "groundseg.json"

# CLIP's normalisation (LLaVA-1.5 vision tower); pixels in 0..1.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LossWeights:
    """LISA's recipe: 1.0 token cross-entropy + 2.0 per-pixel BCE + 0.5 DICE (add-ons weigh their own losses)."""
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5


@dataclass
class LoraSettings:
    """LoRA on the language model only. The regex keeps LoRA off the CLIP tower, which has q_proj/v_proj too."""
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = r".*language_model.*\.(q_proj|v_proj)"


@dataclass
class GroundingConfig:
    """family:            the model family that builds, prompts and reads this checkpoint (grounding/families/).
    vlm:               ``LlavaConfig.to_dict()`` of the vision-language model (None when ``vlm_path`` is used).
    vlm_path:          a local transformers LLaVA folder (e.g. llava-1.5-7b-hf) to load instead, or the
                       family's own checkpoint folder (LISA, GLaMM). Relative paths: from the model directory.
    vision_path:       a local CLIP folder, for families whose checkpoints hold no vision tower (LISA, GLaMM).
    decoder:           ``segdecoder.build_decoder`` arguments: backend, preset (and image_size).
    decoder_checkpoint: an official SAM ``.pth`` / SAM2 ``.pt`` to load (when not inside model.safetensors).
    seg_state:         which last-layer hidden state feeds the [SEG] projection: ``"seg"`` = the [SEG]
                       position itself (Sa2VA), ``"before"`` = the token that predicts it (LISA, GLaMM).
    box_format:        text format of boxes in prompts and answers (``qwen`` or ``shikra``).
    max_length:        longest token sequence the model accepts (image tokens included).
    addons:            ``{name: settings}``: the optional extras this checkpoint uses, in order
                       (grounding/addons/; e.g. ``{"mask_zoom": {"context": 3.0}}``).
    """

    family: str = "groundseg"
    vlm: dict[str, Any] | None = None
    vlm_path: str | None = None
    vision_path: str | None = None
    decoder: dict[str, Any] = field(default_factory=lambda: {"backend": "sam", "preset": "tiny"})
    decoder_checkpoint: str | None = None
    seg_state: Literal["seg", "before"] = "seg"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    box_format: str = "qwen"
    max_length: int = 2048
    loss_weights: LossWeights = field(default_factory=LossWeights)
    lora: LoraSettings | None = None
    addons: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.loss_weights, dict):
            self.loss_weights = LossWeights(**self.loss_weights)
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.seg_state not in ("seg", "before"):
            raise ValueError(f"seg_state must be 'seg' or 'before', got {self.seg_state!r}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        self.addons = {name: dict(values or {}) for name, values in self.addons.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, directory: str | Path) -> "GroundingConfig":
        path = Path(directory) / CONFIG_NAME
        values = json.loads(path.read_text())
        try:
            return cls(**values)
        except TypeError as exc:   # a field this version does not know
            raise CheckpointError(f"{path}: {exc}") from exc
