"""Questions grouped by image, fast: each image's prompt prefix is computed once and its KV cache shared.

``Grounder.predict_batch`` treats every question on its own: the vision tower and the whole prompt
(system text + hundreds of image tokens + question) run again for each. Evaluation sets ask ~7 questions
per image (RefCOCO val: 10,834 sentences on 1,500 images), so :class:`PrefixEngine` does the work that the
questions of one image share once:

  1. the mask decoder's image embedding (the Grounder's content cache) and the vision tower, once;
  2. the longest token prefix common to the prompts (BOS, "USER:", the image tokens, and any shared start
     of the questions) runs once per image with ``use_cache=True``; each image's KV cache row is repeated
     for its questions (``DynamicCache.batch_select_indices``: a copy of keys/values, no compute). Batches
     mix images, so RefCOCO's ~7 questions per image still fill a batch of 16-32 rows;
  3. the remaining tokens of every question run as one batch on top of it. They are LEFT-padded after the
     prefix (prefix | pads | suffix), so every row's last token sits in the last column and greedy decoding
     steps all rows together; pads are masked out and ``position_ids`` continue the prefix without gaps,
     which makes each row compute what it would compute alone;
  4. greedy decoding feeds each new token and keeps its last-layer hidden state, so the [SEG] states come
     out of the decoding itself (``Grounder`` needs one more forward pass over prompt + answer for them);
  5. the [SEG]s of all of an image's questions are decoded into masks in one call of the mask decoder. With
     ``overlap`` (the default) a batch's masks (the decoder and the mask steps: zoom re-encodes, GrabCut, which
     are CPU work even beside a GPU) are decoded on a worker thread while the language model answers the next
     batch; only the mask decoder and the mask steps run there, which the answering steps do not use.

Results equal ``Grounder.predict_batch`` up to float rounding (the test compares answers and masks).
A question may carry a whole answer (teacher forcing: nothing is generated) or an answer prefix (the model
writes the rest), as :class:`~grounding.inference.prepared.Query` says. Both paths take the same steps
(grounding/inference/steps.py): question encoding, the add-ons' logits rules, [SEG] prompts, mask decoding.

KV cache of a batch (``cache=``):
  ``"dynamic"`` (default): transformers' ``DynamicCache``; every decode step concatenates one column to every
      layer's keys/values and to the attention mask, so each step has new shapes.
  ``"static"``: after the prefix ran, its rows are copied into a ``StaticCache`` preallocated for the whole batch
      (prefix + suffix width + ``max_new_tokens``, rounded up to ``STATIC_ROUND`` slots so that batches of similar
      prompts reuse one cache) and the attention mask is ``[rows, max_cache_len]`` from the start (unwritten slots
      masked); a decode step then has fixed shapes (``input_ids [n, 1]``, ``position_ids [n, 1]``, the same mask
      tensor updated in place), which is what CUDA graphs need. ``compile_decode=True`` (static only) runs the
      decode step through ``torch.compile(fullgraph=True)``, mode ``"reduce-overhead"`` (CUDA graphs) on CUDA, the
      default mode elsewhere; the suffix step stays eager.
  Checked with transformers 5.25.0 / torch 2.14.1 (tests/test_static_cache.py): the static cache gives the same
  greedy ids and hidden states within 1e-5 (fp32) as the dynamic one, and the compiled step traces as one graph
  on CPU. What broke on the way, and is handled here: with ``fullgraph=True`` the FIRST forward call that asks
  for ``output_hidden_states`` installs transformers' output-capturing hooks under a ``threading.Lock``, which
  dynamo cannot trace (``torch._dynamo.exc.Unsupported`` inside ``maybe_install_capturing_hooks``); the eager
  suffix step asks for hidden states first, so the hooks exist before the compiled step runs. In 5.25
  ``StaticLayer.update`` writes at its own ``cumulative_length`` (no ``cache_position``), so the prefix is
  copied in with ``update`` and the masks follow the cache slots, not ``position_ids``.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import torch

from grounding.addons import DecoderPrompts, LogitsRule
from grounding.inference.predictor import Grounder
from grounding.inference.prepared import PreparedImage, Query
from grounding.inference.steps import cut_at
from grounding.processor import IGNORE_INDEX, EncodedText
from grounding.result import Prediction

CACHES = ("dynamic", "static")
STATIC_ROUND = 32   # a static cache's length is rounded up to a multiple of this many slots


class PrefixEngine:
    """Answers questions grouped by image with a shared, cached image prefix. Wraps a :class:`Grounder`
    (same model, tokenizer, caches and settings). ``cache``: ``"dynamic"`` or ``"static"`` KV cache for the
    decode steps, ``compile_decode``: compile the (static) decode step; ``overlap``: decode a batch's masks on a
    worker thread while the next batch is answered; see the module docstring."""

    def __init__(self, grounder: Grounder, cache: str = "dynamic", compile_decode: bool = False,
                 overlap: bool = True):
        if cache not in CACHES:
            raise ValueError(f"unknown cache {cache!r}; choose one of {', '.join(CACHES)}")
        if compile_decode and cache != "static":
            raise ValueError("compile_decode needs cache='static' (a dynamic cache changes shape every step)")
        self.grounder = grounder
        self.cache = cache
        self.compile_decode = compile_decode
        self.overlap = overlap   # a batch's masks decoded on a worker thread while the next batch is answered
        self._static = None      # (rows, length, StaticCache): the last batch's, reused (reset) by the next
        self._compiled = None    # the compiled decode step, made on first use

    def predict_group(self, image: Any, queries: Sequence[Query | tuple], batch_size: int = 16,
                      max_new_tokens: int | None = None) -> list[Prediction]:
        """Answer ``queries`` (their ``image`` fields are ignored) about ``image``."""
        return self.predict_groups([(image, queries)], batch_size, max_new_tokens)[0]

    def predict_groups(self, groups: Sequence[tuple[Any, Sequence[Query | tuple]]], batch_size: int = 16,
                       max_new_tokens: int | None = None) -> list[list[Prediction]]:
        """Answer each ``(image, queries)`` group; returns one list of predictions per group. Rows (questions)
        are batched ``batch_size`` at a time across groups, so small groups (RefCOCO: ~7 questions per image)
        still fill a batch: every image in a batch gets its own prefix row, shared by its questions."""
        max_new = max_new_tokens or self.grounder.max_new_tokens
        if not self.grounder.model.family.llava_inputs:
            return self._per_question(groups, batch_size, max_new)
        preps = self.grounder.prepare([image for image, _ in groups])  # distinct images encoded in one batch
        rows = [(gi, preps[gi], q if isinstance(q, Query) else Query(*q))
                for gi, (_, queries) in enumerate(groups) for q in queries]
        out: list[list[Prediction]] = [[] for _ in groups]
        chunks = [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
        overlap = self.overlap and len(chunks) > 1

        def finish(chunk, answered, masks):
            decoded = masks.result() if isinstance(masks, Future) else masks
            for (gi, _, _), pred in zip(chunk, self._predictions(answered, decoded)):
                out[gi].append(pred)

        # The mask decoding of batch b (the mask decoder and the mask steps: zoom re-encodes, GrabCut; mostly not
        # the language model's work) runs on a worker thread while the language model answers batch b + 1.
        worker = ThreadPoolExecutor(1, thread_name_prefix="prefix-engine-masks") if overlap else None
        pending: list[tuple[list, _Answered, Any]] = []
        try:
            for chunk in chunks:
                answered = self._answer([(p, q) for _, p, q in chunk], max_new)
                pending.append((chunk, answered, worker.submit(self._decode_masks, answered) if worker
                                else self._decode_masks(answered)))
                while len(pending) > 1:   # one batch's masks in flight behind the language model
                    finish(*pending.pop(0))
            while pending:
                finish(*pending.pop(0))
        finally:
            if worker is not None:
                worker.shutdown(wait=True, cancel_futures=True)
        return out

    def _per_question(self, groups, batch_size: int, max_new_tokens: int) -> list[list[Prediction]]:
        """A family whose VLM is not LLaVA-shaped (``ModelFamily.llava_inputs``): no shared prefix; the questions go
        through ``Grounder.predict_batch`` (batched, each with its whole prompt; images still encoded once)."""
        rows = [(gi, dataclasses.replace(q if isinstance(q, Query) else Query(*q), image=image))
                for gi, (image, queries) in enumerate(groups) for q in queries]
        preds = self.grounder.predict_batch([q for _, q in rows], batch_size=batch_size, max_new_tokens=max_new_tokens)
        out: list[list[Prediction]] = [[] for _ in groups]
        for (gi, _), pred in zip(rows, preds):
            out[gi].append(pred)
        return out

    # ---------------------------------------------------------------------------------------------------
    def _answer(self, items: list[tuple[PreparedImage, Query]], max_new_tokens: int) -> "_Answered":
        """Steps 1-4 and the [SEG] prompts of step 5: everything before the mask decoder."""
        g = self.grounder
        steps, vlm, dev = g.steps, g.model.vlm, g.device
        # prompt ids (+ any answer prefix, labelled) and, for teacher forcing, the given answer
        prompts = [steps.encode_question(q, p, max_new_tokens) for p, q in items]
        forced = [steps.given_answer_ids(q) for _, q in items]
        max_new_tokens = steps.answer_budget([p for p, f in zip(prompts, forced) if f is None], max_new_tokens)
        rows = [EncodedText(p.input_ids + (f or []), [int(lab != IGNORE_INDEX) for lab in p.labels] + [1] * len(f or []))
                for p, f in zip(prompts, forced)]
        # one prefix row per distinct image; row i continues prefix row owner[i]
        images = list({id(p): p for p, _ in items}.values())
        owner = [next(k for k, im in enumerate(images) if im is p) for p, _ in items]
        prefix_len = _shared_prefix_length(prompts, steps.processor.image_token_id)
        n = len(rows)

        with torch.no_grad():
            # 1-2: the shared prefix once per image, its cache rows repeated over that image's questions
            prefix = torch.tensor([rows[0].input_ids[:prefix_len]] * len(images), device=dev)
            pixel_values = torch.stack([im.vision for im in images]).to(dev, g.dtype)
            first = vlm(input_ids=prefix, pixel_values=pixel_values, use_cache=True, logits_to_keep=1,
                        output_hidden_states=steps.reads_hidden_states)
            readings = steps.read_images(images, first.hidden_states, prefix)
            cache = first.past_key_values
            if owner != list(range(n)):
                cache.batch_select_indices(torch.tensor(owner, device=dev))
            # 3: the suffixes, left-padded after the prefix
            suffixes = [r.input_ids[prefix_len:] for r in rows]
            width = max(len(s) for s in suffixes)
            pad_id = steps.processor.tokenizer.pad_token_id
            ids = torch.full((n, width), pad_id, dtype=torch.long)
            mask = torch.zeros((n, prefix_len + width), dtype=torch.long)
            mask[:, :prefix_len] = 1
            positions = torch.full((n, width), prefix_len, dtype=torch.long)
            for i, s in enumerate(suffixes):
                ids[i, width - len(s):] = torch.tensor(s)
                mask[i, prefix_len + width - len(s):] = 1
                positions[i, width - len(s):] = torch.arange(prefix_len, prefix_len + len(s))
            ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
            if self.cache == "static":   # fixed shapes from here on: the whole batch's cache and mask preallocated
                cache, mask = self._static_cache(cache, mask, max_new_tokens if any(f is None for f in forced) else 0)
            # rows end in the same column: only the last column's logits are needed
            step = vlm(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, output_hidden_states=True, logits_to_keep=1)
            # hidden states and ids of each row's suffix (real tokens only); generated tokens are appended
            hidden = [[step.hidden_states[-1][i, width - len(s):]] for i, s in enumerate(suffixes)]
            row_ids = [list(s) for s in suffixes]
            is_answer = [r.labels[prefix_len:] for r in rows]

            # 4: greedy decoding for the rows without a given answer
            active = [f is None for f in forced]
            rules = steps.logits_rules([q for _, q in items], [images[k] for k in owner],
                                       [p.answer_ids for p in prompts]) if any(active) else []
            generated = self._decode(step, cache, mask, positions[:, -1], active, max_new_tokens,
                                     hidden, row_ids, is_answer, rules)

            # 5: the [SEG] states of every answer, projected, with the add-ons' decoder prompts
            segs = []
            for h, t, a, k in zip(hidden, row_ids, is_answer, owner):
                tokens, answer = torch.tensor([t], device=dev), torch.tensor([a], device=dev) == 1
                seg = g.model.read_segs(torch.cat(h)[None], tokens, answer)[0]
                segs.append(steps.seg_prompts(seg, [(addon, read[k]) for addon, read in readings], images[k].size))
        answers = [p.answer_ids + (f if f is not None else gen) for p, f, gen in zip(prompts, forced, generated)]
        return _Answered(items, answers, segs, owner, images)

    def _decode_masks(self, answered: "_Answered") -> list[tuple[np.ndarray, np.ndarray]]:
        """Step 5's mask decoding: each image's [SEG]s in one call of the mask decoder, then the mask steps ->
        per image (masks bool ``[n, H, W]``, scores ``[n]``), its rows' [SEG]s in row order. Thread-safe beside
        ``_answer``: it uses the mask decoder alone (and the add-ons' mask steps), which ``_answer`` does not."""
        steps, out = self.grounder.steps, []
        with torch.no_grad():   # grad mode is per thread
            for k, im in enumerate(answered.images):
                mine = [s for s, o in zip(answered.segs, answered.owner) if o == k]
                found = [p for _, p in mine if p is not None]
                out.append(steps.decode_segs(im, torch.cat([e for e, _ in mine]),
                                             DecoderPrompts.concat(found) if found else None))
        return out

    def _predictions(self, answered: "_Answered", decoded: list[tuple[np.ndarray, np.ndarray]]) -> list[Prediction]:
        """Each row's answer read into targets, with its [SEG]s' masks (``_decode_masks``' per image)."""
        taken = [0] * len(decoded)   # per image: the masks its earlier rows took
        out = []
        for (prep, q), answer, (s, _), k in zip(answered.items, answered.answers, answered.segs, answered.owner):
            masks, scores = decoded[k]
            out.append(self.grounder.steps.prediction(q, prep, answer, masks[taken[k]:taken[k] + len(s)],
                                                      scores[taken[k]:taken[k] + len(s)]))
            taken[k] += len(s)
        return out

    def _decode(self, step, cache, mask: torch.Tensor, last_positions: torch.Tensor, active: list[bool],
                max_new_tokens: int, hidden: list[list[torch.Tensor]], row_ids: list[list[int]],
                is_answer: list[list[int]], rules: list[LogitsRule]) -> list[list[int]]:
        """Greedy decoding from ``step``'s last logits for the ``active`` rows (the add-ons' ``rules`` adjust each
        row's logits first). Appends each FED token's id and hidden state to ``row_ids``/``hidden`` (the last token
        written is never fed, like ``generate``; a [SEG] written last is fed once more so that its state exists).
        Returns the new ids per row, cut at EOS/padding."""
        g = self.grounder
        tok = g.processor.tokenizer
        stop, seg = (tok.eos_token_id, tok.pad_token_id), g.processor.seg_token_id
        n = len(active)
        new: list[list[int]] = [[] for _ in range(n)]
        done = [not a for a in active]
        n_fed = [0] * n
        logits, positions = step.logits[:, -1], last_positions
        slot = int(cache.get_seq_length()) if self.cache == "static" else None   # static: next unwritten slot
        while True:
            for i in range(n):
                if not done[i]:
                    for rule in rules:
                        rule.adjust(i, new[i], logits[i])
            next_ids = logits.argmax(-1).tolist()
            for i in range(n):
                if not done[i]:
                    new[i].append(next_ids[i])
                    done[i] = next_ids[i] in stop or len(new[i]) >= max_new_tokens
            # feed the rows that go on, and a row whose last token is a [SEG] (its state is needed)
            fed = [n_fed[i] < len(new[i]) and new[i][-1] not in stop and (not done[i] or new[i][-1] == seg)
                   for i in range(n)]
            if not any(fed):
                break
            # every row takes a column (finished rows a pad) so shapes stay rectangular; their outputs are unused
            feed = torch.tensor([new[i][-1] if fed[i] else stop[1] for i in range(n)], device=mask.device)[:, None]
            positions = positions + 1
            if self.cache == "static":   # the next free slot of the preallocated mask (same tensor, same shape)
                mask[:, slot] = 1
                slot += 1
            else:
                mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=mask.device)], dim=1)
            logits, last = self._step(feed, positions[:, None], mask, cache)
            for i in range(n):
                if fed[i]:
                    hidden[i].append(last[i:i + 1])
                    row_ids[i].append(new[i][-1])
                    is_answer[i].append(1)
                    n_fed[i] += 1
        return [cut_at(ids, *stop) for ids in new]

    def _static_cache(self, cache, mask: torch.Tensor, room: int):
        """The prefix rows of ``cache`` (a ``DynamicCache``, ``[n, heads, prefix, d]`` per layer) copied into a
        ``StaticCache`` of ``mask``'s width (prefix + suffix) + ``room`` slots, rounded up to ``STATIC_ROUND``;
        returns it and ``mask`` ``[n, width]`` widened with zeros to ``[n, max_cache_len]``."""
        from transformers import StaticCache

        n, width = mask.shape
        length = -(-(width + room) // STATIC_ROUND) * STATIC_ROUND
        if self._static is not None and self._static[:2] == (n, length):
            static = self._static[2]
            static.reset()
        else:
            self._static = None   # free the last one first: a 7B batch's cache is gigabytes
            static = StaticCache(config=self.grounder.model.vlm.config, max_cache_len=length)
            self._static = (n, length, static)
        done = cache.get_seq_length()
        slots = {"cache_position": torch.arange(done, device=mask.device)}   # transformers < 5.25 read it
        for idx, layer in enumerate(cache.layers):
            static.update(layer.keys, layer.values, idx, slots)
        full = mask.new_zeros((n, length))
        full[:, :width] = mask
        return static, full

    def _step(self, feed: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache):
        """One decode step: feed ``[n, 1]`` at ``positions`` ``[n, 1]`` -> (last logits ``[n, V]``, last-layer
        hidden state ``[n, h]``); compiled when ``compile_decode``."""
        if not self.compile_decode:
            return _decode_step(self.grounder.model.vlm, feed, positions, mask, cache)
        if self._compiled is None:
            cuda = mask.device.type == "cuda"
            self._compiled = torch.compile(_decode_step, fullgraph=True, dynamic=False,
                                           mode="reduce-overhead" if cuda else None)
        if mask.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits, last = self._compiled(self.grounder.model.vlm, feed, positions, mask, cache)
        return logits.clone(), last.clone()   # a CUDA graph's outputs are overwritten by its next replay


@dataclasses.dataclass
class _Answered:
    """A batch after its answers (``_answer``): its rows ``(image, query)``, each row's answer ids and its [SEG]s
    (projected states ``[n, prompt_dim]`` and the add-ons' decoder prompts), the image each row is about (an index
    into ``images``, the batch's distinct images)."""
    items: list[tuple[PreparedImage, Query]]
    answers: list[list[int]]
    segs: list[tuple[torch.Tensor, DecoderPrompts | None]]
    owner: list[int]
    images: list[PreparedImage]


def _decode_step(vlm, feed: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache):
    out = vlm(input_ids=feed, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
              output_hidden_states=True)
    return out.logits[:, -1], out.hidden_states[-1][:, -1]


def _shared_prefix_length(prompts: Sequence[EncodedText], image_token_id: int) -> int:
    """Length of the longest common start of the prompts, kept short of every prompt's last token (so
    each row has at least one token of its own, whose logits start decoding) and of any answer prefix
    (so the state before an answer's first token, which ``seg_state="before"`` may read, is in the row).
    It always covers the image tokens: the template puts them before the question."""
    ends = [len(p.input_ids) - 1 for p in prompts]
    ends += [p.labels.index(next(lab for lab in p.labels if lab != IGNORE_INDEX)) - 1
             for p in prompts if any(lab != IGNORE_INDEX for lab in p.labels)]
    limit = min(ends)
    first = prompts[0].input_ids
    length = 0
    while length < limit and all(p.input_ids[length] == first[length] for p in prompts):
        length += 1
    last_image = max(i for i, t in enumerate(first) if t == image_token_id) if image_token_id in first else -1
    if length <= last_image:
        raise RuntimeError("the prompts' shared prefix does not cover the image tokens; "
                           "the prompt template must put the image before the question")
    return length
