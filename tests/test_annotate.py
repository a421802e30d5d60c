"""``groundseg annotate``: files a user can load (COCO, YOLO-seg, LabelMe) holding the masks the model gave,
unreadable files reported, resume after kill -9, identical output with 1 or 2 worker processes; videos as
per-frame annotations with track ids.

Most tests use a fake grounder whose masks are known (the pixels of the prompt's colour); end-to-end tests
run the tiny random checkpoint to prove the wiring, the worker processes and the video pipeline."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from apps.annotate import (LOCK_FILE, AnnotateError, annotate_folder, parse_formats, question_for,
                           read_prompts)
from apps.exporters import mask_polygons, sidecar_paths
from grounding.errors import CheckpointError, DatasetError, PromptError
from grounding.images import load_image
from grounding.result import Prediction, Target, box_from_mask
from grounding.video.io import VideoReader, VideoWriter

REPO = Path(__file__).resolve().parent.parent
FORMATS = ["coco", "yolo", "labelme"]
# Two mask prompts (the second finds two objects) and one the fake answers with a box and no mask.
PROMPTS = ["the red disc", "all blue squares", "the green box"]
COLOURS = {"the red disc": (220, 30, 30), "all blue squares": (40, 60, 230)}
FAKE_BOX = (2.5, 3.0, 20.0, 12.25)
CALLS = {"images": 0, "videos": 0, "every": None}
GOOD = ["rotated.jpg", "scan.dat", "scene.png", "sub/deeper/photo.jpg"]
BAD = {"broken/empty.png": "empty", "broken/notes.png": "not an image", "broken/truncated.png": "corrupt or truncated"}


# --------------------------------------------------------------------------- a grounder with known answers


def expected_masks(pixels: np.ndarray, prompt: str) -> list[np.ndarray]:
    """The fake's answer: one mask per connected region (>= 20 px) of the prompt's colour."""
    if prompt not in COLOURS:
        return []
    near = np.abs(pixels.astype(int) - COLOURS[prompt]).sum(axis=2) < 90
    n, labels = cv2.connectedComponents(near.astype(np.uint8), connectivity=8)
    masks = [labels == k for k in range(1, n)]
    return [m for m in masks if m.sum() >= 20]


class FakeGrounder:
    """``predict_batch`` like Grounder's; sleeps ``sleep`` s per image (to be killed mid-run)."""

    max_pixels = 10 ** 8

    def __init__(self, sleep: float = 0.0):
        self.sleep = sleep

    def predict_batch(self, queries, batch_size=8):
        CALLS["images"] += 1
        time.sleep(self.sleep)
        out = []
        for image, question in queries:
            prompt = next(p for p in PROMPTS if question_for(p) == question)
            assert question == f"Please segment {prompt}."
            size = image.shape[:2]
            if prompt == "the green box":
                targets = [Target(phrase=prompt, box=FAKE_BOX)]
            else:
                targets = [Target(phrase=prompt, box=box_from_mask(m), mask=m, score=0.875, seg_index=i)
                           for i, m in enumerate(expected_masks(image, prompt))]
            out.append(Prediction(answer="fake", targets=targets, image_size=size, question=question))
        return out

    def predict_video(self, reader, question, key_frame=0, every=8):
        """Like grounding.video.predict_video: every frame's objects are the prompt's colour regions, the k-th
        (in scan order) with id k + 1; yielded key frame first, then forwards, as the real pipeline does."""
        from grounding.video import FrameObject, FrameResult, VideoRun
        CALLS["videos"] += 1
        CALLS["every"] = every
        assert key_frame == 0
        prompt = next(p for p in PROMPTS if question_for(p) == question)
        objects: dict[int, str] = {}

        def frames():
            for index, rgb in reader.frames():
                found = [FrameObject(k + 1, prompt, m, 0.75) for k, m in enumerate(expected_masks(rgb, prompt))]
                objects.update((o.obj_id, prompt) for o in found)
                yield FrameResult(index, reader.time_s(index), found)

        answer = Prediction("fake video answer", [], reader.info.size, question)
        return VideoRun(reader, frames, mode="fake", key_frame=0, objects=objects, question=question,
                        key_prediction=answer)


def fake_factory(model_dir, device):
    return FakeGrounder(float(os.environ.get("FAKE_SLEEP", "0")))


# --------------------------------------------------------------------------- test data


def _scene(h: int, w: int, disc: tuple[int, int], squares: list[tuple[int, int, int]]) -> np.ndarray:
    img = np.full((h, w, 3), 128, np.uint8)
    cv2.circle(img, disc, 9, COLOURS["the red disc"], -1)
    for x, y, s in squares:
        cv2.rectangle(img, (x, y), (x + s, y + s), COLOURS["all blue squares"], -1)
    return img


def make_folder(root: Path) -> Path:
    """4 images (one EXIF-rotated, one PNG named .dat), 3 broken files, and files that must be ignored."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "broken").mkdir()
    (root / ".cache").mkdir()
    scene = _scene(48, 64, (18, 24), [(40, 4, 12), (40, 28, 14)])
    Image.fromarray(scene).save(root / "scene.png")
    Image.fromarray(_scene(40, 56, (40, 20), [(4, 4, 14)])).save(root / "sub/deeper/photo.jpg", quality=95)
    Image.fromarray(_scene(30, 44, (12, 14), [(28, 10, 10)])).save(root / "scan.dat", format="PNG")
    # Stored 80 wide x 40 tall; EXIF orientation 6 (rotate 90 degrees clockwise) shows it 40 x 80.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_scene(40, 80, (15, 20), [(50, 10, 16)])).save(root / "rotated.jpg", quality=95, exif=exif)
    png = (root / "scene.png").read_bytes()
    (root / "broken/truncated.png").write_bytes(png[: len(png) // 2])
    (root / "broken/empty.png").write_bytes(b"")
    (root / "broken/notes.png").write_text("these are notes, not a picture\n")
    (root / "readme.txt").write_text("not an image, not reported\n")
    Image.fromarray(scene).save(root / ".hidden.png")
    Image.fromarray(scene).save(root / ".cache" / "x.png")
    return root


N_FRAMES = 8


def write_video(path: Path, n: int = N_FRAMES, h: int = 48, w: int = 64) -> list[np.ndarray]:
    """A red disc moving right past two still blue squares (never touching), as an H.264 mp4. -> the frames
    as they decode (the fake grounder and the checks read these)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, w, h, 8) as writer:
        for i in range(n):
            writer.write(_scene(h, w, (12 + 2 * i, 30), [(44, 2, 10), (46, 30, 12)]))
    return [rgb for _, rgb in VideoReader(path).frames()]


def make_video_folder(root: Path) -> Path:
    """One image, two videos (one named .jpg), an animated GIF (an image), a PNG named .mp4 (an image), a
    truncated .mp4 and a text file named .mov (both reported)."""
    root.mkdir(parents=True)
    Image.fromarray(_scene(48, 64, (18, 24), [(40, 4, 12), (40, 28, 14)])).save(root / "scene.png")
    write_video(root / "clips" / "moving.mp4")
    data = (root / "clips" / "moving.mp4").read_bytes()
    (root / "clips" / "misnamed.jpg").write_bytes(data)
    (root / "broken").mkdir()
    (root / "broken" / "cut.mp4").write_bytes(data[: len(data) // 2])
    (root / "broken" / "notes.mov").write_text("not a video\n" * 40)
    gif = [Image.fromarray(_scene(40, 40, (10 + 8 * i, 20), [])) for i in range(3)]
    gif[0].save(root / "anim.gif", save_all=True, append_images=gif[1:], duration=100, loop=0)
    Image.fromarray(_scene(40, 40, (20, 20), [(2, 2, 10)])).save(root / "still.mp4", format="PNG")
    return root


@pytest.fixture()
def folder(tmp_path):
    return make_folder(tmp_path / "photos")


@pytest.fixture()
def fake_model(tmp_path):
    """A folder the run's signature fingerprints (the fake grounder does not read it)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "groundseg.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights v1")
    return model


def run_fake(root, out, model, prompts=PROMPTS, **kwargs):
    return annotate_folder(root, prompts, out, formats=FORMATS, overlays=True, model_dir=model,
                           grounder_factory=fake_factory, **kwargs)


def snapshot(out: Path) -> dict[str, bytes]:
    """Every non-hidden file under ``out`` (relative path -> bytes)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def fill(polygons, h: int, w: int) -> np.ndarray:
    canvas = np.zeros((h, w), np.uint8)
    cv2.fillPoly(canvas, [np.round(np.asarray(p, float)).astype(np.int32).reshape(-1, 1, 2) for p in polygons], 1)
    return canvas.astype(bool)


# --------------------------------------------------------------------------- tests


def test_formats_hold_the_known_masks_and_bad_files_are_reported(folder, fake_model, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "out"
    summary = run_fake(folder, out, fake_model)
    assert (summary.images, summary.errors, summary.done_now) == (4, 3, 7)

    coco = COCO(str(out / "instances.json"))
    assert [c["name"] for c in coco.loadCats([1, 2, 3])] == PROMPTS
    images = coco.loadImgs(sorted(coco.getImgIds()))
    assert [im["file_name"] for im in images] == GOOD  # sorted, relative; broken, hidden and .txt files absent
    yolo_names = yaml.safe_load((out / "data.yaml").read_text())["names"]
    assert yolo_names == dict(enumerate(PROMPTS))
    n_masks = 0
    for im in images:
        pixels = load_image(folder / im["file_name"])
        h, w = pixels.shape[:2]
        assert (im["height"], im["width"]) == (h, w)
        expected = [(k, m) for k, p in enumerate(PROMPTS) for m in expected_masks(pixels, p)]
        assert expected, im["file_name"]
        anns = coco.loadAnns(sorted(coco.getAnnIds(imgIds=im["id"])))
        assert len(anns) == len(expected) + 1  # + the box-only answer
        for ann, (k, mask) in zip(anns, expected):
            assert ann["category_id"] == k + 1 and ann["score"] == 0.875 and ann["iscrowd"] == 0
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            x1, y1, x2, y2 = box_from_mask(mask)
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1] and ann["area"] == mask.sum()
            n_masks += 1
        box_only = anns[-1]
        assert box_only["category_id"] == 3 and "segmentation" not in box_only
        assert box_only["bbox"] == [2.5, 3.0, 17.5, 9.25] and box_only["score"] is None

        stem = im["file_name"].rsplit(".", 1)[0]
        lines = (out / "labels" / f"{stem}.txt").read_text().splitlines()
        assert len(lines) == len(expected) + 1
        for line, (k, mask) in zip(lines, expected):
            cls, *coords = line.split()
            assert int(cls) == k and all(0.0 <= float(v) <= 1.0 for v in coords)
            assert iou(fill([np.reshape([float(v) for v in coords], (-1, 2)) * [w, h]], h, w), mask) > 0.9
        cls, *coords = lines[-1].split()
        assert cls == "2" and np.allclose(np.reshape([float(v) for v in coords], (-1, 2)) * [w, h],
                                          [[2.5, 3], [20, 3], [20, 12.25], [2.5, 12.25]], atol=1e-3)

        labelme = json.loads((out / "labelme" / f"{stem}.json").read_text())
        assert labelme["imagePath"] == Path(im["file_name"]).name and labelme["imageData"] is None
        assert (labelme["imageHeight"], labelme["imageWidth"]) == (h, w)
        for group, (k, mask) in enumerate(expected, start=1):
            shapes = [s for s in labelme["shapes"] if s["group_id"] == group]
            assert {s["label"] for s in shapes} == {PROMPTS[k]} and {s["shape_type"] for s in shapes} == {"polygon"}
            assert iou(fill([s["points"] for s in shapes], h, w), mask) > 0.9
        rect = labelme["shapes"][-1]
        assert rect["shape_type"] == "rectangle" and rect["points"] == [[2.5, 3.0], [20.0, 12.25]]

        overlay = load_image(out / "overlays" / (im["file_name"] + ".png"))
        assert overlay.shape == pixels.shape and not np.array_equal(overlay, pixels)
    assert n_masks == 9  # one disc per image + 2 + 1 + 1 + 1 squares: "all blue squares" gives 2 on scene.png

    # The EXIF-rotated JPEG is annotated upright: 40 wide, 80 tall.
    rotated = next(im for im in images if im["file_name"] == "rotated.jpg")
    assert (rotated["width"], rotated["height"]) == (40, 80)

    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["file"] for e in errors] == sorted(BAD)
    for e in errors:
        assert e["reason"].startswith(e["file"]) and BAD[e["file"]] in e["reason"], e
    assert str(tmp_path) not in (out / "errors.jsonl").read_text() + (out / "instances.json").read_text()


def test_rerun_redoes_nothing_and_changes_redo_what_they_affect(folder, fake_model, tmp_path):
    out = tmp_path / "out"
    CALLS["images"] = 0
    run_fake(folder, out, fake_model)
    assert CALLS["images"] == 4
    first = snapshot(out)

    CALLS["images"] = 0
    again = run_fake(folder, out, fake_model)
    assert CALLS["images"] == 0 and (again.done_now, again.reused) == (0, 7)
    assert snapshot(out) == first

    # an edited image (new content and mtime) is redone, alone
    Image.fromarray(_scene(48, 64, (30, 30), [(4, 4, 12)])).save(folder / "scene.png")
    stat = (folder / "scene.png").stat()
    os.utime(folder / "scene.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    run_fake(folder, out, fake_model)
    assert CALLS["images"] == 1

    # other prompts: everything is redone and the categories follow
    CALLS["images"] = 0
    run_fake(folder, out, fake_model, prompts=PROMPTS[:2])
    assert CALLS["images"] == 4
    assert [c["name"] for c in json.loads((out / "instances.json").read_text())["categories"]] == PROMPTS[:2]

    # other model weights: everything is redone (a model card edit is not a new model)
    CALLS["images"] = 0
    (fake_model / "MODEL_CARD.md").write_text("notes")
    run_fake(folder, out, fake_model, prompts=PROMPTS[:2])
    assert CALLS["images"] == 0
    (fake_model / "model.safetensors").write_bytes(b"weights v2")
    run_fake(folder, out, fake_model, prompts=PROMPTS[:2])
    assert CALLS["images"] == 4

    # a removed image leaves no labels behind
    (folder / "sub/deeper/photo.jpg").unlink()
    run_fake(folder, out, fake_model, prompts=PROMPTS[:2])
    assert not (out / "labels" / "sub").exists() and not (out / "labelme" / "sub").exists()
    assert len(json.loads((out / "instances.json").read_text())["images"]) == 3


_KILLED_RUN = """
import sys
sys.path.insert(0, {tests!r})
import test_annotate as t
t.run_fake({root!r}, {out!r}, {model!r})
"""


def test_resume_after_sigkill_gives_byte_identical_files(folder, fake_model, tmp_path):
    reference = tmp_path / "reference"
    run_fake(folder, reference, fake_model)

    out = tmp_path / "out"
    script = _KILLED_RUN.format(tests=str(REPO / "tests"), root=str(folder), out=str(out), model=str(fake_model))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "FAKE_SLEEP": "0.6"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    # the 3 broken files sort first and are quick; kill once the first image is done, 3 images remain
    while len(list((out / "results").rglob("*.json"))) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    finished = len(list((out / "results").rglob("*.json")))
    assert 4 <= finished < 7 and not (out / "instances.json").exists()
    # a temporary file as an atomic write cut by the kill would leave it
    (out / "results" / ".scene.png.json.4242.0123456789abcdef0123456789abcdef.tmp").write_text("{half")

    CALLS["images"] = 0
    resumed = run_fake(folder, out, fake_model)
    assert CALLS["images"] == 7 - finished and resumed.reused == finished
    assert snapshot(out) == snapshot(reference)
    assert not list(out.rglob("*.tmp"))


def test_cli_with_tiny_model_one_or_two_processes_give_the_same_files(tiny_dir, tmp_path):
    from pycocotools.coco import COCO

    root = tmp_path / "in"
    (root / "b").mkdir(parents=True)
    Image.fromarray(_scene(48, 64, (18, 24), [(40, 4, 12)])).save(root / "a.png")
    Image.fromarray(_scene(40, 56, (40, 20), [(4, 4, 14)])).save(root / "b" / "c.jpg")
    Image.fromarray(_scene(36, 36, (12, 12), [(20, 20, 10)])).save(root / "b" / "d.png")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    one, two = tmp_path / "one", tmp_path / "two"

    summary = annotate_folder(root, ["the red circle", "all blue shapes"], one, formats=FORMATS, num_procs=1,
                              model_dir=tiny_dir, device="cpu")
    assert (summary.images, summary.errors) == (3, 1)
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "apps.cli", "annotate", str(root), "--prompts",
                        "the red circle, all blue shapes", "--out", str(two), "--format", "coco,yolo,labelme",
                        "--num-procs", "2", "--model", str(tiny_dir), "--device", "cpu"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    seconds = time.perf_counter() - started
    assert r.returncode == 0, r.stderr
    assert "annotated 3 images (4 files processed now" in r.stdout, r.stdout
    print(f"2 processes: 4 files in {seconds:.1f} s including start-up; {r.stdout.splitlines()[0]}")

    assert snapshot(one) == snapshot(two)  # the model's answers in results/ too
    coco = COCO(str(two / "instances.json"))
    assert [im["file_name"] for im in coco.loadImgs(sorted(coco.getImgIds()))] == ["a.png", "b/c.jpg", "b/d.png"]
    record = json.loads((two / "results" / "b" / "c.jpg.json").read_text())
    assert [p["question"] for p in record["predictions"]] == ["Please segment the red circle.",
                                                              "Please segment all blue shapes."]
    assert record["image_size"] == [40, 56]


def test_user_mistakes_are_clear_errors(folder, fake_model, tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        annotate_folder(tmp_path / "nowhere", PROMPTS, tmp_path / "o", model_dir=fake_model,
                        grounder_factory=fake_factory)
    with pytest.raises(PromptError, match="--prompts"):
        read_prompts(None, None)
    with pytest.raises(PromptError, match="empty"):
        read_prompts(" , .", None)
    with pytest.raises(PromptError, match="twice"):
        read_prompts("a cat, a cat.", None)
    listing = tmp_path / "prompts.txt"
    listing.write_text("# shapes\nthe red   disc.\n\nall blue squares\n")
    assert read_prompts(None, listing) == ["the red disc", "all blue squares"]
    with pytest.raises(PromptError, match="coco, yolo, labelme"):
        parse_formats("coco,voc")
    with pytest.raises(CheckpointError, match="groundseg.json"):
        annotate_folder(folder, PROMPTS, tmp_path / "o", model_dir=tmp_path)

    out = tmp_path / "busy"
    out.mkdir()
    with open(out / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(AnnotateError, match="another groundseg annotate"):
            run_fake(folder, out, fake_model)

    r = subprocess.run([sys.executable, "-m", "apps.cli", "annotate", str(tmp_path / "nowhere"), "--prompts", "x",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "input folder not found" in r.stderr, r.stderr


def test_videos_become_per_frame_annotations_with_track_ids(tmp_path, fake_model):
    from pycocotools.coco import COCO

    root = make_video_folder(tmp_path / "media")
    out = tmp_path / "out"
    CALLS.update(images=0, videos=0)
    summary = annotate_folder(root, PROMPTS, out, formats=FORMATS, overlays=True, model_dir=fake_model,
                              grounder_factory=fake_factory, video_every=5)
    assert (summary.images, summary.videos, summary.frames, summary.errors) == (3, 2, 2 * N_FRAMES, 2)
    assert CALLS["videos"] == 2 * len(PROMPTS) and CALLS["every"] == 5 and CALLS["images"] == 3
    assert "annotated 3 images and 2 videos (16 frames)" in summary.text()

    coco = COCO(str(out / "instances.json"))
    data = json.loads((out / "instances.json").read_text())
    videos = ["clips/misnamed.jpg", "clips/moving.mp4"]
    assert data["videos"] == [{"id": i, "file_name": v, "width": 64, "height": 48, "length": N_FRAMES}
                              for i, v in enumerate(videos, 1)]
    images = coco.loadImgs(sorted(coco.getImgIds()))
    # sorted by path; the GIF and the PNG named .mp4 are images, the mp4 named .jpg a video
    assert [im["file_name"] for im in images if "video_id" not in im] == ["anim.gif", "scene.png", "still.mp4"]
    frames = [im for im in images if "video_id" in im]
    assert [(im["file_name"], im["video_id"], im["frame_id"]) for im in frames] == [
        (f"{v}/{i:06d}.png", k, i) for k, v in enumerate(videos, 1) for i in range(N_FRAMES)]
    assert all("track_id" not in a for im in images if "video_id" not in im
               for a in coco.loadAnns(coco.getAnnIds(imgIds=im["id"])))

    decoded = [rgb for _, rgb in VideoReader(root / "clips" / "moving.mp4").frames()]
    tracks: dict[int, set] = {}
    for im in frames:
        anns = coco.loadAnns(sorted(coco.getAnnIds(imgIds=im["id"])))
        expected = [(k, m) for k, p in enumerate(PROMPTS) for m in expected_masks(decoded[im["frame_id"]], p)]
        assert len(anns) == len(expected) == 3  # the disc and the two squares; "the green box" finds nothing
        for ann, (k, mask) in zip(anns, expected):
            assert ann["category_id"] == k + 1 and ann["score"] == 0.75
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            tracks.setdefault(ann["track_id"], set()).add((im["video_id"], k))
        # YOLO: one label file per frame under the video's path; LabelMe: group_id = track id
        lines = (out / "labels" / f"{im['file_name'][:-4]}.txt").read_text().splitlines()
        assert [int(line.split()[0]) for line in lines] == [k for k, _ in expected]
        labelme = json.loads((out / "labelme" / f"{im['file_name'][:-4]}.json").read_text())
        assert labelme["imagePath"] == f"{im['frame_id']:06d}.png"
        assert [s["group_id"] for s in labelme["shapes"]] == [a["track_id"] for a in anns]
    # each object keeps one id on every frame of its video; ids are unique across videos
    assert sorted(tracks) == [1, 2, 3, 4, 5, 6]
    assert all(len(owners) == 1 for owners in tracks.values())
    # images: a disc each, 2 + 1 squares, a box each; videos: one track per disc and square
    assert summary.objects == {"the red disc": 3 + 2, "all blue squares": 3 + 4, "the green box": 3}
    overlay = VideoReader(out / "overlays" / "clips" / "moving.mp4.mp4")
    assert overlay.info.num_frames == N_FRAMES and overlay.info.size == (48, 64)

    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["file"] for e in errors] == ["broken/cut.mp4", "broken/notes.mov"]
    assert "truncated" in errors[0]["reason"] and "not a readable video" in errors[1]["reason"]
    assert all(e["reason"].startswith(e["file"]) for e in errors) and str(tmp_path) not in json.dumps(errors)

    # Rerun: nothing is redone, same bytes. Another --video-every redoes the videos only.
    first = snapshot(out)
    CALLS.update(images=0, videos=0)
    again = annotate_folder(root, PROMPTS, out, formats=FORMATS, overlays=True, model_dir=fake_model,
                            grounder_factory=fake_factory, video_every=5)
    assert (CALLS["images"], CALLS["videos"], again.done_now, again.reused) == (0, 0, 0, 7)
    assert snapshot(out) == first
    overlay_mp4 = out / "overlays" / "clips" / "moving.mp4.mp4"
    overlay_mp4.unlink()  # a lost overlay is redrawn from the result, without the model
    annotate_folder(root, PROMPTS, out, formats=FORMATS, overlays=True, model_dir=fake_model,
                    grounder_factory=fake_factory, video_every=5)
    assert CALLS["videos"] == 0 and VideoReader(overlay_mp4).info.num_frames == N_FRAMES
    # (libx264's bytes vary from one encoding to the next: the overlay video is compared by its frames)
    redrawn = snapshot(out)
    assert redrawn.pop("overlays/clips/moving.mp4.mp4") and first.pop("overlays/clips/moving.mp4.mp4")
    assert redrawn == first
    annotate_folder(root, PROMPTS, out, formats=FORMATS, overlays=True, model_dir=fake_model,
                    grounder_factory=fake_factory, video_every=2)
    assert (CALLS["images"], CALLS["videos"], CALLS["every"]) == (0, 2 * len(PROMPTS), 2)


def test_tiny_model_annotates_a_video_end_to_end(tiny_dir, tmp_path, monkeypatch):
    """The real pipeline (SAM backend: re-ask mode) with the tiny checkpoint, whose random VLM names nothing:
    its answer is replaced by a box (the decoder cuts the mask from it and carries it), so tracks exist."""
    from pycocotools.coco import COCO

    from grounding import Grounder

    def boxed(self, image, question, **kwargs):
        return Prediction("<ref>the red circle</ref>", [Target("the red circle", (6.0, 18.0, 30.0, 42.0))],
                          image.shape[:2], question)

    monkeypatch.setattr(Grounder, "predict", boxed)
    root = tmp_path / "in"
    write_video(root / "clip.mp4", n=6)
    Image.fromarray(_scene(48, 64, (18, 24), [(40, 4, 12)])).save(root / "a.png")
    out = tmp_path / "out"
    summary = annotate_folder(root, ["the red circle"], out, formats=["coco"], model_dir=tiny_dir, device="cpu",
                              video_every=3)
    assert (summary.images, summary.videos, summary.frames, summary.errors) == (1, 1, 6, 0)
    record = json.loads((out / "results" / "clip.mp4.json").read_text())
    (run,) = record["runs"]
    assert run["mode"] == "reask" and run["question"] == "Please segment the red circle."
    assert [f["frame"] for f in run["frames"]] == list(range(6))
    coco = COCO(str(out / "instances.json"))
    frames = [im for im in coco.loadImgs(sorted(coco.getImgIds())) if "video_id" in im]
    assert [im["frame_id"] for im in frames] == list(range(6))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"] for im in frames]))
    assert anns and all(a["track_id"] >= 1 and coco.annToMask(a).shape == (48, 64) for a in anns)
    first = next(a for a in anns if a["image_id"] == frames[0]["id"])
    assert first["track_id"] == 1  # the key frame's object is the first track


def test_sidecar_names_and_polygons():
    assert sidecar_paths(["a/x.jpg", "a/x.png", "b/y.jpg", "z"], ".txt") == {
        "a/x.jpg": "a/x.jpg.txt", "a/x.png": "a/x.png.txt", "b/y.jpg": "b/y.txt", "z": "z.txt"}
    mask = np.zeros((20, 30), bool)
    mask[2:6, 3:8] = True    # 20 px
    mask[10:18, 12:28] = True  # 128 px: the largest part comes first
    mask[0, 29] = True       # a single pixel has no polygon
    polygons = mask_polygons(mask)
    assert len(polygons) == 2
    assert np.array_equal(fill(polygons[:1], 20, 30), np.pad(np.ones((8, 16), bool), ((10, 2), (12, 2))))
