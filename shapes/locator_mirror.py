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

import threading
import weakref
from collections import OrderedDict

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
    Returns ``combine``'s ``(scores [n, g*g], box_map [n, g*g, 4])``.

    Without gradients, each image's readings are kept by phrase (``_ReadingMemo``) and a phrase read before on
    the same image is not read again: a ``FusionLocator`` reads the phrase and the image, not the [SEG] state, so
    the answers of one image that write the same phrase (every teacher-forced "[SEG]." writes none) share one
    reading, and the box a generated answer writes (shapes/box_writer.py) is the reading its [SEG] then uses."""
    from shapes.locator import FusionLocator

    if torch.is_grad_enabled() or not isinstance(net, FusionLocator) or not len(states):
        return _read_both(net, states, keys, mirrored_keys, phrases, grid)
    memo = _MEMO.readings(net, keys, mirrored_keys)
    names = [_phrase_key(phrases, i) for i in range(len(states))]
    todo = [i for i, name in enumerate(names) if name not in memo and names.index(name) == i]
    if todo:
        pick = torch.tensor(todo, device=phrases.mask.device)
        scores, box_map = _read_both(net, states[pick], keys, mirrored_keys, _rows(phrases, pick), grid)
        for i, s, b in zip(todo, scores, box_map):
            memo[names[i]] = (s, b)
    return torch.stack([memo[name][0] for name in names]), torch.stack([memo[name][1] for name in names])


def _read_both(net, states: torch.Tensor, keys: torch.Tensor, mirrored_keys: torch.Tensor, phrases,
               grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``locate_both`` without the memo: one pass of ``net`` over the 2n sequences."""
    from shapes.locator import Phrases

    n, twin = len(states), phrases.mirrored
    width = max(phrases.mask.shape[1], twin.mask.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]))
    both = Phrases(torch.cat([pad(phrases.embeds), pad(twin.embeds)]), torch.cat([pad(phrases.mask), pad(twin.mask)]))
    images = torch.cat([keys.expand(n, -1, -1), mirrored_keys.expand(n, -1, -1)])
    scores, box_map = net.locate(torch.cat([states, states]), images, both)
    return combine(scores[:n], box_map[:n], scores[n:], box_map[n:], grid)


def _rows(phrases, pick: torch.Tensor):
    """The phrases (and their mirrored twins) of rows ``pick``."""
    from shapes.locator import Phrases

    twin = phrases.mirrored
    return Phrases(phrases.embeds[pick], phrases.mask[pick], Phrases(twin.embeds[pick], twin.mask[pick]))


def _phrase_key(phrases, i: int) -> bytes:
    """Row ``i``'s words and mirrored words as bytes: where they sit (their positions are read) and their input
    embeddings; the padding is left out, so a phrase has one key whatever the width of its batch."""
    parts = []
    for p in (phrases, phrases.mirrored):
        where = p.mask[i].nonzero().flatten()
        words = p.embeds[i, where].detach().cpu().contiguous()
        parts += [str(where.tolist()).encode(), str(words.dtype).encode(), words.view(torch.uint8).numpy().tobytes()]
    return b"|".join(parts)


class _ReadingMemo:
    """Per image (its ``keys`` / ``mirrored_keys`` tensors, which the ``locator`` add-on keeps with the
    ``PreparedImage``), the readings ``{phrase key: (scores [g*g], box_map [g*g, 4])}`` of one locator ``net``.
    An entry is dropped when its tensors are gone (an id can be reused) or the net's weights changed (in place,
    as an optimiser step or ``load_state_dict`` does, replaced, or by dtype / device); the last ``IMAGES`` images
    are kept. Callers on several threads (a web app's requests) share it under a lock."""

    IMAGES = 64

    def __init__(self):
        self._entries: OrderedDict[tuple[int, int, int], tuple] = OrderedDict()
        self._modules: tuple[weakref.ref, list] | None = None   # the last net and its modules (walking is slow)
        self._lock = threading.Lock()

    def stamp(self, net) -> tuple:
        """What changes when ``net``'s weights do: each parameter's identity and in-place version."""
        if self._modules is None or self._modules[0]() is not net:
            self._modules = (weakref.ref(net), list(net.modules()))
        params = [p for m in self._modules[1] for p in m._parameters.values() if p is not None]
        return tuple((id(p), p._version, p.dtype, p.device) for p in params)

    def readings(self, net, keys: torch.Tensor, mirrored_keys: torch.Tensor) -> dict:
        """The readings kept for this image and net (a dict to read and add to)."""
        with self._lock:
            stamp = self.stamp(net)
            key = (id(net), id(keys), id(mirrored_keys))
            entry = self._entries.get(key)
            if entry is None or entry[0]() is not keys or entry[1]() is not mirrored_keys or entry[2] != stamp:
                entry = (weakref.ref(keys), weakref.ref(mirrored_keys), stamp, {})
                self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.IMAGES:
                self._entries.popitem(last=False)
            return entry[3]


_MEMO = _ReadingMemo()
