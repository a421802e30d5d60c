"""What the parts of ``groundseg annotate`` share (apps/annotate.py, annotate_workers.py, annotate_video.py): the
run's settings, one file to do, the question asked, and where a file's result and overlay go."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from grounding.errors import GroundsegError
from grounding.result import atomic_write_text

QUESTION = "Please segment {prompt}."
RESULTS_DIR = "results"
OVERLAYS_DIR = "overlays"
RECORD_VERSION = 1
IMAGE, VIDEO = "image", "video"
VIDEO_KEY_FRAME = 0
DEFAULT_VIDEO_EVERY = 8

GrounderFactory = Callable[[str, str], Any]


class AnnotateError(GroundsegError):
    """A batch annotation run could not finish; the message says what to do."""


@dataclass(frozen=True)
class Settings:
    """What every worker needs (picklable)."""
    input_dir: str
    out_dir: str
    prompts: tuple[str, ...]
    signature: str
    overlays: bool
    model_dir: str
    device: str
    batch_size: int
    video_every: int = DEFAULT_VIDEO_EVERY
    video_signature: str = ""   # a video result's signature: the run's plus the video options
    mask_threshold: float = 0.0  # mask = decoder logit above this

    def signature_for(self, kind: str) -> str:
        return self.video_signature if kind == VIDEO else self.signature


@dataclass(frozen=True)
class Item:
    """One image or video: ``file`` relative to the input folder (POSIX); ``source`` = (bytes, mtime_ns);
    ``overlay_only``: its result is valid, only the overlay is missing."""
    file: str
    source: tuple[int, int]
    overlay_only: bool = False
    kind: str = IMAGE


def question_for(prompt: str) -> str:
    return QUESTION.format(prompt=prompt)


def record_path(settings: Settings, file: str) -> Path:
    return Path(settings.out_dir) / RESULTS_DIR / (file + ".json")


def overlay_path(settings: Settings, file: str, kind: str = IMAGE) -> Path:
    return Path(settings.out_dir) / OVERLAYS_DIR / (file + (".mp4" if kind == VIDEO else ".png"))


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_record(settings: Settings, item: Item, record: dict) -> None:
    """results/<file>.json: the header that makes it reusable (see :func:`apps.annotate._valid`), then ``record``."""
    header = {"version": RECORD_VERSION, "signature": settings.signature_for(item.kind), "file": item.file,
              "source": list(item.source)}
    atomic_write_text(record_path(settings, item.file), json.dumps({**header, **record}, ensure_ascii=False))
