"""The web app: handlers called directly (clicks as Gradio builds gr.SelectData), then the launched app driven
by gradio_client, its file access rules and its limits. Tiny random model, 96x72 images, an 8-frame 96x72 video."""
from __future__ import annotations

import io
import json
import socket
import zipfile
from pathlib import Path

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
from tests.conftest import draw_scene  # noqa: E402

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


def shown(picture: str) -> np.ndarray:
    """The RGB pixels of a picture the page is given (a PNG file path)."""
    return cv2.cvtColor(cv2.imread(picture, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_a_picture_is_written_once_per_content_and_never_rewritten_in_place(tmp_path):
    folder = DownloadFolder(tmp_path)
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    first = folder.picture(image)
    assert np.array_equal(shown(first), image)   # lossless, RGB order kept
    written = Path(first).stat().st_ino
    assert folder.picture(image.copy()) == first and Path(first).stat().st_ino == written   # served, not rewritten
    other = folder.picture(image[:, :30].copy())   # same bytes' start, another size: another file
    assert other != first and shown(other).shape == (30, 30, 3)
    assert folder.picture(None) is None
    assert not list(tmp_path.rglob(".view.*"))   # no staging file left behind


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


def click(handlers, session, x, y, mode="positive", threshold=None) -> tuple:
    """A click as the page runs it: the draw-only event, then the mask decoder's. -> the second's view."""
    session = handlers.on_click(session, mode, select(x, y))[0]
    return handlers.on_masks(session, threshold)


def test_image_then_click_draws_at_once_then_segments_from_the_cached_embedding(handlers, scene_png, grounder):
    path, image = scene_png
    session, overlay, answer, status, objects, image_input = handlers.on_input(None, upload(path))
    assert np.array_equal(session.pixels, image) and np.array_equal(shown(overlay), image)
    assert f"{W}x{H}" in status and answer is None and session.scale == 1.0
    assert objects["choices"] == [("1: object · no mask yet", 0)]
    encoded = grounder.encoder_calls

    session, drawn, *_ = handlers.on_click(session, "positive", select(*DISC))
    assert session.objects.current.points == ((28.0, 40.0),) and session.objects.current.mask is None
    assert not np.array_equal(shown(drawn), image) and "segmenting" in session.status  # the marker, before any mask
    session, overlay, answer, status, objects = handlers.on_masks(session)
    assert grounder.encoder_calls == encoded  # decoder only: the upload already encoded the image
    obj = session.objects.current
    assert obj.mask.shape == (H, W) and obj.mask.dtype == bool and not obj.stale
    assert "mask decoder only" in status and "1 object point" in status
    assert objects["choices"] == [(f"1: object · 1 object point · {obj.area:,} px", 0)]
    result_json, masks, single = handlers.on_downloads(session)
    saved = json.loads(open(result_json, encoding="utf-8").read())
    assert np.array_equal(rle_decode(saved["targets"][0]["mask"]), obj.mask)
    assert zipfile.ZipFile(masks).namelist() == ["target_01_mask.png"] and single.endswith("target_01_mask.png")


def test_objects_each_keep_their_own_clicks_mask_and_colour(handlers, scene_png):
    session = loaded(handlers, scene_png)
    session = click(handlers, session, *DISC)[0]
    first = session.objects.items[0]
    session = handlers.on_new_object(session)[0]
    assert session.objects.active == 1 and len(session.objects.items) == 2
    session = click(handlers, session, 75, 22)[0]  # the blue square
    session = click(handlers, session, 10, 60, "negative")[0]
    one, two = session.objects.items
    assert one.points == first.points and np.array_equal(one.mask, first.mask)  # untouched by object 2's clicks
    assert two.points == ((75.0, 22.0), (10.0, 60.0)) and two.labels == (1, 0)
    assert one.colour is not None and two.colour is not None and one.colour != two.colour
    files = handlers.on_downloads(session)
    assert [Path(f).name for f in files] == ["groundseg_result.json", "groundseg_masks.zip", "target_01_mask.png",
                                             "target_02_mask.png"]
    saved = json.loads(open(files[0], encoding="utf-8").read())
    assert len(saved["targets"]) == 2
    assert np.array_equal(rle_decode(saved["targets"][1]["mask"]), two.mask)
    # Choosing object 1 again sends the next click to it.
    session = handlers.on_select(session, 0)[0]
    session = click(handlers, session, 30, 45)[0]
    assert len(session.objects.items[0].points) == 2 and len(session.objects.items[1].points) == 2


def test_undo_redo_and_clearing_one_object_or_all(handlers, scene_png, grounder):
    session = loaded(handlers, scene_png)
    session = click(handlers, session, *DISC)[0]
    after_one = session.objects.current.mask
    session = click(handlers, session, 80, 20, "negative")[0]
    with pytest.raises(gr.Error, match="nothing to redo"):
        handlers.on_redo(session)
    calls = grounder.encoder_calls
    session = handlers.on_undo(session)[0]
    obj = session.objects.current
    assert obj.labels == (1,) and np.array_equal(obj.mask, after_one) and not obj.stale  # no decoder call needed
    session = handlers.on_redo(session)[0]
    assert session.objects.current.labels == (1, 0) and not session.objects.current.stale
    assert grounder.encoder_calls == calls
    session = handlers.on_new_object(session)[0]
    session = click(handlers, session, 75, 22)[0]
    session = handlers.on_clear_object(session)[0]
    assert len(session.objects.items) == 1 and session.objects.items[0].labels == (1, 0)
    session = handlers.on_undo(session)[0]
    assert len(session.objects.items) == 2
    session, overlay, _, status, objects, image_input = handlers.on_clear_all(session)
    assert len(session.objects.items) == 1 and not session.objects.current.has_prompt
    assert np.array_equal(shown(overlay), session.pixels) and handlers.on_downloads(session) is None  # no empty zip
    assert image_input == {"image": str(scene_png[0]), "boxes": []}
    for _ in range(3):
        session = handlers.on_undo(session)[0]
    assert session.objects.items[0].labels == (1, 0)
    with pytest.raises(gr.Error, match="nothing to undo"):
        handlers.on_undo(handlers.on_input(None, upload(scene_png[0]))[0])


def test_a_drawn_box_goes_to_the_current_object_and_clears_the_input(handlers, scene_png, grounder):
    path = scene_png[0]
    session = loaded(handlers, scene_png)
    encoded = grounder.encoder_calls
    session, overlay, _, status, _, image_input = handlers.on_input(session, upload(path, [(10, 22, 41, 51)]))
    assert grounder.encoder_calls == encoded  # same file: a box, not a new image
    assert session.objects.current.box == (10.0, 22.0, 41.0, 51.0)
    assert image_input == {"image": str(path), "boxes": []}  # the next drag draws a new box
    assert np.array_equal(shown(overlay)[22, 25], [255, 255, 255])  # the prompt box's white top edge, drawn at once
    session, _, _, status, _ = handlers.on_masks(session)
    assert "1 box" in status and session.objects.current.mask.shape == (H, W)
    # Our update of the input comes back as a change: nothing happens.
    echo = handlers.on_input(session, image_input)
    assert echo[0] is session and all(v == gr.update() for v in echo[1:])
    # A second box elsewhere replaces the first; dragged past the edge: clipped; then a click with it.
    session = handlers.on_input(session, upload(path, [(-48, 30, 300, 60)]))[0]
    assert session.objects.current.box == (0.0, 30.0, float(W), 60.0)
    session = click(handlers, session, *DISC)[0]
    assert "1 object point and 1 box" in session.status
    with pytest.raises(gr.Error, match="the drawn box lies outside the image"):
        handlers.on_input(session, upload(path, [(200, 10, 300, 40)]))
    view = handlers.on_input(session, upload(path, [(30, 30, 30, 30)]))  # a drag's first event: no size yet
    assert view[0] is session and all(v == gr.update() for v in view[1:])


def test_click_on_the_last_pixel_edge_is_clamped_into_the_image(handlers, scene_png):
    session = handlers.on_click(loaded(handlers, scene_png), "positive", select(W, H))[0]
    assert session.objects.current.points == ((W - 1.0, H - 1.0),)


def test_a_big_image_is_segmented_on_its_view_and_downloaded_at_full_size(handlers, tmp_path, grounder):
    from apps.demo_objects import VIEW_MAX_SIDE
    image, disc = draw_scene(H * 20, W * 20)  # 1920 x 1440: shown at 1024 x 768
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    session, overlay, _, status, _, _ = handlers.on_input(None, upload(path))
    assert shown(overlay).shape == (768, VIEW_MAX_SIDE, 3) and session.scale == pytest.approx(VIEW_MAX_SIDE / (W * 20))
    assert "shown and segmented at 1024x768" in status
    k = session.scale
    session = click(handlers, session, 28 * 20 * k, 40 * 20 * k)[0]  # the page's click, in view pixels
    assert session.objects.current.points == (pytest.approx((560.0, 800.0), abs=1),)  # stored in image pixels
    assert session.objects.current.mask.shape == (768, 1024)
    result = json.loads(open(handlers.on_downloads(session)[0], encoding="utf-8").read())
    full = rle_decode(result["targets"][0]["mask"])
    assert full.shape == (H * 20, W * 20) and result["image_size"] == [H * 20, W * 20]
    small = cv2.resize(full.astype(np.uint8), (1024, 768), interpolation=cv2.INTER_NEAREST).astype(bool)
    assert (small & session.objects.current.mask).sum() / (small | session.objects.current.mask).sum() > 0.95


def test_ask_turns_the_answer_into_objects(handlers, scene_png):
    session = loaded(handlers, scene_png)
    session, overlay, answer, status, objects = handlers.on_ask(session, "Where is the red circle?", 6)
    assert session.prediction.question == "Where is the red circle?"
    assert session.prediction.image_size == (H, W) and shown(overlay).shape == (H, W, 3)
    assert status.startswith("Answered in") and "Model output" in status
    n = len(session.prediction.targets)
    assert len(session.objects.items) == n + 1 and session.objects.active == n  # clicks go to a new object
    files = handlers.on_downloads(session)
    if files is not None:
        assert json.loads(open(files[0], encoding="utf-8").read())["question"] == "Where is the red circle?"


def test_ask_about_region_writes_the_clicks_into_the_question(handlers, scene_png, monkeypatch):
    session = loaded(handlers, scene_png)
    with pytest.raises(gr.Error, match="click a point or draw a box first"):
        handlers.on_ask_region(session, "What is this?", 6)
    session = click(handlers, session, *DISC)[0]
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


def test_errors_are_one_readable_line(handlers, scene_png, tmp_path, monkeypatch):
    with pytest.raises(gr.Error, match="upload an image or pick an example first"):
        handlers.on_click(Session(), "positive", select(1, 1))
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    session, overlay, _, status, _, image_input = handlers.on_input(None, upload(fake))
    message = "the uploaded file 'notes.png' is not an image (unknown or unsupported format)"
    assert warnings == [message] and message in status and str(tmp_path) not in status
    assert session.pixels is None and overlay is None and image_input is None  # the input is emptied, usable
    session = loaded(handlers, scene_png)
    with pytest.raises(gr.Error, match="the question is empty"):
        handlers.on_ask(session, "   ", 8)
    with pytest.raises(gr.Error, match="max new tokens must be between 1 and"):
        handlers.on_ask(session, "Where?", 0)

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail at /srv/model.py line 12")

    session = handlers.on_click(session, "positive", select(*DISC))[0]
    monkeypatch.setattr(handlers.service.grounder, "segment", broken)
    with pytest.raises(gr.Error) as err:
        handlers.on_masks(session)
    assert err.value.message == GENERIC_ERROR and "secret" not in err.value.message
    assert session.objects.current.stale  # a failed mask leaves the stored session as it was


def test_a_background_click_never_grows_the_mask(scene_png):
    """The default model's decoder answers "object click + background click" with a mask that spreads onto
    like-coloured neighbours (on examples/shapes.png the cyan square's 7,909 px became 20,000, over the circle
    and the yellow square). A background click may only take pixels away, near the object."""
    from apps.cli import DEFAULT_MODEL
    from apps.demo import EXAMPLES_DIR
    from grounding.images import load_image
    grounder = Grounder.from_pretrained(DEFAULT_MODEL, device="cpu")
    image = load_image(EXAMPLES_DIR / "shapes.png")
    cyan = grounder.segment(image, [[140, 80]], [1]).targets[0].mask
    near = cv2.dilate(cyan.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    for background in ([250, 250], [210, 148], [30, 30], [60, 200]):
        mask = grounder.segment(image, [[140, 80], background], [1, 0]).targets[0].mask
        assert not (mask & ~near).any(), (background, int((mask & ~near).sum()))
        assert mask.sum() <= 1.15 * cyan.sum() and (mask & cyan).sum() / cyan.sum() > 0.9


def test_a_higher_mask_threshold_gives_a_smaller_mask_for_the_same_click(handlers, scene_png, grounder):
    session = loaded(handlers, scene_png)
    masks = {t: click(handlers, session, *DISC, threshold=t)[0].objects.current.mask for t in (-1.0, 0.0, 1.0)}
    areas = [int(masks[t].sum()) for t in (-1.0, 0.0, 1.0)]
    assert areas[0] > areas[2] and areas == sorted(areas, reverse=True), areas
    assert not (masks[1.0] & ~masks[0.0]).any() and not (masks[0.0] & ~masks[-1.0]).any()  # nested: one logit map
    assert grounder.mask_threshold == 0.0  # a request's setting is restored: the API and other tabs get the default
    api = handlers.api_click(str(scene_png[0]), *DISC, 1)
    assert np.array_equal(rle_decode(api["targets"][0]["mask"]), masks[0.0])

    # Changing the setting re-cuts every clicked object's mask (decoder only, no new encoding), and says so.
    clicked = click(handlers, session, *DISC, threshold=-1.0)[0]
    encoded = grounder.encoder_calls
    session, _, _, status, _ = handlers.on_threshold(clicked, 1.0)
    assert "cutting the masks again" in status and session.objects.current.stale
    session, overlay, _, status, _ = handlers.on_masks(session, 1.0)
    assert grounder.encoder_calls == encoded and "mask threshold 1" in status
    assert np.array_equal(session.objects.current.mask, masks[1.0])
    with pytest.raises(gr.Error, match="mask threshold must be a logit between -20 and 20"):
        click(handlers, session, *DISC, threshold=float("nan"))
    assert grounder.mask_threshold == 0.0


def test_api_handlers_return_the_result_json(handlers, scene_png):
    path = str(scene_png[0])
    click = handlers.api_click(path, *DISC, 1)
    assert rle_decode(click["targets"][0]["mask"]).shape == (H, W)
    seg = handlers.api_segment(path, "[[28, 40], [80, 20]]", [1, 0], None)
    assert seg["image_size"] == [H, W] and len(seg["targets"]) == 1
    boxes = handlers.api_segment(path, None, None, [[2, 2, 40, 40], [50, 5, 90, 40]])
    assert len(boxes["targets"]) == 2
    many = handlers.api_segment(path, None, None, None, [{"points": [[28, 40], [80, 20]], "point_labels": [1, 0]},
                                                         {"box": [58, 8, 88, 38]}])
    assert [len(many["targets"]), many["image_size"]] == [2, [H, W]]
    assert np.array_equal(rle_decode(many["targets"][0]["mask"]), rle_decode(seg["targets"][0]["mask"]))
    with pytest.raises(gr.Error, match="object 1 has no points and no box"):
        handlers.api_segment(path, None, None, None, [{"point_labels": [1]}])
    with pytest.raises(gr.Error, match="or objects, not both"):
        handlers.api_segment(path, [[1, 1]], [1], None, [{"box": [1, 1, 9, 9]}])
    with pytest.raises(gr.Error, match="points must be a JSON list"):
        handlers.api_segment(path, "[[28, 40", None, None)
    with pytest.raises(gr.Error, match="outside the 96x72 image"):
        handlers.api_click(path, 500, 10, 1)
    with pytest.raises(gr.Error, match="no image was given"):
        handlers.api_ground(None, "Where?", 8)


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
    session, frame, result, answer, status, files, objects, slider, _ = video_handlers.on_video(None, str(path))
    assert np.array_equal(shown(frame), frames[0]) and result is None and files is None
    assert slider["maximum"] == N_FRAMES - 1 and slider["interactive"] and f"{N_FRAMES} frames" in status
    session, frame, *_ = video_handlers.on_frame(session, 3.0)
    assert session.index == 3 and np.array_equal(shown(frame), frames[3])

    fake_disc_answer(grounder, monkeypatch, frames)
    session, frame, result, answer, status, files, _ = video_handlers.on_ask(session, "Please segment the red disc.",
                                                                             8)
    assert answer == [("It is ", None), ("the red disc", "1"), (".", None)]
    assert "Answered on frame 3 and tracked 1 object(s) through 8 frames" in status
    assert "answered on frame 3" in status  # the model's notes are shown
    overlay = VideoReader(result)
    assert overlay.info.num_frames == N_FRAMES and overlay.info.size == (H, W)
    key_mask = session.answer.targets[0].mask
    on_video = overlay.read(3)
    assert np.abs(on_video[key_mask].astype(int) - frames[3][key_mask]).mean() > 10  # the mask is drawn on the video
    frames_file, summary_file = files
    lines = read_frames_jsonl(frames_file)
    assert [line["frame"] for line in lines] == list(range(N_FRAMES))
    assert all([o["id"] for o in line["objects"]] == [1] for line in lines)
    assert np.array_equal(rle_decode(lines[3]["objects"][0]["mask"]), key_mask)
    summary = json.loads(open(summary_file, encoding="utf-8").read())
    assert summary["key_frame"] == 3 and summary["video"] == "clip.mp4"  # no server path
    assert summary["objects"] == [{"id": 1, "phrase": "the red disc"}]
    assert np.abs(shown(frame)[key_mask].astype(int) - frames[3][key_mask]).mean() > 10  # the answer on the shown frame


def test_video_clicks_on_two_objects_track_each_on_its_own(video_handlers, clip, grounder):
    path, frames = clip
    session = video_handlers.on_frame(video_handlers.on_video(None, str(path))[0], 2)[0]
    with pytest.raises(gr.Error, match="click on the object in the frame first"):
        video_handlers.on_track(session)
    session, frame, result, _, status, files, objects = video_handlers.on_click(session, "positive",
                                                                                select(*disc_at(2)))
    disc = session.objects.items[0]
    assert disc.points == ((float(disc_at(2)[0]), float(disc_at(2)[1])),) and disc.mask.shape == (H, W)
    assert not np.array_equal(shown(frame), frames[2])
    assert "object 1: 1 object point" in status and result == gr.update()
    session = video_handlers.on_click(session, "negative", select(80, 60))[0]
    session = video_handlers.on_new_object(session)[0]
    session = video_handlers.on_click(session, "positive", select(73, 21))[0]  # the blue square
    assert [o.labels for o in session.objects.items] == [(1, 0), (1,)]

    session, frame, result, answer, status, files, _ = video_handlers.on_track(session)
    assert "Tracked 2 object(s) from frame 2 through 8 frames" in status
    assert VideoReader(result).info.num_frames == N_FRAMES
    lines = read_frames_jsonl(files[0])
    assert [line["frame"] for line in lines] == list(range(N_FRAMES))
    assert all([o["id"] for o in line["objects"]] == [1, 2] for line in lines)  # one track per object
    first = grounder.segment(frames[2], points=[list(p) for p in disc.points] + [[80.0, 60.0]],
                             point_labels=[1, 0]).targets[0].mask
    assert np.array_equal(rle_decode(lines[2]["objects"][0]["mask"]), first)  # object 1's clicks on its frame
    second = grounder.segment(frames[2], points=[[73.0, 21.0]], point_labels=[1]).targets[0].mask
    assert np.array_equal(rle_decode(lines[2]["objects"][1]["mask"]), second)  # object 2's own click, not merged

    # A new frame drops the objects (clicks belong to the frame they were made on).
    session = video_handlers.on_frame(session, 5)[0]
    assert not session.prompted and len(session.objects.items) == 1


def test_video_errors_are_readable(video_handlers, clip, tmp_path):
    with pytest.raises(gr.Error, match="upload a video or pick an example first"):
        video_handlers.on_ask(None, "Where?", 8)
    good = clip[0].read_bytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(good[: len(good) // 2])
    out = video_handlers.on_video(None, str(broken))   # one line in the status, the input emptied
    session, status, video_input = out[0], out[4], out[-1]
    assert "'broken.mp4'" in session.status and "truncated" in session.status and "Not loaded" in str(status)
    assert str(tmp_path) not in session.status and session.path is None and video_input is None
    kept = video_handlers.on_video(session, None)   # the emptied input's own change event: the line stays
    assert kept[0].status == session.status
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 40)
    message = video_handlers.on_video(None, str(text))[0].status
    assert "the video 'notes.mp4' is not a readable video" in message
    assert "Errno" not in message and message.count("notes.mp4") == 1   # one readable line
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
    seg = client.predict(image, [[28, 40]], [1], [[10, 20, 50, 60]], api_name="/segment")  # as the README
    assert rle_decode(seg["targets"][0]["mask"]).shape == (H, W)
    two = client.predict(image, None, None, None, [{"points": [[28, 40]]}, {"box": [58, 8, 88, 38]}],
                         api_name="/segment")
    assert len(two["targets"]) == 2
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
    _, two = client.predict(handle_file(str(path)), 4, None, None, None,
                            [{"points": [list(disc_at(4))], "point_labels": [1]}, {"box": [60, 8, 86, 34]}],
                            api_name="/track_video")
    assert two["video"]["objects"] == [{"id": 1, "phrase": None}, {"id": 2, "phrase": None}]
    assert all(len(f["objects"]) == 2 for f in two["frames"])
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
    assert all(fn.concurrency_limit == 1 for fn in model_fns)
    # Every page event that changes a tab's session queues in the model's group (so a tab's events run in order);
    # only reading a video's frames and writing downloads run beside it.
    outside = {getattr(fn.fn, "__name__", None) for fn in app.fns.values()
               if fn.concurrency_id != MODEL_CONCURRENCY and fn.fn is not None}
    assert outside - {"load_example"} == {"on_downloads", "on_video", "on_frame"}, outside  # + gr.Examples
    inside = {getattr(fn.fn, "__name__", None) for fn in model_fns}
    assert {"on_input", "on_click", "on_masks", "on_ask", "on_track", "on_undo", "on_threshold"} <= inside


def test_cli_demo_command(monkeypatch, tmp_path):
    import apps.demo
    from apps.cli import DEFAULT_MODEL, app
    calls = []
    monkeypatch.setattr(apps.demo, "serve", lambda model, **kw: calls.append((model, kw)))
    result = CliRunner().invoke(app, ["demo", "--port", "7999"])
    assert result.exit_code == 0, result.output
    assert calls == [(DEFAULT_MODEL, dict(host="127.0.0.1", port=7999, device="auto", max_new_tokens=256,
                                          max_file_size="25mb", quantize=None))]
