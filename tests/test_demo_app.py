"""The web app: handlers called directly (clicks as Gradio builds gr.SelectData), then the launched app driven
by gradio_client, its file access rules and its limits. Tiny random model, 96x72 images, an 8-frame 96x72 video."""
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
from apps.demo_video import VideoHandlers
from apps.overlay import target_colour
from grounding.text.boxes import parse_answer
from grounding import Grounder
from grounding.result import Prediction, Target, box_from_mask, rle_decode
from grounding.video.io import VideoReader, VideoWriter
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


@pytest.fixture()
def video_handlers(grounder, tmp_path):
    return VideoHandlers(ModelService(grounder), DownloadFolder(tmp_path / "downloads"), default_max_new_tokens=8)


N_FRAMES = 8


def disc_at(i: int) -> tuple[int, int]:
    """(x, y) of the red disc's centre on frame i of the test clip: it moves 6 px right per frame."""
    return 22 + 6 * i, 36


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """8 frames, 96x72, 8 fps: a red disc moving right over a blue square. -> (path, decoded frames)."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with VideoWriter(path, W, H, 8) as writer:
        for i in range(N_FRAMES):
            frame = np.full((H, W, 3), 90, np.uint8)
            cv2.rectangle(frame, (60, 8), (86, 34), (40, 60, 230), -1)
            cv2.circle(frame, disc_at(i), 12, (220, 30, 30), -1)
            writer.write(frame)
    return path, [rgb for _, rgb in VideoReader(path).frames()]


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


def test_a_higher_mask_threshold_gives_a_smaller_mask_for_the_same_click(handlers, scene_png, grounder):
    session = loaded(handlers, scene_png)
    masks = {t: handlers.on_click(session, "positive", select(*DISC), t)[0].prediction.targets[0].mask
             for t in (-1.0, 0.0, 1.0)}
    areas = [int(masks[t].sum()) for t in (-1.0, 0.0, 1.0)]
    assert areas[0] > areas[2] and areas == sorted(areas, reverse=True), areas
    assert not (masks[1.0] & ~masks[0.0]).any() and not (masks[0.0] & ~masks[-1.0]).any()  # nested: one logit map
    assert grounder.mask_threshold == 0.0  # a request's setting is restored: the API and other tabs get the default
    api = handlers.api_click(str(scene_png[0]), *DISC, 1)
    assert np.array_equal(rle_decode(api["targets"][0]["mask"]), masks[0.0])

    # Moving the slider re-cuts a click's mask at once (decoder only, no new encoding), and says so.
    clicked = handlers.on_click(session, "positive", select(*DISC), -1.0)[0]
    encoded = grounder.encoder_calls
    session, overlay, _, status, _, files = handlers.on_threshold(clicked, 1.0)
    assert grounder.encoder_calls == encoded and "mask threshold 1" in status
    assert np.array_equal(session.prediction.targets[0].mask, masks[1.0])
    saved = json.loads(open(files[0], encoding="utf-8").read())
    assert np.array_equal(rle_decode(saved["targets"][0]["mask"]), masks[1.0])
    # An answer is not re-asked: the setting applies to the next question.
    answered = handlers.on_ask(loaded(handlers, scene_png), "Where is the red circle?", 4)[0]
    view = handlers.on_threshold(answered, 2.0)
    assert view[0].prediction is answered.prediction and "applies to the next result" in view[3]
    with pytest.raises(gr.Error, match="mask threshold must be a logit between -20 and 20"):
        handlers.on_click(session, "positive", select(*DISC), float("nan"))
    assert grounder.mask_threshold == 0.0


# ----------------------------------------------------------------------------- the video tab


def fake_disc_answer(grounder, monkeypatch, frames):
    """The tiny random model names nothing: make its answer on any frame the red disc, with that frame's mask."""
    def predict(image, question, **kwargs):
        index = next(i for i, f in enumerate(frames) if np.array_equal(f, image))
        mask = np.abs(image.astype(int) - (220, 30, 30)).sum(-1) < 90
        target = Target("the red disc", box_from_mask(mask), mask, 0.9, 0)
        return Prediction("It is <ref>the red disc</ref>[SEG].", [target], image.shape[:2], question,
                          [f"answered on frame {index}"])
    monkeypatch.setattr(grounder, "predict", predict)


def read_frames_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8").read().splitlines()]


def test_video_question_gives_an_overlay_mp4_of_every_frame_and_the_answer(video_handlers, clip, grounder,
                                                                           monkeypatch):
    path, frames = clip
    session, frame, result, answer, status, files, slider = video_handlers.on_video(None, str(path))
    assert np.array_equal(frame, frames[0]) and result is None and files is None
    assert slider["maximum"] == N_FRAMES - 1 and slider["interactive"] and f"{N_FRAMES} frames" in status
    session, frame, *_ = video_handlers.on_frame(session, 3.0)
    assert session.index == 3 and np.array_equal(frame, frames[3])

    fake_disc_answer(grounder, monkeypatch, frames)
    session, frame, result, answer, status, files = video_handlers.on_ask(session, "Please segment the red disc.", 8)
    assert answer == [("It is ", None), ("the red disc", "1"), (".", None)]
    assert "Answered on frame 3 and tracked 1 object(s) through 8 frames" in status
    assert "answered on frame 3" in status  # the model's notes are shown
    overlay = VideoReader(result)
    assert overlay.info.num_frames == N_FRAMES and overlay.info.size == (H, W)
    key_mask = session.answer.targets[0].mask
    shown = overlay.read(3)
    assert np.abs(shown[key_mask].astype(int) - frames[3][key_mask]).mean() > 10  # the mask is drawn on the video
    frames_file, summary_file = files
    lines = read_frames_jsonl(frames_file)
    assert [line["frame"] for line in lines] == list(range(N_FRAMES))
    assert all([o["id"] for o in line["objects"]] == [1] for line in lines)
    assert np.array_equal(rle_decode(lines[3]["objects"][0]["mask"]), key_mask)
    summary = json.loads(open(summary_file, encoding="utf-8").read())
    assert summary["key_frame"] == 3 and summary["video"] == "clip.mp4"  # no server path
    assert summary["objects"] == [{"id": 1, "phrase": "the red disc"}]
    assert np.abs(frame[key_mask].astype(int) - frames[3][key_mask]).mean() > 10  # the answer on the shown frame


def test_video_clicks_then_track_follow_one_object_through_every_frame(video_handlers, clip, grounder):
    path, frames = clip
    session = video_handlers.on_frame(video_handlers.on_video(None, str(path))[0], 2)[0]
    with pytest.raises(gr.Error, match="click on the object in the frame first"):
        video_handlers.on_track(session)
    session, frame, result, _, status, files = video_handlers.on_click(session, "positive", select(*disc_at(2)))
    preview = session.preview.targets[0].mask
    assert session.points == [[float(disc_at(2)[0]), float(disc_at(2)[1])]] and preview.shape == (H, W)
    assert not np.array_equal(frame, frames[2]) and "1 object point" in status and result == gr.update()
    session = video_handlers.on_click(session, "negative", select(80, 60))[0]
    assert session.labels == [1, 0]

    session, frame, result, answer, status, files = video_handlers.on_track(session)
    assert "Tracked the object of 1 object point and 1 background point on frame 2 through 8 frames" in status
    assert VideoReader(result).info.num_frames == N_FRAMES
    lines = read_frames_jsonl(files[0])
    assert [line["frame"] for line in lines] == list(range(N_FRAMES))
    assert all(len(line["objects"]) == 1 and line["objects"][0]["id"] == 1 for line in lines)
    expected = grounder.segment(frames[2], points=session.points, point_labels=session.labels).targets[0].mask
    assert np.array_equal(rle_decode(lines[2]["objects"][0]["mask"]), expected)  # the click's mask on its frame

    # A new frame drops the clicks (they belong to the frame they were made on).
    session = video_handlers.on_frame(session, 5)[0]
    assert session.points == [] and session.preview is None


def test_video_errors_are_readable(video_handlers, clip, tmp_path):
    with pytest.raises(gr.Error, match="upload a video or pick an example first"):
        video_handlers.on_ask(None, "Where?", 8)
    good = clip[0].read_bytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(good[: len(good) // 2])
    with pytest.raises(gr.Error) as err:
        video_handlers.on_video(None, str(broken))
    assert "'broken.mp4'" in err.value.message and "truncated" in err.value.message
    assert str(tmp_path) not in err.value.message
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 40)
    with pytest.raises(gr.Error, match="the video 'notes.mp4' is not a readable video"):
        video_handlers.on_video(None, str(text))
    session = video_handlers.on_video(None, str(clip[0]))[0]
    with pytest.raises(gr.Error, match="the question is empty"):
        video_handlers.on_ask(session, "  ", 8)
    with pytest.raises(gr.Error, match="frame 8 does not exist: the video has 8 frames"):
        video_handlers.api_track_video(str(clip[0]), 8, [[10, 10]], [1], None)
    with pytest.raises(gr.Error, match="nothing to track"):
        video_handlers.api_track_video(str(clip[0]), 0, None, None, None)


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


def test_client_track_video_and_ground_video(client, clip):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    path, frames = clip
    overlay, result = client.predict(handle_file(str(path)), 4, [list(disc_at(4))], [1], None,
                                     api_name="/track_video")
    assert VideoReader(overlay).info.num_frames == N_FRAMES and VideoReader(overlay).info.size == (H, W)
    assert [f["frame"] for f in result["frames"]] == list(range(N_FRAMES))
    assert result["video"]["key_frame"] == 4 and result["video"]["objects"] == [{"id": 1, "phrase": None}]
    assert rle_decode(result["frames"][4]["objects"][0]["mask"]).shape == (H, W)
    overlay, result = client.predict(handle_file(str(path)), "Please segment the red disc.", 0, 4,
                                     api_name="/ground_video")
    assert VideoReader(overlay).info.num_frames == N_FRAMES and len(result["frames"]) == N_FRAMES
    assert result["video"]["question"] == "Please segment the red disc."
    with pytest.raises(AppError, match="the question is empty"):
        client.predict(handle_file(str(path)), "", 0, 4, api_name="/ground_video")


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
    assert {"segment", "click", "ground", "ground_video", "track_video"} <= set(by_name)
    model_fns = [fn for fn in app.fns.values() if fn.concurrency_id == MODEL_CONCURRENCY]
    assert {by_name[n] for n in ("segment", "click", "ground", "ground_video", "track_video")} <= set(model_fns)
    assert len(model_fns) == 16  # the image tab's 7 model events, the video tab's 4, the 5 endpoints
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
