"""GroundingProcessor: turns (image, question, answer) into the tensors the VLM reads.

Vision input: the image is padded to a square with the mean colour, centred (LLaVA-1.5's "pad" mode, which
keeps the whole image visible so that box coordinates refer to all of it), resized to ``s x s`` and
normalised with CLIP's mean/std -> ``[3, s, s]`` float.
Text input: LLaVA-1.5's template; the single ``<image>`` token is expanded to one id per image token, as
transformers' Llava expects.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from grounding.config import GroundingConfig
from grounding.errors import QuestionError
from grounding.text.tokens import IMAGE, SEG

IGNORE_INDEX = -100


@dataclass
class EncodedText:
    """input_ids and labels (IGNORE_INDEX outside the answer), both length T."""
    input_ids: list[int]
    labels: list[int]

    @property
    def answer_ids(self) -> list[int]:
        """The ids labelled as answer (an answer prefix at the end of a prompt; a whole answer, EOS included)."""
        return [t for t, lab in zip(self.input_ids, self.labels) if lab != IGNORE_INDEX]


class GroundingProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: GroundingConfig, vision_image_size: int,
                 num_image_tokens: int):
        self.tokenizer = tokenizer
        self.config = config
        self.vision_image_size = vision_image_size
        self.num_image_tokens = num_image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self.seg_token_id = tokenizer.convert_tokens_to_ids(SEG)
        self._mean = np.asarray(config.image_mean, np.float32)
        self._std = np.asarray(config.image_std, np.float32)

    # ---- images ---------------------------------------------------------------------------------------
    def vision_pixels(self, image: np.ndarray) -> torch.Tensor:
        """uint8 ``H x W x 3`` RGB -> float ``[3, s, s]`` for the vision tower."""
        h, w = image.shape[:2]
        side = max(h, w)
        fill = tuple(int(round(v * 255)) for v in self.config.image_mean)
        square = np.empty((side, side, 3), np.uint8)
        square[:] = fill
        top, left = (side - h) // 2, (side - w) // 2
        square[top:top + h, left:left + w] = image
        s = self.vision_image_size
        interp = cv2.INTER_AREA if side > s else cv2.INTER_LINEAR
        resized = cv2.resize(square, (s, s), interpolation=interp).astype(np.float32) / 255.0
        return torch.from_numpy(((resized - self._mean) / self._std).transpose(2, 0, 1).copy())

    # ---- text -----------------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode(self, prompt: str, answer: str | None = None) -> EncodedText:
        """Tokenise ``prompt`` (built by ``prompts.build_prompt``) and, for training or teacher forcing, the
        answer that follows it (ending with EOS). Prompt and answer are tokenised separately so that the
        boundary is the same at training and at generation time."""
        ids = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        for tok in self._ids(prompt):
            ids.extend([tok] * self.num_image_tokens if tok == self.image_token_id else [tok])
        labels = [IGNORE_INDEX] * len(ids)
        if answer is not None:
            answer_ids = self._ids(" " + answer.strip()) + [self.tokenizer.eos_token_id]
            ids += answer_ids
            labels += answer_ids
        if len(ids) > self.config.max_length:
            raise QuestionError(
                f"the question is too long: {len(ids)} tokens with the image, the model accepts {self.config.max_length}"
            )
        return EncodedText(ids, labels)

    def decode_answer(self, ids: list[int]) -> str:
        """Answer ids -> text with the project's tokens kept verbatim; stops at EOS and drops padding."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        kept = []
        for t in ids:
            if t == eos:
                break
            if t != pad:
                kept.append(t)
        return self.tokenizer.decode(kept, skip_special_tokens=False).strip()

    def pad(self, encoded: list[EncodedText], side: str = "right") -> dict[str, torch.Tensor]:
        """Stack sequences into ``input_ids``/``labels``/``attention_mask`` ``[B, T]`` and ``position_ids``
        that start at 0 on each sequence's first real token (needed for left padding)."""
        length = max(len(e.input_ids) for e in encoded)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        mask = torch.zeros_like(input_ids)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            sl = slice(length - n, length) if side == "left" else slice(0, n)
            input_ids[i, sl] = torch.tensor(e.input_ids)
            labels[i, sl] = torch.tensor(e.labels)
            mask[i, sl] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": position_ids}
