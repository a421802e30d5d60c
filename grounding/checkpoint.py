"""Checkpoint directory format, saved and loaded by one function pair.

    DIR/groundseg.json        GroundingConfig (the VLM's LlavaConfig inline, decoder preset, [SEG] settings, LoRA)
    DIR/model.safetensors     every weight without LoRA: ``vlm.*`` (plain transformers names),
                              ``seg_projection.*``, ``mask_decoder.*``, ``addons.<name>.*`` (add-ons' own)
    DIR/adapter/              optional peft adapter of the VLM (LoRA, new token rows, lm_head copy);
                              absent when the adapter was merged
    DIR/tokenizer/            transformers tokenizer files (tokenizer.json, ...)

A directory holding only ``groundseg.json`` (with ``vlm_path`` / ``decoder_checkpoint``) assembles a model from
official files instead: see weights/README.md.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from grounding.config import CONFIG_NAME, GroundingConfig
from grounding.errors import CheckpointError
from grounding.families import get_family
from grounding.model import GroundingModel

WEIGHTS_NAME = "model.safetensors"
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"


def _plain_vlm_state(vlm: torch.nn.Module, trained_copies: bool) -> dict[str, torch.Tensor]:
    """The VLM's weights under plain transformers names, peft wrappers removed.

    trained_copies=False keeps the base weights (the adapter is saved beside them);
    True keeps peft's trained lm_head copy (used after ``merge_adapter`` for a merged save)."""
    base = vlm.get_base_model() if isinstance(vlm, PeftModel) else vlm
    out = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name or "trainable_tokens_" in name:
            continue
        if ".modules_to_save." in name:
            if not trained_copies:
                continue
            name = name.replace(".modules_to_save.default.", ".")
        elif ".original_module." in name:
            if trained_copies:
                continue
            name = name.replace(".original_module.", ".")
        out[name.replace(".token_adapter.", ".").replace(".base_layer.", ".")] = tensor
    return out


def save_checkpoint(model: GroundingModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path,
                    merge_lora: bool = False) -> Path:
    """Write ``model`` to ``directory`` atomically (a half-written checkpoint never replaces a good one).

    merge_lora=True folds the adapter into the weights (no ``adapter/``); the model in memory is unchanged."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        peft_vlm = model.vlm if isinstance(model.vlm, PeftModel) else None
        config = GroundingConfig(**model.config.to_dict())
        config.vlm = (peft_vlm.get_base_model() if peft_vlm else model.vlm).config.to_dict()
        config.vlm_path = None
        config.decoder = model.mask_decoder.config()
        config.decoder_checkpoint = None
        config.addons = model.addon_settings()
        if peft_vlm is not None and merge_lora:
            # merge -> read -> unmerge is not exact in floating point: restore the touched weights bit for bit.
            touched = {k: v for k, v in peft_vlm.get_base_model().state_dict().items() if ".base_layer." in k}
            saved = {k: v.clone() for k, v in touched.items()}
            peft_vlm.merge_adapter()
            try:
                vlm_state = {k: v.clone() for k, v in _plain_vlm_state(peft_vlm, trained_copies=True).items()}
            finally:
                peft_vlm.unmerge_adapter()
                with torch.no_grad():
                    for k, v in touched.items():
                        v.copy_(saved[k])
            config.lora = None
        else:
            vlm_state = _plain_vlm_state(model.vlm, trained_copies=False)
            if peft_vlm is not None:
                peft_vlm.save_pretrained(tmp / ADAPTER_DIR)
        state = {f"vlm.{k}": v for k, v in vlm_state.items()}
        state.update({f"seg_projection.{k}": v for k, v in model.seg_projection.state_dict().items()})
        state.update({f"addons.{k}": v for k, v in model.addons.state_dict().items()})
        state.update({f"mask_decoder.{k}": v for k, v in model.mask_decoder.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / WEIGHTS_NAME)
        config.save(tmp)
        tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        _apply_umask(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def save_run(model: GroundingModel, tokenizer: PreTrainedTokenizerBase, out: str | Path, name: str,
             report: dict) -> None:
    """A training command's outputs: the model to ``out/model`` (``save_checkpoint``), ``report`` to
    ``out/{name}.json``."""
    import json

    out = Path(out)
    save_checkpoint(model, tokenizer, out / "model")
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))


def _apply_umask(root: Path) -> None:
    """mkdtemp (and safetensors) create private files; a checkpoint gets the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def load_tokenizer(directory: str | Path, config: GroundingConfig | None = None) -> PreTrainedTokenizerBase:
    directory = Path(directory)
    candidates = [directory / TOKENIZER_DIR] + ([Path(config.vlm_path)] if config and config.vlm_path else [])
    for path in candidates:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    raise CheckpointError(f"no tokenizer found; looked in {', '.join(str(p) for p in candidates)}")


def load_checkpoint(directory: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[GroundingModel, PreTrainedTokenizerBase]:
    """Load what ``save_checkpoint`` wrote (or an assembly of official files) -> (model in eval mode, tokenizer)."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(f"not a groundseg checkpoint: {directory / CONFIG_NAME} does not exist")
    config = GroundingConfig.load(directory)
    for field in ("vlm_path", "vision_path", "decoder_checkpoint"):   # relative paths: from the model directory
        value = getattr(config, field)
        if value and not Path(value).expanduser().is_absolute():
            setattr(config, field, str(directory / value))
    lora, config.lora = config.lora, None
    family = get_family(config.family)
    tokenizer = family.load_tokenizer(directory, config)
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        config.vlm_path, config.decoder_checkpoint = None, None  # everything is in model.safetensors
    elif config.vlm is not None and config.vlm_path is None:
        raise CheckpointError(f"checkpoint weights missing: {weights} does not exist")
    model = family.build(config, tokenizer, dtype=dtype)
    if weights.is_file():
        state = load_file(str(weights))
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"{weights} does not match {directory / CONFIG_NAME}: missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )
    adapter = directory / ADAPTER_DIR
    if adapter.is_dir():
        model.vlm = PeftModel.from_pretrained(model.vlm, str(adapter), is_trainable=False)
        model.config.lora = lora
    return model.to(device=device, dtype=dtype).eval(), tokenizer
