"""The web app: handlers called directly (clicks as Gradio builds gr.SelectData), then the launched app driven
by gradio_client, its file access rules and its limits. Tiny random model, 96x72 images."""
from __future__ import annotations

import io
import json
import socket
import zipfile

import cv2
import gradio as gr
import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from apps.demo import MODEL_CONCURRENCY, build_app, launch_options
from apps.demo_handlers import (COLOR_MAP, GENERIC_ERROR, DemoHandlers, DownloadFolder, ModelService, Session,
                                answer_pieces, masks_zip)
from apps.overlay import target_colour
from grounding.boxes import parse_answer
from grounding.predictor import Grounder
from grounding.result import Prediction, Target, rle_decode
from tests.conftest import draw_scene

# gradio's queue calls pandas in a way pandas 3 deprecates: not ours, and not worth a warning per test.
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

H, W = 72, 96
DISC = (28, 40)  # (x, y) inside the red disc of draw_scene


def select(x, y) -> gr.SelectData:
    """A click on an image, as Gradio builds it from the browser's event: index = [x, y], value = None."""
    return gr.SelectData(None, {"index": [x, y], "value": None})


@pytest.fixture(scope="module")
def grounder(tiny_dir):
    return Grounder.from_pretrained(tiny_dir, device="cpu", max_new_tokens=8)


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    image, _ = draw_scene(H, W)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path, image


@pytest.fixture()
def handlers(grounder, tmp_path):
    return DemoHandlers(ModelService(grounder), DownloadFolder(tmp_path / "downloads"), default_max_new_tokens=8)


def upload(path, boxes=()) -> dict:
    """The image input's value (gradio_image_annotation): the file and the boxes drawn on it, image pixels."""
    return {"image": str(path), "boxes": [dict(xmin=b[0], ymin=b[1], xmax=b[2], ymax=b[3], label="", color=(0, 0, 0))
                                          for b in boxes], "orientation": 0}


def loaded(handlers, scene_png) -> Session:
    return handlers.on_input(None, upload(scene_png[0]))[0]


# ----------------------------------------------------------------------------- pure functions


def test_answer_pieces_colour_each_phrase_like_its_mask_and_skip_dropped_targets():
    size = (H, W)
    answer = ("<ref>nothing</ref> and <ref>the disc</ref><box>(100,200),(400,700)</box>[SEG] near "
              "<ref>a square</ref>[SEG].")
    parsed = parse_answer(answer, size)
    mask = np.zeros(size, bool)
    mask[30:50, 12:44] = True
    # As Grounder does: "nothing" has no box and no [SEG], so it is dropped from the targets.
    targets = [Target(p.phrase, p.box, mask, 0.9, p.seg_index) for p in parsed if p.seg_index is not None]
    prediction = Prediction(answer, targets, size)
    assert answer_pieces(prediction) == [("nothing", None), (" and ", None), ("the disc", "1"), (" near ", None),
                                         ("a square", "2"), (".", None)]
    hidden_first = answer_pieces(prediction, shown=[1])
    assert ("the disc", None) in hidden_first and ("a square", "2") in hidden_first
    assert COLOR_MAP["1"] == "#%02x%02x%02x" % target_colour(0)
    assert COLOR_MAP["2"] == "#%02x%02x%02x" % target_colour(1) != COLOR_MAP["1"]
    assert answer_pieces(Prediction("", [], size)) == []


def test_masks_zip_holds_one_png_per_mask_at_the_image_size():
    mask = np.zeros((H, W), bool)
    mask[5:20, 7:30] = True
    prediction = Prediction("", [Target(None, None, mask, 0.5), Target("box only", (1, 2, 3, 4))], (H, W))
    with zipfile.ZipFile(io.BytesIO(masks_zip(prediction))) as archive:
        names = archive.namelist()
        png = cv2.imdecode(np.frombuffer(archive.read(names[0]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert names == ["target_01_mask.png"]
    assert png.shape == (H, W) and np.array_equal(png > 0, mask) and set(np.unique(png)) == {0, 255}


# ----------------------------------------------------------------------------- UI handlers


def test_image_then_click_segments_from_the_cached_embedding(handlers, scene_png, grounder):
    path, image = scene_png
    session, overlay, answer, status, targets, files = handlers.on_input(None, upload(path))
    assert np.array_equal(session.pixels, image) and np.array_equal(overlay, image)
    assert f"{W}x{H}" in status and files is None and answer is None
    encoded = grounder.encoder_calls

    session, overlay, answer, status, targets, files = handlers.on_click(session, "positive", select(*DISC))
    assert grounder.encoder_calls == encoded  # decoder only: the upload already encoded the image
    assert session.points == [[float(DISC[0]), float(DISC[1])]] and session.labels == [1]
    (target,) = session.prediction.targets
    assert target.mask.shape == (H, W) and target.mask.dtype == bool
    assert overlay.shape == image.shape and not np.array_equal(overlay, image)  # the click marker at least
    assert "mask decoder only" in status and "1 object point" in status
    assert targets["choices"] == [("1: mask", 0)] and targets["value"] == [0]
    result_json, masks = files
    saved = json.loads(open(result_json, encoding="utf-8").read())
    assert np.array_equal(rle_decode(saved["targets"][0]["mask"]), target.mask)
    assert zipfile.ZipFile(masks).namelist() == ["target_01_mask.png"]

    session = handlers.on_click(session, "negative", select(80, 20))[0]
    assert session.labels == [1, 0] and len(session.prediction.targets) == 1


def test_a_drawn_box_segments_and_replaces_or_removes(handlers, scene_png, grounder):
    path = scene_png[0]
    session = loaded(handlers, scene_png)
    encoded = grounder.encoder_calls
    session, overlay, _, status, *_ = handlers.on_input(session, upload(path, [(10, 22, 41, 51)]))
    assert grounder.encoder_calls == encoded  # same file: a box edit, not a new image
    assert session.boxes == [[10.0, 22.0, 41.0, 51.0]] and "1 box" in status
    assert session.prediction.targets[0].mask.shape == (H, W)
    assert np.array_equal(overlay[22, 25], [255, 255, 255])  # the prompt box's white top edge
    # Dragged past the image's edge: clipped to it.
    session = handlers.on_input(session, upload(path, [(-48, 30, 300, 60)]))[0]
    assert session.boxes == [[0.0, 30.0, float(W), 60.0]]
    session = handlers.on_click(session, "positive", select(*DISC))[0]
    assert "1 object point and 1 box" in session.status
    # Box deleted: the point alone segments; then nothing left, no result.
    session = handlers.on_input(session, upload(path))[0]
    assert session.boxes == [] and session.points == [[28.0, 40.0]] and session.prediction is not None
    session, *_, image_input = handlers.on_clear(session)
    echo = handlers.on_input(session, image_input)  # Clear's update of the input comes back as a change
    assert echo[0] is session and session.prediction is None and all(v == gr.update() for v in echo[1:])
    with pytest.raises(gr.Error, match="the drawn box lies outside the image"):
        handlers.on_input(session, upload(path, [(200, 10, 300, 40)]))
    # A drag's first event is a box of no size: nothing changes yet.
    view = handlers.on_input(session, upload(path, [(30, 30, 30, 30)]))
    assert view[0] is session and all(v == gr.update() for v in view[1:])
    fresh = handlers.on_input(None, upload(path, [(30, 30, 30, 30)]))  # ... but a new image still shows
    assert np.array_equal(fresh[1], fresh[0].pixels) and fresh[0].boxes == []


def test_click_on_the_last_pixel_edge_is_clamped_into_the_image(handlers, scene_png):
    session = handlers.on_click(loaded(handlers, scene_png), "positive", select(W, H))[0]
    assert session.points == [[W - 1.0, H - 1.0]]


def test_hiding_a_target_removes_its_mask_from_the_overlay(handlers, scene_png):
    session = loaded(handlers, scene_png)
    session, full, *_ = handlers.on_input(session, upload(scene_png[0], [(2, 2, 61, 61)]))
    mask = session.prediction.targets[0].mask
    assert mask.any(), "the tiny model's box mask should not be empty"
    session, hidden, answer, status, targets, files = handlers.on_targets(session, [])
    assert session.shown == []
    inside = mask & (np.abs(full.astype(int) - session.pixels).sum(-1) > 0)
    assert inside.any() and np.array_equal(hidden[inside & ~_near_box(session.boxes[0])],
                                           session.pixels[inside & ~_near_box(session.boxes[0])])
    assert files == gr.update()  # the result files keep every target


def _near_box(box, margin=3):
    near = np.zeros((H, W), bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    near[max(0, y1 - margin):y2 + margin, max(0, x1 - margin):x2 + margin] = True
    near[y1 + margin:y2 - margin, x1 + margin:x2 - margin] = False
    return near


def test_ask_runs_the_language_path(handlers, scene_png):
    session = loaded(handlers, scene_png)
    session, overlay, answer, status, targets, files = handlers.on_ask(session, "Where is the red circle?", 6)
    assert session.prediction.question == "Where is the red circle?"
    assert session.prediction.image_size == (H, W) and overlay.shape == (H, W, 3)
    assert status.startswith("Answered in") and "Model output" in status
    assert json.loads(open(files[0], encoding="utf-8").read())["question"] == "Where is the red circle?"


def test_ask_about_region_writes_the_clicks_into_the_question(handlers, scene_png, monkeypatch):
    session = loaded(handlers, scene_png)
    with pytest.raises(gr.Error, match="click a point or draw a box first"):
        handlers.on_ask_region(session, "What is this?", 6)
    session = handlers.on_click(session, "positive", select(*DISC))[0]
    seen = {}
    real = handlers.service.grounder.predict

    def spy(image, question, **kwargs):
        seen.update(kwargs, question=question)
        return real(image, question, **kwargs)

    monkeypatch.setattr(handlers.service.grounder, "predict", spy)
    session = handlers.on_ask_region(session, "", 6)[0]
    assert seen["question"] == "What is in this region?"
    assert seen["points"] == [[28.0, 40.0]] and seen["point_labels"] == [1] and seen["max_new_tokens"] == 6
    assert session.prediction.question == "What is in this region?"


def test_clear_keeps_the_image_and_drops_prompts_box_and_result(handlers, scene_png):
    session = handlers.on_input(loaded(handlers, scene_png), upload(scene_png[0], [(10, 22, 41, 51)]))[0]
    session = handlers.on_click(session, "positive", select(*DISC))[0]
    session, overlay, answer, status, targets, files, image_input = handlers.on_clear(session)
    assert session.points == [] and session.boxes == [] and session.prediction is None
    assert np.array_equal(overlay, session.pixels) and targets["choices"] == [] and files is None
    assert image_input == {"image": str(scene_png[0]), "boxes": []}  # the drawn box goes too


def test_errors_are_one_readable_line(handlers, scene_png, tmp_path, monkeypatch):
    with pytest.raises(gr.Error, match="upload an image or pick an example first"):
        handlers.on_click(Session(), "positive", select(1, 1))
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    with pytest.raises(gr.Error) as err:
        handlers.on_input(None, upload(fake))
    assert err.value.message == "the uploaded file 'notes.png' is not an image (unknown or unsupported format)"
    session = loaded(handlers, scene_png)
    with pytest.raises(gr.Error, match="the question is empty"):
        handlers.on_ask(session, "   ", 8)
    with pytest.raises(gr.Error, match="max new tokens must be between 1 and"):
        handlers.on_ask(session, "Where?", 0)

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail at /srv/model.py line 12")

    monkeypatch.setattr(handlers.service.grounder, "segment", broken)
    with pytest.raises(gr.Error) as err:
        handlers.on_click(session, "positive", select(*DISC))
    assert err.value.message == GENERIC_ERROR and "secret" not in err.value.message
    assert session.points == []  # a failed click leaves the stored session as it was


def test_api_handlers_return_the_result_json(handlers, scene_png):
    path = str(scene_png[0])
    click = handlers.api_click(path, *DISC, 1)
    assert rle_decode(click["targets"][0]["mask"]).shape == (H, W)
    seg = handlers.api_segment(path, "[[28, 40], [80, 20]]", [1, 0], None)
    assert seg["image_size"] == [H, W] and len(seg["targets"]) == 1
    boxes = handlers.api_segment(path, None, None, [[2, 2, 40, 40], [50, 5, 90, 40]])
    assert len(boxes["targets"]) == 2
    with pytest.raises(gr.Error, match="points must be a JSON list"):
        handlers.api_segment(path, "[[28, 40", None, None)
    with pytest.raises(gr.Error, match="outside the 96x72 image"):
        handlers.api_click(path, 500, 10, 1)
    with pytest.raises(gr.Error, match="no image was given"):
        handlers.api_ground(None, "Where?", 8)


# ----------------------------------------------------------------------------- the launched app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(grounder, tmp_path_factory):
    app = build_app(grounder, download_dir=tmp_path_factory.mktemp("dl"), max_new_tokens=8)
    port = free_port()
    app.launch(prevent_thread_lock=True, quiet=True, **launch_options(port=port, max_file_size="100kb"))
    yield app, f"http://127.0.0.1:{port}"
    app.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client
    return Client(served[1] + "/", verbose=False)


def test_client_click_segment_ground(client, scene_png):
    from gradio_client import handle_file
    image = handle_file(str(scene_png[0]))
    click = client.predict(image, DISC[0], DISC[1], 1, api_name="/click")
    assert rle_decode(click["targets"][0]["mask"]).shape == (H, W)
    seg = client.predict(image, [[28, 40]], [1], [[10, 20, 50, 60]], api_name="/segment")
    assert rle_decode(seg["targets"][0]["mask"]).shape == (H, W)
    ground = client.predict(image, "Where is the red circle?", 6, None, None, None, api_name="/ground")
    assert ground["question"] == "Where is the red circle?" and ground["image_size"] == [H, W]
    for target in ground["targets"]:
        if target["mask"] is not None:
            assert rle_decode(target["mask"]).shape == (H, W)


def test_client_errors_are_readable(client, scene_png, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError) as err:
        client.predict(handle_file(str(scene_png[0])), "", 8, None, None, None, api_name="/ground")
    assert str(err.value) == "the question is empty: type what you want to find"
    text = tmp_path / "readme.png"
    text.write_text("hello")
    with pytest.raises(AppError) as err:
        client.predict(handle_file(str(text)), 1, 1, 1, api_name="/click")
    assert "'readme.png' is not an image" in str(err.value) and "Traceback" not in str(err.value)


def test_only_the_examples_are_readable(served):
    app, url = served
    repo = launch_options()["allowed_paths"][0].rsplit("/", 1)[0]
    assert httpx.get(f"{url}/gradio_api/file={repo}/examples/shapes.png").status_code == 200
    refused = ["/etc/passwd", "%2Fetc%2Fpasswd", f"{repo}/README.md", f"{repo}/examples/../README.md",
               f"{repo}/examples/..%2F..%2F..%2Fetc%2Fpasswd", f"{repo}/weights/shapes-tiny/groundseg.json",
               "../../../../etc/passwd"]
    for path in refused:
        response = httpx.get(f"{url}/gradio_api/file={path}")
        assert response.status_code in (403, 404), (path, response.status_code)
        assert "root:" not in response.text


def test_the_api_takes_only_uploaded_files(served):
    app, url = served
    for path in ("/etc/passwd", launch_options()["allowed_paths"][0] + "/shapes.png"):
        payload = {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, 1, 1, 1]}
        event = httpx.post(f"{url}/gradio_api/call/click", json=payload).json()["event_id"]
        stream = httpx.get(f"{url}/gradio_api/call/click/{event}", timeout=60).text
        assert "event: error" in stream and "not uploaded by a user" in stream and "root:" not in stream


def test_upload_size_limit(served):
    app, url = served
    big = io.BytesIO(b"\0" * 200_000)  # the fixture launches with max_file_size="100kb"
    response = httpx.post(f"{url}/gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert response.status_code == 413


def test_server_settings(served):
    app, url = served
    assert launch_options()["server_name"] == "127.0.0.1" and app.server_name == "127.0.0.1"
    assert app.max_file_size == 100 * 1000 or app.max_file_size == 100 * 1024
    by_name = {fn.api_name: fn for fn in app.fns.values()}
    assert {"segment", "click", "ground"} <= set(by_name)
    model_fns = [fn for fn in app.fns.values() if fn.concurrency_id == MODEL_CONCURRENCY]
    assert {by_name[n] for n in ("segment", "click", "ground")} <= set(model_fns) and len(model_fns) >= 7
    assert all(fn.concurrency_limit == 1 for fn in model_fns)


def test_cli_demo_command(monkeypatch, tmp_path):
    import apps.demo
    from apps.cli import DEFAULT_MODEL, app
    calls = []
    monkeypatch.setattr(apps.demo, "serve", lambda model, **kw: calls.append((model, kw)))
    result = CliRunner().invoke(app, ["demo", "--port", "7999"])
    assert result.exit_code == 0, result.output
    assert calls == [(DEFAULT_MODEL, dict(host="127.0.0.1", port=7999, device="auto", max_new_tokens=128,
                                          max_file_size="25mb"))]
