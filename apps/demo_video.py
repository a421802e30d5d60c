"""The web app's Video tab, without the page: one function per user action, testable without a browser.

What a user does: upload a video (or pick ``examples/*.mp4``); the frame slider shows one frame; a question about
that frame runs :func:`grounding.video.predict_video` with it as the key frame (the VLM answers on it and every
object its answer names is carried through the whole video); clicks on the shown frame (object + / background -)
show their mask at once (mask decoder only) and **Track** runs :func:`grounding.video.track` from that frame.
Each job's ``VideoRun.save`` writes ``overlay.mp4`` (shown in the result player), ``frames.jsonl`` and
``video.json`` (the downloads) into a fresh folder of the app's :class:`~apps.demo_handlers.DownloadFolder`.

UI handlers return :data:`VIDEO_VIEW`; ``on_video`` also returns the frame slider's update. The API handlers
(``/ground_video``, ``/track_video``) return ``(overlay.mp4, {"video": video.json, "frames": [frames.jsonl
lines]})``.

A job (the VLM's answer, tracking, writing) runs whole under the model lock (``ModelService.run``): the tracker
calls the mask decoder on every frame while the run is iterated. Frames done of the total go to ``gr.Progress``
at most every 0.25 s. Videos are opened with grounding.video.io's checks; a missing, corrupt, truncated or
oversized video is a VideoError, shown as its one-line message with the server's path replaced by the file name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import numpy as np

from apps.demo_handlers import (MODES, DownloadFolder, ModelService, _api_objects, _click_xy, _json_list,
                                answer_pieces, check_max_new_tokens, check_question, object_choices, user_errors)
from apps.demo_objects import Objects, colour_of
from apps.overlay import draw_masks, draw_overlay
from grounding.errors import PromptError, VideoError
from grounding.result import Prediction
from grounding.video import VideoRun, predict_video, track_objects
from grounding.video.io import DEFAULT_MAX_VIDEO_PIXELS, VideoInfo, VideoReader
from segdecoder.video import ObjectPrompt

VIDEO_VIEW = ("session", "frame", "result", "answer", "status", "downloads", "objects")
PROGRESS_EVERY_S = 0.25
_KEEP = object()  # "leave this output as it is" in _view


@dataclass
class VideoSession:
    """One browser tab's video, shown frame, the objects clicked on it and the last answer (kept in a
    ``gr.State``; replaced, never changed in place). Objects' clicks and masks are in the frame's pixels."""

    path: str | None = None
    info: VideoInfo | None = None
    index: int = 0                              # the shown frame: the key frame of the next job
    frame: np.ndarray | None = None             # its pixels, RGB H x W x 3
    objects: Objects = field(default_factory=Objects)  # each object's clicks and mask (decoder only) on it
    answer: Prediction | None = None            # the last question's answer, on frame answer_frame
    answer_frame: int | None = None
    status: str = ""

    @property
    def prompted(self) -> list[int]:
        """Indices of the objects with clicks (the ones Track follows)."""
        return [i for i, o in enumerate(self.objects.items) if o.points]


def render_frame(session: VideoSession) -> np.ndarray | None:
    """The shown frame with the clicks and their mask, or (on the key frame of the last answer) the answer's."""
    if session.frame is None:
        return None
    if not session.prompted and session.answer is not None and session.answer_frame == session.index:
        return draw_overlay(session.frame, session.answer)
    objs = session.objects
    return draw_masks(session.frame, [o.mask for o in objs.items], [colour_of(o, i) for i, o in enumerate(objs.items)],
                      points=objs.current.points, point_labels=objs.current.labels,
                      emphasis=objs.active if len(objs.items) > 1 else None)


class VideoHandlers:
    """The Video tab's actions. ``max_pixels``: the largest frame accepted (pixels per frame)."""

    def __init__(self, service: ModelService, downloads: DownloadFolder, default_max_new_tokens: int = 256,
                 max_pixels: int = DEFAULT_MAX_VIDEO_PIXELS):
        self.service, self.downloads = service, downloads
        self.default_max_new_tokens, self.max_pixels = default_max_new_tokens, max_pixels
        # Opening a video demuxes it once (to count frames): keep the last few open for the slider and the jobs.
        self._readers: OrderedDict[tuple, VideoReader] = OrderedDict()
        self._readers_lock = threading.Lock()

    # ---- UI ------------------------------------------------------------------------------------------
    @user_errors
    def on_video(self, session: VideoSession | None, path: str | None):
        """A new video (upload or example): show its frame 0 and size the slider; nothing: clear the tab (keeping
        the line that says why a file was refused). A file that is no readable video: one line (status and a
        warning) and the input emptied, ready for the next file.
        -> the view, then the frame slider's update, then the video input's."""
        if not path:
            kept = session.status if session is not None and session.path is None else ""
            return (*self._view(VideoSession(status=kept), result=None, answer=None, downloads=None),
                    gr.update(value=0, maximum=1, interactive=False), gr.update())
        try:
            reader = self._reader(path)
            with _named(path):
                frame = reader.read(0)
        except VideoError as err:
            message = " ".join(str(err).split())
            gr.Warning(message)
            return (*self._view(VideoSession(status=f"**Not loaded:** {message}"), result=None, answer=None,
                                downloads=None), gr.update(value=0, maximum=1, interactive=False), None)
        info = reader.info
        session = VideoSession(path=str(path), info=info, frame=frame, status=(
            f"Video {info.width}x{info.height}, {info.num_frames} frames, {info.fps:.3g} fps. Pick a frame, then ask "
            "about it (the answer's objects are tracked through the video) or click on it and press Track."))
        slider = gr.update(minimum=0, maximum=max(info.num_frames - 1, 1), value=0, step=1,
                           interactive=info.num_frames > 1)
        return (*self._view(session, result=None, answer=None, downloads=None), slider, gr.update())

    @user_errors
    def on_frame(self, session: VideoSession | None, index: float):
        """The frame slider moved: show that frame; clicks belong to a frame, so they are dropped."""
        session = self._need_video(session)
        i = _frame_number(index, session.info)
        if i == session.index and session.frame is not None:
            return (session, *(gr.update() for _ in VIDEO_VIEW[1:]))
        with _named(session.path):
            frame = self._reader(session.path).read(i)
        session = dataclasses.replace(session, index=i, frame=frame, objects=Objects(), status=(
            f"Frame {i} of {session.info.num_frames} ({self._time(session, i):.2f} s): ask about it, or click on "
            "it and press Track."))
        return self._view(session)

    @user_errors
    def on_click(self, session: VideoSession | None, mode: str, evt: gr.SelectData):
        """A click on the shown frame adds an object / background point to the current object; its mask (decoder
        only) is shown."""
        session = self._need_video(session)
        if mode not in MODES:
            raise PromptError(f"unknown click mode {mode!r}; choose one of {', '.join(MODES)}")
        x, y = _click_xy(evt, session.info.size)
        objects = session.objects.add_click(x, y, 1 if mode == "positive" else 0)
        obj, i = objects.current, objects.active
        preview = self.service.segment(session.frame, [list(p) for p in obj.points], list(obj.labels), click=True)
        target = preview.targets[0] if preview.targets else None
        objects = objects.with_mask(i, None if target is None else target.mask,
                                    None if target is None else target.score, obj.key, session.frame)
        return self._view(dataclasses.replace(session, objects=objects, status=(
            f"Frame {session.index}, object {i + 1}: {obj.prompt_text()}, mask {objects.current.area:,} px. "
            "New object for another one; Track follows them all through the video.")))

    @user_errors
    def on_new_object(self, session: VideoSession | None):
        session = self._need_video(session)
        objects = session.objects.new_object()
        return self._view(dataclasses.replace(session, objects=objects, status=(
            f"Object {objects.active + 1}: click on it.")))

    @user_errors
    def on_select(self, session: VideoSession | None, index: Any):
        session = self._need_video(session)
        try:
            objects = session.objects.select(int(index))
        except (TypeError, ValueError):
            raise PromptError(f"choose an object from the list, got {index!r}") from None
        return self._view(dataclasses.replace(session, objects=objects, status=(
            f"Object {objects.active + 1} chosen: new clicks go to it.")))

    @user_errors
    def on_undo(self, session: VideoSession | None):
        session = self._need_video(session)
        return self._view(dataclasses.replace(session, objects=session.objects.undo(), status="Undone."))

    @user_errors
    def on_clear(self, session: VideoSession | None):
        """Forget every object clicked on the shown frame."""
        session = self._need_video(session)
        return self._view(dataclasses.replace(session, objects=session.objects.clear_all(),
                                              status="Objects cleared (Undo brings them back)."))

    @user_errors
    def on_ask(self, session: VideoSession | None, question: str, max_new_tokens: float,
               progress=gr.Progress()):
        """The question about the shown frame; every object of the answer is tracked through the video."""
        session = self._need_video(session)
        question = check_question(question)
        tokens = check_max_new_tokens(max_new_tokens)
        reader = self._reader(session.path)
        key = session.index
        run, files, seen, seconds = self._job(session.path, lambda g: predict_video(
            g, reader, question, key_frame=key, max_new_tokens=tokens), progress, "Tracking the answer's objects")
        prediction = run.key_prediction
        raw = prediction.answer.replace("`", "'")
        lines = [f"Answered on frame {key} and tracked {len(run.objects)} object(s) through "
                 f"{run.info.num_frames} frames in {seconds:.1f} s ({run.mode} mode)."]
        lines += [f"Object {i} ({phrase or 'no phrase'}): visible on {seen.get(i, 0)} of {run.info.num_frames} "
                  "frames." for i, phrase in sorted(run.objects.items())]
        lines.append(f"Model output: `{raw}`" if raw.strip() else "Model output: (empty)")
        lines += [f"Note: {n}" for n in run.notes]
        session = dataclasses.replace(session, objects=Objects(), answer=prediction, answer_frame=key,
                                      status="  \n".join(lines))
        return self._view(session, result=str(files["overlay"]), answer=answer_pieces(prediction) or None,
                          downloads=[str(files["frames"]), str(files["summary"])])

    @user_errors
    def on_track(self, session: VideoSession | None, progress=gr.Progress()):
        """Track every clicked object from the shown frame through the whole video, one track each (object i of
        the list is track id i + 1; no language model)."""
        session = self._need_video(session)
        todo = session.prompted
        if not todo:
            raise PromptError("click on the object in the frame first: there is nothing to track")
        reader = self._reader(session.path)
        key = session.index
        prompts = [ObjectPrompt(i + 1, points=[list(p) for p in o.points], point_labels=list(o.labels))
                   for i, o in ((i, session.objects.items[i]) for i in todo)]
        run, files, seen, seconds = self._job(session.path, lambda g: track_objects(g, reader, key, prompts),
                                              progress, "Tracking the clicked objects")
        n = run.info.num_frames
        lines = [f"Tracked {len(todo)} object(s) from frame {key} through {n} frames in {seconds:.1f} s "
                 f"({run.mode} mode)."]
        lines += [f"Object {i + 1} ({session.objects.items[i].prompt_text()}): visible on {seen.get(i + 1, 0)} of "
                  f"{n} frames." for i in todo]
        session = dataclasses.replace(session, status="  \n".join(lines))
        return self._view(session, result=str(files["overlay"]), answer=None,
                          downloads=[str(files["frames"]), str(files["summary"])])

    # ---- API -----------------------------------------------------------------------------------------
    @user_errors
    def api_ground_video(self, video: str | None, question: str, key_frame: float | None = 0,
                         max_new_tokens: float | None = None) -> tuple[str, dict]:
        """A question about frame ``key_frame`` -> (overlay.mp4, {"video": video.json, "frames": [...]})."""
        check_question(question)
        tokens = check_max_new_tokens(self.default_max_new_tokens if max_new_tokens is None else max_new_tokens)
        reader = self._api_reader(video)
        key = _frame_number(0 if key_frame is None else key_frame, reader.info)
        _, files, _, _ = self._job(video, lambda g: predict_video(g, reader, question, key_frame=key,
                                                                 max_new_tokens=tokens))
        return _api_result(files)

    @user_errors
    def api_track_video(self, video: str | None, frame_index: float | None = 0, points: Any = None,
                        point_labels: Any = None, box: Any = None, objects: Any = None) -> tuple[str, dict]:
        """Clicks (pixel ``[[x, y], ...]``, labels ``[1/0, ...]``) and/or a box ``[x1, y1, x2, y2]`` on frame
        ``frame_index`` -> one object (id 1) tracked through the video; or ``objects``, a list of ``{"points",
        "point_labels", "box"}``: object i is track id i + 1. -> (overlay.mp4, {"video": ..., "frames": [...]})."""
        reader = self._api_reader(video)
        key = _frame_number(0 if frame_index is None else frame_index, reader.info)
        many = _json_list(objects, "objects")
        if many is not None:
            if any(v not in (None, "", []) for v in (points, point_labels, box)):
                raise PromptError("give points / point_labels / box for one object, or objects, not both")
            prompts = [ObjectPrompt(i + 1, points=p, point_labels=lab, box=b)
                       for i, (p, lab, b) in enumerate(_api_objects(many))]
        else:
            points, labels, box = _json_list(points, "points"), _json_list(point_labels, "point_labels"), _json_list(
                box, "box")
            if points is None and box is None:
                raise PromptError("give points and/or a box on the frame: there is nothing to track")
            prompts = [ObjectPrompt(1, points=points, point_labels=labels, box=box)]
        _, files, _, _ = self._job(video, lambda g: track_objects(g, reader, key, prompts))
        return _api_result(files)

    # ---- helpers -------------------------------------------------------------------------------------
    def _job(self, path: str, start, progress=None, desc: str = "Tracking"):
        """Run ``start(grounder) -> VideoRun`` and save it, all under the model lock. -> (run, files, visible
        frames per object id, seconds)."""
        seen: dict[int, int] = {}
        t0 = time.perf_counter()

        def job(grounder):
            run = start(grounder)
            return run, _reporting(run, progress, desc, seen).save(self.downloads.new_folder(), draw=draw_overlay)

        with _named(path):
            run, files = self.service.run(job)
        return run, files, seen, time.perf_counter() - t0

    def _reader(self, path: str) -> VideoReader:
        """The video at ``path``, opened (and checked) once while it is among the last four used."""
        stat = os.stat(path) if os.path.isfile(path) else None
        key = (str(path), None if stat is None else (stat.st_size, stat.st_mtime_ns))
        with self._readers_lock:
            if key in self._readers:
                self._readers.move_to_end(key)
                return self._readers[key]
        with _named(path):
            reader = VideoReader(path, max_pixels=self.max_pixels)
        with self._readers_lock:
            self._readers[key] = reader
            while len(self._readers) > 4:
                self._readers.popitem(last=False)
        return reader

    def _api_reader(self, video: str | None) -> VideoReader:
        if not video:
            raise VideoError("no video was given: upload one")
        return self._reader(video)

    @staticmethod
    def _need_video(session: VideoSession | None) -> VideoSession:
        """A copy of the session to change (a failed action leaves the stored one as it was)."""
        if session is None or session.path is None or session.frame is None:
            raise VideoError("upload a video or pick an example first")
        return session

    def _time(self, session: VideoSession, index: int) -> float:
        return self._reader(session.path).time_s(index)

    def _view(self, session: VideoSession, result: Any = _KEEP, answer: Any = _KEEP, downloads: Any = _KEEP) -> tuple:
        keep = lambda v: gr.update() if v is _KEEP else v
        objects = object_choices(session.objects) if session.frame is not None else gr.update(choices=[], value=None)
        return (session, self.downloads.picture(render_frame(session)), keep(result), keep(answer), session.status,
                keep(downloads), objects)


def _reporting(run: VideoRun, progress, desc: str, seen: dict[int, int]) -> VideoRun:
    """``run`` whose iteration also reports progress and counts, per object id, the frames it is visible on."""
    total = run.info.num_frames

    def frames() -> Iterator:
        seen.clear()
        last = 0.0
        for done, result in enumerate(run, 1):
            for o in result.objects:
                if o.mask.any():
                    seen[o.obj_id] = seen.get(o.obj_id, 0) + 1
            now = time.monotonic()
            if progress is not None and (now - last >= PROGRESS_EVERY_S or done == total):
                progress((done, total), desc=desc, unit="frames")
                last = now
            yield result

    return _AppRun(run.reader, frames, mode=run.mode, key_frame=run.key_frame, objects=run.objects,
                   question=run.question, key_prediction=run.key_prediction, notes=run.notes)


class _AppRun(VideoRun):
    """A run whose video.json names the video by its file name: uploads live in the server's temporary tree."""

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "video": Path(self.info.name).name}


def _api_result(files: dict[str, Path]) -> tuple[str, dict]:
    frames = [json.loads(line) for line in files["frames"].read_text(encoding="utf-8").splitlines() if line]
    return str(files["overlay"]), {"video": json.loads(files["summary"].read_text(encoding="utf-8")),
                                   "frames": frames}


def _frame_number(value: Any, info: VideoInfo) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PromptError(f"a frame number must be a whole number, got {value!r}") from None
    if not number.is_integer() or not 0 <= number < info.num_frames:
        raise PromptError(f"frame {value!r} does not exist: the video has {info.num_frames} frames "
                          f"(0..{info.num_frames - 1})")
    return int(number)


@contextmanager
def _named(path: str | os.PathLike | None) -> Iterator[None]:
    """VideoErrors about ``path`` name the file, not the server's folders (uploads live in a temporary tree)."""
    try:
        yield
    except VideoError as err:
        if path is None:
            raise
        message = str(err).replace(str(path), f"the video {Path(str(path)).name!r}")
        raise VideoError(message) from None

