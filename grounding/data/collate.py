"""Training samples and batches: (image, question, answer, masks) -> tensors for ``GroundingModel.forward``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from grounding.model import GroundingModel
from grounding.processor import EncodedText, GroundingProcessor
from grounding.text.prompts import build_prompt


@dataclass
class TrainSample:
    """image: uint8 ``H x W x 3``; text: prompt + answer ids; masks: bool ``[n, H, W]``, one per [SEG] of the
    answer, in order; vision: ``[3, s, s]`` vision-tower input."""
    image: np.ndarray
    text: EncodedText
    masks: np.ndarray
    vision: torch.Tensor


def make_sample(processor: GroundingProcessor, image: np.ndarray, question: str, answer: str,
                masks: np.ndarray | Sequence[np.ndarray] = ()) -> TrainSample:
    text = processor.encode(build_prompt(question), answer)
    n_seg = sum(t == processor.seg_token_id for t in text.input_ids)
    masks = np.asarray(masks, bool).reshape(-1, *image.shape[:2])
    if len(masks) != n_seg:
        raise ValueError(f"the answer has {n_seg} [SEG] tokens but {len(masks)} masks were given: {answer!r}")
    return TrainSample(image, text, masks, processor.vision_pixels(image))


def collate(samples: Sequence[TrainSample], processor: GroundingProcessor, model: GroundingModel) -> dict:
    """Right-padded batch; the frozen decoder image encoder runs here (no grad), once per image."""
    batch = processor.pad([s.text for s in samples], side="right")
    param = next(model.parameters())
    batch = {k: v.to(param.device) for k, v in batch.items()}
    batch["pixel_values"] = torch.stack([s.vision for s in samples]).to(param.device, param.dtype)
    batch["decoder_embeddings"] = [e.to(param.device) for e in model.mask_decoder.encode([s.image for s in samples])]
    batch["gt_masks"] = [torch.from_numpy(s.masks) for s in samples]
    return batch
