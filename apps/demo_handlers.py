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
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
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

from apps.demo_objects import ClickObject, Objects, colour_of, full_size_mask, scaled_view
from apps.overlay import draw_masks, target_colour
from grounding.text.boxes import parse_answer
from grounding.errors import GroundsegError, ImageError, PromptError, QuestionError
from grounding.images import load_image
from grounding.result import Prediction, Target, box_from_mask

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
VIEW_OUTPUTS = ("session", "overlay", "answer", "status", "objects")
# Click masks on views above this many pixels skip these add-ons (GrabCut costs ~0.2 s at 1024 px on a laptop CPU:
# more than the rest of a click); questions and the API keep every add-on.
CLICK_SKIP_ABOVE = {"mask_refine": 400_000}
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

    def load(self, source: Any, name: str | None = None, view: bool = True) -> np.ndarray:
        """Decode an image (EXIF applied) and encode it for the mask decoder now (its view, the copy the web page
        segments, with ``view``; else the image itself), so that the first click on it only runs the decoder.
        -> RGB uint8 ``H x W x 3``, the image as uploaded."""
        if source is None:
            raise ImageError("no image was given: upload one or pick an example")
        pixels = load_image(source, max_pixels=self.grounder.max_pixels, name=name)
        with self._lock:
            self.grounder.prepare([scaled_view(pixels) if view else pixels])
        return pixels

    def segment(self, pixels: np.ndarray, points=None, point_labels=None, boxes=None,
                mask_threshold: Any = None, click: bool = False) -> Prediction:
        """The mask decoder on ``pixels``; ``click``: a web-page click, which skips the add-ons of
        :data:`CLICK_SKIP_ABOVE` on images above their size."""
        skip = {name for name, most in CLICK_SKIP_ABOVE.items() if click and pixels.shape[0] * pixels.shape[1] > most}
        with self._model(mask_threshold) as grounder, _without_mask_steps(grounder, skip):
            return grounder.segment(pixels, points=points or None, point_labels=point_labels or None,
                                    boxes=boxes or None)

    def predict(self, pixels: np.ndarray, question: str, max_new_tokens: int, points=None, point_labels=None,
                boxes=None, mask_threshold: Any = None) -> Prediction:
        check_question(question)
        tokens = check_max_new_tokens(max_new_tokens)
        with self._model(mask_threshold) as grounder:
            return grounder.predict(pixels, question, points=points or None, point_labels=point_labels or None,
                                    boxes=boxes or None, max_new_tokens=tokens)


@contextmanager
def _without_mask_steps(grounder, names: set[str]) -> Iterator[None]:
    """The grounder's mask steps minus ``names`` for one call (inside the model lock: no other call sees it)."""
    steps = grounder.steps
    if not names or not any(s.name in names for s in steps.mask_steps):
        yield
        return
    own = steps.mask_steps
    steps.mask_steps = [s for s in own if s.name not in names]
    try:
        yield
    finally:
        steps.mask_steps = own


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
    """One browser tab's image, objects and last answer (kept in a ``gr.State``; replaced, never changed in place,
    so a failed action leaves the stored one as it was).

    ``pixels``: the image as uploaded (RGB ``H x W x 3``); ``view``: what the app segments and shows (``pixels``
    itself up to VIEW_MAX_SIDE, else scaled down); points and boxes are kept in ``pixels``' coordinates."""

    pixels: np.ndarray | None = None
    view: np.ndarray | None = None
    source: str | None = None  # the image input's file: a change with the same file is a box drawn on it
    objects: Objects = field(default_factory=Objects)
    prediction: Prediction | None = None  # the last answer (its targets are objects too)
    status: str = ""

    @property
    def scale(self) -> float:
        """View pixels per image pixel (1.0 for images up to VIEW_MAX_SIDE)."""
        return 1.0 if self.pixels is None else self.view.shape[1] / self.pixels.shape[1]

    def view_prompt(self, obj: ClickObject) -> tuple[list | None, list | None, list | None]:
        """``obj``'s clicks and box in view pixels: (points, labels, boxes) for ModelService.segment."""
        k = self.scale
        points = [[x * k, y * k] for x, y in obj.points] or None
        boxes = [[v * k for v in obj.box]] if obj.box is not None else None
        return points, list(obj.labels) or None, boxes


def render(session: Session) -> np.ndarray | None:
    """The view with every object's mask (its colour, filled and outlined; the active one outlined thicker) and
    the active object's clicks and box."""
    if session.view is None:
        return None
    objs, k = session.objects, session.scale
    current = objs.current
    return draw_masks(session.view, [o.mask for o in objs.items],
                      [colour_of(o, i) for i, o in enumerate(objs.items)],
                      points=[(x * k, y * k) for x, y in current.points], point_labels=current.labels,
                      boxes=[[v * k for v in current.box]] if current.box is not None else [],
                      emphasis=objs.active if len(objs.items) > 1 else None)


def object_choices(objects: Objects) -> dict:
    """The object list (a radio: one line per object with its area; the chosen one takes the clicks)."""
    return gr.update(choices=[(objects.label(i), i) for i in range(len(objects.items))], value=objects.active)


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


# --------------------------------------------------------------------------- downloads


# zlib level of the pictures the page is given: a 1024x768 result at level 1 takes ~50 ms against ~200 ms at PIL's
# default 6, and is ~25% bigger (benchmarks/click_big_image.py); lossless either way
PNG_COMPRESS_LEVEL = 1


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
        if not any(t.mask is not None for t in prediction.targets):
            return [str(result)]  # no masks: no empty zip
        masks = folder / "groundseg_masks.zip"
        masks.write_bytes(masks_zip(prediction))
        return [str(result), str(masks)]

    def write_objects(self, prediction: Prediction) -> list[str]:
        """-> [result.json, masks.zip (every mask), one PNG per target]: the downloads for all objects and for
        each one."""
        folder = self.new_folder()
        result = folder / "groundseg_result.json"
        result.write_text(json.dumps(prediction.to_json(), ensure_ascii=False), encoding="utf-8")
        pngs = {i: mask_png(t.mask, i) for i, t in enumerate(prediction.targets) if t.mask is not None}
        masks = folder / "groundseg_masks.zip"
        masks.write_bytes(masks_zip(prediction, pngs))
        singles = []
        for i, png in pngs.items():
            single = folder / f"{mask_name(i, prediction.targets[i].phrase)}.png"
            single.write_bytes(png)
            singles.append(str(single))
        return [str(result), str(masks), *singles]

    def picture(self, pixels: np.ndarray | None) -> str | None:
        """``pixels`` (RGB, H x W x 3 uint8) as a PNG file for an image component, one file per content.

        Gradio writes an array it is given into its cache in place, at a path named by the content, so a view
        shown twice (a click's marker, then its mask over the same pixels) is rewritten while the browser may be
        reading it: a truncated picture, and a click on it lost. A file path is instead copied into the cache
        atomically, once; here too the PNG is written under a temporary name and renamed into place."""
        if pixels is None:
            return None
        digest = hashlib.blake2b(pixels.tobytes(), digest_size=16)
        digest.update(repr(pixels.shape).encode())
        folder = self.root / f"view-{digest.hexdigest()}"
        path = folder / "view.png"
        if path.exists():
            os.utime(folder)   # in use again: not pruned on its first use's schedule
            return str(path)
        self._prune()
        folder.mkdir(exist_ok=True)
        ok, png = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESS_LEVEL])
        if not ok:
            raise RuntimeError(f"could not encode a {pixels.shape} picture as PNG")
        fd, staging = tempfile.mkstemp(dir=folder, prefix=".view.", suffix=".png")
        with os.fdopen(fd, "wb") as out:
            out.write(png.tobytes())
        os.replace(staging, path)
        return str(path)

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


def masks_zip(prediction: Prediction, pngs: dict[int, bytes] | None = None) -> bytes:
    """One 0/255 PNG per target with a mask (``pngs``: already encoded PNGs by target index)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i, target in enumerate(prediction.targets):
            if target.mask is None:
                continue
            png = (pngs or {}).get(i) or mask_png(target.mask, i)
            archive.writestr(f"{mask_name(i, target.phrase)}.png", png)
    return buffer.getvalue()


def mask_name(index: int, phrase: str | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", phrase or "mask").strip("_")[:40] or "mask"
    return f"target_{index + 1:02d}_{slug}"


def mask_png(mask: np.ndarray, index: int = 0) -> bytes:
    # Compression level 1: a 12-megapixel 0/255 mask encodes in tens of ms (level 3, OpenCV's default, is ~3x
    # slower) and is still small (long runs of one value).
    ok, png = cv2.imencode(".png", mask.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ImageError(f"could not encode the mask of target {index + 1} as PNG")
    return png.tobytes()


# --------------------------------------------------------------------------- the handlers


class DemoHandlers:
    """The app's actions. UI handlers return :data:`VIEW_OUTPUTS` (``on_input`` and ``on_clear_all`` also the
    image input's value); API handlers return the result JSON.

    A click is two events: ``on_click`` adds the point and draws it at once (no model), then ``on_masks`` runs
    the mask decoder for every object whose clicks / box changed, and ``on_downloads`` writes the files last."""

    def __init__(self, service: ModelService, downloads: DownloadFolder, default_max_new_tokens: int = 256):
        self.service = service
        self.downloads = downloads
        self.default_max_new_tokens = default_max_new_tokens

    # ---- UI: the image and prompts -----------------------------------------------------------------------
    @user_errors
    def on_input(self, session: Session | None, value: dict | None):
        """The image input changed: a new image (upload, example; encode it, start over), a box drawn on it (the
        current object's box: drawn on the result, and the input's own box removed so the next drag starts a new
        one), or nothing (cleared). A file that is not a readable image leaves one line (a warning and the status)
        and an empty input. -> the view, then the image input's value.

        ``value`` is gradio_image_annotation's: ``{"image": path, "boxes": [{"xmin", "ymin", "xmax", "ymax",
        ...}]}`` in the image's pixels."""
        path = None if not value else value.get("image")
        if path is None:
            if session is None or session.pixels is None:  # nothing shown (or the echo of a refused file's reset)
                return (session, *(gr.update() for _ in VIEW_OUTPUTS[1:]), gr.update())
            return (*self._view(Session()), gr.update())
        fresh = session is None or session.pixels is None or session.source != str(path)
        if fresh:
            try:
                pixels = self.service.load(path, name=f"the uploaded file {Path(str(path)).name!r}")
            except ImageError as err:
                message = " ".join(str(err).split())
                gr.Warning(message)
                return (*self._view(Session(status=f"**Not loaded:** {message}")), None)
            h, w = pixels.shape[:2]
            view = scaled_view(pixels)
            shown = "" if view is pixels else f" (shown and segmented at {view.shape[1]}x{view.shape[0]})"
            session = Session(pixels=pixels, view=view, source=str(path), status=(
                f"Image {w}x{h} ready{shown}: click on the result (object +, background -), drag a box on the "
                "image, or ask a question."))
        drawn = _annotator_boxes(value.get("boxes") or [], session.pixels.shape[:2])
        if not drawn:
            # No box, or a drag that has just begun (the input reports a box of no size first), or our own update
            # of the input coming back as a change: nothing new.
            return (*self._view(session), gr.update()) if fresh else (session, *(gr.update() for _ in VIEW_OUTPUTS[1:]),
                                                                      gr.update())
        session = dataclasses.replace(session, objects=session.objects.set_box(tuple(drawn[0])))
        session.status = f"Object {session.objects.active + 1}: box drawn; segmenting..."
        return (*self._view(session), {"image": session.source, "boxes": []})

    @user_errors
    def on_click(self, session: Session | None, mode: str, evt: gr.SelectData):
        """A click on the result image: an object (+) or background (-) point of the current object, drawn at
        once; ``on_masks`` follows. (Gradio passes ``evt`` by its annotation.)"""
        session = self._need_image(session)
        if mode not in MODES:
            raise PromptError(f"unknown click mode {mode!r}; choose one of {', '.join(MODES)}")
        vx, vy = _click_xy(evt, session.view.shape[:2])
        k = session.scale
        x, y = min(vx / k, session.pixels.shape[1] - 1.0), min(vy / k, session.pixels.shape[0] - 1.0)
        objects = session.objects.add_click(x, y, 1 if mode == "positive" else 0)
        return self._view(dataclasses.replace(session, objects=objects,
                                              status=f"Object {objects.active + 1}: {objects.current.prompt_text()}; "
                                                     "segmenting..."))

    @user_errors
    def on_masks(self, session: Session | None, threshold: float | None = None):
        """The mask decoder for every object whose clicks or box changed since its mask (on the cached embedding
        of the view); the others keep theirs. ``threshold``: the mask threshold setting (None: the model's)."""
        if session is None or session.view is None:
            return (session, *(gr.update() for _ in VIEW_OUTPUTS[1:]))
        objects, lines = session.objects, []
        for i, obj in enumerate(objects.items):
            if not obj.stale:
                continue
            t0 = time.perf_counter()
            points, labels, boxes = session.view_prompt(obj)
            prediction = self.service.segment(session.view, points, labels, boxes, mask_threshold=threshold,
                                              click=True)
            ms = (time.perf_counter() - t0) * 1000
            target = prediction.targets[0] if prediction.targets else None
            mask = None if target is None else target.mask
            objects = objects.with_mask(i, mask, None if target is None else target.score, obj.key, session.view)
            own = threshold is None or float(threshold) == self.service.grounder.mask_threshold
            cut = "" if own else f", mask threshold {float(threshold):g}"
            lines.append(f"Object {i + 1}: mask from {obj.prompt_text()} (mask decoder only, {ms:.0f} ms{cut}): "
                         f"{objects.items[i].area:,} px" + ("" if target is None or target.score is None
                                                            else f", score {target.score:.2f}") + ".")
        for i, obj in enumerate(objects.items):  # undo / clear can leave an object with no prompt and an old mask
            if not obj.has_prompt and obj.name is None and obj.mask is not None:
                objects = objects.with_mask(i, None, None, obj.key, session.view)
        status = "  \n".join(lines) if lines else session.status
        return self._view(dataclasses.replace(session, objects=objects, status=status))

    @user_errors
    def on_downloads(self, session: Session | None):
        """The download box: the result JSON (every object's mask as COCO RLE at the image's size), a zip of
        their PNGs and one PNG per object; nothing when there is no mask."""
        if session is None or session.pixels is None or not session.objects.with_masks:
            return None
        return self.downloads.write_objects(full_prediction(session))

    @user_errors
    def on_new_object(self, session: Session | None):
        session = self._need_image(session)
        objects = session.objects.new_object()
        return self._view(dataclasses.replace(session, objects=objects, status=(
            f"Object {objects.active + 1}: click on it (+) or drag a box around it.")))

    @user_errors
    def on_select(self, session: Session | None, index: Any):
        """The object list: the chosen object takes the next clicks and box."""
        session = self._need_image(session)
        try:
            i = int(index)
        except (TypeError, ValueError):
            raise PromptError(f"choose an object from the list, got {index!r}") from None
        objects = session.objects.select(i)
        return self._view(dataclasses.replace(session, objects=objects, status=(
            f"Object {i + 1} chosen: {objects.current.prompt_text()}; new clicks and boxes go to it.")))

    @user_errors
    def on_undo(self, session: Session | None):
        session = self._need_image(session)
        objects = session.objects.undo()
        return self._view(dataclasses.replace(session, objects=objects, status=(
            f"Undone. {len(objects.history)} more step(s) to undo, {len(objects.future)} to redo.")))

    @user_errors
    def on_redo(self, session: Session | None):
        session = self._need_image(session)
        objects = session.objects.redo()
        return self._view(dataclasses.replace(session, objects=objects, status=(
            f"Redone. {len(objects.future)} more step(s) to redo.")))

    @user_errors
    def on_clear_object(self, session: Session | None):
        session = self._need_image(session)
        gone = session.objects.active + 1
        objects = session.objects.clear_current()
        return self._view(dataclasses.replace(session, objects=objects, status=f"Object {gone} removed (Undo brings "
                                                                               "it back)."))

    @user_errors
    def on_clear_all(self, session: Session | None):
        """Forget every object and the answer; keep the image. -> the view, then the image input's value."""
        if session is None or session.pixels is None:
            return (*self._view(Session()), gr.update())
        session = dataclasses.replace(session, objects=session.objects.clear_all(), prediction=None,
                                      status="All objects cleared (Undo brings them back).")
        return (*self._view(session), {"image": session.source, "boxes": []})

    @user_errors
    def on_threshold(self, session: Session | None, threshold: float):
        """The mask threshold setting changed: every clicked object's mask is cut again (``on_masks`` follows;
        the decoder only, on the cached embedding); an answer's masks change with the next question."""
        if session is None or session.pixels is None:
            return (session, *(gr.update() for _ in VIEW_OUTPUTS[1:]))
        value = _mask_threshold(threshold)
        objects = session.objects
        items = tuple(dataclasses.replace(o, prompt_key=None) if o.has_prompt else o for o in objects.items)
        objects = dataclasses.replace(objects, items=items)
        status = f"Mask threshold {value:g}: " + ("cutting the masks again..." if any(o.has_prompt for o in items)
                                                   else "it applies to the next result.")
        return self._view(dataclasses.replace(session, objects=objects, status=status))

    # ---- UI: questions -------------------------------------------------------------------------------
    @user_errors
    def on_ask(self, session: Session, question: str, max_new_tokens: float, threshold: float | None = None):
        """The question about the whole image: the answer's targets become the objects."""
        session = self._need_image(session)
        return self._ask(session, question, max_new_tokens, with_region=False, threshold=threshold)

    @user_errors
    def on_ask_region(self, session: Session, question: str, max_new_tokens: float, threshold: float | None = None):
        """The question with the current object's clicks / box written into it as <point>/<box> text."""
        session = self._need_image(session)
        if not session.objects.current.has_prompt:
            raise PromptError("click a point or draw a box first: there is no region to ask about")
        return self._ask(session, (question or "").strip() or REGION_QUESTION, max_new_tokens, with_region=True,
                         threshold=threshold)

    # ---- API (named endpoints for gradio_client) ----------------------------------------------------
    @user_errors
    def api_segment(self, image: str | None, points: Any = None, point_labels: Any = None, boxes: Any = None,
                    objects: Any = None) -> dict:
        """Mask decoder only: pixel points [[x, y], ...] with labels [1/0, ...] and/or boxes [[x1, y1, x2, y2]]
        (one object; several boxes alone: one mask each); or ``objects``, a list of ``{"points", "point_labels",
        "box"}``: one target per object, in order."""
        pixels = self._api_image(image)
        many = _json_list(objects, "objects")
        if many is None:
            return self.service.segment(pixels, _json_list(points, "points"),
                                        _json_list(point_labels, "point_labels"), _json_list(boxes, "boxes")).to_json()
        if any(v not in (None, "", []) for v in (points, point_labels, boxes)):
            raise PromptError("give points / point_labels / boxes for one object, or objects, not both")
        targets = []
        for n, obj in enumerate(_api_objects(many)):
            pts, labs, box = obj
            result = self.service.segment(pixels, pts, labs, None if box is None else [box])
            targets.extend(result.targets[:1] or [Target()])
        return Prediction("", targets, pixels.shape[:2]).to_json()

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
        return self.service.load(image, name=name, view=False)

    @staticmethod
    def _need_image(session: Session | None) -> Session:
        if session is None or session.pixels is None:
            raise ImageError("upload an image or pick an example first")
        return session

    def _ask(self, session: Session, question: str, max_new_tokens: float, with_region: bool,
             threshold: float | None = None):
        t0 = time.perf_counter()
        region = session.view_prompt(session.objects.current) if with_region else (None, None, None)
        prediction = self.service.predict(session.view, question, max_new_tokens, *region, mask_threshold=threshold)
        seconds = time.perf_counter() - t0
        objects = session.objects.with_answer([(t.phrase, t.box, t.mask, t.score) for t in prediction.targets])
        masks = sum(t.mask is not None for t in prediction.targets)
        raw = prediction.answer.replace("`", "'")
        lines = [f"Answered in {seconds:.2f} s: {len(prediction.targets)} target(s), {masks} mask(s)"
                 + (f", asked with {session.objects.current.prompt_text()}" if with_region else "") + "."]
        lines.append(f"Model output: `{raw}`" if raw.strip() else "Model output: (empty)")
        lines += [f"Note: {n}" for n in prediction.notes]
        return self._view(dataclasses.replace(session, objects=objects, prediction=prediction,
                                              status="  \n".join(lines)))

    def _view(self, session: Session) -> tuple:
        objects = object_choices(session.objects) if session.pixels is not None else gr.update(choices=[], value=None)
        return (session, self.downloads.picture(render(session)), answer_pieces(session.prediction) or None,
                session.status, objects)


def full_prediction(session: Session) -> Prediction:
    """Every object with a mask as a target at the image's size (masks scaled up from the view, boxes from the
    full-size mask); the answer and question of the last answer, if any."""
    size = session.pixels.shape[:2]
    targets = []
    for i in session.objects.with_masks:
        obj = session.objects.items[i]
        mask = full_size_mask(obj.mask, size)
        targets.append(Target(obj.name if obj.name != "mask" else None, box_from_mask(mask), mask, obj.score))
    answer = session.prediction
    return Prediction(answer.answer if answer else "", targets, size, answer.question if answer else None,
                      list(answer.notes) if answer else [])


def _api_objects(objects: list) -> list[tuple[list | None, list | None, list | None]]:
    """The API's ``objects``: each a dict with ``points`` / ``point_labels`` / ``box`` (any may be missing)."""
    out = []
    for n, obj in enumerate(objects, 1):
        if not isinstance(obj, dict) or not set(obj) <= {"points", "point_labels", "box"}:
            raise PromptError(f"object {n} must be a dict with points, point_labels and/or box, got {obj!r:.80}")
        points, labels, box = obj.get("points") or None, obj.get("point_labels") or None, obj.get("box") or None
        if points is None and box is None:
            raise PromptError(f"object {n} has no points and no box")
        out.append((points, labels, box))
    return out


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
    """The drawn box (the newest, if several: the input lists it first) as pixel xyxy clipped to the image; []
    when there is none; None while it has no size yet (the input reports a drag's first point as a box)."""
    h, w = size
    for box in boxes[:1]:
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
