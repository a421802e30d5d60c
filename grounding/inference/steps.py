"""The steps an answer goes through, shared by ``Grounder`` (one question at a time, ``generate``) and
``PrefixEngine`` (questions grouped by image over a cached prefix): encoding a question, the logits rules of the
add-ons, turning [SEG]s into decoder prompts, decoding masks and reading the answer into targets."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from grounding.addons import AddOn, AnswerRows, DecoderPrompts, LogitsRule, MaskContext, SegRead, addon_class
from grounding.errors import CheckpointError, QuestionError
from grounding.inference.prepared import PreparedImage, Query, check_prompts
from grounding.processor import EncodedText, GroundingProcessor
from grounding.text.prompts import build_prompt, visual_prompt_text
from grounding.result import Prediction, Target, box_from_mask
from grounding.text.tokens import IMAGE, REF_END, REF_START, SEG
from segdecoder import ImageEmbedding, MaskPrediction


def active_addons(model, overrides: Mapping[str, Any] | None, tokenizer) -> list[AddOn]:
    """The model's add-ons with ``overrides`` applied: ``{name: None or False}`` turns one off, ``{name: True}``
    on (with its settings), ``{name: {key: value}}`` changes settings (turning it on if needed). An add-on with
    weights can only be changed or turned off, not added."""
    addons = dict(model.addons.items())
    for name, value in (overrides or {}).items():
        if value is None or value is False:
            if name in addons and addons[name].built_in:
                raise CheckpointError(f"add-on {name!r} is part of this model (it changes how the model reads "
                                      f"images) and cannot be turned off for one predictor; load a "
                                      f"checkpoint without it")
            addons.pop(name, None)
            continue
        values = value if isinstance(value, Mapping) else {}
        try:
            if name in addons:
                addons[name] = addons[name].with_settings(values) if values else addons[name]
                continue
            cls = addon_class(name)
            addon = cls(cls.parse_settings(values))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"add-on {name!r}: {exc}") from exc
        addon.attach(model, tokenizer)
        if any(True for _ in addon.parameters()):
            raise CheckpointError(f"add-on {name!r} has trained weights and this model has none: it cannot be "
                                  "turned on at inference")
        addons[name] = addon
    return list(addons.values())


class AnswerRulesProcessor(LogitsProcessor):
    """``generate`` hook: every add-on rule adjusts each row's next-token logits (generated ids start at column
    ``prompt_length``)."""

    def __init__(self, prompt_length: int, rules: list[LogitsRule]):
        self.prompt_length, self.rules = prompt_length, rules

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, ids in enumerate(input_ids[:, self.prompt_length:].tolist()):
            for rule in self.rules:
                rule.adjust(row, ids, scores[row])
        return scores


def mask_steps_of(addons) -> list[AddOn]:
    """The add-ons that refine decoded masks, in the order they run."""
    return sorted((a for a in addons if a.mask_order is not None), key=lambda a: a.mask_order)


def decode_with_steps(backend, mask_steps: Sequence[AddOn], pixels: np.ndarray, embedding: ImageEmbedding,
                      source: str, stats: dict[str, int] | None = None, **prompts) -> MaskPrediction:
    """The mask decoder on one image's prompts (``MaskDecoderBackend.decode``'s keyword arguments), then each mask
    step; ``pixels`` uint8 ``H x W x 3`` and its decoder ``embedding`` (on the decoder's device); ``source``:
    ``"answer"``, ``"prompt"`` or ``"video"`` (``MaskContext``)."""
    ctx = MaskContext(backend, embedding, pixels, prompts, source, {} if stats is None else stats)
    pred = backend.decode(ctx.embedding, **prompts)
    for step in mask_steps:
        pred = step.refine(pred, ctx)
    return pred


# a question may leave its answer less room than ``max_new_tokens`` asks (it then gets what is left), but not less
# than this: one target with its box takes about 26 tokens of the default model's vocabulary
MIN_ANSWER_TOKENS = 32
# an answer's unfinished last target (``max_new_tokens`` ran out inside it): its text leaves the answer with it
_CUT_OFF_TARGET = re.compile(re.escape(REF_START) + r"[^<]*(?:" + re.escape(REF_END) + r"(?:<box>[^<]*)?)?\s*")


class AnswerSteps:
    """The model, its processor and the active add-ons, and the steps both answer paths take."""

    def __init__(self, model, processor: GroundingProcessor, addons: list[AddOn], device: torch.device,
                 dtype: torch.dtype, mask_threshold: float = 0.0):
        self.model, self.processor, self.addons = model, processor, addons
        self.device, self.dtype = device, dtype
        self.mask_threshold = float(mask_threshold)  # mask = decoder logit > this (0.0: probability 0.5)
        self.mask_steps = mask_steps_of(addons)
        self.reads_hidden_states = any(a.reads_hidden_states for a in addons)
        self.stats: dict[str, int] = {}

    def addon_settings(self) -> dict[str, dict]:
        return {a.name: a.settings_dict() for a in self.addons}

    # ---- questions ----------------------------------------------------------------------------------------
    def question_text(self, query: Query) -> str:
        """The query's question as the prompt holds it (after the add-ons' ``question`` rewrites)."""
        question = query.question
        if not isinstance(question, str):
            raise QuestionError(f"the question must be text, got {type(question).__name__}")
        # A user's text must not smuggle in image slots or [SEG] tokens; <point>/<box> are welcome.
        question = question.replace(IMAGE, " ").replace(SEG, " ").strip()
        if not question:
            raise QuestionError("the question is empty")
        for addon in self.addons:
            question = addon.question(question)
        return question

    def encode_question(self, query: Query, prep: PreparedImage, max_new_tokens: int) -> EncodedText:
        """The prompt's ids, then any answer prefix's ids (labelled with themselves, the prompt IGNORE_INDEX)."""
        question = self.question_text(query)
        pts, labels, bxs = check_prompts(prep.size, query.points, query.point_labels, query.boxes)
        config = self.model.config
        # a processor may bring its model's own chat template (box-speaking families load it from their folder)
        build = getattr(self.processor, "build_prompt", build_prompt)
        prompt = build(question, visual_prompt_text(prep.size, pts, labels, bxs, config.box_format))
        encoded = self.processor.encode(prompt)
        prefix = self.answer_prefix_ids(query)
        encoded = EncodedText(encoded.input_ids + prefix, encoded.labels + prefix)
        room, needed = config.max_length - len(encoded.input_ids), min(max_new_tokens, MIN_ANSWER_TOKENS)
        if query.answer is None and room < needed:
            raise QuestionError(
                f"the question is too long: {len(encoded.input_ids)} tokens with the image leave {max(room, 0)} of "
                f"the {needed} needed for the answer (the model accepts {config.max_length})"
            )
        return encoded

    def answer_budget(self, prompts: Sequence[EncodedText], max_new_tokens: int) -> int:
        """``max_new_tokens``, or the room the longest of the generating rows' ``prompts`` leaves in the model's
        context when that is less."""
        return min([max_new_tokens] + [self.model.config.max_length - len(p.input_ids) for p in prompts])

    def answer_prefix_ids(self, query: Query) -> list[int]:
        """Token ids of ``query.answer_prefix`` (tokenised as the start of an answer), or []."""
        if query.answer_prefix is None:
            return []
        return self.processor.encode("", query.answer_prefix).answer_ids[:-1]  # without EOS

    def given_answer_ids(self, query: Query) -> list[int] | None:
        """The ids of a whole given answer (teacher forcing, EOS included), or None."""
        return None if query.answer is None else self.processor.encode("", query.answer).answer_ids

    def logits_rules(self, queries: Sequence[Query], images: Sequence[PreparedImage],
                     prefixes: list[list[int]]) -> list[LogitsRule]:
        """The add-ons' rules for one generation batch (row i: ``queries[i]`` about ``images[i]``)."""
        rows = AnswerRows(self.model, self.processor.tokenizer, list(images),
                          [self.question_text(q) for q in queries], prefixes, {a.name: a for a in self.addons})
        with torch.no_grad():
            return [rule for a in self.addons if (rule := a.logits_rule(rows)) is not None]

    # ---- [SEG]s -> masks ---------------------------------------------------------------------------------
    def read_images(self, images: Sequence[PreparedImage], hidden_states: tuple[torch.Tensor, ...] | None,
                    input_ids: torch.Tensor | None) -> list[tuple[AddOn, list[Any]]]:
        """What each prompt-giving add-on reads of each image (row i of ``hidden_states`` / ``input_ids``: a
        forward pass that covered ``images[i]``'s prompt)."""
        out = []
        for a in self.addons:
            read = a.read_image(self.model, list(images), hidden_states if a.reads_hidden_states else None, input_ids)
            if read is not None:
                out.append((a, read))
        return out

    def seg_prompts(self, seg: SegRead, readings: list[tuple[AddOn, Any]],
                    size: tuple[int, int]) -> tuple[torch.Tensor, DecoderPrompts | None]:
        """One answer's [SEG]s -> (projected states ``[n, prompt_dim]``, the add-ons' decoder prompts or None);
        ``readings``: (add-on, what it read of this answer's image)."""
        prompts = None
        for addon, image in readings:
            prompts = addon.seg_prompts(self.model, seg, image, size)
        return self.model.seg_projection(seg.states), prompts

    def decode(self, pixels: np.ndarray, embedding: ImageEmbedding, source: str, **prompts) -> MaskPrediction:
        """The mask decoder on one image's prompts (``MaskDecoderBackend.decode``'s), then the add-ons' mask steps;
        ``pixels`` uint8 ``H x W x 3`` and its decoder ``embedding``; ``source``: ``"answer"``, ``"prompt"`` or
        ``"video"`` (``MaskContext``)."""
        prompts["threshold"] = self.mask_threshold
        return decode_with_steps(self.model.mask_decoder, self.mask_steps, pixels, embedding.to(self.device), source,
                                 self.stats, **prompts)

    def decode_segs(self, prep: PreparedImage, seg: torch.Tensor,
                    prompts: DecoderPrompts | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Projected [SEG] states ``[n, prompt_dim]`` (and the add-ons' prompts for them) -> (masks bool
        ``[n, H, W]``, scores ``[n]``)."""
        if not len(seg):
            return np.zeros((0, *prep.size), bool), np.zeros((0,), np.float32)
        p = prompts or DecoderPrompts()
        pred = self.decode(prep.pixels, prep.embedding, "answer", seg_embeddings=seg, points=p.points, point_labels=p.point_labels,
                           boxes=p.boxes)
        return pred.masks, pred.scores

    # ---- reading the answer ------------------------------------------------------------------------------
    def prediction(self, query: Query, prep: PreparedImage, answer_ids: list[int], masks: np.ndarray,
                   scores: np.ndarray) -> Prediction:
        """The answer's targets: each parsed ``<ref>/<box>/[SEG]`` with the mask of its [SEG] (``masks[k]`` for
        the answer's k-th [SEG])."""
        text = self.processor.decode_answer(answer_ids)
        notes: list[str] = []
        targets = []
        for parsed in self.model.family.parse_answer(text, prep.size, self.model.config):
            if parsed.note:   # a box clipped to the image, unreadable JSON...
                notes.append(f"target {parsed.phrase or '(unnamed)'!r}: {parsed.note}")
            idx = parsed.seg_index
            mask = masks[idx] if idx is not None and idx < len(masks) else None
            if idx is not None and mask is None:
                notes.append(f"[SEG] number {idx + 1} was written as plain text, not the [SEG] token: no mask")
            box = parsed.box if parsed.box is not None else (box_from_mask(mask) if mask is not None else None)
            if box is None and mask is None:
                notes.append(f"target {parsed.phrase or '(unnamed)'!r} has no readable box and no [SEG]: dropped")
                written = parsed.span[0] >= len(query.answer_prefix or "")   # the model's, not the user's
                if query.answer is None and written and _CUT_OFF_TARGET.fullmatch(text[parsed.span[0]:]):
                    text = text[:parsed.span[0]].rstrip()
                    notes[-1] += " (the answer ran out of tokens inside it: its unfinished text is left out)"
                continue
            score = float(scores[idx]) if mask is not None else None
            targets.append(Target(phrase=parsed.phrase, box=box, mask=mask, score=score, seg_index=idx))
        if self.model.family.masks_from_boxes:
            targets = self.box_masks(prep, targets)
        if not targets:
            notes.append("the answer names no object: it has no [SEG] token and no readable box")
        pred = Prediction(answer=text, targets=targets, image_size=prep.size, question=query.question, notes=notes)
        question = self.question_text(query)
        if query.answer is None:   # a given answer (teacher forcing) is the user's, not the model's to change
            asked = dataclasses.replace(query, question=question)   # the question as the model read it
            for addon in self.addons:
                pred = addon.review(self.model, self.processor.tokenizer, prep, asked, pred)
        pred.notes += [n for a in self.addons for n in a.notes(question, pred.answer)]
        return tidy_phrases(pred)

    def box_masks(self, prep: PreparedImage, targets: list[Target]) -> list[Target]:
        """For a family whose answers carry boxes and no [SEG]: each target's box becomes a box prompt, and the
        decoded mask its mask."""
        todo = [i for i, t in enumerate(targets) if t.mask is None and t.box is not None]
        if not todo:
            return targets
        boxes = torch.tensor([list(targets[i].box) for i in todo], dtype=self.dtype, device=self.device)
        with torch.no_grad():
            pred = self.decode(prep.pixels, prep.embedding, "answer", boxes=boxes)
        out = list(targets)
        for i, mask, score in zip(todo, pred.masks, pred.scores):
            out[i] = dataclasses.replace(out[i], mask=mask, score=float(score))
        return out


def tidy_phrases(pred: Prediction) -> Prediction:
    """``pred`` with the spaces just inside each ``<ref>..</ref>`` taken out of its answer and phrases.

    A tokenizer that spells a word with its leading space ("Ġsquares") may start a phrase with it, and the model's
    checks read the phrase as it was written; the user reads the name. Done last, after the add-ons' reviews."""
    answer = re.sub(rf"{re.escape(REF_START)}\s+", REF_START, pred.answer)
    answer = re.sub(rf"\s+{re.escape(REF_END)}", REF_END, answer)
    targets = [dataclasses.replace(t, phrase=t.phrase.strip()) if t.phrase else t for t in pred.targets]
    return dataclasses.replace(pred, answer=answer, targets=targets)


def cut_at(ids: list[int], eos: int, pad: int) -> list[int]:
    """Generated ids up to (not including) the first EOS or padding."""
    out = []
    for t in ids:
        if t in (eos, pad):
            break
        out.append(t)
    return out
