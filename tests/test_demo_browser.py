"""The web app in a real browser: Debian's chromium driven by playwright uploads an image, asks a question,
drags a box on the image, clicks the result image, and checks that the answer, its colour, the overlays and the
downloads appear.

Skipped only when /usr/bin/chromium is absent (``apt-get install -y chromium``; .ci/run installs it).
Screenshots go to the test's tmp dir; GROUNDSEG_UPDATE_SCREENSHOT=1 also copies the answer screenshot to
benchmarks/app_screenshot.png (the one the repository shows).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from apps.demo import EXAMPLES_DIR, build_app, launch_options
from apps.overlay import POSITIVE_POINT_COLOUR, target_colour
from grounding.images import load_image
from grounding.result import rle_decode

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
IMAGE = EXAMPLES_DIR / "shapes.png"
QUESTION = "Please segment the circle below the cyan shape."
CLICK = (140, 80)  # (x, y) pixels of shapes.png, on the cyan square
BOX = (90, 30, 190, 160)  # x1, y1, x2, y2 pixels of shapes.png, around the cyan square
TIMEOUT_MS = 90_000  # 2 shared CPU cores: be patient
SCREENSHOT = Path(__file__).resolve().parent.parent / "benchmarks" / "app_screenshot.png"

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"no browser at {CHROMIUM}: install Debian's chromium (apt-get install -y chromium)"),
    # gradio's queue calls pandas in a way pandas 3 deprecates: not ours.
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from apps.cli import DEFAULT_MODEL
    from grounding import Grounder
    grounder = Grounder.from_pretrained(DEFAULT_MODEL, device="cpu", max_new_tokens=48)
    expected = grounder.predict(IMAGE, QUESTION)  # greedy: the app gives the same answer
    app = build_app(grounder, download_dir=tmp_path_factory.mktemp("dl"), max_new_tokens=48)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(prevent_thread_lock=True, quiet=True, **launch_options(port=port))
    yield f"http://127.0.0.1:{port}/", expected
    app.close()


def overlay_pixels(page) -> np.ndarray:
    src = page.locator("#overlay img").get_attribute("src")
    data = page.request.get(src).body()
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def page_xy(locator, natural_size, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of image pixel (x, y) in an element that shows the image scaled to fit, centred."""
    box = locator.bounding_box()
    w, h = natural_size
    scale = min(box["width"] / w, box["height"] / h)
    return (box["x"] + (box["width"] - w * scale) / 2 + x * scale,
            box["y"] + (box["height"] - h * scale) / 2 + y * scale)


def _relative(locator, natural_size, xy) -> dict:
    box = locator.bounding_box()
    px, py = page_xy(locator, natural_size, xy[0] + 0.5, xy[1] + 0.5)
    return {"x": px - box["x"], "y": py - box["y"]}


def wait_for_status(page, text: str) -> None:
    page.wait_for_function("t => (document.querySelector('#status')?.innerText || '').includes(t)", arg=text,
                           timeout=TIMEOUT_MS)


def test_upload_ask_box_click_in_chromium(served, tmp_path):
    from playwright.sync_api import sync_playwright
    url, expected = served
    phrases = [t.phrase for t in expected.targets if t.phrase]
    assert phrases, f"the default model should name a target for {QUESTION!r}; it answered {expected.answer!r}"
    original = load_image(IMAGE)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.locator("#input-image input[type=file]").set_input_files(str(IMAGE))
            wait_for_status(page, f"Image {original.shape[1]}x{original.shape[0]} ready")
            assert np.array_equal(overlay_pixels(page), original)  # nothing drawn yet, lossless PNG

            page.locator("#question textarea").fill(QUESTION)
            page.locator("#ask").click()
            wait_for_status(page, "Answered in")
            answer = page.locator("#answer")
            assert phrases[0] in answer.inner_text()
            label = answer.locator(".label").first  # the phrase's number tag, in its target's colour
            assert label.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(%d, %d, %d)" % target_colour(0)
            asked = overlay_pixels(page)
            assert asked.shape == original.shape and not np.array_equal(asked, original)
            mask = expected.targets[0].mask
            assert mask is not None and (np.abs(asked[mask].astype(int) - original[mask]).sum(-1) > 0).mean() > 0.9
            page.screenshot(path=str(tmp_path / "app_answer.png"), full_page=True)

            # Drag a box on the image input (gradio_image_annotation): the mask decoder segments it.
            canvas = page.locator("#input-image canvas").first
            size = (original.shape[1], original.shape[0])
            page.mouse.move(*page_xy(canvas, size, BOX[0], BOX[1]))
            page.mouse.down()
            page.mouse.move(*page_xy(canvas, size, BOX[2], BOX[3]), steps=8)
            page.mouse.up()
            wait_for_status(page, "Mask from 1 box")
            boxed = overlay_pixels(page)
            ys, xs = np.nonzero(np.all(boxed == 255, -1))  # the prompt box is drawn white
            assert np.allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], BOX, atol=3)
            assert page.locator("#answer").inner_text().find(phrases[0]) == -1  # a mask result has no answer

            # Click an object point on the result image: box and point together.
            img = page.locator("#overlay img")
            img.click(position=_relative(img, size, CLICK))
            wait_for_status(page, "Mask from 1 object point and 1 box")
            clicked = overlay_pixels(page)
            x, y = CLICK
            near = clicked[y - 6:y + 7, x - 6:x + 7].reshape(-1, 3)
            assert (np.abs(near.astype(int) - POSITIVE_POINT_COLOUR).sum(-1) < 40).any()  # the green + is drawn
            assert not np.array_equal(clicked, boxed)
            links = [a.get_attribute("href") or "" for a in page.locator("#downloads a").all()]
            result_url = next(h for h in links if h.split("?")[0].endswith("groundseg_result.json"))
            result = page.request.get(result_url).json()
            assert rle_decode(result["targets"][0]["mask"]).shape == original.shape[:2]
            page.screenshot(path=str(tmp_path / "app_click.png"), full_page=True)
        finally:
            browser.close()

    shot = tmp_path / "app_answer.png"
    assert shot.stat().st_size > 10_000
    if os.environ.get("GROUNDSEG_UPDATE_SCREENSHOT") == "1":
        # 3/4 size in 256 colours: still readable, and the committed file stays small (~50 KB).
        with Image.open(shot) as picture:
            small = picture.convert("RGB").resize((picture.width * 3 // 4, picture.height * 3 // 4), Image.LANCZOS)
            small.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(SCREENSHOT, optimize=True)
