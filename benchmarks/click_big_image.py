"""Click to mask on a 12-megapixel image in the web app: the full-resolution way (the decoder's mask upscaled,
refined, drawn and PNG-encoded at 4000x3000, as the app did before) vs the app's way (the image segmented and
shown at VIEW_MAX_SIDE, the full-size mask made only for the downloads), both after the image's first encode,
with the default model, in the same run.

    python benchmarks/click_big_image.py [--model DIR] [--clicks 12] [--full-clicks 3]

A click's time is what the page waits for: the handlers (click, then mask decoder, then the result image written
as a PNG file, ``DownloadFolder.picture``) plus Gradio's copy of that file into its cache. The full-resolution way
is charged the same writing and copying of its picture. The downloads are written by a later event and timed
separately.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import gradio as gr
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# (x, y) on examples/shapes.png (405 x 403): the cyan square, the yellow circle, the yellow square, the brown
# square, and a background point beside the cyan square.
SHAPES_CLICKS = [(140, 80, 1), (210, 148, 1), (245, 220, 1), (360, 45, 1), (60, 200, 0), (150, 60, 1)]


def cache_copy_ms(path: str) -> float:
    """Gradio's copy of a result image file into its cache (it hashes the file's bytes, then copies it)."""
    from gradio import processing_utils
    t0 = time.perf_counter()
    processing_utils.save_file_to_cache(path, tempfile.mkdtemp())
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    from apps.cli import DEFAULT_MODEL
    from apps.demo_handlers import DemoHandlers, DownloadFolder, ModelService
    from apps.overlay import draw_overlay
    from grounding import Grounder
    from grounding.images import load_image

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--clicks", type=int, default=12)
    ap.add_argument("--full-clicks", type=int, default=3)
    args = ap.parse_args()

    grounder = Grounder.from_pretrained(args.model, device="cpu")
    small = load_image(ROOT / "examples" / "shapes.png")
    sy, sx = 3000 / small.shape[0], 4000 / small.shape[1]
    big = cv2.resize(small, (4000, 3000), interpolation=cv2.INTER_CUBIC)
    path = Path(tempfile.mkdtemp()) / "big.png"
    cv2.imwrite(str(path), cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    clicks = [(x * sx, y * sy, label) for x, y, label in SHAPES_CLICKS]

    # The full-resolution way: Grounder.segment on the 12-MP image, overlay and PNG at full size.
    grounder.prepare([big])
    pictures = DownloadFolder(tempfile.mkdtemp())
    full = []
    for i in range(args.full_clicks):
        x, y, _ = clicks[i % len(clicks)]
        t0 = time.perf_counter()
        prediction = grounder.segment(big, [[x, y]], [1])
        shown = pictures.picture(draw_overlay(big, prediction, points=[[x, y]], point_labels=[1]))
        full.append((time.perf_counter() - t0) * 1000 + cache_copy_ms(shown))

    # The app's way: the handlers, as the page calls them.
    handlers = DemoHandlers(ModelService(grounder), DownloadFolder(tempfile.mkdtemp()))
    t0 = time.perf_counter()
    session = handlers.on_input(None, {"image": str(path), "boxes": []})[0]
    upload_s = time.perf_counter() - t0
    k = session.scale
    app, downloads = [], []
    for i in range(args.clicks):
        x, y, label = clicks[i % len(clicks)]
        if label == 1 and i:
            session = handlers.on_new_object(session)[0]
        t0 = time.perf_counter()
        session = handlers.on_click(session, "positive" if label else "negative",
                                    gr.SelectData(None, {"index": [x * k, y * k], "value": None}))[0]
        session, overlay, *_ = handlers.on_masks(session)
        app.append((time.perf_counter() - t0) * 1000 + cache_copy_ms(overlay))
        t0 = time.perf_counter()
        handlers.on_downloads(session)
        downloads.append((time.perf_counter() - t0) * 1000)

    p50_full, p50_app = statistics.median(full), statistics.median(app)
    view = session.view.shape
    print(f"click to mask on a 4000x3000 image, default model ({args.model.name}), cpu; view {view[1]}x{view[0]}")
    print(f"  upload (decode + encode the view): {upload_s * 1000:8.0f} ms")
    print(f"  full resolution, p50 of {len(full):2d} clicks: {p50_full:8.0f} ms")
    print(f"  app's view path, p50 of {len(app):2d} clicks: {p50_app:8.0f} ms   (p90 {np.percentile(app, 90):.0f} ms)")
    print(f"  downloads after a click (full-size masks: JSON + zip + PNGs of all {len(session.objects.items)} "
          f"objects), p50: {statistics.median(downloads):.0f} ms")
    print(f"  ratio: {p50_full / p50_app:.1f}x")


if __name__ == "__main__":
    main()
