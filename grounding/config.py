"""GroundingConfig: everything needed to rebuild a GroundingModel, stored as ``groundseg.json``."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from segdecoder.refine import check_mask_refine

CONFIG_NAME = "groundseg.json"

# CLIP's normalisation (LLaVA-1.5 vision tower); pixels in 0..1.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LossWeights:
    """LISA's recipe: 1.0 token cross-entropy + 2.0 per-pixel BCE + 0.5 DICE; ``locate``: the [SEG] locator's
    loss (only with ``GroundingConfig.seg_locator``)."""
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    locate: float = 1.0


@dataclass
class LoraSettings:
    """LoRA on the language model only. The regex keeps LoRA off the CLIP tower, which has q_proj/v_proj too."""
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = r".*language_model.*\.(q_proj|v_proj)"


@dataclass
class GroundingConfig:
    """vlm:            ``LlavaConfig.to_dict()`` of the vision-language model (None when ``vlm_path`` is used).
    vlm_path:          a local transformers LLaVA folder (e.g. llava-1.5-7b-hf) to load instead.
    decoder:           ``segdecoder.build_decoder`` arguments: backend, preset (and image_size).
    decoder_checkpoint: an official SAM ``.pth`` / SAM2 ``.pt`` to load (when not inside model.safetensors).
    seg_state:         which last-layer hidden state feeds the [SEG] projection: ``"seg"`` = the [SEG]
                       position itself (Sa2VA), ``"before"`` = the token that predicts it (LISA, GLaMM).
    box_format:        text format of boxes in prompts and answers (``qwen`` or ``shikra``).
    max_length:        longest token sequence the model accepts (image tokens included).
    vision_stem:       None: the tower's own patch embedding (CLIP's); ``"conv"``: grounding/vision_stem.py.
    projector_norm:    a LayerNorm on the tower features before the projector (grounding/projector_norm.py).
    seg_locator:       each [SEG] also gives the mask decoder a click where its state points among the image
                       tokens (grounding/seg_locator.py).
    seg_locator_words: the locator's query also reads the mean input embedding of the [SEG]'s <ref> phrase.
    seg_locator_layer: the language model's layer whose image-token states the locator scores (-1: the last;
                       0: its input, the projected vision features).
    seg_locator_fusion: >0: the locator is a ``FusionLocator`` of that many layers, which reads the phrase's
                       words with the image tokens (grounding/locator_train.py trains one); 0: ``SegLocator``.
    mask_zoom:         None: masks are decoded on the whole image; c (>= 1): each is decoded again on a crop of c
                       times its box side around it (segdecoder/zoom.py), for decoders whose input is small.
    mask_refine:       None: masks as decoded; ``"grabcut"``: each mask's outline re-decided against the image in a
                       band of 1.5 logit cells (segdecoder/refine.py), for decoders whose logit grid is coarse.
    mask_box_margin:   None: off; m (>= 0): an answer's masks are cut to the locator's boxes grown by m times their
                       sides (segdecoder/masks.py ``clip_to_boxes``).
    locator_click:     the mask decoder gets the locator's click (the best cell's centre) with its box; False: the
                       box alone where the locator gives one (a ``FusionLocator``), in training and inference.
    locator_mirror:    a ``FusionLocator`` also reads the image flipped left-right with the phrase's left/right
                       swapped, and adds both readings (grounding/locator_mirror.py).
    ref_copy_bias:     None: off; b (nats): while a generated ``<ref>`` phrase repeats the question's words, the tokens
                       that go on repeating them get +b (grounding/ref_copy.py).
    """

    vlm: dict[str, Any] | None = None
    vlm_path: str | None = None
    decoder: dict[str, Any] = field(default_factory=lambda: {"backend": "sam", "preset": "tiny"})
    decoder_checkpoint: str | None = None
    seg_state: Literal["seg", "before"] = "seg"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    box_format: str = "qwen"
    max_length: int = 2048
    loss_weights: LossWeights = field(default_factory=LossWeights)
    lora: LoraSettings | None = None
    vision_stem: str | None = None
    projector_norm: bool = False
    seg_locator: bool = False
    seg_locator_words: bool = False
    seg_locator_layer: int = -1
    seg_locator_fusion: int = 0
    mask_zoom: float | None = None
    mask_refine: str | None = None
    mask_box_margin: float | None = None
    locator_click: bool = True
    locator_mirror: bool = False
    ref_copy_bias: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.loss_weights, dict):
            self.loss_weights = LossWeights(**self.loss_weights)
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.seg_state not in ("seg", "before"):
            raise ValueError(f"seg_state must be 'seg' or 'before', got {self.seg_state!r}")
        check_mask_zoom(self.mask_zoom)
        check_mask_refine(self.mask_refine)
        if self.mask_box_margin is not None and not self.mask_box_margin >= 0:
            raise ValueError(f"mask_box_margin must be None (off) or >= 0, got {self.mask_box_margin!r}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, directory: str | Path) -> "GroundingConfig":
        return cls(**json.loads((Path(directory) / CONFIG_NAME).read_text()))


def check_mask_zoom(value: float | None) -> float | None:
    """A mask zoom context: None (off) or a number >= 1 (a crop smaller than the box would cut the object)."""
    if value is not None and not value >= 1:
        raise ValueError(f"mask_zoom must be None (off) or >= 1 (crop side / box side), got {value!r}")
    return value
