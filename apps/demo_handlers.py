"""What the web app does, without the page: one function per user action, testable without a browser.

``apps/demo.py`` lays these out in Gradio Blocks; here every handler takes plain values (the image input's
value, a :class:`Session`, a ``gr.SelectData``) and returns plain values in the order of :data:`VIEW_OUTPUTS`.

Threading: a :class:`~grounding.Grounder` is not thread-safe (its embedding cache and the model's
modules are shared), so every model call goes through :class:`ModelService`, which holds one lock. The app's
queue also runs all model events in one concurrency group of size 1, so queued requests wait in the queue,
not on the lock; the lock is what keeps direct (unqueued) callers, tests and scripts safe too.

Mask threshold: the image tab's "Mask threshold (logit)" setting is per request. ModelService sets
``grounder.mask_threshold`` inside the lock for the one call that asked for it and restores the grounder's own
value afterwards, so one browser tab's setting never leaks into another tab's or an API client's call; the API
endpoints (and any call given ``mask_threshold=None``) use the grounder's own value (0.0 unless the server was
started with another). Masks are cut from the decoder's logits at call time (only image embeddings are cached),
so a new threshold takes effect at once.

Errors: :func:`user_errors` turns a :class:`~grounding.errors.GroundsegError` into ``gr.Error`` with the
error's own one-line message; anything else is logged with its traceback on the server and the user sees one
generic line, never a stack trace.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import re
import shutil
import threading
import math
import time
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import cv2
import gradio as gr
import numpy as np

from apps.overlay import draw_overlay, target_colour
from grounding.text.boxes import parse_answer
from grounding.errors import GroundsegError, ImageError, PromptError, QuestionError
from grounding.images import load_image
from grounding.result import Prediction, Target

log = logging.getLogger("groundseg.demo")

GENERIC_ERROR = "Something went wrong on the server; the details are in its log. Please try again."
REGION_QUESTION = "What is in this region?"  # "Ask about this region" with an empty question box
MAX_NEW_TOKENS_LIMIT = 1024
MASK_THRESHOLD_LIMIT = 20.0  # |logit|: beyond this the decoder's sigmoid is 0 or 1 to float precision
MODES = {"positive": "object point (+)", "negative": "background point (-)"}
# Target i's phrase is highlighted under the label str(i + 1) in target_colour(i): the same colour as its
# mask and box in the overlay.
HIGHLIGHT_LABELS = 64
COLOR_MAP = {str(i + 1): "#%02x%02x%02x" % target_colour(i) for i in range(HIGHLIGHT_LABELS)}
VIEW_OUTPUTS = ("session", "overlay", "answer", "status", "targets", "downloads")
_MARKUP = re.compile(r"</?ref>|</?box>|</?point>|\[SEG\]")
T = TypeVar("T")


def user_errors(fn: Callable) -> Callable:
    """Decorator: GroundsegError -> gr.Error(its message); any other exception -> logged + a generic line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except GroundsegError as err:
            raise gr.Error(" ".join(str(err).split()), print_exception=False) from None
        except Exception:
            log.exception("unexpected error in %s", getattr(fn, "__name__", "a handler"))
            raise gr.Error(GENERIC_ERROR, print_exception=False) from None

    return wrapper


# --------------------------------------------------------------------------- model access


class ModelService:
    """The one Grounder of the app behind a lock; images are loaded here so errors name the user's file."""

    def __init__(self, grounder):
        self.grounder = grounder
        self._lock = threading.Lock()

    @contextmanager
    def _model(self, mask_threshold: Any = None) -> Iterator[Any]:
        """Hold the lock, with ``grounder.mask_threshold`` set to ``mask_threshold`` for this call (None: the
        grounder's own) and restored afterwards."""
        value = None if mask_threshold is None else _mask_threshold(mask_threshold)
        with self._lock:
            own = self.grounder.mask_threshold
            if value is not None:
                self.grounder.mask_threshold = value
            try:
                yield self.grounder
            finally:
                self.grounder.mask_threshold = own

    def run(self, job: Callable[[Any], T]) -> T:
        """``job(grounder)`` under the lock: for work that calls the model many times (a video job iterates the
        tracker, which runs the mask decoder on every frame, inside ``job``)."""
        with self._model() as grounder:
            return job(grounder)

    def load(self, source: Any, name: str | None = None) -> np.ndarray:
        """Decode an image (EXIF applied) and encode it for the mask decoder now, so that the first click
        on it only runs the decoder. -> RGB uint8 ``H x W x 3``."""
        if source is None:
            raise ImageError("no image was given: upload one or pick an example")
        pixels = load_image(source, max_pixels=self.grounder.max_pixels, name=name)
        with self._lock:
            self.grounder.prepare([pixels])
        return pixels

    def segment(self, pixels: np.ndarray, points=None, point_labels=None, boxes=None,
                mask_threshold: Any = None) -> Prediction:
        with self._model(mask_threshold) as grounder:
            return grounder.segment(pixels, points=points or None, point_labels=point_labels or None,
                                    boxes=boxes or None)

    def predict(self, pixels: np.ndarray, question: str, max_new_tokens: int, points=None, point_labels=None,
                boxes=None, mask_threshold: Any = None) -> Prediction:
        check_question(question)
        tokens = check_max_new_tokens(max_new_tokens)
        with self._model(mask_threshold) as grounder:
            return grounder.predict(pixels, question, points=points or None, point_labels=point_labels or None,
                                    boxes=boxes or None, max_new_tokens=tokens)


def check_question(question: Any) -> str:
    if not isinstance(question, str) or not question.strip():
        raise QuestionError("the question is empty: type what you want to find")
    return question


def _mask_threshold(value: Any) -> float:
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise PromptError(f"the mask threshold must be a number (a decoder logit), got {value!r}") from None
    if not math.isfinite(threshold) or abs(threshold) > MASK_THRESHOLD_LIMIT:
        raise PromptError(f"the mask threshold must be a logit between {-MASK_THRESHOLD_LIMIT:g} and "
                          f"{MASK_THRESHOLD_LIMIT:g}, got {value!r}")
    return threshold


def check_max_new_tokens(value: Any) -> int:
    try:
        tokens = int(value)
    except (TypeError, ValueError):
        raise QuestionError(f"max new tokens must be a whole number, got {value!r}") from None
    if not 1 <= tokens <= MAX_NEW_TOKENS_LIMIT:
        raise QuestionError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {tokens}")
    return tokens


# --------------------------------------------------------------------------- session and view


@dataclass
class Session:
    """One browser tab's image, prompts and last result (kept in a ``gr.State``)."""

    pixels: np.ndarray | None = None
    source: str | None = None  # the image input's file: a change with the same file is a box edit
    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)  # at most one, drawn on the image input
    prediction: Prediction | None = None
    shown: list[int] | None = None  # indices of the targets drawn; None = all
    status: str = ""

    def prompt_text(self) -> str:
        pos = sum(1 for v in self.labels if v == 1)
        parts = [f"{pos} object point{'s' * (pos != 1)}"] if pos else []
        if len(self.labels) - pos:
            neg = len(self.labels) - pos
            parts.append(f"{neg} background point{'s' * (neg != 1)}")
        if self.boxes:
            parts.append("1 box")
        return " and ".join(parts) or "no prompt"


def shown_prediction(prediction: Prediction, shown: Sequence[int] | None) -> Prediction:
    """``prediction`` with the targets not in ``shown`` blanked, not removed: target i keeps index i, so
    draw_overlay gives it the same colour as its highlighted phrase."""
    if shown is None:
        return prediction
    keep = set(shown)
    targets = [t if i in keep else Target() for i, t in enumerate(prediction.targets)]
    return Prediction(prediction.answer, targets, prediction.image_size, prediction.question, prediction.notes)


def render(session: Session) -> np.ndarray | None:
    """The overlay: the shown masks and boxes, the clicks and the prompt box."""
    if session.pixels is None:
        return None
    pixels = session.pixels
    prediction = session.prediction or Prediction("", [], pixels.shape[:2])
    return draw_overlay(pixels, shown_prediction(prediction, session.shown), points=session.points or None,
                        point_labels=session.labels or None, boxes=session.boxes or None)


def answer_pieces(prediction: Prediction | None, shown: Sequence[int] | None = None) -> list[tuple[str, str | None]]:
    """The answer as HighlightedText pieces: markup removed, each ``<ref>`` phrase labelled with its target's
    number (``"1"`` for target 0, coloured by :data:`COLOR_MAP`); hidden targets' phrases are plain text."""
    if prediction is None or not prediction.answer:
        return []
    text, targets = prediction.answer, prediction.targets
    visible = set(range(len(targets))) if shown is None else set(shown)
    pieces: list[tuple[str, str | None]] = []
    pos, kept = 0, 0
    for parsed in parse_answer(text, prediction.image_size):
        # prediction.targets is parse_answer's list minus dropped targets (no box and no mask), in order.
        index = None
        if kept < len(targets) and (targets[kept].phrase, targets[kept].seg_index) == (parsed.phrase, parsed.seg_index):
            index, kept = kept, kept + 1
        start, end = parsed.span
        if start < pos:  # one phrase with several boxes: its first target names the span
            continue
        _add_plain(pieces, text[pos:start])
        words = parsed.phrase if parsed.phrase else (f"target {index + 1}" if index is not None else "")
        label = str(index + 1) if index is not None and index in visible and index < HIGHLIGHT_LABELS else None
        if words:
            pieces.append((words, label))
        pos = end
    _add_plain(pieces, text[pos:])
    return pieces


def _add_plain(pieces: list, text: str) -> None:
    text = _MARKUP.sub("", text)
    if text:
        pieces.append((text, None))


def target_choices(prediction: Prediction | None) -> list[tuple[str, int]]:
    if prediction is None:
        return []
    return [(f"{i + 1}: {t.phrase or 'mask'}", i) for i, t in enumerate(prediction.targets)]


# --------------------------------------------------------------------------- downloads


class DownloadFolder:
    """Where result files are written for the download box: one fresh sub-folder per result, removed after
    ``max_age_s`` (Gradio serves its own copy of each file, so ours are only needed briefly)."""

    def __init__(self, root: str | Path, max_age_s: float = 3600.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_age_s = max_age_s

    def write(self, prediction: Prediction) -> list[str]:
        """-> [result.json (masks as COCO RLE), masks.zip (one 0/255 PNG per target with a mask)]."""
        folder = self.new_folder()
        result = folder / "groundseg_result.json"
        result.write_text(json.dumps(prediction.to_json(), ensure_ascii=False), encoding="utf-8")
        masks = folder / "groundseg_masks.zip"
        masks.write_bytes(masks_zip(prediction))
        return [str(result), str(masks)]

    def new_folder(self) -> Path:
        """A fresh, empty sub-folder for one result's files (old ones are pruned first)."""
        self._prune()
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def _prune(self) -> None:
        cutoff = time.time() - self.max_age_s
        for child in self.root.iterdir():
            try:
                if child.stat().st_mtime < cutoff:
                    shutil.rmtree(child, ignore_errors=True)
            except OSError:
                continue  # removed by a concurrent prune


def masks_zip(prediction: Prediction) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i, target in enumerate(prediction.targets):
            if target.mask is None:
                continue
            slug = re.sub(r"[^A-Za-z0-9]+", "_", target.phrase or "mask").strip("_")[:40] or "mask"
            ok, png = cv2.imencode(".png", target.mask.astype(np.uint8) * 255)
            if not ok:
                raise ImageError(f"could not encode the mask of target {i + 1} as PNG")
            archive.writestr(f"target_{i + 1:02d}_{slug}.png", png.tobytes())
    return buffer.getvalue()


# --------------------------------------------------------------------------- the handlers


class DemoHandlers:
    """The app's actions. UI handlers return :data:`VIEW_OUTPUTS`; API handlers return the result JSON."""

    def __init__(self, service: ModelService, downloads: DownloadFolder, default_max_new_tokens: int = 128):
        self.service = service
        self.downloads = downloads
        self.default_max_new_tokens = default_max_new_tokens

    # ---- UI ------------------------------------------------------------------------------------------
    @user_errors
    def on_input(self, session: Session | None, value: dict | None, threshold: float | None = None):
        """The image input changed: a new image (upload, example; encode it, forget the old prompts and result),
        a box drawn, moved or deleted on it (segment again), or nothing (cleared). ``threshold``: the mask
        threshold setting (a decoder logit; None = the model's own), here and in every handler below.

        ``value`` is gradio_image_annotation's: ``{"image": path, "boxes": [{"xmin", "ymin", "xmax", "ymax",
        ...}]}`` in the image's pixels; ``single_box`` keeps at most one box."""
        path = None if not value else value.get("image")
        if path is None:
            return self._view(Session())
        fresh = session is None or session.pixels is None or session.source != str(path)
        if fresh:
            pixels = self.service.load(path, name=f"the uploaded file {Path(str(path)).name!r}")
            h, w = pixels.shape[:2]
            session = Session(pixels=pixels, source=str(path),
                              status=f"Image {w}x{h} ready: ask a question, click on the result, or draw a box.")
        drawn = _annotator_boxes(value.get("boxes") or [], session.pixels.shape[:2])
        if drawn is None or drawn == session.boxes:
            # A drag has just begun (the input reports a box of no size first), or our own update of the input
            # (Clear) came back as a change: nothing new to segment.
            return self._view(session) if fresh else (session, *(gr.update() for _ in VIEW_OUTPUTS[1:]))
        session = self._need_image(session)
        session.boxes = drawn
        if not session.boxes and not session.points:
            session.prediction, session.shown, session.status = None, None, "Box removed."
            return self._view(session)
        return self._segment(session, threshold)

    @user_errors
    def on_click(self, session: Session, mode: str, evt: gr.SelectData, threshold: float | None = None):
        """A click on the result image adds an object or background point; the mask follows at once.
        (Gradio passes ``evt`` by its annotation: the event's inputs are ``[session, mode, threshold]``.)"""
        session = self._need_image(session)
        if mode not in MODES:
            raise PromptError(f"unknown click mode {mode!r}; choose one of {', '.join(MODES)}")
        x, y = _click_xy(evt, session.pixels.shape[:2])
        session.points.append([x, y])
        session.labels.append(1 if mode == "positive" else 0)
        return self._segment(session, threshold)

    @user_errors
    def on_ask(self, session: Session, question: str, max_new_tokens: float, threshold: float | None = None):
        """The question about the whole image (clicks are kept on screen but not sent)."""
        session = self._need_image(session)
        return self._ask(session, question, max_new_tokens, with_region=False, threshold=threshold)

    @user_errors
    def on_ask_region(self, session: Session, question: str, max_new_tokens: float, threshold: float | None = None):
        """The question with the clicked points / box written into it as <point>/<box> text."""
        session = self._need_image(session)
        if not session.points and not session.boxes:
            raise PromptError("click a point or draw a box first: there is no region to ask about")
        return self._ask(session, (question or "").strip() or REGION_QUESTION, max_new_tokens, with_region=True,
                         threshold=threshold)

    @user_errors
    def on_threshold(self, session: Session | None, threshold: float):
        """The mask threshold setting moved: a mask from clicks / a box is cut again at once (decoder only, on
        the cached embedding); an answer's masks change with the next question (re-asking would rerun the VLM)."""
        if session is None or session.pixels is None:
            return (session, *(gr.update() for _ in VIEW_OUTPUTS[1:]))
        value = _mask_threshold(threshold)
        if session.prediction is not None and session.prediction.question is None and (session.points or session.boxes):
            return self._segment(self._need_image(session), value)
        session = dataclasses.replace(session, status=f"Mask threshold {value:g}: it applies to the next result.")
        return (session, gr.update(), gr.update(), session.status, gr.update(), gr.update())

    @user_errors
    def on_clear(self, session: Session | None):
        """Forget the clicks, the box and the result; keep the image. -> the view, then the image input's new
        value (its box removed)."""
        if session is None or session.pixels is None:
            return (*self._view(Session()), gr.update())
        cleared = Session(pixels=session.pixels, source=session.source, status="Clicks and box cleared.")
        return (*self._view(cleared), {"image": session.source, "boxes": []})

    @user_errors
    def on_targets(self, session: Session, shown: list[int] | None):
        """Which targets to draw: only the overlay and the highlighting change, not the result files."""
        session = dataclasses.replace(session or Session(), shown=sorted(int(i) for i in (shown or [])))
        return self._view(session, refresh_downloads=False, refresh_targets=False)

    # ---- API (named endpoints for gradio_client) ----------------------------------------------------
    @user_errors
    def api_segment(self, image: str | None, points: Any = None, point_labels: Any = None, boxes: Any = None) -> dict:
        """Mask decoder only: pixel points [[x, y], ...] with labels [1/0, ...] and/or boxes [[x1, y1, x2, y2]]."""
        pixels = self._api_image(image)
        return self.service.segment(pixels, _json_list(points, "points"), _json_list(point_labels, "point_labels"),
                                    _json_list(boxes, "boxes")).to_json()

    @user_errors
    def api_click(self, image: str | None, x: float, y: float, label: float = 1) -> dict:
        """One click at pixel (x, y), label 1 (object) or 0 (background) -> its mask."""
        pixels = self._api_image(image)
        try:
            xy, lab = [float(x), float(y)], int(float(1 if label is None else label))
        except (TypeError, ValueError):
            raise PromptError(f"a click is pixel x, y and a label 1 or 0, got {x!r}, {y!r}, {label!r}") from None
        return self.service.segment(pixels, [xy], [lab]).to_json()

    @user_errors
    def api_ground(self, image: str | None, question: str, max_new_tokens: float | None = None, points: Any = None,
                   point_labels: Any = None, boxes: Any = None) -> dict:
        """A question (optionally with points / boxes written into it) -> answer, boxes and masks."""
        pixels = self._api_image(image)
        tokens = self.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        return self.service.predict(pixels, question, tokens, _json_list(points, "points"),
                                    _json_list(point_labels, "point_labels"), _json_list(boxes, "boxes")).to_json()

    # ---- helpers -------------------------------------------------------------------------------------
    def _api_image(self, image: str | None) -> np.ndarray:
        name = None if image is None else f"the uploaded file {Path(str(image)).name!r}"
        return self.service.load(image, name=name)

    @staticmethod
    def _need_image(session: Session | None) -> Session:
        """A copy of the session to change: if the action then fails, the stored session is untouched."""
        if session is None or session.pixels is None:
            raise ImageError("upload an image or pick an example first")
        return dataclasses.replace(session, points=[list(p) for p in session.points], labels=list(session.labels),
                                   boxes=[list(b) for b in session.boxes])

    def _segment(self, session: Session, threshold: float | None = None):
        t0 = time.perf_counter()
        prediction = self.service.segment(session.pixels, session.points, session.labels, session.boxes,
                                          mask_threshold=threshold)
        ms = (time.perf_counter() - t0) * 1000
        session.prediction, session.shown = prediction, None
        details = "; ".join(f"score {t.score:.2f}, {int(t.mask.sum())} px" for t in prediction.targets
                            if t.mask is not None and t.score is not None)
        cut = "" if threshold is None else f", mask threshold {float(threshold):g}"
        session.status = (f"Mask from {session.prompt_text()} (mask decoder only, {ms:.0f} ms{cut}): "
                          f"{details or 'empty'}.")
        return self._view(session)

    def _ask(self, session: Session, question: str, max_new_tokens: float, with_region: bool,
             threshold: float | None = None):
        t0 = time.perf_counter()
        region = (session.points, session.labels, session.boxes) if with_region else ([], [], [])
        prediction = self.service.predict(session.pixels, question, max_new_tokens, *region, mask_threshold=threshold)
        seconds = time.perf_counter() - t0
        session.prediction, session.shown = prediction, None
        masks = sum(t.mask is not None for t in prediction.targets)
        raw = prediction.answer.replace("`", "'")
        lines = [f"Answered in {seconds:.2f} s: {len(prediction.targets)} target(s), {masks} mask(s)"
                 + (f", asked with {session.prompt_text()}" if with_region else "") + "."]
        lines.append(f"Model output: `{raw}`" if raw.strip() else "Model output: (empty)")
        lines += [f"Note: {n}" for n in prediction.notes]
        session.status = "  \n".join(lines)
        return self._view(session)

    def _view(self, session: Session, refresh_downloads: bool = True, refresh_targets: bool = True) -> tuple:
        prediction = session.prediction
        if refresh_targets:
            targets = gr.update(choices=target_choices(prediction),
                                value=list(range(len(prediction.targets))) if prediction else [])
        else:
            targets = gr.update()
        if refresh_downloads:
            files = self.downloads.write(prediction) if prediction is not None else None
        else:
            files = gr.update()
        return (session, render(session), answer_pieces(prediction, session.shown) or None, session.status,
                targets, files)


def _click_xy(evt: gr.SelectData, size: tuple[int, int]) -> tuple[float, float]:
    """Pixel (x, y) of a click on an image: Gradio's select event carries ``index = [x, y]`` in the image's
    own pixels. Clamped to the image (a click on the last pixel's edge can round to W or H)."""
    index = getattr(evt, "index", None)
    if not isinstance(index, (list, tuple)) or len(index) != 2:
        raise PromptError("the click did not carry a position on the image")
    h, w = size
    try:
        x, y = float(index[0]), float(index[1])
    except (TypeError, ValueError):
        raise PromptError(f"the click position {index!r} is not a pair of numbers") from None
    return min(max(x, 0.0), w - 1.0), min(max(y, 0.0), h - 1.0)


def _annotator_boxes(boxes: list[dict], size: tuple[int, int]) -> list[list[float]] | None:
    """The drawn box (the last, if several) as pixel xyxy clipped to the image; [] when there is none; None
    while it has no size yet (the input reports a drag's first point as a box)."""
    h, w = size
    for box in reversed(boxes):
        try:
            x1, y1, x2, y2 = (float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (KeyError, TypeError, ValueError):
            raise PromptError(f"a drawn box needs numbers xmin, ymin, xmax, ymax, got {box!r}") from None
        if abs(x2 - x1) < 1 or abs(y2 - y1) < 1:
            return None
        x1, x2 = sorted((min(max(x1, 0.0), w), min(max(x2, 0.0), w)))
        y1, y2 = sorted((min(max(y1, 0.0), h), min(max(y2, 0.0), h)))
        if x2 - x1 >= 1 and y2 - y1 >= 1:
            return [[x1, y1, x2, y2]]
        raise PromptError("the drawn box lies outside the image: draw it over the image")
    return []


def _json_list(value: Any, what: str) -> list | None:
    """An API list argument: a JSON value already decoded, JSON text, or nothing."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise PromptError(f"{what} must be a JSON list, got {value[:60]!r}") from None
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"{what} must be a list, got {type(value).__name__}")
    return list(value) or None
