"""The prefix engine's static KV cache (grounding/inference/engine.py, ``cache="static"``): the same greedy ids and
hidden states as the dynamic cache, decode steps of fixed shapes on one preallocated cache (what CUDA graphs need).
Tiny random model, fp32, CPU."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import grounding.inference.engine as engine_module
from grounding import Grounder, PrefixEngine, Query

QUESTIONS = ["Where is the red circle?", "Please segment the blue square.", "What is left of the disc?", "Segment it."]


class Recording(PrefixEngine):
    """Keeps, per batch, every fed token's last-layer hidden state and id (what the [SEG] masks are read from)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def _decode(self, step, cache, mask, last_positions, active, max_new_tokens, hidden, row_ids, is_answer, rules):
        new = super()._decode(step, cache, mask, last_positions, active, max_new_tokens, hidden, row_ids,
                              is_answer, rules)
        self.batches.append(([torch.cat(h) for h in hidden], [list(r) for r in row_ids], new))
        return new


@pytest.fixture(scope="module")
def grounder():
    from grounding.presets import build_random

    model, tok = build_random("tiny", seed=0)
    return Grounder(model.eval(), tok, max_new_tokens=10)


def _groups():
    """3 images of different sizes with 2-4 questions each: generated answers, one given answer with a [SEG]
    (teacher forcing: an inactive row among active ones) and one answer prefix."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48 + 8 * k, 64, 3), dtype=np.uint8) for k in range(3)]
    groups = [(im, [Query(im, q) for q in QUESTIONS[:2 + k]]) for k, im in enumerate(images)]
    groups[1][1][0] = Query(images[1], QUESTIONS[0], answer="Sure, [SEG].")
    groups[2][1][1] = Query(images[2], QUESTIONS[1], answer_prefix="It is")
    return groups


def _run(grounder, cache: str, compile_decode: bool = False):
    engine = Recording(grounder, cache=cache, compile_decode=compile_decode)
    grounder.clear_cache()
    preds = engine.predict_groups(_groups(), batch_size=4)   # 9 questions: batches of 4, 4, 1 mixing images
    return engine, [p for per_image in preds for p in per_image]


@pytest.fixture(scope="module")
def early_eos(grounder):
    """Make the random model write EOS where it would write one of its frequent tokens, so that rows finish at
    different steps (the finished rows keep being fed pads while the others decode)."""
    engine, _ = _run(grounder, "dynamic")
    lm_head = grounder.model.vlm.get_output_embeddings().weight
    eos = grounder.processor.tokenizer.eos_token_id
    firsts = {}
    for _, _, new in engine.batches:
        for ids in new:
            for pos, t in enumerate(ids):
                firsts.setdefault(t, set()).add(pos)
    # a token that rows first write at different steps
    token = max(firsts, key=lambda t: (len(firsts[t]), -t))
    saved = lm_head[eos].clone()
    with torch.no_grad():
        lm_head[eos] = lm_head[token] * 1.01   # beats `token` whenever that token's logit is the (positive) max
    yield
    with torch.no_grad():
        lm_head[eos] = saved


def _compare(a, b):
    (ea, pa), (eb, pb) = a, b
    assert len(ea.batches) == len(eb.batches) == 3
    worst = 0.0
    for (ha, ida, newa), (hb, idb, newb) in zip(ea.batches, eb.batches):
        assert ida == idb and newa == newb                      # identical greedy ids, fed tokens included
        for x, y in zip(ha, hb):
            assert x.shape == y.shape
            worst = max(worst, (x - y).abs().max().item())
    assert worst < 1e-5, worst
    assert [p.answer for p in pa] == [p.answer for p in pb]
    for p, q in zip(pa, pb):                                     # the [SEG] masks read from those states
        assert len(p.targets) == len(q.targets)
        for s, t in zip(p.targets, q.targets):
            assert (s.mask is None) == (t.mask is None)
            if s.mask is not None:
                assert np.array_equal(s.mask, t.mask)
    return worst


def test_static_cache_equals_dynamic(grounder, early_eos):
    dynamic, static = _run(grounder, "dynamic"), _run(grounder, "static")
    lengths = {len(ids) for _, _, new in dynamic[0].batches for ids in new}
    assert len(lengths - {0}) >= 2, lengths                      # rows did finish at different steps
    assert any(t.mask is not None for p in dynamic[1] for t in p.targets)   # the given [SEG] answer has a mask
    _compare(dynamic, static)


def test_static_decode_steps_have_fixed_shapes(grounder, monkeypatch):
    """Every decode step of a batch: same input shapes, the same mask tensor, the cache's keys never reallocated;
    and a next batch of the same size reuses the cache (reset, not rebuilt)."""
    calls = []
    real = engine_module._decode_step

    def spy(vlm, feed, positions, mask, cache):
        calls.append((tuple(feed.shape), tuple(positions.shape), tuple(mask.shape), mask.data_ptr(), id(cache),
                      cache.layers[0].keys.data_ptr(), int(mask.sum())))
        return real(vlm, feed, positions, mask, cache)

    monkeypatch.setattr(engine_module, "_decode_step", spy)
    engine = PrefixEngine(grounder, cache="static")
    im = np.full((40, 56, 3), 120, np.uint8)
    engine.predict_group(im, [Query(im, q) for q in QUESTIONS[:3]], max_new_tokens=6)
    first = list(calls)
    assert len(first) >= 2
    assert len({c[:6] for c in first}) == 1, first              # shapes, mask storage, cache and its keys fixed
    assert [c[6] for c in first] == sorted({c[6] for c in first}) and first[1][6] - first[0][6] == 3  # one slot/row/step
    length = first[0][2][1]
    assert length % engine_module.STATIC_ROUND == 0
    calls.clear()
    engine.predict_group(im, [Query(im, q) for q in QUESTIONS[1:4]], max_new_tokens=6)
    assert calls and calls[0][4] == first[0][4] and calls[0][5] == first[0][5]   # the same StaticCache, reset


def test_bad_options():
    with pytest.raises(ValueError, match="unknown cache"):
        PrefixEngine(None, cache="paged")
    with pytest.raises(ValueError, match="static"):
        PrefixEngine(None, cache="dynamic", compile_decode=True)


@pytest.mark.skipif(os.environ.get("GROUNDSEG_TEST_COMPILE") != "1",
                    reason="torch.compile of the decode step takes ~30 s on a 2-core CPU; set GROUNDSEG_TEST_COMPILE=1")
def test_compiled_static_decode_equals_dynamic(grounder):
    _compare(_run(grounder, "dynamic"), _run(grounder, "static", compile_decode=True))
