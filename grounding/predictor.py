"""Grounder: image(s) + question -> Prediction (answer text, targets with phrase, pixel box, mask, score).

One path for one or many questions: ``predict`` is ``predict_batch`` of one. Per batch:
  1. images are loaded and encoded by the mask decoder once per distinct content (an LRU cache keyed by a
     digest of the pixels, so a second question or click on the same image never re-encodes it);
  2. the answers are generated together (left padding, greedy) — or given, for teacher forcing;
  3. ``generate`` never computes the hidden state of the last token it emits, so one forward pass over
     prompt + answer reads the last-layer states at the answer's [SEG] positions;
  4. each [SEG] state is projected and decoded into one mask, aligned with its phrase by order (and, with
     ``mask_zoom``, decoded again on a crop around its object: segdecoder/zoom.py).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from grounding.box_writer import BoxWriter
from grounding.boxes import parse_answer
from grounding.checkpoint import load_checkpoint
from grounding.config import check_mask_zoom
from grounding.device import resolve_device
from grounding.errors import PromptError, QuestionError
from grounding.images import image_digest, load_image
from grounding.locator_mirror import mirror_token_ids
from grounding.model import GroundingModel
from grounding.processor import IGNORE_INDEX, EncodedText, GroundingProcessor
from grounding.prompts import build_prompt, visual_prompt_text
from grounding.ref_copy import RefCopy, TokenWords
from grounding.result import Prediction, Target, box_from_mask
from grounding.seg_locator import Phrases
from grounding.tokens import IMAGE, SEG
from segdecoder import ImageEmbedding, MaskPrediction
from segdecoder.masks import clip_to_boxes, decode_masks
from segdecoder.refine import check_mask_refine


@dataclass
class PreparedImage:
    """An image as both models see it: ``pixels`` uint8 ``H x W x 3``, the decoder's embedding and the
    vision tower's input ``[3, s, s]``; ``locator_features`` ``[g*g, width]``: a fusion locator's view of it, and
    ``mirrored_features`` the same of the image flipped left-right with ``locator_mirror``
    (``Grounder.locator_features`` fills them when first needed)."""
    pixels: np.ndarray
    digest: str
    embedding: ImageEmbedding
    vision: torch.Tensor
    locator_features: torch.Tensor | None = None
    mirrored_features: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[0], self.pixels.shape[1]


@dataclass
class Query:
    """One question about one image. Points are pixel (x, y) with labels 1/0; boxes pixel xyxy."""
    image: Any
    question: str
    points: Sequence[Sequence[float]] | None = None
    point_labels: Sequence[int] | None = None
    boxes: Sequence[Sequence[float]] | None = None
    answer: str | None = None  # given answer => teacher forcing, no generation
    answer_prefix: str | None = None  # the answer starts with this text and the model writes the rest

    def __post_init__(self) -> None:
        if self.answer is not None and self.answer_prefix is not None:
            raise QuestionError("give a whole answer (teacher forcing) or an answer prefix, not both")


class _AnswerRules(LogitsProcessor):
    """``generate`` hook: a ``RefCopy`` pushes question words in ``<ref>`` phrases, then the ``BoxWriter`` forces the
    rows' next tokens where it writes a box (generated ids start at column ``prompt_length``)."""

    def __init__(self, prompt_length: int, writer: BoxWriter | None, copy: RefCopy | None):
        self.prompt_length, self.writer, self.copy = prompt_length, writer, copy

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, ids in enumerate(input_ids[:, self.prompt_length:].tolist()):
            if self.copy is not None:
                self.copy.adjust(row, ids, scores[row])
            token = self.writer.next_token(row, ids) if self.writer is not None else None
            if token is not None:
                scores[row] = float("-inf")
                scores[row, token] = 0.0
        return scores


class Grounder:
    def __init__(self, model: GroundingModel, tokenizer, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, cache_size: int = 32, max_new_tokens: int = 128,
                 max_pixels: int = 100_000_000, mask_threshold: float = 0.0, locator_boxes: bool = True,
                 mask_zoom: float | str | None = "model", mask_refine: str | None = "model",
                 locator_mirror: bool | str = "model", ref_copy_bias: float | str | None = "model"):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.processor = GroundingProcessor(tokenizer, model.config, model.vision_image_size, model.num_image_tokens)
        self.max_new_tokens = max_new_tokens
        self.max_pixels = max_pixels
        self.mask_threshold = float(mask_threshold)  # mask = decoder logit > this (0.0: probability 0.5)
        # each mask decoded again on a crop of this many times its box side (segdecoder/zoom.py); "model": the
        # model's own setting (GroundingConfig.mask_zoom); None or 0: off
        self.mask_zoom = model.config.mask_zoom if mask_zoom == "model" else check_mask_zoom(mask_zoom or None)
        # each mask's outline refined against the image (segdecoder/refine.py); "model" as above; None: off
        self.mask_refine = model.config.mask_refine if mask_refine == "model" else check_mask_refine(mask_refine)
        # generated answers' <box> numbers come from a fusion locator (grounding/box_writer.py)
        self.locator_boxes = locator_boxes and BoxWriter.applies_to(model)
        # a fusion locator also reads the mirrored image and phrase (grounding/locator_mirror.py); "model" as above
        mirror = model.config.locator_mirror if locator_mirror == "model" else bool(locator_mirror)
        self.locator_mirror = bool(mirror) and model.has_fusion_locator
        self.mirror_table = mirror_token_ids(tokenizer) if self.locator_mirror else None
        # <ref> phrases lean to the question's words (grounding/ref_copy.py); "model" as above; None or 0: off
        self.ref_copy_bias = model.config.ref_copy_bias if ref_copy_bias == "model" else (ref_copy_bias or None)
        self._token_words = TokenWords.of(tokenizer) if self.ref_copy_bias else None
        self.cache_size = cache_size
        self._cache: OrderedDict[str, PreparedImage] = OrderedDict()
        self.encoder_calls = 0  # images run through the decoder's image encoder (the expensive part)
        self.zoom_crops = 0  # and crops of them, for mask_zoom

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "auto", dtype: str = "auto", **kwargs) -> "Grounder":
        dev, dt = resolve_device(device, dtype)
        model, tokenizer = load_checkpoint(directory, device=dev, dtype=dt)
        return cls(model, tokenizer, dev, dt, **kwargs)

    def clear_cache(self) -> None:
        """Forget every cached image embedding (the next question re-encodes its image)."""
        self._cache.clear()

    # ---- images ---------------------------------------------------------------------------------------
    def prepare(self, images: Sequence[Any]) -> list[PreparedImage]:
        """Load and encode images; distinct contents not in the cache are encoded in one batch."""
        arrays = [load_image(im, max_pixels=self.max_pixels) for im in images]
        digests = [image_digest(a) for a in arrays]
        missing = list(dict.fromkeys(d for d in digests if d not in self._cache))
        if missing:
            first = {d: a for d, a in zip(reversed(digests), reversed(arrays))}
            todo = [first[d] for d in missing]
            with torch.no_grad():
                embeddings = self.model.mask_decoder.encode(todo)
            self.encoder_calls += len(todo)
            for d, a, e in zip(missing, todo, embeddings):
                vision = self.processor.vision_pixels(a)
                self._cache[d] = PreparedImage(a, d, e, vision)
        out = []
        for d in digests:
            self._cache.move_to_end(d)
            out.append(self._cache[d])
        while len(self._cache) > max(self.cache_size, len(set(digests))):
            self._cache.popitem(last=False)
        return out

    def locator_features(self, preps: Sequence[PreparedImage]) -> list[torch.Tensor]:
        """A ``FusionLocator``'s features ``[g*g, width]`` of each image: the tower's patch features, which do not
        depend on the question, so they are computed once per image (in one batch) and kept with it; with
        ``locator_mirror`` those of the mirrored image too (``PreparedImage.mirrored_features``)."""
        todo = list({id(p): p for p in preps if p.locator_features is None or
                     (self.locator_mirror and p.mirrored_features is None)}.values())
        if todo:
            with torch.no_grad():
                pixels = torch.stack([p.vision for p in todo]).to(self.device, self.dtype)
                if self.locator_mirror:   # the padded square flipped: its cells are the image's, mirrored
                    pixels = torch.cat([pixels, pixels.flip(-1)])
                features = self.model.locator_keys(None, None, pixels)
                for i, p in enumerate(todo):
                    p.locator_features = features[i]
                    if self.locator_mirror:
                        p.mirrored_features = features[len(todo) + i]
        return [p.locator_features for p in preps]

    def locator_inputs(self, preps: Sequence[PreparedImage], hidden_states: tuple[torch.Tensor, ...] | None,
                       input_ids: torch.Tensor) -> list[torch.Tensor | None]:
        """Per image, what the [SEG] locator scores: a ``FusionLocator``'s tower features (``locator_features``),
        a ``SegLocator``'s image-token states from the forward pass (``hidden_states`` of ``input_ids``), or None
        without a locator."""
        if self.model.seg_locator is None:
            return [None] * len(preps)
        if self.model.has_fusion_locator:
            return self.locator_features(preps)
        return list(self.model.image_states(hidden_states, input_ids))

    # ---- the click path: decoder only -----------------------------------------------------------------
    def segment(self, image: Any, points: Sequence[Sequence[float]] | None = None,
                point_labels: Sequence[int] | None = None,
                boxes: Sequence[Sequence[float]] | None = None) -> Prediction:
        """Clicks and/or boxes -> masks, no language model. All points (and at most one box) describe ONE
        object; several boxes without points give one mask each."""
        prep = self.prepare([image])[0]
        pts, labels, bxs = _check_prompts(prep.size, points, point_labels, boxes)
        if pts is None and bxs is None:
            raise PromptError("give at least one point or box to segment")
        if bxs is not None and len(bxs) > 1 and pts is not None:
            raise PromptError("several boxes cannot be combined with points: give one box, or boxes alone")
        n = len(bxs) if bxs is not None else 1
        t = lambda a: None if a is None else torch.as_tensor(a, dtype=self.dtype, device=self.device)
        points_t = t(pts)[None].expand(n, -1, -1) if pts is not None else None
        labels_t = torch.as_tensor(labels, device=self.device)[None].expand(n, -1) if pts is not None else None
        # One click is ambiguous (part or whole?): let SAM propose 3 masks and keep the best, as SAM advises.
        multimask = pts is not None and len(pts) == 1 and bxs is None
        emb = prep.embedding.to(self.device)
        pred = self._decode(prep, emb, points=points_t, point_labels=labels_t, boxes=t(bxs), multimask=multimask)
        masks = pred.masks if bxs is not None else [clicked_parts(m, pts, labels) for m in pred.masks]
        targets = [Target(phrase=None, box=box_from_mask(m), mask=m, score=float(s), seg_index=None)
                   for m, s in zip(masks, pred.scores)]
        return Prediction(answer="", targets=targets, image_size=prep.size, question=None, notes=[])

    # ---- the language path -------------------------------------------------------------------------------
    def predict(self, image: Any, question: str, points=None, point_labels=None, boxes=None,
                answer: str | None = None, max_new_tokens: int | None = None,
                answer_prefix: str | None = None) -> Prediction:
        return self.predict_batch([Query(image, question, points, point_labels, boxes, answer, answer_prefix)],
                                  max_new_tokens=max_new_tokens)[0]

    def predict_video(self, video: Any, question: str, key_frame: int = 0, **kwargs: Any):
        """Answer ``question`` on frame ``key_frame`` of ``video`` (file, folder of frames or list of frames) and
        carry its targets through every frame: a ``grounding.video.VideoRun`` (iterate it for per-frame results,
        or ``.save(out_dir)``). Options (mode, every, encode_batch, ...): ``grounding.video.predict_video``."""
        from grounding.video import predict_video
        return predict_video(self, video, question, key_frame, **kwargs)

    def predict_batch(self, queries: Sequence[Query | tuple], batch_size: int = 8,
                      max_new_tokens: int | None = None) -> list[Prediction]:
        queries = [q if isinstance(q, Query) else Query(*q) for q in queries]
        out: list[Prediction] = []
        for start in range(0, len(queries), batch_size):
            out.extend(self._predict_chunk(queries[start:start + batch_size], max_new_tokens or self.max_new_tokens))
        return out

    def _predict_chunk(self, queries: list[Query], max_new_tokens: int) -> list[Prediction]:
        preps = self.prepare([q.image for q in queries])
        prompts = [self._encode_question(q, p, max_new_tokens) for q, p in zip(queries, preps)]
        pixel_values = torch.stack([p.vision for p in preps]).to(self.device, self.dtype)
        generated = self._answers(queries, prompts, pixel_values, preps, max_new_tokens)
        # prompt labels are IGNORE_INDEX except on an answer prefix: the answer is prefix + what follows
        answers = [p.answer_ids + g for p, g in zip(prompts, generated)]
        full = [EncodedText(p.input_ids + g, [int(lab != IGNORE_INDEX) for lab in p.labels] + [1] * len(g))
                for p, g in zip(prompts, generated)]
        batch = {k: v.to(self.device) for k, v in self.processor.pad(full, side="left").items()}
        with torch.no_grad():
            out = self.model.vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"], pixel_values=pixel_values,
                                 output_hidden_states=True)
            # labels hold 1 on answer tokens: only [SEG]s the model wrote (not ones in the prompt) count.
            hidden, ids = out.hidden_states[-1], batch["input_ids"]
            states = self.model.seg_states(hidden, ids, batch["labels"] == 1)
            images = self.locator_inputs(preps, out.hidden_states, ids)
            phrases = self.model.seg_phrases(ids, batch["labels"] == 1, self.mirror_table) \
                if self.model.reads_phrases else [None] * len(ids)
            prompts = [self.seg_prompts(s, im, ph, p) for s, im, ph, p in zip(states, images, phrases, preps)]
        return [self.prediction(q, p, a, *self.decode_segs(p, *sp)) for q, p, a, sp in zip(queries, preps, answers, prompts)]

    @staticmethod
    def question_text(query: Query) -> str:
        """The query's question as the prompt holds it."""
        question = query.question
        if not isinstance(question, str):
            raise QuestionError(f"the question must be text, got {type(question).__name__}")
        # A user's text must not smuggle in image slots or [SEG] tokens; <point>/<box> are welcome.
        question = question.replace(IMAGE, " ").replace(SEG, " ").strip()
        if not question:
            raise QuestionError("the question is empty")
        return question

    def ref_copy(self, queries: Sequence[Query], prefixes: list[list[int]]) -> RefCopy | None:
        """The ``RefCopy`` of these rows (None when ``ref_copy_bias`` is off)."""
        if not self.ref_copy_bias:
            return None
        tok = self.processor.tokenizer
        questions = [tok(self.question_text(q), add_special_tokens=False)["input_ids"] for q in queries]
        return RefCopy(self._token_words, questions, prefixes, self.ref_copy_bias)

    def _encode_question(self, query: Query, prep: PreparedImage, max_new_tokens: int) -> EncodedText:
        """The prompt's ids, then any answer prefix's ids (labelled with themselves, the prompt IGNORE_INDEX)."""
        question = self.question_text(query)
        pts, labels, bxs = _check_prompts(prep.size, query.points, query.point_labels, query.boxes)
        prompt = build_prompt(question, visual_prompt_text(prep.size, pts, labels, bxs, self.model.config.box_format))
        encoded = self.processor.encode(prompt)
        prefix = self.answer_prefix_ids(query)
        encoded = EncodedText(encoded.input_ids + prefix, encoded.labels + prefix)
        room = self.model.config.max_length - len(encoded.input_ids)
        if query.answer is None and room < max_new_tokens:
            raise QuestionError(
                f"the question is too long: {len(encoded.input_ids)} tokens with the image leave {max(room, 0)} of "
                f"the {max_new_tokens} needed for the answer (the model accepts {self.model.config.max_length})"
            )
        return encoded

    def answer_prefix_ids(self, query: Query) -> list[int]:
        """Token ids of ``query.answer_prefix`` (tokenised as the start of an answer), or []."""
        if query.answer_prefix is None:
            return []
        return self.processor.encode("", query.answer_prefix).answer_ids[:-1]  # without EOS

    def _answers(self, queries: list[Query], prompts: list[EncodedText], pixel_values: torch.Tensor,
                 preps: list[PreparedImage], max_new_tokens: int) -> list[list[int]]:
        """Answer token ids per query: the given answers (teacher forcing) or greedy generation (after the
        prompt, which holds any answer prefix; boxes written by the ``BoxWriter`` when ``locator_boxes``)."""
        answers: list[list[int] | None] = [None] * len(queries)
        for i, q in enumerate(queries):
            if q.answer is not None:
                answers[i] = self.processor.encode("", q.answer).answer_ids
        todo = [i for i, a in enumerate(answers) if a is None]
        if todo:
            batch = {k: v.to(self.device) for k, v in self.processor.pad([prompts[i] for i in todo], side="left").items()}
            tok = self.processor.tokenizer
            gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            prefixes = [prompts[i].answer_ids for i in todo]
            with torch.no_grad():
                writer = None
                if self.locator_boxes:
                    mine = [preps[i] for i in todo]
                    self.locator_features(mine)
                    writer = BoxWriter(self.model, tok, mine, prefixes, self.mirror_table)
                copy = self.ref_copy([queries[i] for i in todo], prefixes)
                processors = LogitsProcessorList([_AnswerRules(batch["input_ids"].shape[1], writer, copy)])
                generated = self.model.vlm.generate(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=pixel_values[todo], generation_config=gen_config, logits_processor=processors,
                )
            new = generated[:, batch["input_ids"].shape[1]:].tolist()
            for i, ids in zip(todo, new):
                answers[i] = _cut_at(ids, tok.eos_token_id, tok.pad_token_id)
        return answers  # type: ignore[return-value]

    def seg_prompts(self, states: torch.Tensor, image_states: torch.Tensor | None, phrases: Phrases | None,
                    prep: PreparedImage) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One answer's [SEG] states ``[n, h]`` (and, read by a [SEG] locator, its ``locator_keys`` and phrases)
        -> (prompt embeddings ``[n, prompt_dim]``, clicks ``[n, 1, 2]`` pixel xy or None, boxes ``[n, 4]`` pixel
        xyxy or None)."""
        m = self.model
        if m.seg_locator is None:
            return m.seg_projection(states), None, None
        found = m.locate(states, image_states, phrases, prep.size,
                         ranks=phrases.repeats() if phrases is not None else None,
                         mirrored_states=prep.mirrored_features)
        return (m.seg_projection(states), *found.decoder_prompts(m.config.locator_click))

    def decode_segs(self, prep: PreparedImage, seg: torch.Tensor, clicks: torch.Tensor | None = None,
                    boxes: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Projected [SEG] states ``[n, prompt_dim]`` (and the locator's clicks ``[n, 1, 2]`` and boxes ``[n, 4]``)
        -> (masks bool ``[n, H, W]``, scores ``[n]``)."""
        if not len(seg):
            return np.zeros((0, *prep.size), bool), np.zeros((0,), np.float32)
        labels = None if clicks is None else torch.ones(clicks.shape[:2], dtype=torch.long, device=clicks.device)
        pred = self._decode(prep, prep.embedding.to(self.device), seg_embeddings=seg, points=clicks,
                            point_labels=labels, boxes=boxes)
        margin = self.model.config.mask_box_margin
        if boxes is None or margin is None:
            return pred.masks, pred.scores
        return clip_to_boxes(pred.masks, boxes.float().cpu().numpy(), margin), pred.scores

    def _decode(self, prep: PreparedImage, embedding: ImageEmbedding, **prompts) -> MaskPrediction:
        """The mask decoder on one image's prompts (``MaskDecoderBackend.decode``'s), zoomed when ``mask_zoom``,
        refined when ``mask_refine``."""
        pred, crops = decode_masks(self.model.mask_decoder, embedding, prep.pixels, self.mask_zoom, self.mask_refine,
                                   threshold=self.mask_threshold, **prompts)
        self.zoom_crops += crops
        return pred

    def prediction(self, query: Query, prep: PreparedImage, answer_ids: list[int], masks: np.ndarray,
                   scores: np.ndarray) -> Prediction:
        """The answer's targets: each parsed ``<ref>/<box>/[SEG]`` with the mask of its [SEG] (``masks[k]`` for
        the answer's k-th [SEG])."""
        text = self.processor.decode_answer(answer_ids)
        notes: list[str] = []
        targets = []
        for parsed in parse_answer(text, prep.size):
            idx = parsed.seg_index
            mask = masks[idx] if idx is not None and idx < len(masks) else None
            if idx is not None and mask is None:
                notes.append(f"[SEG] number {idx + 1} was written as plain text, not the [SEG] token: no mask")
            box = parsed.box if parsed.box is not None else (box_from_mask(mask) if mask is not None else None)
            if box is None and mask is None:
                notes.append(f"target {parsed.phrase or '(unnamed)'!r} has no readable box and no [SEG]: dropped")
                continue
            score = float(scores[idx]) if mask is not None else None
            targets.append(Target(phrase=parsed.phrase, box=box, mask=mask, score=score, seg_index=idx))
        if not targets:
            notes.append("the answer names no object: it has no [SEG] token and no readable box")
        return Prediction(answer=text, targets=targets, image_size=prep.size, question=query.question, notes=notes)


def clicked_parts(mask: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The parts (8-connected components) of a bool ``[H, W]`` mask that hold a positive click (``points [k, 2]``
    pixel xy, ``labels [k]``, 1 = object); the mask unchanged if no positive click lies on it. Clicks name the
    object under them: a small decoder's mask can spill onto a like-coloured shape elsewhere in the image (the
    default model's did on its demo image), and that part is not what was clicked. Box prompts keep every part:
    an occluded object can be in pieces inside its box. 120 val objects, one click each: mean IoU 0.654 -> 0.661."""
    _, parts = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    h, w = mask.shape
    hit = {int(parts[int(np.clip(y, 0, h - 1)), int(np.clip(x, 0, w - 1))]) for (x, y), label in zip(points, labels)
           if label == 1}
    hit.discard(0)
    return np.isin(parts, list(hit)) if hit else mask


def _cut_at(ids: list[int], eos: int, pad: int) -> list[int]:
    out = []
    for t in ids:
        if t in (eos, pad):
            break
        out.append(t)
    return out


def _check_prompts(size: tuple[int, int], points, point_labels, boxes):
    """Validate clicks/boxes against the image ``size`` (H, W) -> float arrays (or None)."""
    h, w = size
    pts = labels = bxs = None
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
            raise PromptError("points must be a list of (x, y) pixel pairs")
        if ((pts[:, 0] < 0) | (pts[:, 0] > w) | (pts[:, 1] < 0) | (pts[:, 1] > h)).any():
            raise PromptError(f"a point lies outside the {w}x{h} image")
        labels = np.ones(len(pts), np.int64) if point_labels is None else np.asarray(point_labels, np.int64)
        if labels.shape != (len(pts),) or not np.isin(labels, (0, 1)).all():
            raise PromptError("point labels must be 1 (object) or 0 (background), one per point")
    if boxes is not None and len(boxes):
        bxs = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if np.size(boxes) % 4 == 0 else None
        if bxs is None or not np.isfinite(bxs).all():
            raise PromptError("boxes must be (x1, y1, x2, y2) pixel quadruples")
        if (bxs[:, 2] <= bxs[:, 0]).any() or (bxs[:, 3] <= bxs[:, 1]).any():
            raise PromptError("a box must have x2 > x1 and y2 > y1")
        bxs[:, [0, 2]] = bxs[:, [0, 2]].clip(0, w)
        bxs[:, [1, 3]] = bxs[:, [1, 3]].clip(0, h)
    return pts, labels, bxs
