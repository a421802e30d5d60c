"""Stage 0's per-patch heads: what the vision tower is trained (and evaluated) to say about each of its tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grounding.data.patch_labels import ATTRIBUTES


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


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, 3, s, s]`` -> the tower's patch tokens at the layer the VLM reads, ``[B, n, width]`` (no CLS)."""
    config = model.llava_config
    hidden = model.vlm.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    feats = hidden[config.vision_feature_layer]
    return feats[:, 1:] if config.vision_feature_select_strategy == "default" else feats


class PointerHead(nn.Module):
    """Auxiliary head of stage 1: from the language model's last-layer state at the end of a referring phrase
    (the ``</ref>`` token) to the image tokens of the object the phrase names. ``scores[b, j] = <q(query[b]),
    k(image[b, j])> / sqrt(dim)``; the loss is -log of the softmax mass on the object's tokens. It gives the
    binding of words to image tokens a direct signal (through text alone it is a chicken-and-egg problem: the
    box digits teach nothing until the right token is found); it is not used at inference."""

    def __init__(self, width: int, dim: int = 64):
        super().__init__()
        self.q, self.k, self.dim = nn.Linear(width, dim), nn.Linear(width, dim), dim

    def loss(self, query: torch.Tensor, image: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """query ``[B, h]``, image ``[B, n, h]``, targets ``[B, n]`` bool (each row has a True) -> scalar."""
        scores = torch.einsum("bd,bnd->bn", self.q(query), self.k(image)) / self.dim ** 0.5
        logp = scores.log_softmax(-1)
        return -logp.masked_fill(~targets, float("-inf")).logsumexp(-1).mean()
