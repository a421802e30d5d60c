"""TrainConfig: one training run, as a YAML / JSON file (``groundseg train --config FILE``)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grounding.config import LoraSettings


@dataclass
class TrainConfig:
    """data: a REFER folder (synthetic or real); init: checkpoint to start from (stage 2 starts from a checkpoint
    that already answers, e.g. a LISA or LLaVA assembly), else a random model of ``vlm_preset`` + ``decoder``.
    ``stage`` picks the stage (grounding/trainer/stages.py: 2 is LISA's recipe; other packages add stages), and
    keys the core does not know go to ``options``, which that stage reads. Batches are per process."""
    data: str
    out: str
    stage: int = 2
    init: str | None = None
    dataset: str = "refcoco"
    split_by: str = "unc"
    split: str = "train"
    vlm_preset: str = "small"
    decoder: dict[str, Any] = field(default_factory=lambda: {"backend": "sam", "preset": "tiny"})
    kinds: tuple[str, ...] = ("seg", "rec", "no_target", "multi", "region")
    seg_box_fraction: float = 0.5   # seg answers that write the box before [SEG]; the others make the mask come
                                    # from the image alone (with the box in the text, the mask can copy it)
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup: int = 100
    save_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "auto"   # auto: bf16 on GPU, none on CPU
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompts_per_image: int = 3      # click/box prompts per image for the mask decoder
    prompt_images: int | None = None  # images of each batch that get them (default: all)
    masks: bool | None = None       # [SEG] answers with mask losses; default: stage 2 (LISA's recipe) only
    prompts: bool = True            # SAM's click/box task too. In stage 2 it keeps the fine-tuned mask decoder
                                    # from forgetting clicks (trained on [SEG] alone, it does; the app needs both)
    vocab_size: int = 1024          # from scratch: size of the tokenizer trained on the data
    merge_lora: bool = True
    freeze: tuple[str, ...] = ()    # parts that keep their weights (stage 2: mask_decoder, seg_projection, addons)
    addons: dict[str, dict[str, Any]] = field(default_factory=dict)  # add-ons the model gets (or has, with these
                                    # settings, ``AddOn.grown``) before training, e.g. {locator: {kind: seg}}
    options: dict[str, Any] = field(default_factory=dict)  # the stage's own settings

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        self.kinds, self.betas, self.freeze = tuple(self.kinds), tuple(self.betas), tuple(self.freeze)
        if self.masks is None:
            self.masks = self.stage == 2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Known keys become fields; the rest become ``options`` (checked by the stage)."""
        known = {f.name for f in dataclasses.fields(cls)}
        options = {**data.get("options", {}), **{k: v for k, v in data.items() if k not in known}}
        return cls(**{k: v for k, v in data.items() if k in known and k != "options"}, options=options)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)
