"""Videos in ``groundseg annotate`` (apps/annotate.py): which files are videos, the per-video job, and a video's
result as per-frame annotations.

Which files. A file that is not an image is a video when PyAV (FFmpeg) opens it and finds a video stream that is
not a still picture (cover art, an image-pipe or text-art "video"), whatever its name; a file with a video
extension (:data:`VIDEO_SUFFIXES`) that cannot be read is reported in errors.jsonl like a broken image. The
image test comes first, so anything Pillow reads is an image: an animated GIF (or APNG, animated WebP) is
annotated as one image, its first frame (convert it to .mp4 to annotate it as a video).

The job. For each prompt, the video gets the same question on its frame 0 through ``grounder.predict_video``
(grounding/video/predict.py: the targets are carried through every frame, SAM2 memory or re-asking every
``--video-every`` frames), so every object keeps one id across frames. A video's result is one file
(``results/a/clip.mp4.json``), so resume works per video.

The output. Frame ``i`` of ``a/clip.mp4`` is the image ``a/clip.mp4/{i:06d}.png`` in every format
(apps/exporters.py: COCO ``videos``, ``video_id``, ``frame_id``, ``track_id``; one YOLO / LabelMe file per
frame); ``overlays/a/clip.mp4.mp4`` draws each object in its own colour.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

from apps.annotate_common import (VIDEO, VIDEO_KEY_FRAME, Item, Settings, overlay_path, question_for, read_record,
                                  record_path, write_record)
from apps.exporters import AnnotatedImage, FrameOf, Instance, frame_file
from apps.overlay import draw_overlay
from grounding.errors import VideoError
from grounding.result import Prediction, Target, box_from_mask, rle_decode
from grounding.video.io import VideoReader, VideoWriter

# Names that promise a video: such a file that FFmpeg cannot read is reported, not skipped. (Not .ts / .mts,
# which are TypeScript sources as often as MPEG transport streams; real ones are found by content.)
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".wmv", ".flv", ".mpg", ".mpeg",
                            ".m2ts", ".3gp", ".ogv"})
# FFmpeg "videos" that are pictures or text: single-image demuxers (image2, *_pipe) and text art (tty).
_STILL_FORMATS = frozenset({"image2", "tty", "bin", "adf", "idf", "xbin"})
_TEXT_CODECS = frozenset({"ansi", "bintext", "idf", "xbin"})


def is_video(path: Path) -> bool:
    """Whether FFmpeg (PyAV) opens ``path`` and finds a moving-picture stream in it: not a cover picture
    (``attached_pic``), not a single-image demuxer (``image2``, ``*_pipe``: a PNG is not a one-frame video) and
    not text art. Only the container's header is read; no frame is decoded."""
    import av

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError):
        return False
    try:
        names = set(container.format.name.split(","))
        if names & _STILL_FORMATS or any(n.endswith("_pipe") for n in names):
            return False
        for stream in container.streams.video:
            still = int(stream.disposition) & int(av.stream.Disposition.attached_pic)
            if not still and stream.codec_context.name not in _TEXT_CODECS:
                return True
        return False
    finally:
        container.close()


def annotate_one_video(settings: Settings, item: Item, grounder) -> None:
    """Every prompt's question on frame 0, its objects carried through the video; one result file per video.
    A video that cannot be read (at the start or midway) is an error record, like an unreadable image."""
    path = Path(settings.input_dir) / item.file
    try:
        reader = VideoReader(path)
        if item.overlay_only:
            record = read_record(record_path(settings, item.file)) or {}
        else:
            info = reader.info
            record = {"status": "ok", "kind": VIDEO, "video": {"width": info.width, "height": info.height,
                                                               "num_frames": info.num_frames, "fps": info.fps},
                      "runs": [_video_run(grounder, reader, prompt, settings.video_every)
                               for prompt in settings.prompts]}
        if settings.overlays:
            _write_video_overlay(settings, item.file, reader, record["runs"])
    except VideoError as err:
        record = {"status": "error", "kind": VIDEO, "reason": str(err).replace(str(path), item.file)}
    if item.overlay_only and record["status"] == "ok":
        return
    write_record(settings, item, record)


def _video_run(grounder, reader, prompt: str, every: int) -> dict:
    run = grounder.predict_video(reader, question_for(prompt), VIDEO_KEY_FRAME, every=every)
    frames = sorted((result.to_json() for result in run), key=lambda f: f["frame"])  # key frame first: sort
    return {"question": run.question, "answer": None if run.key_prediction is None else run.key_prediction.answer,
            "mode": run.mode, "objects": [{"id": k, "phrase": v} for k, v in sorted(run.objects.items())],
            "notes": list(run.notes), "frames": frames}


def _visible_objects(runs: list[dict]) -> tuple[dict[int, list[tuple[int, dict]]], list[tuple[int, int]]]:
    """-> (per frame index: its (prompt index, object) pairs with a non-empty mask, prompt by prompt;
    every (prompt index, object id) among them, sorted). Objects never visible are in neither."""
    by_frame: dict[int, list[tuple[int, dict]]] = {}
    for category, run in enumerate(runs):
        for frame in run["frames"]:
            by_frame.setdefault(frame["frame"], []).extend((category, o) for o in frame["objects"] if o["area"] > 0)
    keys = sorted({(category, o["id"]) for found in by_frame.values() for category, o in found})
    return by_frame, keys


def video_frames(file: str, record: dict, first_track: int) -> tuple[Iterator[AnnotatedImage], list[tuple[int, int]]]:
    """A video's result as one AnnotatedImage per frame (masks decoded one frame at a time) and the
    (prompt index, object id) of each of its tracks in order: the track ids are ``first_track``, ``+1``, ...
    Objects never visible get no track."""
    info = record["video"]
    width, height, length = info["width"], info["height"], info["num_frames"]
    by_frame, keys = _visible_objects(record["runs"])
    track = {key: first_track + i for i, key in enumerate(keys)}

    def images() -> Iterator[AnnotatedImage]:
        for index in range(length):
            found = sorted(by_frame.get(index, []), key=lambda f: track[f[0], f[1]["id"]])
            instances = [Instance(category, rle_decode(o["mask"]), None, o["score"], track[category, o["id"]])
                         for category, o in found]
            yield AnnotatedImage(frame_file(file, index), width, height, instances, FrameOf(file, index, length))

    return images(), keys


def _write_video_overlay(settings: Settings, file: str, reader, runs: list[dict]) -> None:
    """overlays/<video>.mp4: every object of every prompt on every frame, one colour per object, written under a
    temporary name (cleaned up by the next run if this one is killed) and renamed."""
    final = overlay_path(settings, file, VIDEO)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    by_frame, keys = _visible_objects(runs)
    colours = {key: i for i, key in enumerate(keys)}
    info = reader.info
    try:
        with VideoWriter(temporary, info.width, info.height, info.fps) as writer:
            for index, rgb in reader.frames():
                targets = [Target() for _ in colours]
                for category, o in by_frame.get(index, []):
                    mask = rle_decode(o["mask"])
                    targets[colours[category, o["id"]]] = Target(settings.prompts[category], box_from_mask(mask),
                                                                 mask, o["score"])
                writer.write(draw_overlay(rgb, Prediction("", targets, info.size)), time_s=reader.time_s(index))
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
