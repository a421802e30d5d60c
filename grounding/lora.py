"""LoRA setup, and the ONE place that says which parameters train in each stage.

Stage 0 (pretraining stand-in for CLIP and SAM, because no pretrained weights can be downloaded here): the
vision tower on dense per-patch labels of the synthetic scenes, and the whole mask decoder backend (image
encoder included) on click/box prompts. The language model does not train.

Stage 1 (pretraining stand-in for LLaVA): the VLM on text answers, and optionally (``masks: true``) the [SEG]
answers with the [SEG] projection (and the add-ons' weights); parts named in ``freeze`` (``vision_tower``, ``projector``,
``mask_decoder``, ``image_encoder``) keep their weights, e.g. the tower stage 0 trained.

Stage 2 (reference §3, LISA's recipe) trains:
  - LoRA adapters on the language model's q_proj / v_proj (never on the CLIP tower);
  - the rows of the input embedding that belong to the project's new tokens ([SEG], <ref>, ...);
  - the LM head (full copy, so new tokens can be predicted);
  - the [SEG] projection (and the weights of add-ons that have some, e.g. the default model's locator);
  - the mask decoder of SAM / SAM2 (its light transformer + heads);
  but not the parts named in ``freeze`` (``mask_decoder``, ``seg_projection``, ``addons``), e.g. when a run
  should teach the language model an answer without moving the mask path it already has.
Frozen: the vision tower, the multimodal projector, the language model's base weights, SAM's image encoder
and prompt encoder.
"""
from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from grounding.config import LoraSettings
from grounding.model import GroundingModel
from grounding.text.tokens import SPECIAL_TOKENS


def lora_config(settings: LoraSettings, new_token_ids: list[int]) -> LoraConfig:
    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        trainable_token_indices={"embed_tokens": sorted(new_token_ids)},
        modules_to_save=["lm_head"],
    )


def new_token_ids(model: GroundingModel, tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]


def apply_lora(model: GroundingModel, settings: LoraSettings, token_ids: list[int],
               freeze: tuple[str, ...] = ()) -> GroundingModel:
    """Wrap the VLM with peft in place and set every requires_grad flag; records ``settings`` in the config."""
    model.vlm = get_peft_model(model.vlm, lora_config(settings, token_ids))
    model.config.lora = settings
    set_trainable(model, freeze)
    return model


STAGE2_FREEZABLE = ("mask_decoder", "seg_projection", "addons")


def set_trainable(model: GroundingModel, freeze: tuple[str, ...] = ()) -> None:
    """requires_grad per the list in the module docstring. peft has already frozen the VLM's base weights and
    made its adapters, token rows and lm_head copy trainable; the rest is set here."""
    if not isinstance(model.vlm, PeftModel):
        raise ValueError("apply LoRA first: set_trainable describes stage 2 (LoRA) training")
    for p in model.mask_decoder.parameters():
        p.requires_grad_(False)
    for p in model.mask_decoder.trainable_decoder_module().parameters():
        p.requires_grad_(True)
    for p in model.seg_projection.parameters():
        p.requires_grad_(True)
    for p in model.addons.parameters():
        p.requires_grad_(True)
    for name in freeze:
        if name not in STAGE2_FREEZABLE:
            raise ValueError(f"stage 2 can freeze {', '.join(STAGE2_FREEZABLE)}, not {name!r} (it never trains)")
        for p in model_part(model, name).parameters():
            p.requires_grad_(False)


def model_part(model: GroundingModel, name: str) -> nn.Module:
    """``vision_tower``, ``projector``, ``mask_decoder`` (all of SAM) or ``image_encoder`` (SAM's) of a plain (not
    LoRA-wrapped) model; ``seg_projection`` and ``addons`` (the add-ons' own weights) of any."""
    parts = {"vision_tower": lambda: model.vlm.model.vision_tower,
             "projector": lambda: model.vlm.model.multi_modal_projector, "mask_decoder": lambda: model.mask_decoder,
             "image_encoder": lambda: model.mask_decoder.frozen_image_encoder_module(),
             "seg_projection": lambda: model.seg_projection,
             "addons": lambda: model.addons}
    if name not in parts:
        raise ValueError(f"unknown model part {name!r}; choose from {', '.join(parts)}")
    return parts[name]()


def merge_lora(model: GroundingModel) -> GroundingModel:
    """Fold the adapters, token rows and lm_head copy into plain weights (for faster inference and export)."""
    if isinstance(model.vlm, PeftModel):
        model.vlm = model.vlm.merge_and_unload()
        model.config.lora = None
    return model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
