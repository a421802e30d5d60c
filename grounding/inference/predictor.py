"""Grounder: image(s) + question -> Prediction (answer text, targets with phrase, pixel box, mask, score).

One path for one or many questions: ``predict`` is ``predict_batch`` of one. Per batch:
  1. images are loaded and encoded by the mask decoder once per distinct content (an LRU cache keyed by a
     digest of the pixels, so a second question or click on the same image never re-encodes it);
  2. the answers are generated together (left padding, greedy; the add-ons' logits rules adjust each step) —
     or given, for teacher forcing;
  3. ``generate`` never computes the hidden state of the last token it emits, so one forward pass over
     prompt + answer reads the last-layer states at the answer's [SEG] positions;
  4. each [SEG] state is projected (with the add-ons' decoder prompts beside it) and decoded into one mask,
     aligned with its phrase by order; the add-ons' mask steps follow (grounding/inference/steps.py).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessorList

from grounding.checkpoint import load_checkpoint
from grounding.device import resolve_device
from grounding.errors import PromptError
from grounding.images import image_digest, load_image
from grounding.inference.prepared import PreparedImage, Query, check_prompts
from grounding.inference.steps import AnswerRulesProcessor, AnswerSteps, active_addons, cut_at
from grounding.processor import IGNORE_INDEX, EncodedText
from grounding.result import Prediction, Target, box_from_mask


class Grounder:
    """``addons``: changes to the checkpoint's add-ons for this predictor (``{name: None}`` off,
    ``{name: {setting: value}}`` changed; ``steps.active_addons``)."""

    def __init__(self, model, tokenizer, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 cache_size: int = 32, max_new_tokens: int = 256, max_pixels: int = 100_000_000,
                 mask_threshold: float = 0.0, addons: Mapping[str, Any] | None = None):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        processor = model.family.processor(model, tokenizer)
        self.steps = AnswerSteps(self.model, processor, active_addons(self.model, addons, tokenizer), self.device,
                                 dtype, mask_threshold)
        self.max_new_tokens = max_new_tokens
        self.max_pixels = max_pixels
        self.cache_size = cache_size
        self._cache: OrderedDict[str, PreparedImage] = OrderedDict()
        self.encoder_calls = 0  # images run through the decoder's image encoder (the expensive part)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "auto", dtype: str = "auto",
                        quantize: str | None = None, **kwargs) -> "Grounder":
        """``quantize``: ``"4bit"`` / ``"8bit"`` loads the language model through bitsandbytes (CUDA only)."""
        dev, dt = resolve_device(device, dtype)
        if quantize is not None:
            from grounding.quantize import check_quantize, quantize_language_model
            check_quantize(quantize, dev)   # before loading gigabytes
        model, tokenizer = load_checkpoint(directory, device="cpu" if quantize else dev, dtype=dt)
        if quantize is not None:
            quantize_language_model(model, quantize, dev)
        return cls(model, tokenizer, dev, dt, **kwargs)

    @property
    def processor(self):
        return self.steps.processor

    @property
    def mask_threshold(self) -> float:
        return self.steps.mask_threshold

    @mask_threshold.setter
    def mask_threshold(self, value: float) -> None:
        self.steps.mask_threshold = float(value)

    @property
    def addon_settings(self) -> dict[str, dict]:
        """The active add-ons and their settings."""
        return self.steps.addon_settings()

    @property
    def zoom_crops(self) -> int:
        """Crops encoded again by the ``mask_zoom`` add-on."""
        return self.steps.stats.get("zoom_crops", 0)

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
                self._cache[d] = PreparedImage(a, d, e, self.processor.vision_pixels(a))
        out = []
        for d in digests:
            self._cache.move_to_end(d)
            out.append(self._cache[d])
        while len(self._cache) > max(self.cache_size, len(set(digests))):
            self._cache.popitem(last=False)
        return out

    # ---- the click path: decoder only -----------------------------------------------------------------
    def segment(self, image: Any, points: Sequence[Sequence[float]] | None = None,
                point_labels: Sequence[int] | None = None,
                boxes: Sequence[Sequence[float]] | None = None) -> Prediction:
        """Clicks and/or boxes -> masks, no language model. All points (and at most one box) describe ONE
        object; several boxes without points give one mask each."""
        prep = self.prepare([image])[0]
        pts, labels, bxs = check_prompts(prep.size, points, point_labels, boxes)
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
        pred = self.steps.decode(prep.pixels, prep.embedding, "prompt", points=points_t, point_labels=labels_t, boxes=t(bxs),
                                 multimask=multimask)
        targets = [Target(phrase=None, box=box_from_mask(m), mask=m, score=float(s), seg_index=None)
                   for m, s in zip(pred.masks, pred.scores)]
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
        or ``.save(out_dir, draw=...)``). Options (mode, every, encode_batch, ...): ``grounding.video.predict_video``."""
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
        steps = self.steps
        preps = self.prepare([q.image for q in queries])
        family = self.model.family
        if not family.llava_inputs:
            # the family drives its own VLM; its answers carry boxes (no [SEG] states to read): masks come from them
            answers = family.answer_ids(steps, queries, preps, max_new_tokens)
            return [steps.prediction(q, p, a, np.zeros((0, *p.size), bool), np.zeros((0,), np.float32))
                    for q, p, a in zip(queries, preps, answers)]
        prompts = [steps.encode_question(q, p, max_new_tokens) for q, p in zip(queries, preps)]
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
            ids = batch["input_ids"]
            # labels hold 1 on answer tokens: only [SEG]s the model wrote (not ones in the prompt) count.
            segs = self.model.read_segs(out.hidden_states[-1], ids, batch["labels"] == 1)
            readings = steps.read_images(preps, out.hidden_states, ids)
            results = []
            for i, (q, p, a, seg) in enumerate(zip(queries, preps, answers, segs)):
                embeddings, seg_prompts = steps.seg_prompts(seg, [(addon, read[i]) for addon, read in readings], p.size)
                results.append(steps.prediction(q, p, a, *steps.decode_segs(p, embeddings, seg_prompts)))
        return results

    def _answers(self, queries: list[Query], prompts: list[EncodedText], pixel_values: torch.Tensor,
                 preps: list[PreparedImage], max_new_tokens: int) -> list[list[int]]:
        """Answer token ids per query: the given answers (teacher forcing) or greedy generation after the prompt
        (which holds any answer prefix)."""
        answers = [self.steps.given_answer_ids(q) for q in queries]
        todo = [i for i, a in enumerate(answers) if a is None]
        if todo:
            batch = {k: v.to(self.device) for k, v in self.processor.pad([prompts[i] for i in todo], side="left").items()}
            tok = self.processor.tokenizer
            budget = self.steps.answer_budget([prompts[i] for i in todo], max_new_tokens)
            gen_config = GenerationConfig(max_new_tokens=budget, do_sample=False, num_beams=1,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            rules = self.steps.logits_rules([queries[i] for i in todo], [preps[i] for i in todo],
                                            [prompts[i].answer_ids for i in todo])
            processors = LogitsProcessorList([AnswerRulesProcessor(batch["input_ids"].shape[1], rules)] if rules else [])
            with torch.no_grad():
                generated = self.model.vlm.generate(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=pixel_values[todo], generation_config=gen_config, logits_processor=processors,
                )
            new = generated[:, batch["input_ids"].shape[1]:].tolist()
            for i, ids in zip(todo, new):
                answers[i] = cut_at(ids, tok.eos_token_id, tok.pad_token_id)
        return answers  # type: ignore[return-value]
