"""A training run's data: the conversations of a REFER folder and the images and masks they need."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from grounding.data.refer import ReferDataset
from grounding.data.tasks import Conversation, build_conversations
from grounding.images import load_image


class TrainData:
    """Conversations and the images and masks they need, with small LRU caches (decoding PNGs and polygons
    costs more than tiny models' forward passes)."""

    def __init__(self, cfg):
        self.ds = ReferDataset(cfg.data, dataset=cfg.dataset, split_by=cfg.split_by)
        self.conversations: list[Conversation] = build_conversations(
            self.ds, cfg.split, cfg.seed, with_masks=cfg.masks, kinds=cfg.kinds, seg_box_fraction=cfg.seg_box_fraction)
        if not self.conversations:
            raise ValueError(f"no training conversations in split {cfg.split!r} of {cfg.data}")
        self.anns_by_image: dict[int, list[int]] = {}
        for ref in self.ds.refs(cfg.split):
            anns = self.anns_by_image.setdefault(ref.image_id, [])
            if ref.ann_id not in anns:
                anns.append(ref.ann_id)
        self._images: OrderedDict[int, np.ndarray] = OrderedDict()
        self._masks: OrderedDict[int, np.ndarray] = OrderedDict()

    def image(self, image_id: int) -> np.ndarray:
        return _cached(self._images, image_id, lambda: load_image(self.ds.image_path(image_id)), 4096)

    def mask(self, ann_id: int) -> np.ndarray:
        return _cached(self._masks, ann_id, lambda: self.ds.mask(ann_id), 8192)


def _cached(cache: OrderedDict, key, make, limit: int):
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    cache[key] = value = make()
    if len(cache) > limit:
        cache.popitem(last=False)
    return value
