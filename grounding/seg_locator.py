"""SegLocator: the [SEG] state points at its object's image tokens; the peak becomes a click for the mask decoder.

A [SEG] prompt alone asks SAM's decoder to match a language embedding against SAM's image features, which
know edges but not words; a small model trained from scratch never learnt that (dice flat for 2,200 steps).
The language model's own image-token states do know what each cell shows, so the [SEG] state is scored
against them (scaled dot product, ``[n, g*g]``), and the centre of the best cell goes to the mask decoder as a
positive click beside the [SEG] prompt: the decoder then segments the object under the click, which it
already does well. SAM4MLLM (Chen et al., ECCV 2024) prompts SAM with points from the MLLM in the same spirit.

Geometry: the vision input is the image padded to a centred square and resized (``GroundingProcessor``);
its ``g x g`` tokens are row-major cells of that square. Points are pixel xy in the original image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegLocator(nn.Module):
    """``scores[i, j] = <q(seg[i]), k(image[j])> / sqrt(dim)`` for [SEG] states ``[n, h]`` and image-token states
    ``[g*g, h]`` (the language model's, at the last layer or ``seg_locator_layer``); batched ``[B, n, h]`` x
    ``[B, g*g, h]`` too. Stage 1's pointer task trains it on the states at ``</ref>`` as well (train.py)."""

    def __init__(self, hidden_size: int, dim: int = 64, words: bool = False):
        super().__init__()
        self.q, self.k, self.dim = nn.Linear(hidden_size, dim), nn.Linear(hidden_size, dim), dim
        self.words = None
        if words:
            self.add_words()

    def add_words(self) -> None:
        """The query also reads the phrase's words: ``+ words(mean input embedding of the <ref> phrase)``, as
        open-vocabulary detectors score image regions against the phrase's text features. Zero at first, so a
        trained locator keeps its scores."""
        if self.words is None:
            self.words = nn.Linear(self.q.in_features, self.dim).to(self.q.weight)
            nn.init.zeros_(self.words.weight)
            nn.init.zeros_(self.words.bias)

    def forward(self, seg_states: torch.Tensor, image_states: torch.Tensor,
                phrases: torch.Tensor | None = None) -> torch.Tensor:
        """phrases: the mean input embeddings ``[n, h]`` of each [SEG]'s phrase (read when ``words`` exists)."""
        query = self.q(seg_states)
        if self.words is not None and phrases is not None:
            query = query + self.words(phrases)
        return query @ self.k(image_states).transpose(-1, -2) / self.dim ** 0.5


def locator_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """-log of the softmax mass on each row's object cells, mean over rows that have any (None if none):
    scores ``[n, g*g]``, targets bool ``[n, g*g]``."""
    keep = targets.any(-1)
    if not keep.any():
        return None
    logp = scores[keep].float().log_softmax(-1)
    return -logp.masked_fill(~targets[keep], float("-inf")).logsumexp(-1).mean()


def _square_offsets(height: int, width: int) -> tuple[int, int, int]:
    """(side, top, left) of the centred square the processor pads an ``height x width`` image into."""
    side = max(height, width)
    return side, (side - height) // 2, (side - width) // 2


def mask_cells(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """Bool ``[n, H, W]`` -> bool ``[n, grid*grid]``: the cells at least half covered by the mask, or the most
    covered cell when none is (small or thin objects); all False for an empty mask."""
    n, height, width = masks.shape
    side, top, left = _square_offsets(height, width)
    square = masks.new_zeros((n, side, side), dtype=torch.float32)
    square[:, top:top + height, left:left + width] = masks.float()
    cover = F.adaptive_avg_pool2d(square[:, None], grid).flatten(1)          # [n, g*g], fraction covered
    best = cover == cover.amax(-1, keepdim=True)
    return ((cover >= 0.5) | ((cover.amax(-1, keepdim=True) < 0.5) & best)) & (cover > 0)


def cell_centres(cells: torch.Tensor, grid: int, size: tuple[int, int]) -> torch.Tensor:
    """Cell indices ``[n]`` (row-major in the ``grid x grid`` square) -> pixel xy ``[n, 2]`` float in the
    original ``size = (H, W)`` image (clamped into it: cells of the padding map to the nearest edge)."""
    height, width = size
    side, top, left = _square_offsets(height, width)
    row, col = cells // grid, cells % grid
    x = (col.float() + 0.5) * side / grid - left
    y = (row.float() + 0.5) * side / grid - top
    return torch.stack([x.clamp(0, width - 1), y.clamp(0, height - 1)], -1)
