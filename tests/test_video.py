"""Videos: streaming SAM2 tracking (equal to sam2's own predictor, bounded memory), reading/writing with clear
errors, the key-frame pipeline with its no-memory fallback, click-to-track, the CLI."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from apps.overlay import draw_overlay
from grounding.errors import PromptError, VideoError
from grounding.result import Prediction, Target, rle_decode
from grounding.video import FrameObject, FrameResult, VideoRun, predict_video, track
from grounding.video.carry import _Carried, _Reasker, match_by_iou, mask_iou_matrix
from grounding.video.io import VideoReader, VideoWriter
from segdecoder.video import ObjectPrompt, StreamingSam2Tracker

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "shapes-tiny"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lively_sam2(side: int):
    """A tiny random SAM2 (image path backend) whose object-score head says "visible": with random weights it
    would call every object absent after the key frame, and the masks to compare would all be empty."""
    from segdecoder.build import preset_spec
    from segdecoder.sam2 import Sam2Backend, build_sam2_model
    torch.manual_seed(0)
    spec = preset_spec("sam2", "tiny")
    backend = Sam2Backend(build_sam2_model(spec, side), "tiny", spec).eval()
    with torch.no_grad():
        head = [m for m in backend.sam2.sam_mask_decoder.pred_obj_score_head.modules()
                if isinstance(m, torch.nn.Linear)][-1]
        head.bias += 10.0
    return backend


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """10 frames, 64x96, of the synthetic moving shapes: (frames, annotations, folder)."""
    from shapes.scenes.synthetic_video import generate_video
    folder = generate_video(tmp_path_factory.mktemp("clip") / "v", 10, seed=3, size=(64, 96))
    ann = json.loads((folder / "annotations.json").read_text())
    frames = [np.array(Image.open(folder / f["file_name"]).convert("RGB")) for f in ann["frames"]]
    return frames, ann, folder


def gt_mask(ann, frame: int, obj: int = 0) -> np.ndarray:
    return rle_decode(ann["frames"][frame]["objects"][obj]["segmentation"])


def write_mp4(path, frames, fps=25, times=None):
    with VideoWriter(path, frames[0].shape[1], frames[0].shape[0], fps) as w:
        for i, f in enumerate(frames):
            w.write(f, None if times is None else times[i])
    return path


# ---- streaming SAM2 = sam2's SAM2VideoPredictor ---------------------------------------------------------


def test_streaming_tracker_equals_sam2_video_predictor(tmp_path):
    """40 frames, prompts on frame 2: forwards the tracker forgets memories (its window is 15 frames; frames near
    the key frame are kept for the way back, which reads them, as sam2 does)."""
    from sam2.sam2_video_predictor import SAM2VideoPredictor
    from segdecoder.sam2 import build_sam2_model
    from segdecoder.build import preset_spec
    from shapes.scenes.synthetic_video import generate_video

    folder = generate_video(tmp_path / "v", 40, seed=3, size=(64, 96))
    ann = json.loads((folder / "annotations.json").read_text())
    frames = [np.array(Image.open(folder / f["file_name"]).convert("RGB")) for f in ann["frames"]]
    tmp_path = tmp_path / "jpg"
    tmp_path.mkdir()
    backend = lively_sam2(128)
    ref = build_sam2_model(preset_spec("sam2", "tiny"), 128, model_cls=SAM2VideoPredictor).eval()
    ref.load_state_dict(backend.sam2.state_dict())
    key, n = 2, len(frames)
    mask, box, click = gt_mask(ann, key, 0), ann["frames"][key]["objects"][1]["box_xyxy"], [[20.0, 30.0]]
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"{i:05d}.jpg")
    state = ref.init_state(str(tmp_path), offload_video_to_cpu=True)
    # same pixels in: the project's preprocessing of the same frames (the comparison is of the tracking)
    state["images"] = torch.stack([backend.preprocess(f)[0] for f in frames])
    state["cached_features"] = {}
    ref.add_new_mask(state, key, 1, mask)
    ref.add_new_points_or_box(state, key, 2, box=np.array(box, np.float32), points=click, labels=[1])
    expected = {}
    for reverse in (False, True):
        for index, ids, logits in ref.propagate_in_video(state, reverse=reverse):
            expected[index] = (list(ids), logits[:, 0].clone())

    tracker = StreamingSam2Tracker.from_backend(backend, encode_batch=3)
    got = {key: tracker.start(frames[key], key, n, [ObjectPrompt(1, mask=mask),
                                                    ObjectPrompt(2, box=box, points=click, point_labels=[1])])}
    for tf in tracker.propagate((i, frames[i]) for i in range(key + 1, n)):
        got[tf.index] = tf
    for tf in tracker.propagate(((i, frames[i]) for i in range(key - 1, -1, -1)), reverse=True):
        got[tf.index] = tf

    assert sorted(got) == sorted(expected) == list(range(n))
    for index in range(n):
        ids, logits = expected[index]
        assert got[index].obj_ids == ids == [1, 2]
        for k in range(2):
            stored = state["output_dict_per_obj"][k]
            out = stored["cond_frame_outputs"].get(index) or stored["non_cond_frame_outputs"][index]
            torch.testing.assert_close(got[index].low_res_logits[k:k + 1], out["pred_masks"].float(),
                                       atol=1e-5, rtol=0)   # a forgotten memory moves them ~1e-4
        sure = logits.abs().numpy() > 1e-3
        np.testing.assert_array_equal(got[index].masks[sure], (logits.numpy() > 0)[sure])
    # the comparison is not of empty or constant masks: the objects are seen and move
    areas = [[int(got[i].masks[k].sum()) for k in range(2)] for i in range(n)]
    assert all(0 < a < 64 * 96 for row in areas for a in row), areas
    assert len({tuple(r) for r in areas}) > n // 2
    assert tracker.stats.peak_frames_held <= 3
    assert tracker.stats.peak_memory_frames <= 2 * tracker.reach + 1
    assert tracker.stats.memory_frames_now <= tracker.reach + 1 < n - 1   # memories were forgotten


def test_memory_is_bounded_on_a_200_frame_stream():
    backend = lively_sam2(64)
    n, rng = 200, np.random.default_rng(0)
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    pulled = []

    def stream(indices):
        for i in indices:
            pulled.append(i)
            yield i, np.roll(base, i, axis=1)

    for key in (0, 100):
        tracker = StreamingSam2Tracker.from_backend(backend, encode_batch=4)
        reach = tracker.model.max_obj_ptrs_in_encoder - 1
        tracker.start(np.roll(base, key, axis=1), key, n, [ObjectPrompt(1, box=[10, 10, 40, 30])])
        assert tracker.reach == reach == 15
        for direction, indices in ((False, range(key + 1, n)), (True, range(key - 1, -1, -1))):
            pulled.clear()
            for done, tf in enumerate(tracker.propagate(stream(indices), reverse=direction), start=1):
                assert len(pulled) - done <= 3, "frames are pulled at most one encoder batch ahead"
                assert tracker.stats.memory_frames_now <= 2 * reach + 1
            assert len(pulled) == len(indices)
        # cond frame + `reach` frames behind the front (+ `reach` kept beside the key frame for the other way)
        assert tracker.stats.peak_frames_held == 4
        assert tracker.stats.peak_memory_frames == (reach + 1 if key == 0 else 2 * reach + 1)
        assert tracker.stats.memory_frames_now <= reach + 1


def test_reversed_reading_holds_one_chunk(tmp_path):
    frames = [np.full((32, 48, 3), (i * 7) % 256, np.uint8) for i in range(40)]
    reader = VideoReader(write_mp4(tmp_path / "a.mp4", frames))
    forward = [f for _, f in reader.frames()]
    spans = []
    original = reader._backend.frames
    reader._backend.frames = lambda a, b: (spans.append((a, b)), original(a, b))[1]
    backward = list(reader.frames_reversed(3, 37, chunk=8))
    assert [i for i, _ in backward] == list(range(36, 2, -1))
    assert all(np.array_equal(f, forward[i]) for i, f in backward)
    assert spans == [(29, 37), (21, 29), (13, 21), (5, 13), (3, 5)]


# ---- reading and writing ----------------------------------------------------------------------------------


def test_mp4_round_trip_seeking_and_variable_frame_rate(tmp_path):
    frames = [np.full((48, 64, 3), (i * 20) % 256, np.uint8) for i in range(12)]
    reader = VideoReader(write_mp4(tmp_path / "cfr.mp4", frames, fps=25))
    assert (reader.info.num_frames, reader.info.size, reader.info.fps) == (12, (48, 64), 25.0)
    assert not reader.info.variable_frame_rate
    decoded = [f for _, f in reader.frames()]
    assert all(abs(int(d.mean()) - int(f.mean())) <= 3 for d, f in zip(decoded, frames))
    assert all(np.array_equal(f, decoded[i]) for i, f in reader.frames(7, 12))   # seek lands exactly
    assert np.array_equal(reader.read(9), decoded[9])

    times = [0.0, 0.04, 0.2, 0.24, 0.5, 0.54, 0.58, 1.0, 1.04, 1.5, 1.52, 2.0]
    vfr = VideoReader(write_mp4(tmp_path / "vfr.mp4", frames, times=times))
    assert vfr.info.variable_frame_rate and vfr.info.num_frames == 12
    assert [round(vfr.time_s(i), 3) for i in range(12)] == times
    with pytest.raises(VideoError, match="variable frame rate"):
        VideoReader(tmp_path / "vfr.mp4", strict_frame_rate=True)

    odd = VideoReader(write_mp4(tmp_path / "odd.mp4", [np.zeros((47, 63, 3), np.uint8)] * 2))
    assert odd.info.size == (48, 64)   # yuv420p: padded to even sides


def test_bad_videos_get_clear_errors(tmp_path):
    good = write_mp4(tmp_path / "good.mp4", [np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
                                             for i in range(30)])
    with pytest.raises(VideoError, match="no video file"):
        VideoReader(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        VideoReader(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("not a video\n" * 50)
    with pytest.raises(VideoError, match="not a readable video"):
        VideoReader(tmp_path / "text.mp4")
    with pytest.raises(VideoError, match="MP per frame"):
        VideoReader(good, max_pixels=64 * 47)
    zero = tmp_path / "zero.mkv"
    container = av.open(str(zero), "w", format="matroska")
    stream = container.add_stream("mpeg4", rate=25)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    container.start_encoding()
    container.close()
    with pytest.raises(VideoError, match="before its first frame"):
        VideoReader(zero)
    # the index at the front (faststart), the data cut in half: the header promises more frames than there are
    fast = tmp_path / "fast.mp4"
    container = av.open(str(fast), "w", format="mp4", options={"movflags": "faststart"})
    stream = container.add_stream("mpeg4", rate=25)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for i in range(30):
        frame = np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    data = fast.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
    with pytest.raises(VideoError, match="truncated"):
        VideoReader(tmp_path / "cut.mp4")
    # the index at the end, cut off (an interrupted recording)
    plain = good.read_bytes()
    (tmp_path / "cut2.mp4").write_bytes(plain[:len(plain) // 2])
    with pytest.raises(VideoError, match="truncated"):
        VideoReader(tmp_path / "cut2.mp4")
    with pytest.raises(VideoError, match="no frames"):
        VideoReader([])
    with pytest.raises(VideoError, match="does not exist"):
        VideoReader(good).read(30)


# ---- the pipeline -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam2_grounder():
    from grounding import Grounder
    from grounding.presets import build_random
    model, tok = build_random("tiny", {"backend": "sam2", "preset": "tiny", "image_size": 128}, seed=0)
    with torch.no_grad():
        head = [m for m in model.mask_decoder.sam2.sam_mask_decoder.pred_obj_score_head.modules()
                if isinstance(m, torch.nn.Linear)][-1]
        head.bias += 10.0
    return Grounder(model, tok, max_new_tokens=8)


@pytest.fixture(scope="module")
def default_grounder():
    from grounding import Grounder
    return Grounder.from_pretrained(DEFAULT_MODEL, device="cpu", max_new_tokens=24)


def test_predict_video_memory_mode_writes_frames_and_overlay(sam2_grounder, clip, tmp_path, monkeypatch):
    frames, ann, _ = clip
    key, n = 4, len(frames)
    big = int(np.argmax([o["area"] for o in ann["frames"][key]["objects"]]))
    seg = gt_mask(ann, key, big)
    answer = Prediction("<ref>the circle</ref>[SEG]", [Target("the circle", mask=seg)], (64, 96))
    asked = []
    monkeypatch.setattr(sam2_grounder, "predict",
                        lambda image, question, **kw: (asked.append(image.copy()), answer)[1])
    run = sam2_grounder.predict_video(frames, "Please segment the circle.", key_frame=key)
    assert run.mode == "memory" and run.objects == {1: "the circle"}
    assert len(asked) == 1 and np.array_equal(asked[0], frames[key])
    order = [fr.index for fr in run]
    assert order == [4, 5, 6, 7, 8, 9, 3, 2, 1, 0]

    paths = run.save(tmp_path / "out", draw=draw_overlay)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["frames.jsonl", "overlay.mp4", "video.json"]
    lines = [json.loads(line) for line in paths["frames"].read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(n))
    key_obj = lines[key]["objects"][0]
    assert (key_obj["id"], key_obj["phrase"]) == (1, "the circle")
    key_mask = rle_decode(key_obj["mask"])
    assert (key_mask & seg).sum() / (key_mask | seg).sum() > 0.8   # the [SEG] mask, via SAM2's S/4 logits
    assert key_obj["box"] == list(FrameResult.from_json(lines[key]).objects[0].box)
    overlay = VideoReader(paths["overlay"])
    assert (overlay.info.num_frames, overlay.info.size) == (n, (64, 96))
    shown = overlay.read(key).astype(int)
    assert np.abs(shown - frames[key]).sum(-1)[key_mask].mean() > 20   # the mask is drawn on the key frame
    summary = json.loads(paths["summary"].read_text())
    assert summary["mode"] == "memory" and summary["objects"] == [{"id": 1, "phrase": "the circle"}]


def test_nothing_half_written_when_a_job_fails(sam2_grounder, clip, tmp_path, monkeypatch):
    frames, _, _ = clip
    out = tmp_path / "out"
    out.mkdir()
    (out / "frames.jsonl").write_text("an earlier result\n")
    calls = []

    def broken_write(self, rgb, time_s=None):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
    monkeypatch.setattr(VideoWriter, "write", broken_write)
    run = track(sam2_grounder, frames, 0, box=[10, 10, 40, 40])
    with pytest.raises(OSError, match="disk full"):
        run.save(out, draw=draw_overlay)
    assert sorted(p.name for p in out.iterdir()) == ["frames.jsonl"]
    assert (out / "frames.jsonl").read_text() == "an earlier result\n"


def test_save_draws_an_overlay_only_with_a_draw_function(clip, tmp_path):
    frames, _, _ = clip
    reader = VideoReader(frames)
    mask = np.zeros(frames[0].shape[:2], bool)
    mask[10:20, 30:50] = True

    def results():   # backwards, as a job may yield them: saved in frame order all the same
        for i in reversed(range(len(frames))):
            yield FrameResult(i, reader.time_s(i), [FrameObject(1, "a box", mask, 0.5)])

    run = VideoRun(reader, results, mode="fake", key_frame=0, objects={1: "a box"})
    paths = run.save(tmp_path / "plain")
    assert sorted(paths) == ["frames", "summary"]
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["frames.jsonl", "video.json"]
    assert json.loads(paths["summary"].read_text())["files"] == {"frames": "frames.jsonl"}
    lines = [json.loads(line) for line in paths["frames"].read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(len(frames)))

    drawn = []

    def draw(rgb, prediction):
        drawn.append((rgb.shape, prediction.targets[0].box))
        return draw_overlay(rgb, prediction)

    paths = run.save(tmp_path / "drawn", draw=draw)
    assert drawn == [(frames[0].shape, (30.0, 10.0, 50.0, 20.0))] * len(frames)
    assert json.loads(paths["summary"].read_text())["files"] == {"frames": "frames.jsonl", "overlay": "overlay.mp4"}
    assert VideoReader(paths["overlay"]).info.num_frames == len(frames)


def test_click_to_track_iterates_every_frame_from_the_clicked_one(sam2_grounder, clip):
    frames, _, _ = clip
    run = track(sam2_grounder, frames, 6, points=[[30, 20]], point_labels=[1])
    results = list(run)
    assert [fr.index for fr in results] == [6, 7, 8, 9, 5, 4, 3, 2, 1, 0]
    assert all([o.obj_id for o in fr.objects] == [1] and fr.objects[0].mask.shape == (64, 96) for fr in results)
    assert run.objects == {1: None} and run.key_prediction is None
    with pytest.raises(PromptError, match="outside"):
        track(sam2_grounder, frames, 0, points=[[500, 20]])
    with pytest.raises(PromptError, match="does not exist"):
        track(sam2_grounder, frames, 10, box=[1, 1, 5, 5])
    with pytest.raises(PromptError, match="SAM2"):
        track(default_model_stub(), frames, 0, box=[1, 1, 5, 5], mode="memory")


def default_model_stub():
    class Decoder:
        backend_name = "sam"
    return type("G", (), {"model": type("M", (), {"mask_decoder": Decoder()})()})()


def test_fallback_carry_follows_shapes_from_their_first_box(default_grounder, tmp_path_factory):
    """The default model has no SAM2 memory: its decoder carries each shape from its first-frame box. J (mean
    IoU over frames) on two synthetic videos must stay well above chance."""
    from shapes.scenes.synthetic_video import generate_video
    from grounding.video.evaluate import iou
    scores = []
    for seed in (11, 12):
        folder = generate_video(tmp_path_factory.mktemp("carry") / "v", 8, seed=seed, size=(120, 160))
        ann = json.loads((folder / "annotations.json").read_text())
        for k, obj in enumerate(ann["frames"][0]["objects"]):
            run = track(default_grounder, folder, 0, box=obj["box_xyxy"])
            assert run.mode == "carry"
            for fr in run:
                scores.append(iou(fr.objects[0].mask, gt_mask(ann, fr.index, k)))
    assert np.mean(scores) > 0.5, np.mean(scores)


def test_reask_mode_relinks_and_adds_objects_the_vlm_names_later(default_grounder, tmp_path, monkeypatch):
    """SAM v1 decoder (no memory): the answers on frames 0 and 2 name object A; re-asked on frame 4 the VLM names A
    and a new B. A keeps id 1 (linked by IoU), B becomes object 2 from frame 4 on; backwards nothing is re-asked.
    The two largest shapes of 120x160 frames, re-asked every 2 frames: carried further, or on the 64x96 clip's
    ~11-px shapes, the default decoder's mask can drift below the link threshold (IoU 0.3), which makes it a new
    object."""
    from shapes.scenes.synthetic_video import generate_video
    folder = generate_video(tmp_path / "v", 10, seed=3, size=(120, 160))
    ann = json.loads((folder / "annotations.json").read_text())
    frames = [np.array(Image.open(folder / f["file_name"]).convert("RGB")) for f in ann["frames"]]
    a, b = np.argsort([o["area"] for o in ann["frames"][0]["objects"]])[::-1][:2]    # the two largest shapes
    answers = {0: [("the a", gt_mask(ann, 0, a))], 2: [("the a", gt_mask(ann, 2, a))],
               4: [("the b", gt_mask(ann, 4, b)), ("the a", gt_mask(ann, 4, a))],
               **{i: [("the a", gt_mask(ann, i, a)), ("the b", gt_mask(ann, i, b))] for i in (6, 8)}}
    asked = []

    def fake_predict(image, question, **kw):
        index = next(i for i, f in enumerate(frames) if np.array_equal(f, image))
        asked.append(index)
        return Prediction("", [Target(p, mask=m) for p, m in answers[index]], (120, 160))
    monkeypatch.setattr(default_grounder, "predict", fake_predict)
    run = predict_video(default_grounder, frames, "Please segment a and b.", 0, every=2, max_misses=1)
    results = {fr.index: fr for fr in run}
    assert run.mode == "reask" and asked == [0, 2, 4, 6, 8]
    assert run.objects == {1: "the a", 2: "the b"}
    assert [[o.obj_id for o in results[i].objects] for i in range(10)] == [[1]] * 4 + [[1, 2]] * 6
    assert np.array_equal(results[4].objects[0].mask, gt_mask(ann, 4, a))   # re-anchored to the VLM's mask
    assert np.array_equal(results[4].objects[1].mask, gt_mask(ann, 4, b))


def test_variable_frame_rate_file_keeps_its_timestamps_end_to_end(sam2_grounder, clip, tmp_path):
    frames, _, _ = clip
    times = [0.0, 0.05, 0.3, 0.35, 0.4, 0.9, 0.95, 1.0, 1.6, 1.65]
    video = write_mp4(tmp_path / "vfr.mp4", frames, times=times)
    run = track(sam2_grounder, video, 7, box=[20, 10, 60, 50], chunk=3)   # backwards from 7 in chunks of 3
    paths = run.save(tmp_path / "out", draw=draw_overlay)
    lines = [json.loads(line) for line in paths["frames"].read_text().splitlines()]
    assert [line["time_s"] for line in lines] == times
    overlay = VideoReader(paths["overlay"])
    assert [round(overlay.time_s(i), 3) for i in range(len(frames))] == times
    assert json.loads(paths["summary"].read_text())["variable_frame_rate"] is True


def test_reask_links_by_iou_adds_new_targets_and_drops_unconfirmed():
    def square(x, y, s=10):
        m = np.zeros((60, 80), bool)
        m[y:y + s, x:x + s] = True
        return m
    a, b = _Carried(1, "a", square(5, 5), last_seen=square(5, 5)), _Carried(2, "b", square(50, 30))
    b.misses = 2
    reasker = _Reasker(grounder=None, question="q", every=4, min_iou=0.3, max_misses=2, max_new_tokens=None)
    fresh = []
    kept = reasker.link([a, b], [("c", square(40, 40)), ("a2", square(6, 6))],
                        new_id=lambda phrase: (fresh.append(phrase), 3)[1])
    assert [o.obj_id for o in kept] == [1, 3] and fresh == ["c"]
    assert np.array_equal(kept[0].mask, square(6, 6)) and kept[0].misses == 0   # drift reset to the VLM's mask
    assert reasker.due(8) and not reasker.due(6)


def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(0)
    for rows, cols in itertools.product(range(1, 6), repeat=2):
        for _ in range(3):
            iou = rng.random((rows, cols)) * (rng.random((rows, cols)) > 0.3)
            pairs = match_by_iou(iou, 0.0)
            assert len({i for i, _ in pairs}) == len(pairs) == len({j for _, j in pairs}) == min(rows, cols)
            best = _brute(iou)
            assert sum(iou[i, j] for i, j in pairs) == pytest.approx(best)
    masks = [np.eye(4, dtype=bool), np.ones((4, 4), bool)]
    assert mask_iou_matrix(masks, masks[::-1]).round(3).tolist() == [[0.25, 1.0], [1.0, 0.25]]
    assert match_by_iou(np.array([[0.9, 0.1], [0.8, 0.2]]), 0.3) == [(0, 0)]


def _brute(iou: np.ndarray) -> float:
    """Largest total IoU over every one-to-one pairing of min(rows, cols) rows and columns."""
    rows, cols = iou.shape
    k = min(rows, cols)
    return max(sum(iou[i, j] for i, j in zip(r, c))
               for r in itertools.combinations(range(rows), k) for c in itertools.permutations(range(cols), k))


# ---- the command line -------------------------------------------------------------------------------------


def test_cli_predict_video_with_the_default_model(clip, tmp_path):
    frames, _, _ = clip
    video = write_mp4(tmp_path / "clip.mp4", frames, fps=8)
    out = tmp_path / "out"
    run = lambda *args: subprocess.run([sys.executable, "-m", "apps.cli", "predict", *map(str, args)],
                                       capture_output=True, text=True, timeout=300)
    r = run("--video", video, "--question", "Please segment the circle.", "--out", out, "--device", "cpu",
            "--max-new-tokens", "24", "--every", "4")
    assert r.returncode == 0, r.stderr
    assert "mode reask" in r.stdout
    lines = (out / "frames.jsonl").read_text().splitlines()
    assert [json.loads(line)["frame"] for line in lines] == list(range(len(frames)))
    assert VideoReader(out / "overlay.mp4").info.num_frames == len(frames)
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 1000)
    r = run("--video", tmp_path / "bad.mp4", "--question", "Where?", "--out", tmp_path / "o2", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "not a readable video" in r.stderr
    assert not (tmp_path / "o2" / "frames.jsonl").exists()
