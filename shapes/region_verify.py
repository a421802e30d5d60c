"""A second look at a plain target: does the region head read, inside the answer's box, what the phrase names?

The presence head (shapes/presence.py) decides from the locator's fused features whether a phrase's object is there;
on near misses ("the cyan square" beside a cyan pentagon and a blue square) it can be fooled, and the answer then
boxes a neighbour. The region head (shapes/region_head.py) reads colour and kind from the cells under a box. For a
phrase that names nothing but a colour and / or a kind ("the cyan square", "yellow circle", "the star", "the red
shape"), the ``region`` add-on's ``verify`` setting drops a target when the head gives its box the phrase's colour
and kind with a probability (their product) under ``verify``; in a group ("all red shapes", "the stars") each
target is checked on its own. Phrases with any other word (sizes, places, relations) are left to the presence head
alone: their words do not describe the boxed object alone. The target's mask outline is read first
(shapes/outline_kind.py): a clear outline of another kind moves or drops the target whatever the head reads, and a
clear outline of a kind named alone ("the star") stands for the head's kind reading (``Region.verify``).

``calibrate_verify`` sets ``verify`` where a chosen share of present objects' phrases would be dropped, on the
model's own answers over a synthetic val split (clean scenes and corrupted copies), as the presence threshold is set.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

ARTICLES = ("the", "a", "an")
QUANTIFIERS = ("all", "every", "each", "both")
KINDLESS = ("shape", "shapes", "object", "objects")
# a repeat of a group phrase whose mask's tight box overlaps its box by less IoU is not one object's box (a locator
# cell at an object's edge boxes it and its surroundings); 1% of the right answers on val (v14.1, generated) fall
# below it, 10% of the wrong ones
REPEAT_BOX_FIT = 0.5
# a repeat whose mask lies more than this share on the masks of the phrase's earlier targets is no new object (a box
# between two objects gets a mask of a part of each)
REPEAT_MASK_SHARE = 0.5
# nor is a repeat whose mask holds more than this share of an earlier target's mask (a box around an earlier object
# and its surroundings gets a mask of that object and more)
REPEAT_MASK_HOLDS = 0.3


def plain_names(phrase: str, vocab) -> tuple[list[str], list[str]] | None:
    """(colours, kinds) a plain phrase names, kinds in the singular ("the cyan square" -> (["cyan"], ["square"]),
    "the red shape" -> (["red"], []), "all the stars" -> ([], ["star"])); None for a phrase with any other word, or
    naming neither. A group phrase ("all ...", "every ...", a plural) names what each of its objects is."""
    words = re.findall(r"[a-z]+(?:-[a-z]+)*", phrase.lower())
    if words and words[0] in QUANTIFIERS:
        words = words[1:]
    if words and words[0] in ARTICLES:
        words = words[1:]
    kind_of = vocab.kind_words()
    colours = [w for w in words if w in vocab.colours]
    kinds = [kind_of[w] for w in words if w in kind_of]
    rest = [w for w in words if w not in vocab.colours and w not in kind_of]
    if colours and not kinds and len(rest) == 1 and rest[0] in KINDLESS:
        rest = []
    if rest or len(colours) > 1 or len(kinds) > 1 or not (colours or kinds):
        return None
    return colours, kinds


def share_on(mask: np.ndarray | None, others: list[np.ndarray]) -> float:
    """The share of a bool ``H x W`` ``mask`` that lies on any of the ``others``; 0 for no mask, an empty one or no
    others."""
    if mask is None or not others or not mask.any():
        return 0.0
    return float((mask & np.logical_or.reduce(others)).sum() / mask.sum())


def most_held(mask: np.ndarray | None, others: list[np.ndarray]) -> float:
    """The largest share of any of the bool ``H x W`` ``others`` that lies on ``mask``; 0 for no mask or no others."""
    if mask is None or not others:
        return 0.0
    return max(float((mask & other).sum() / max(other.sum(), 1)) for other in others)


def sureness(region, keys: torch.Tensor, region_square: torch.Tensor, colours: list[str], kinds: list[str]) -> float:
    """The region head's probability that the region (``region_box`` of the box) has every named colour and kind."""
    p = region.probabilities(keys, region_square)
    out = 1.0
    for name, values in (("colour", colours), ("kind", kinds)):
        for value in values:
            out *= float(p[name][region.vocab.values(name).index(value)])
    return out


def val_phrases(scene: dict) -> list[str]:
    """Plain phrases of a scene's mostly visible objects that name one object: "the {colour} {kind}" where the
    pair is unique, "the {kind}" where the kind is."""
    objects = [o for o in scene["objects"] if o["area"] >= 0.5 * max(o["full_area"], 1)]
    pairs = [(o["colour"], o["kind"]) for o in scene["objects"]]
    kinds = [o["kind"] for o in scene["objects"]]
    out = [f"the {o['colour']} {o['kind']}" for o in objects if pairs.count((o["colour"], o["kind"])) == 1]
    return out + [f"the {o['kind']}" for o in objects if kinds.count(o["kind"]) == 1]


@torch.no_grad()
def calibrate_verify(grounder, data_root: str | Path, split: str = "val", share: float = 0.01, seed: int = 0,
                     augment: float = 0.5, limit: int | None = None, progress: bool = True) -> dict:
    """The ``verify`` value under which ``share`` of the sureness values of present objects' plain phrases fall,
    read at the boxes of the model's answers to "Please segment {phrase}." (answers without a target are
    skipped: the presence head denied them), and ``verify_colour``, the same of the sureness of the colour alone
    of the phrases that name one. Returns {"verify", "verify_colour", "phrases", "quantiles", "colour_quantiles"}."""
    from grounding.images import load_image
    from grounding.inference.prepared import Query
    from grounding.progress import progress_bar
    from shapes.augment import corrupt
    from shapes.region_head import region_box
    from shapes.scenes.synthetic import split_scenes

    rng = np.random.default_rng(seed)
    ds, scenes = split_scenes(data_root, split)
    scenes = scenes[:limit] if limit else scenes
    model = grounder.model
    region, locator = model.addons["region"], model.addons["locator"]
    values, colours = [], []
    with progress_bar(len(scenes), f"{split} plain phrases", enabled=progress) as advance:
        for scene in scenes:
            phrases = val_phrases(scene)
            image = load_image(ds.image_path(scene["image_id"]))
            for view in [image] + ([corrupt(image, rng)] if rng.random() < augment else []):
                preds = grounder.predict_batch([Query(view, f"Please segment {p}.") for p in phrases])
                prepared = grounder.prepare([view])[0]
                keys = locator.read_image(model, [prepared])[0].keys
                for phrase, pred in zip(phrases, preds):
                    if pred.targets:
                        square = region_box(prepared.size, pred.targets[0].box).to(keys.device, keys.dtype)
                        named, kinds = plain_names(phrase, region.vocab)
                        values.append(sureness(region, keys, square, named, kinds))
                        if named:
                            colours.append(sureness(region, keys, square, named, []))
            advance()
    if not values:
        raise ValueError(f"no plain phrases answered with a target in {split} of {data_root}")
    quantiles = (0.005, 0.01, 0.02, 0.05, 0.1)
    values, colours = np.array(values), np.array(colours if colours else [1.0])
    return {"verify": float(np.quantile(values, share)), "verify_colour": float(np.quantile(colours, share)),
            "phrases": len(values), "quantiles": {q: float(np.quantile(values, q)) for q in quantiles},
            "colour_quantiles": {q: float(np.quantile(colours, q)) for q in quantiles}}


def set_verify(model_dir: str | Path, data_root: str | Path, share: float = 0.01, colour_only: bool = False,
               **options) -> dict:
    """Calibrate ``verify`` and ``verify_colour`` on the model at ``model_dir`` (its ``region`` add-on off the check
    meanwhile) and write them (``colour_only``: the second only) into its ``groundseg.json``; returns
    ``calibrate_verify``'s report."""
    from grounding import Grounder
    from grounding.config import GroundingConfig

    grounder = Grounder.from_pretrained(model_dir, device="cpu", addons={"region": {"verify": 0.0}})
    report = calibrate_verify(grounder, data_root, share=share, **options)
    config = GroundingConfig.load(model_dir)
    if not colour_only:
        config.addons["region"]["verify"] = report["verify"]
    config.addons["region"]["verify_colour"] = report["verify_colour"]
    config.save(model_dir)
    return report
