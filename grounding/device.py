"""Device and precision are chosen once, here, and passed down (no module hard-codes "cuda")."""
from __future__ import annotations

import torch

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_device(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto`` -> cuda + bf16 where a GPU is present, else cpu + fp32.

    bf16 on CPU is slower than fp32 on most CPUs and loses mask precision, so ``auto`` never picks it there.
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if isinstance(dtype, torch.dtype):
        return device, dtype
    if dtype == "auto":
        return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
    return device, _DTYPES[dtype]
