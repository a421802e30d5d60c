"""``quantize="4bit" | "8bit"``: the language model's Linear layers through bitsandbytes on CUDA, as LISA's
chat.py loads with ``--load_in_4bit`` (NF4, double quantisation, fp16 compute) / ``--load_in_8bit`` (LLM.int8);
the vision tower, projector, lm_head, [SEG] projection and mask decoder stay in the model's dtype."""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

from grounding.errors import CheckpointError

CHOICES = ("4bit", "8bit")


def check_quantize(mode: str, device: torch.device) -> None:
    """One clear CheckpointError where ``mode`` cannot run on ``device`` (checked before a model is loaded)."""
    if mode not in CHOICES:
        raise CheckpointError(f"unknown quantization {mode!r}; choose {' or '.join(CHOICES)}")
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise CheckpointError(f"--quantize {mode} needs a CUDA GPU (bitsandbytes); there is none here: load the "
                              "model without --quantize")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise CheckpointError(f"--quantize {mode} needs the bitsandbytes package: pip install bitsandbytes")


def quantize_language_model(model, mode: str, device: torch.device) -> int:
    """Replace every ``nn.Linear`` of the language model (not lm_head) by its bitsandbytes version on ``device``;
    returns how many."""
    check_quantize(mode, device)
    import bitsandbytes as bnb

    vlm = model.vlm.get_base_model() if hasattr(model.vlm, "get_base_model") else model.vlm
    language = vlm.model.language_model
    targets = [(name, m) for name, m in language.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent = language.get_submodule(name.rsplit(".", 1)[0]) if "." in name else language
        weight = linear.weight.data.to(torch.float16)
        if mode == "4bit":
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float16, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.to(torch.float16), requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[-1], q.to(device))   # moving to CUDA quantizes the weights
    return len(targets)
