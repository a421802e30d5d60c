"""Synthetic referring-segmentation data in the exact REFER (RefCOCO) format.

The project cannot download pretrained weights or COCO images, so it trains its default model on
scenes of coloured shapes that it draws itself. A dataset folder written by ``generate_dataset``::

    out_dir/images/synth_000001.png      RGB scenes
    out_dir/instances.json               COCO: images, annotations (polygon masks), categories
    out_dir/refs(unc).p                  REFER refs: one per referred object, 1-3 sentences each
    out_dir/extra.json                   {"version", "samples": [no_target | multi | region]}
    out_dir/scenes.json                  object attributes + the query behind every sentence

``instances.json`` + ``refs(unc).p`` + ``images/`` load with the same code as real RefCOCO
(``grounding.data.refer.ReferDataset``); the other two files are additions that the REFER tools
ignore. Coordinates: COCO ``bbox`` is ``[x, y, w, h]``, polygons are flat ``[x1, y1, ...]``
lists, both in continuous pixels (pixel ``(c, r)`` covers ``[c, c+1) x [r, r+1)``); the GT mask of
an object is its polygons as pycocotools decodes them, which equals the object's *visible* pixels
(occluded parts excluded) up to 1-pixel slits that connect holes to the outside.

Determinism: image ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` and splits from
``default_rng(seed)``; nothing else is random, so one seed gives byte-identical files whatever
the number of worker processes.
"""
from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from grounding.errors import DatasetError
from grounding.progress import progress_bar
from . import expressions as ex
from ._io import write_bytes_atomic, write_json_atomic, write_pickle_atomic
from .figures import (COLOURS, SHAPE_KINDS, SIZE_RANGES, ShapeSpec, contrasting_colours, iou,
                     make_background, mask_box_xyxy, mask_to_polygons, polygons_to_mask,
                     polygons_to_rle, render_scene, sample_spec, shape_mask,
                     visible_masks)

DEFAULT_SPLITS = (("train", 0.8), ("val", 0.1), ("testA", 0.05), ("testB", 0.05))
CATEGORY_IDS = {name: i + 1 for i, name in enumerate(SHAPE_KINDS)}
MIN_VISIBLE_PIXELS = 60      # objects smaller than this once occluded are not placed
MIN_VISIBLE_FRACTION = 0.55  # nor objects hidden more than this much
MIN_POLYGON_IOU = 0.95       # GT polygon mask vs drawn visible mask


@dataclass
class SceneResult:
    """One generated image with everything needed to write its records (indices, not ids)."""

    png: bytes
    width: int
    height: int
    specs: list[ShapeSpec]
    polygons: list[list[list[float]]]
    scene: ex.SceneInfo
    expressions: dict[int, list[ex.Expression]]
    multi: list[tuple[str, list[int]]]
    no_target: str | None


def _choose_attributes(rng: np.random.Generator, palette: list[str], placed: list[ShapeSpec]
                       ) -> tuple[str, str, str]:
    # Re-using a kind or a colour already in the scene creates the look-alikes that make
    # position and relation expressions necessary (two red circles, three squares...).
    kinds = list(SHAPE_KINDS)
    kind = placed[int(rng.integers(len(placed)))].kind if placed and rng.random() < 0.35 else \
        kinds[int(rng.integers(len(kinds)))]
    reuse = [s.colour for s in placed if s.colour in palette]
    colour = reuse[int(rng.integers(len(reuse)))] if reuse and rng.random() < 0.35 else \
        palette[int(rng.integers(len(palette)))]
    size = list(SIZE_RANGES)[int(rng.choice(3, p=[0.4, 0.35, 0.25]))]
    return kind, colour, size


def _separable(spec: ShapeSpec, full: np.ndarray, specs: list[ShapeSpec], fulls: list[np.ndarray]) -> bool:
    """A new object touching one of the same colour and texture must carry an outline, or a
    viewer could not see where one ends and the other begins."""
    if spec.outline is not None:
        return True
    twins = [f for s, f in zip(specs, fulls) if s.colour == spec.colour and s.texture == spec.texture]
    if not twins:
        return True
    grown = cv2.dilate(full.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    return not any((grown & f).any() for f in twins)


def _place_objects(rng: np.random.Generator, height: int, width: int, palette: list[str], turned: bool = False
                   ) -> tuple[list[ShapeSpec], list[np.ndarray]]:
    """Sample 2-7 objects bottom to top; a placement is retried when it would hide too much of
    an object already placed (an object is only occluded by later ones)."""
    specs: list[ShapeSpec] = []
    fulls: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    for _ in range(int(rng.integers(2, 8))):
        for _attempt in range(20):
            spec = sample_spec(rng, height, width, *_choose_attributes(rng, palette, specs), turned=turned)
            full = shape_mask(spec, height, width)
            if full.sum() < MIN_VISIBLE_PIXELS:
                continue
            if not _separable(spec, full, specs, fulls):
                continue
            after = [v & ~full for v in visible]
            if all(a.sum() >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * f.sum())
                   for a, f in zip(after, fulls)):
                specs.append(spec)
                fulls.append(full)
                visible = after + [full]
                break
    return specs, fulls


def compose_scene(rng: np.random.Generator, height: int, width: int, turned: bool = False) -> SceneResult:
    """Draw one scene and describe its objects (``turned``: objects in the wider poses of ``sample_spec``)."""
    background, bg_mean = make_background(rng, height, width)
    palette = contrasting_colours(bg_mean)
    specs, fulls = _place_objects(rng, height, width, palette, turned)
    # An object whose visible part is not representable by polygons (never seen in practice,
    # but checked) is removed and the scene re-derived without it.
    while True:
        visible = visible_masks(fulls)
        polygons = [mask_to_polygons(v) for v in visible]
        gt = [polygons_to_mask(p, height, width) if p else np.zeros_like(v)
              for p, v in zip(polygons, visible)]
        bad = [i for i, (g, v) in enumerate(zip(gt, visible)) if iou(g, v) <= MIN_POLYGON_IOU
               or g.sum() < MIN_VISIBLE_PIXELS]
        if not bad:
            break
        specs = [s for i, s in enumerate(specs) if i != bad[0]]
        fulls = [f for i, f in enumerate(fulls) if i != bad[0]]
    image = render_scene(background, specs, fulls, rng)
    objects = tuple(
        ex.ObjectInfo(index=i, kind=s.kind, colour=s.colour, size=s.size, texture=s.texture,
                      outline=s.outline, box=mask_box_xyxy(g), area=int(g.sum()),
                      full_area=int(f.sum()), z=i)
        for i, (s, g, f) in enumerate(zip(specs, gt, fulls)))
    overlap = tuple(tuple(int(np.logical_and(a, b).sum()) if i != j else int(a.sum())
                          for j, b in enumerate(fulls)) for i, a in enumerate(fulls))
    scene = ex.SceneInfo(width, height, objects, overlap)
    ok, png = cv2.imencode(".png", image[..., ::-1])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 RGB
        raise DatasetError("OpenCV could not encode a synthetic image as PNG")
    return SceneResult(png=png.tobytes(), width=width, height=height, specs=specs,
                       polygons=polygons, scene=scene, expressions=ex.describe(scene, rng),
                       multi=ex.multi_target(scene, rng),
                       no_target=ex.no_target(scene, rng, list(COLOURS)))


def _scene_for_index(args: tuple[int, int, tuple[tuple[int, int], tuple[int, int]], bool]) -> SceneResult:
    seed, index, ((h_lo, h_hi), (w_lo, w_hi)), turned = args
    rng = np.random.default_rng([seed, index])
    height, width = int(rng.integers(h_lo, h_hi + 1)), int(rng.integers(w_lo, w_hi + 1))
    return compose_scene(rng, height, width, turned)


def assign_splits(num_images: int, splits: Sequence[tuple[str, float]], seed: int) -> list[str]:
    """Split name per image index: exact counts by largest remainder, every split with a
    positive fraction gets at least one image when there are enough images, order shuffled."""
    names = [n for n, _ in splits]
    fracs = np.array([f for _, f in splits], np.float64)
    if len(names) == 0 or (fracs < 0).any() or fracs.sum() <= 0:
        raise DatasetError(f"splits must be (name, fraction) pairs with positive fractions, got {splits!r}")
    want = fracs / fracs.sum() * num_images
    counts = np.floor(want).astype(int)
    for k in np.argsort(-(want - counts), kind="stable")[: num_images - counts.sum()]:
        counts[k] += 1
    if num_images >= int((fracs > 0).sum()):
        for k in np.nonzero((fracs > 0) & (counts == 0))[0]:
            counts[k] += 1
            counts[int(np.argmax(counts))] -= 1
    labels = [n for n, c in zip(names, counts) for _ in range(c)]
    order = np.random.default_rng(seed).permutation(num_images)
    return [labels[i] for i in order]


def _check_size_range(size_range) -> tuple[tuple[int, int], tuple[int, int]]:
    try:
        (h_lo, h_hi), (w_lo, w_hi) = size_range
        h_lo, h_hi, w_lo, w_hi = int(h_lo), int(h_hi), int(w_lo), int(w_hi)
    except (TypeError, ValueError):
        raise DatasetError(f"image_size_range must be ((h_min, h_max), (w_min, w_max)), got {size_range!r}") from None
    if not (64 <= h_lo <= h_hi and 64 <= w_lo <= w_hi):
        raise DatasetError(f"image sizes must be >= 64 and min <= max, got {size_range!r}")
    return (h_lo, h_hi), (w_lo, w_hi)


def generate_dataset(out_dir: str | Path, num_images: int, seed: int,
                     image_size_range=((160, 320), (160, 320)),
                     splits: Sequence[tuple[str, float]] = DEFAULT_SPLITS,
                     progress: bool = True, workers: int = 1, turned: bool = False) -> Path:
    """Write a synthetic REFER dataset of ``num_images`` scenes to ``out_dir`` and return it.

    ``image_size_range`` is ``((h_min, h_max), (w_min, w_max))`` in pixels, inclusive; each image
    draws its height and width independently (varied aspect ratios). Splits are per image.
    ``workers > 1`` draws scenes in that many processes; the output is identical. ``turned``: rectangles at any
    angle and diamonds lying on their side too (``sample_spec``).
    """
    if int(num_images) < 1:
        raise DatasetError(f"num_images must be >= 1, got {num_images!r}")
    sizes = _check_size_range(image_size_range)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    split_of = assign_splits(int(num_images), splits, seed)

    images, annotations, refs, samples, scenes = [], [], [], [], []
    next_ann, next_ref, next_sent = 1, 1, 1
    jobs = [(int(seed), i, sizes, turned) for i in range(int(num_images))]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = pool.map(_scene_for_index, jobs, chunksize=4) if pool else map(_scene_for_index, jobs)
        with progress_bar(len(jobs), "synthetic scenes", enabled=progress) as advance:
            for i, res in enumerate(results):
                image_id, split = i + 1, split_of[i]
                file_name = f"synth_{image_id:06d}.png"
                write_bytes_atomic(out / "images" / file_name, res.png)
                images.append({"id": image_id, "file_name": file_name,
                               "width": res.width, "height": res.height})
                ann_ids = list(range(next_ann, next_ann + len(res.specs)))
                next_ann += len(res.specs)
                scene_sents = []
                for o, ann_id, polys in zip(res.scene.objects, ann_ids, res.polygons):
                    rle = polygons_to_rle(polys, res.height, res.width)
                    annotations.append({
                        "id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[o.kind],
                        "bbox": [round(float(v), 3) for v in mask_utils.toBbox(rle)],
                        "area": float(mask_utils.area(rle)), "iscrowd": 0, "segmentation": polys})
                    samples.append({"kind": "region", "image_id": image_id, "ann_id": ann_id,
                                    "description": ex.region_description(o), "split": split})
                    exprs = res.expressions.get(o.index, [])
                    if not exprs:
                        continue
                    sent_ids = list(range(next_sent, next_sent + len(exprs)))
                    next_sent += len(exprs)
                    refs.append({
                        "ref_id": next_ref, "ann_id": ann_id, "image_id": image_id,
                        "category_id": CATEGORY_IDS[o.kind], "split": split,
                        "file_name": f"synth_{image_id:06d}_{ann_id}.png", "sent_ids": sent_ids,
                        "sentences": [{"tokens": list(e.tokens), "raw": e.raw, "sent_id": s,
                                       "sent": e.sent} for e, s in zip(exprs, sent_ids)]})
                    next_ref += 1
                    scene_sents += [{"sent_id": s, "ann_id": ann_id, "category": e.category,
                                     "query": e.query} for e, s in zip(exprs, sent_ids)]
                for text, members in res.multi:
                    samples.append({"kind": "multi", "image_id": image_id, "sent": text,
                                    "ann_ids": [ann_ids[k] for k in members], "split": split})
                if res.no_target:
                    samples.append({"kind": "no_target", "image_id": image_id,
                                    "sent": res.no_target, "split": split})
                scenes.append({
                    "image_id": image_id, "width": res.width, "height": res.height,
                    "objects": [{"ann_id": a, "kind": o.kind, "colour": o.colour, "size": o.size,
                                 "texture": o.texture, "outline": o.outline, "z": o.z,
                                 "box_xyxy": list(o.box), "area": o.area, "full_area": o.full_area}
                                for o, a in zip(res.scene.objects, ann_ids)],
                    "overlap": [list(r) for r in res.scene.overlap], "sentences": scene_sents})
                advance()
    finally:
        if pool:
            pool.shutdown()

    # Images of an earlier, larger run into the same folder would otherwise linger unlisted.
    for stale in (out / "images").glob("synth_*.png"):
        stem = stale.stem[len("synth_"):]
        if stem.isdigit() and len(stem) == 6 and int(stem) > int(num_images):
            stale.unlink()
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for name, cid in CATEGORY_IDS.items()]
    write_json_atomic(out / "instances.json", {
        "info": {"description": "groundseg synthetic shapes", "seed": int(seed), "version": 1},
        "images": images, "annotations": annotations, "categories": categories})
    write_json_atomic(out / "extra.json", {"version": 1, "samples": samples})
    write_json_atomic(out / "scenes.json", {"version": 1, "images": scenes})
    # pickle memoises by object identity, so the same text shared by two refs (a template
    # constant) is written once or twice depending on where it was built (this process or a
    # worker). A JSON round trip rebuilds every string afresh: the bytes depend on content only.
    refs = json.loads(json.dumps(refs))
    # Written last: a folder with refs(unc).p is a complete dataset.
    write_pickle_atomic(out / "refs(unc).p", refs)
    return out


def scene_info_from_json(record: dict) -> ex.SceneInfo:
    """Rebuild the ``SceneInfo`` of one ``scenes.json`` image record (to re-check expressions
    with ``expressions.evaluate``)."""
    objects = tuple(ex.ObjectInfo(index=i, kind=o["kind"], colour=o["colour"], size=o["size"],
                                  texture=o["texture"], outline=o["outline"], box=tuple(o["box_xyxy"]),
                                  area=o["area"], full_area=o["full_area"], z=o["z"])
                    for i, o in enumerate(record["objects"]))
    return ex.SceneInfo(record["width"], record["height"], objects,
                        tuple(tuple(r) for r in record["overlap"]))


def main(out: str | Path, images: int, seed: int) -> Path:
    """Entry for the ``groundseg synth`` command: write ``images`` scenes to ``out``."""
    return generate_dataset(out, images, seed)


from .synthetic_video import generate_video, generate_video_dataset  # noqa: E402  (re-export)

__all__ = ["generate_dataset", "generate_video", "generate_video_dataset", "compose_scene",
           "assign_splits", "scene_info_from_json", "main"]


def split_scenes(data_root: str | Path, split: str):
    """A synthetic REFER folder's ``(ReferDataset, [scenes.json records of split's images])``, in file order."""
    from grounding.data.refer import ReferDataset

    ds = ReferDataset(data_root, dataset="synth", split_by="unc")
    wanted = {s.image_id for s in ds.sentences(split)}
    scenes = json.loads((Path(data_root) / "scenes.json").read_text())["images"]
    return ds, [s for s in scenes if s["image_id"] in wanted]
