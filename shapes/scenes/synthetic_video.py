"""Synthetic videos of moving shapes with per-frame masks, for the video (mask propagation) path.

A video folder written by ``generate_video``::

    frame_00000.png ... frame_{T-1:05d}.png     RGB frames
    annotations.json

``annotations.json``::

    {"version": 1, "width": W, "height": H, "num_frames": T, "seed": s,
     "objects": [{"id": 1, "category": "circle", "colour": "red", "size": "small",
                  "texture": "striped"..., "description": "the red circle",
                  "long_description": "a small red striped circle"}, ...],
     "frames": [{"index": 0, "file_name": "frame_00000.png",
                 "objects": [{"id": 1, "segmentation": {"size": [H, W], "counts": "<str>"},
                              "box_xyxy": [x1, y1, x2, y2] | null, "area": int,
                              "visible_fraction": float}, ...]}, ...]}

Masks are the *visible* pixels (pycocotools RLE, ``counts`` as ``str``); an object hidden
entirely in a frame has an empty mask and ``box_xyxy: null``. Boxes are float xyxy in continuous
pixels. Objects move linearly and bounce off the borders, breathe slightly in scale, and pass in
front of / behind each other in a fixed depth order, so occlusions happen when they cross.
Each object's (kind, colour) pair is unique in its video, so its description names it alone.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from grounding.errors import DatasetError
from . import expressions as ex
from ._io import write_bytes_atomic, write_json_atomic
from .figures import (SHAPE_KINDS, contrasting_colours, make_background, mask_box_xyxy, mask_to_rle,
                     moved, render_scene, sample_spec, shape_mask, visible_masks)

_SPIN_FREE = ("triangle", "pentagon", "hexagon", "star", "ellipse", "rectangle")  # see shapes._ROTATION


def _pick_objects(rng: np.random.Generator, palette: list[str], count: int) -> list[tuple[str, str]]:
    pairs = [(k, c) for k in SHAPE_KINDS for c in palette]
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order[:count]]


def _description(objects: list[dict], index: int) -> str:
    o = objects[index]
    for attrs in ({"kind": o["category"]}, {"colour": o["colour"]},
                  {"colour": o["colour"], "kind": o["category"]}):
        same = [p for p in objects if all(p["category" if k == "kind" else k] == v for k, v in attrs.items())]
        if len(same) == 1:
            return "the " + ex.noun_phrase(attrs)
    raise AssertionError("(kind, colour) pairs are unique per video")


def generate_video(out_path_dir: str | Path, num_frames: int, seed: int,
                   size: tuple[int, int] = (240, 320)) -> Path:
    """Write one video of 2-4 moving shapes (``size`` = (height, width)) and return its folder."""
    if int(num_frames) < 1:
        raise DatasetError(f"num_frames must be >= 1, got {num_frames!r}")
    height, width = int(size[0]), int(size[1])
    if height < 64 or width < 64:
        raise DatasetError(f"video size must be at least 64x64, got {size!r}")
    out = Path(out_path_dir)
    rng = np.random.default_rng(seed)
    background, bg_mean = make_background(rng, height, width)
    palette = contrasting_colours(bg_mean)
    count = int(rng.integers(2, 5))
    specs, motion = [], []
    for kind, colour in _pick_objects(rng, palette, count):
        size_class = ("small", "medium")[int(rng.integers(2))]
        spec = sample_spec(rng, height, width, kind, colour, size_class)
        speed = rng.uniform(1.5, 0.035 * min(height, width))
        heading = rng.uniform(0, 2 * np.pi)
        motion.append({"v": np.array([np.cos(heading), np.sin(heading)]) * speed,
                       "spin": float(rng.uniform(-4, 4)) if kind in _SPIN_FREE else 0.0,
                       "breathe": float(rng.uniform(0.0, 0.12)),
                       "period": float(rng.uniform(12, 30)), "phase": float(rng.uniform(0, 2 * np.pi))})
        specs.append(spec)

    objects = [{"id": i + 1, "category": s.kind, "colour": s.colour, "size": s.size,
                "texture": s.texture} for i, s in enumerate(specs)]
    for i, (o, s) in enumerate(zip(objects, specs)):
        o["description"] = _description(objects, i)
        o["long_description"] = ex.region_description(ex.ObjectInfo(
            i, s.kind, s.colour, s.size, s.texture, s.outline, (0, 0, 0, 0), 0, 0, i))

    # One render seed for all frames: the blur / noise choices stay the same through the video
    # instead of flickering from frame to frame.
    render_seed = int(rng.integers(2**32))
    frames = []
    pos = [np.array([s.cx, s.cy]) for s in specs]
    for t in range(int(num_frames)):
        posed = []
        for k, (spec, m) in enumerate(zip(specs, motion)):
            radius = spec.radius * (1 + m["breathe"] * np.sin(2 * np.pi * t / m["period"] + m["phase"]))
            if t > 0:
                pos[k] = pos[k] + m["v"]
                # Bounce: keep the whole circumcircle inside the frame, reflect the velocity.
                for ax, limit in ((0, width), (1, height)):
                    lo, hi = radius + 1, limit - radius - 1
                    if pos[k][ax] < lo or pos[k][ax] > hi:
                        m["v"][ax] = -m["v"][ax]
                        pos[k][ax] = float(np.clip(2 * (lo if pos[k][ax] < lo else hi) - pos[k][ax], lo, hi))
            posed.append(moved(spec, float(pos[k][0]), float(pos[k][1]), float(radius),
                               spec.angle + m["spin"] * t))
        fulls = [shape_mask(s, height, width) for s in posed]
        visible = visible_masks(fulls)
        frame = render_scene(background, posed, fulls, np.random.default_rng(render_seed))
        name = f"frame_{t:05d}.png"
        ok, png = cv2.imencode(".png", frame[..., ::-1])
        if not ok:  # pragma: no cover
            raise DatasetError("OpenCV could not encode a video frame as PNG")
        write_bytes_atomic(out / name, png.tobytes())
        frames.append({"index": t, "file_name": name, "objects": [
            {"id": k + 1, "segmentation": mask_to_rle(v),
             "box_xyxy": list(b) if (b := mask_box_xyxy(v)) is not None else None,
             "area": int(v.sum()), "visible_fraction": round(float(v.sum()) / max(int(f.sum()), 1), 4)}
            for k, (v, f) in enumerate(zip(visible, fulls))]})

    write_json_atomic(out / "annotations.json", {
        "version": 1, "width": width, "height": height, "num_frames": int(num_frames),
        "seed": int(seed), "objects": objects, "frames": frames})
    return out


def generate_video_dataset(out_dir: str | Path, num_videos: int, seed: int,
                           num_frames: int = 24, size: tuple[int, int] = (240, 320)) -> Path:
    """``num_videos`` videos in ``out_dir/video_00000`` ..., plus ``out_dir/videos.json``:
    ``{"version": 1, "videos": [{"name", "split" (train | val), "num_frames", "seed"}]}``.
    About 10% of the videos (at least one when there are two or more) are ``val``."""
    if int(num_videos) < 1:
        raise DatasetError(f"num_videos must be >= 1, got {num_videos!r}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    seeds = [int(s) for s in rng.integers(0, 2**62, size=int(num_videos))]
    n_val = max(1, round(0.1 * num_videos)) if num_videos >= 2 else 0
    val = set(int(i) for i in rng.permutation(int(num_videos))[:n_val])
    index = []
    for i, s in enumerate(seeds):
        name = f"video_{i:05d}"
        generate_video(out / name, num_frames, s, size)
        index.append({"name": name, "split": "val" if i in val else "train",
                      "num_frames": int(num_frames), "seed": s})
    write_json_atomic(out / "videos.json", {"version": 1, "videos": index})
    return out
