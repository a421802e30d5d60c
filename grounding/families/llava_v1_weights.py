"""Reading LLaVA-v1-era checkpoint folders (LISA, GLaMM) fast: each weights file is read once (memory-mapped), and
the model is built with its parameters on the meta device, so billions of parameters are never randomly
initialised before the file's values replace them; the file's tensors are assigned in place (``assign=True``), so
the peak memory stays about the size of the weights.

Files: ``pytorch_model.bin``, ``pytorch_model-0000N-of-0000M.bin`` (+ ``pytorch_model.bin.index.json``),
``model.safetensors`` or ``model-0000N-of-0000M.safetensors`` (+ index). A CLIP folder holds ``model.safetensors``
or ``pytorch_model.bin`` of a ``CLIPModel`` (``vision_model.*``, text keys ignored) or a ``CLIPVisionModel``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import torch

from grounding.errors import CheckpointError

WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "pytorch_model.bin", "pytorch_model-*-of-*.bin")


def weight_files(folder: Path) -> list[Path]:
    """The weights files of a transformers folder, in order; CheckpointError naming the folder if none."""
    for pattern in WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"no weights in {folder}: looked for {', '.join(WEIGHT_PATTERNS)}")


def weight_names(folder: Path) -> set[str]:
    """The tensor names of a folder's weights, from the index or the safetensors headers (cheap); a single
    ``.bin`` is opened memory-mapped."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return set(json.loads((folder / index).read_text())["weight_map"])
    names: set[str] = set()
    for path in weight_files(folder):
        names.update(name for name, _ in iter_tensors(path, lambda n: False))
    return names


def iter_tensors(path: Path, wanted: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, tensor) for every tensor of one file; the tensor is None where ``wanted(name)`` is false (not
    read). Memory-mapped: nothing is copied until a tensor is used."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, (f.get_tensor(name) if wanted(name) else None)
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            for name, tensor in state.items():
                yield name, (tensor if wanted(name) else None)
    except (OSError, RuntimeError, ValueError) as exc:   # truncated or not a weights file
        raise CheckpointError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc


def load_mapped(model: torch.nn.Module, sources: list[tuple[Path, Callable[[str], str | None]]],
                dtype: torch.dtype) -> None:
    """Fill ``model`` (parameters on the meta device) from weights files: ``sources`` pairs a folder with a
    function that maps a file's tensor name to the model's (None: not used). Every parameter must be filled."""
    own = model.state_dict(keep_vars=True)
    filled: dict[str, torch.Tensor] = {}
    for folder, rename in sources:
        for path in weight_files(folder):
            for name, tensor in iter_tensors(path, lambda n: rename(n) is not None):
                if tensor is None:
                    continue
                target = rename(name)
                if target not in own:
                    raise CheckpointError(f"{path}: tensor {name} has no place in the model (as {target})")
                if tuple(own[target].shape) != tuple(tensor.shape):
                    raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                          f"{tuple(own[target].shape)} (is the folder the one its config describes?)")
                filled[target] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing = [k for k, v in own.items() if v.is_meta and k not in filled]
    if missing:
        raise CheckpointError(f"the weights files lack {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    model.load_state_dict(filled, strict=False, assign=True)
    for name, tensor in model.state_dict().items():   # buffers were built on the CPU: match the dtype
        if tensor.is_meta:
            raise CheckpointError(f"no value for {name}")
