"""Photometric corruptions for heads trained on cached tower features (shapes/presence.py, shapes/region_head.py).

The training scenes are clean renders; photographs and scenes drawn by other programs are noisy, compressed, blurred
and differently lit. A head trained on the features of clean renders alone meets features it never saw; trained also
on corrupted copies of the same scenes (same labels) it learns what survives them. Generic corruptions, none tied to
any one test renderer: Gaussian noise, blur, a colour gain and offset per channel, JPEG compression.

``corrupt_regions`` corrupts the background and each object apart (some regions noisy or blurred, others left
clean) before the whole image is: a model that learnt "the textured region is the object" from the training
scenes meets flat objects on a noisy ground, and the reverse. ``grey`` drops the colour, as a grayscale photograph
or scan does (every training scene is in colour; objects the colour told apart now differ in brightness only).
``camouflage`` then takes most of that brightness difference away and gives the ground a blotchy texture, as a
grey photograph of a flat object on carpet, stone or foliage of about its brightness looks: the object is told
apart by its texture and a faint edge only.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image


def corrupt_regions(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """``corrupt`` after the background and each object of the bool ``[H, W]`` ``masks`` (visible pixels) got,
    each with probability 1/2, noise of its own strength (sigma 5-40) or a blur."""
    out = image.astype(np.float32)
    background = ~np.logical_or.reduce(masks) if masks else np.ones(image.shape[:2], bool)
    for region in [background, *masks]:
        if rng.random() < 0.5 or not region.any():
            continue
        if rng.random() < 0.7:
            out[region] += rng.normal(0, rng.uniform(5, 40), (int(region.sum()), 3))
        else:
            out[region] = cv2.GaussianBlur(out, (0, 0), rng.uniform(1, 3))[region]
    return corrupt(np.clip(out, 0, 255).astype(np.uint8), rng)


def corrupt(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A corrupted copy of the uint8 ``H x W x 3`` ``image`` (each corruption drawn at random)."""
    out = image.astype(np.float32)
    out = out * rng.uniform(0.8, 1.2, 3) + rng.uniform(-25, 25, 3)          # lighting and white balance
    if rng.random() < 0.5:
        sigma = rng.uniform(0.5, 1.5)
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    if rng.random() < 0.6:
        out = out + rng.normal(0, rng.uniform(4, 30), out.shape)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < 0.6:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(15, 80)))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy()
    return out


def grey(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A grayscale copy of the uint8 ``H x W x 3`` ``image``, still ``H x W x 3``: a weighted sum of the channels,
    the luma weights (0.299, 0.587, 0.114) each scaled by 0.5-1.5, since cameras and converters mix them
    differently."""
    weights = np.array([0.299, 0.587, 0.114]) * rng.uniform(0.5, 1.5, 3)
    luma = image.astype(np.float32) @ (weights / weights.sum()).astype(np.float32)
    return np.repeat(np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def camouflage(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A copy of the uint8 ``H x W x 3`` ``image`` in which each object of the bool ``[H, W]`` ``masks`` (with
    probability 0.7) has its mean level moved 60-100% of the way to the mean of a 7-pixel ring around it (every
    channel alike, so a grey image stays grey), and the ground (with probability 0.7; else the whole image) gets a
    low-frequency texture: Gaussian noise on a grid of 4-16 px cells, bilinearly upsampled, of amplitude 8-30."""
    out = image.astype(np.float32)
    h, w = image.shape[:2]
    ring_kernel = np.ones((15, 15), np.uint8)
    for mask in masks:
        if not mask.any() or rng.random() >= 0.7:
            continue
        ring = cv2.dilate(mask.view(np.uint8), ring_kernel).astype(bool) & ~mask
        if ring.any():
            out[mask] += rng.uniform(0.6, 1.0) * (out[ring].mean(0) - out[mask].mean(0))
    cell = rng.uniform(4, 16)
    grid = rng.normal(0, 1, (max(2, int(h / cell) + 1), max(2, int(w / cell) + 1))).astype(np.float32)
    texture = cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR) * rng.uniform(8, 30)
    where = ~np.logical_or.reduce(masks) if masks and rng.random() < 0.7 else np.ones((h, w), bool)
    out[where] += texture[where][:, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
