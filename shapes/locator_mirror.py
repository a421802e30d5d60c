"""Mirror test-time augmentation for the ``FusionLocator``: read the phrase once more on the mirrored image.

"The circle left of the star" in an image is "the circle right of the star" in the image flipped left-right, and
it names the same object there. So the locator also reads the flipped image's patch features with the phrase's
left/right words swapped; that score map, flipped back, is added to the first as log-probabilities, and the
boxes read at each cell (flipped back) are averaged. Two readings of one question disagree where the locator is
unsure, and their sum settles many of those cases (measured in weights/shapes-tiny/MODEL_CARD.md). With both
readings the locator is exactly mirror-symmetric. It costs one more vision-tower pass per image and one more
locator pass per phrase, both small beside the language model.

Only the left-right mirror: photographs are not up-down symmetric (gravity), and "on top of" names depth as
often as height. The word swap works on token ids, so it needs no re-tokenising: a word-level vocabulary swaps
``left``/``leftmost`` whole; a BPE vocabulary that spells "leftmost" as ``▁left`` + ``most`` swaps the piece.
The ``locator`` add-on's ``mirror`` setting (shapes/addons.py), on for the default model.

Geometry: the locator's ``g x g`` cells are row-major over the padded square (shapes/locator.py); flipping the
square's pixels flips its columns, so cell ``(r, c)`` of the mirror is cell ``(r, g - 1 - c)`` of the image and a
box ``x1..x2`` (fractions of the square) is ``1 - x2 .. 1 - x1``.
"""
from __future__ import annotations

import torch

from grounding.text.tokenizer import split_space_marker

# Words whose meaning flips with the image (lower case; a token keeps its own case and leading-space marker).
MIRROR_WORDS = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}


def mirror_token_ids(tokenizer) -> torch.Tensor:
    """``[vocab]`` long: the id each token becomes in the mirrored phrase (itself, unless it spells a word of
    ``MIRROR_WORDS`` whose partner the vocabulary has with the same marker and case)."""
    vocab = tokenizer.get_vocab()
    table = torch.arange(max(vocab.values()) + 1)
    for piece, index in vocab.items():
        marker, word = split_space_marker(piece)
        partner = MIRROR_WORDS.get(word.lower())
        if partner is None:
            continue
        if word[:1].isupper():
            partner = partner.upper() if word.isupper() else partner.capitalize()
        if (marker + partner) in vocab:
            table[index] = vocab[marker + partner]
    return table


def mirror_ids(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Token ids ``[L]`` (any shape) -> those of the mirrored phrase (ids beyond the table are kept)."""
    inside = ids < len(table)
    return torch.where(inside, table.to(ids.device)[ids.clamp(max=len(table) - 1)], ids)


def unmirror(scores: torch.Tensor, box_map: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A reading of the mirrored image, ``scores [n, g*g]`` and ``box_map [n, g*g, 4]`` (xyxy fractions of the
    square), -> the same in the image's own frame."""
    n = len(scores)
    scores = scores.reshape(n, grid, grid).flip(-1).reshape(n, -1)
    boxes = box_map.reshape(n, grid, grid, 4).flip(2).reshape(n, grid * grid, 4)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return scores, torch.stack([1 - x2, y1, 1 - x1, y2], -1)


def combine(scores: torch.Tensor, box_map: torch.Tensor, mirrored_scores: torch.Tensor,
            mirrored_box_map: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both readings -> ``(scores [n, g*g]``: the sum of their log-softmaxes, ``box_map [n, g*g, 4]``: the mean
    box per cell)."""
    back_scores, back_boxes = unmirror(mirrored_scores, mirrored_box_map, grid)
    return (scores.float().log_softmax(-1) + back_scores.float().log_softmax(-1)).to(scores.dtype), \
        (box_map + back_boxes) / 2


def locate_both(net, states: torch.Tensor, keys: torch.Tensor, mirrored_keys: torch.Tensor, phrases,
                grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both readings in one pass of the ``FusionLocator`` ``net``: the n phrases on the image's features ``keys
    [g*g, width]`` and their mirrored twins (``phrases.mirrored``) on the mirrored image's ``mirrored_keys``, as a
    batch of 2n sequences (one call instead of two: the locator's cost is mostly per call at these sizes).
    Returns ``combine``'s ``(scores [n, g*g], box_map [n, g*g, 4])``."""
    from shapes.locator import Phrases

    n, twin = len(states), phrases.mirrored
    width = max(phrases.mask.shape[1], twin.mask.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]))
    both = Phrases(torch.cat([pad(phrases.embeds), pad(twin.embeds)]), torch.cat([pad(phrases.mask), pad(twin.mask)]))
    images = torch.cat([keys.expand(n, -1, -1), mirrored_keys.expand(n, -1, -1)])
    scores, box_map = net.locate(torch.cat([states, states]), images, both)
    return combine(scores[:n], box_map[:n], scores[n:], box_map[n:], grid)
