"""Stage 0's per-patch heads: what the vision tower is trained (and evaluated) to say about each of its tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shapes.scenes.patch_labels import ATTRIBUTES


class PatchHeads(nn.Module):
    """Stage 0's linear heads on the vision tower's feature layer: ``[B, n, width]`` -> one classifier per
    attribute of ``ATTRIBUTES`` (class 0 = background) and a box (sigmoid, xyxy in 0..1 of the padded square)."""

    def __init__(self, width: int):
        super().__init__()
        self.classifiers = nn.ModuleList(nn.Linear(width, len(v) + 1) for v in ATTRIBUTES.values())
        self.box = nn.Linear(width, 4)

    def losses(self, feats: torch.Tensor, classes: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats ``[B, n, width]``, classes ``[B, n, A]``, boxes ``[B, n, 4]`` -> (mean CE over attributes, box L1
        on object cells)."""
        ce = torch.stack([F.cross_entropy(head(feats).flatten(0, 1), classes[..., a].flatten())
                          for a, head in enumerate(self.classifiers)]).mean()
        fg = classes[..., 0] > 0
        l1 = F.l1_loss(self.box(feats)[fg].sigmoid(), boxes[fg]) if fg.any() else feats.new_zeros(())
        return ce, l1
