"""SegLocator: the [SEG] state points at its object's image tokens; the peak becomes a click for the mask decoder.

A [SEG] prompt alone asks SAM's decoder to match a language embedding against SAM's image features, which
know edges but not words; a small model trained from scratch did not learn that (its dice loss stayed flat;
weights/shapes-tiny/MODEL_CARD.md). The language model's own image-token states do know what each cell shows,
so the [SEG] state is scored against them (scaled dot product, ``[n, g*g]``), and the centre of the best cell
goes to the mask decoder as a positive click beside the [SEG] prompt: the decoder then segments the object
under the click, which it already does well. SAM4MLLM (Chen et al., ECCV 2024) prompts SAM with points from
the MLLM in the same spirit.

Two locators share that interface: ``SegLocator`` scores a linear map of the [SEG] state (plus, optionally, of
the phrase's mean word embedding) against the language model's image-token states; ``FusionLocator`` reads the
phrase's words and the vision tower's patch features together through a small transformer (as MDETR / GLIP
fuse text and image) and scores its query token against the fused cells, which learns relations ("the circle
above the star") that a mean of words cannot express, and learns from cached features in minutes
(shapes/locator_train.py). Both are the ``locator`` add-on (shapes/addons.py; ``kind``: ``seg`` or ``fusion``).

Geometry: the vision input is the image padded to a centred square and resized (``GroundingProcessor``);
its ``g x g`` tokens are row-major cells of that square. Points are pixel xy in the original image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Phrases:
    """Each [SEG]'s ``<ref>`` phrase as input embeddings: ``embeds [n, L, h]`` (zero past each phrase's end) and
    ``mask`` bool ``[n, L]`` (True on its words); a [SEG] without a phrase has an all-False row. ``mirrored``: the
    same phrases with left and right swapped, for reading the mirrored image (shapes/locator_mirror.py)."""
    embeds: torch.Tensor
    mask: torch.Tensor
    mirrored: "Phrases | None" = None

    @classmethod
    def stack(cls, rows: list[torch.Tensor], hidden_size: int, like: torch.Tensor) -> "Phrases":
        """Word embeddings ``[L_i, h]`` per [SEG] -> one zero-padded batch (``like`` gives dtype and device)."""
        width = max((len(r) for r in rows), default=0)
        embeds = like.new_zeros((len(rows), width, hidden_size))
        mask = torch.zeros((len(rows), width), dtype=torch.bool, device=like.device)
        for i, r in enumerate(rows):
            embeds[i, :len(r)], mask[i, :len(r)] = r, True
        return cls(embeds, mask)

    def mean(self) -> torch.Tensor:
        """``[n, h]``: each phrase's mean word embedding (zeros for an empty one)."""
        m = self.mask[..., None].to(self.embeds.dtype)
        return (self.embeds * m).sum(1) / m.sum(1).clamp(min=1)


class SegLocator(nn.Module):
    """``scores[i, j] = <q(seg[i]), k(image[j])> / sqrt(dim)`` for [SEG] states ``[n, h]`` and image-token states
    ``[g*g, h]`` (the language model's, at the layer the locator add-on's ``layer`` names: -1 the last, 0 its
    input); batched ``[B, n, h]`` x ``[B, g*g, h]`` too. Stage 1's pointer task trains it on the states at
    ``</ref>`` as well (``pointer_loss``, shapes/stages.py)."""

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
                phrases: Phrases | None = None) -> torch.Tensor:
        """phrases: each [SEG]'s phrase (its mean embedding is read when ``words`` exists)."""
        query = self.q(seg_states)
        if self.words is not None and phrases is not None:
            query = query + self.words(phrases.mean())
        return query @ self.k(image_states).transpose(-1, -2) / self.dim ** 0.5

    def locate(self, seg_states: torch.Tensor, image_states: torch.Tensor,
               phrases: Phrases | None = None) -> tuple[torch.Tensor, None]:
        """(scores, no boxes): see ``FusionLocator.locate``."""
        return self(seg_states, image_states, phrases), None


class FusionLocator(nn.Module):
    """Phrase words ``[n, L, h]`` and image features ``[g*g, width]`` (or ``[n, g*g, width]``; the vision tower's
    patch features, ``GroundingModel.vision_features``) -> scores ``[n, g*g]`` and a box per cell.

    One sequence per [SEG]: a learnt query token, the phrase's words (+ learnt word positions) and the cells
    (+ learnt cell positions), each input through LayerNorm -> Linear to ``dim``; ``layers`` pre-norm
    transformer layers over it; then ``<q(query), k(cell)> / sqrt(dim)``, and from each fused cell the box of
    the referred object (``box``: cx, cy, w, h through a sigmoid, as a fraction of the padded square): given to
    the mask decoder, a box tells it the object's extent, which a click does not (measured in the model card). It
    reads the phrase, not the [SEG] state: the phrase is what the answer wrote, and so it trains on cached
    features without the language model. Words past ``max_words`` are dropped."""

    def __init__(self, hidden_size: int, grid: int, layers: int = 2, dim: int = 128, heads: int = 4,
                 max_words: int = 48, image_size: int | None = None):
        super().__init__()
        self.dim, self.max_words = dim, max_words
        image_size = image_size or hidden_size
        self.sizes = dict(hidden_size=hidden_size, grid=grid, dim=dim, heads=heads, max_words=max_words,
                          image_size=image_size)   # all but ``layers`` (``deepened`` builds a deeper twin)
        self.words_in = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, dim))
        self.image_in = nn.Sequential(nn.LayerNorm(image_size), nn.Linear(image_size, dim))
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.word_pos = nn.Parameter(torch.randn(max_words, dim) * 0.02)
        self.cell_pos = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.q, self.k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.box = nn.Linear(dim, 4)

    def deepened(self, layers: int) -> "FusionLocator":
        """A copy with ``layers`` (> this one's) layers: this one's weights, then new layers whose residual branches
        start at zero (attention out-projection, second MLP linear), so the copy scores exactly as this one does
        until the new layers learn. Training it goes on from a trained locator instead of from scratch, which
        would first have to catch up with the shallower one (measured in the model card)."""
        old = len(self.encoder.layers)
        if layers <= old:
            raise ValueError(f"a locator of {old} layers cannot be deepened to {layers}")
        grown = FusionLocator(layers=layers, **self.sizes).to(self.query)
        missing, unexpected = grown.load_state_dict(self.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("encoder.layers.") for k in missing), (missing, unexpected)
        for layer in grown.encoder.layers[old:]:
            for zeroed in (layer.self_attn.out_proj, layer.linear2):
                nn.init.zeros_(zeroed.weight)
                nn.init.zeros_(zeroed.bias)
        return grown

    def forward(self, seg_states: torch.Tensor | None, image_states: torch.Tensor,
                phrases: Phrases | None) -> torch.Tensor:
        return self.locate(seg_states, image_states, phrases)[0]

    def locate(self, seg_states: torch.Tensor | None, image_states: torch.Tensor,
               phrases: Phrases | None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scores ``[n, g*g]``, boxes ``[n, g*g, 4]``: xyxy as fractions of the padded square)."""
        return self.read(self.fuse(image_states, phrases))

    def fuse(self, image_states: torch.Tensor, phrases: Phrases | None) -> torch.Tensor:
        """-> the fused sequence ``[n, 1 + L + g*g, dim]``: the query token, the phrase's words, the cells."""
        if phrases is None:
            raise ValueError("the fusion locator needs each [SEG]'s phrase")
        words, keep = phrases.embeds[:, :self.max_words], phrases.mask[:, :self.max_words]
        n, length = keep.shape
        cells = image_states.shape[-2]
        image = self.image_in(image_states) + self.cell_pos
        image = image.expand(n, -1, -1) if image.dim() == 2 else image
        x = torch.cat([self.query.expand(n, -1, -1), self.words_in(words) + self.word_pos[:length], image], 1)
        pad = torch.cat([keep.new_zeros((n, 1)), ~keep, keep.new_zeros((n, cells))], 1)
        return self.norm(self.encoder(x, src_key_padding_mask=pad))

    def read(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused sequence (``fuse``) -> (scores ``[n, g*g]``, boxes ``[n, g*g, 4]``)."""
        image = fused[:, -self.cell_pos.shape[0]:]
        scores = (self.q(fused[:, :1]) @ self.k(image).transpose(-1, -2))[:, 0] / self.dim ** 0.5
        centre, size = self.box(image).sigmoid().split(2, -1)
        return scores, torch.cat([centre - size / 2, centre + size / 2], -1)


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


def peak_cells(scores: torch.Tensor, grid: int, ranks: torch.Tensor) -> torch.Tensor:
    """Scores ``[n, g*g]`` -> cell index ``[n]``: row i's ``ranks[i]``-th highest local maximum (3x3 cells) of its
    score map; rank 0 is the best cell; a row with fewer peaks takes its lowest one."""
    maps = scores.reshape(-1, 1, grid, grid)
    is_peak = (maps == F.max_pool2d(maps, 3, 1, 1)).flatten(1)
    order = torch.where(is_peak, scores, float("-inf")).argsort(-1, descending=True)
    rank = torch.minimum(ranks.to(scores.device), is_peak.sum(-1) - 1)
    return order.gather(1, rank[:, None])[:, 0]


def distinct_cells(scores: torch.Tensor, box_map: torch.Tensor, ranks: torch.Tensor,
                   overlap: float = 0.2) -> torch.Tensor:
    """Row i's cell for its ``ranks[i]``-th object: the best cell, then repeatedly the best cell whose box
    (``box_map [n, g*g, 4]``, xyxy in any one frame) is a new object -- overlapping no box taken before by more than
    ``overlap`` IoU, holding none of their centres, and not centred inside one. Scores ``[n, g*g]``. Each cell of a
    ``FusionLocator`` boxes the object it lies on, so the cells of one object give one box, while a second object
    next to the first (not a local maximum of the score map) still gives its own. A row with fewer distinct boxes
    than its rank takes the last one found."""
    from torchvision.ops import box_iou

    cells = scores.argmax(-1)
    for i in (ranks > 0).nonzero().flatten().tolist():
        taken = box_map.new_zeros((0, 4))
        for cell in scores[i].argsort(descending=True).tolist():
            box = box_map[i, cell]
            if len(taken):
                centres = (taken[:, :2] + taken[:, 2:]) / 2
                centre = (box[:2] + box[2:]) / 2
                if (((centres >= box[:2]) & (centres <= box[2:])).all(-1).any()
                        or ((centre >= taken[:, :2]) & (centre <= taken[:, 2:])).all(-1).any()
                        or box_iou(box[None], taken).max() > overlap):
                    continue
            taken = torch.cat([taken, box[None]])
            cells[i] = cell
            if len(taken) > int(ranks[i]):
                break
    return cells


def square_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bool ``[n, H, W]`` -> each mask's box ``[n, 4]`` xyxy as fractions of the centred square the processor
    pads the image into (zeros for an empty mask): the ``FusionLocator``'s box targets."""
    n, height, width = masks.shape
    side, top, left = _square_offsets(height, width)
    out = torch.zeros((n, 4))
    for i, m in enumerate(masks):
        ys, xs = m.nonzero(as_tuple=True)
        if len(xs):
            out[i] = torch.tensor([xs.min() + left, ys.min() + top, xs.max() + 1 + left, ys.max() + 1 + top]) / side
    return out


def box_loss(boxes: torch.Tensor, targets: torch.Tensor, cells: torch.Tensor) -> torch.Tensor | None:
    """DETR's box loss (5 x L1 + 2 x generalised IoU) of the boxes ``[n, g*g, 4]`` predicted on each row's object
    cells (bool ``[n, g*g]``) against its box ``[n, 4]`` (both fractions of the square); None without any."""
    from torchvision.ops import generalized_box_iou_loss

    row, cell = cells.nonzero(as_tuple=True)
    if not len(row):
        return None
    pred, gt = boxes[row, cell].float(), targets[row].to(boxes.device, torch.float32)
    return 5 * F.l1_loss(pred, gt) + 2 * generalized_box_iou_loss(pred, gt, reduction="mean")


def box_iou_at(boxes: torch.Tensor, cells: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU ``[n]`` of each row's box at ``cells[i]`` (boxes ``[n, g*g, 4]``) with its target box ``[n, 4]``."""
    from torchvision.ops import box_iou

    pred = boxes[torch.arange(len(cells)), cells].float()
    return box_iou(pred, targets.float()).diagonal()


def square_to_pixels(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boxes ``[n, 4]`` as fractions of the padded square -> pixel xyxy ``[n, 4]`` in the ``size = (H, W)`` image,
    clipped to it."""
    height, width = size
    side, top, left = _square_offsets(height, width)
    xyxy = boxes.float() * side - torch.tensor([left, top, left, top], dtype=torch.float32, device=boxes.device)
    return torch.stack([xyxy[:, 0].clamp(0, width), xyxy[:, 1].clamp(0, height),
                        xyxy[:, 2].clamp(0, width), xyxy[:, 3].clamp(0, height)], -1)


def cell_centres(cells: torch.Tensor, grid: int, size: tuple[int, int]) -> torch.Tensor:
    """Cell indices ``[n]`` (row-major in the ``grid x grid`` square) -> pixel xy ``[n, 2]`` float in the
    original ``size = (H, W)`` image (clamped into it: cells of the padding map to the nearest edge)."""
    height, width = size
    side, top, left = _square_offsets(height, width)
    row, col = cells // grid, cells % grid
    x = (col.float() + 0.5) * side / grid - left
    y = (row.float() + 0.5) * side / grid - top
    return torch.stack([x.clamp(0, width - 1), y.clamp(0, height - 1)], -1)
