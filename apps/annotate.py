"""``groundseg annotate``: masks for a list of prompts on every image and video of a folder, as COCO / YOLO /
LabelMe.

    groundseg annotate INPUT_DIR --prompts "the red circle,all blue shapes" --out OUT_DIR
                       [--format coco,yolo,labelme] [--overlays] [--num-procs N] [--model DIR] [--video-every N]

What is asked. For image I and prompt P the model gets ``"Please segment P."``, the first phrasing it was
trained on (``SEG_QUESTIONS`` in grounding/data/tasks.py), with P exactly as written (a trailing full stop
removed). Training sentences name objects with or without an article ("the red circle", "red circle") and
ask for groups as "all red shapes" / "both circles", so write prompts that way. All prompts of one image go
to ``predict_batch`` together, so the image is encoded once. Every target of the answer is one instance of
category P; a target with an empty mask counts as mask-less, and a target with neither mask nor box is
dropped (the per-image result keeps the model's answer and notes).

Which files. Every visible file under INPUT_DIR (hidden files and folders skipped; OUT_DIR skipped when it
lies inside) whose content is an image, whatever its name (``grounding.images.list_images``), plus every file
whose name has an image extension but whose content cannot be read: those are listed in
``OUT_DIR/errors.jsonl`` (``{"file", "reason"}``), with corrupt or truncated images. Other files (notes.txt)
are ignored. Images are read upright (EXIF orientation applied): widths, heights and coordinates are those
of the upright image. Everything is in sorted relative-path order.

Videos. Any other file is a video when FFmpeg finds moving pictures in it, whatever its name (a file named
like a video that cannot be read is reported). Each prompt is asked on its frame 0 and its objects are carried
through every frame, each keeping one track id; frame ``i`` of ``a/clip.mp4`` is the image
``a/clip.mp4/{i:06d}.png`` in every format. Details in apps/annotate_video.py.

OUT_DIR::

    results/<image path>.json   per-image result, the resume state: {"version", "signature", "file",
                                "source": [bytes, mtime_ns], "status": "ok" | "error", "image_size": [H, W],
                                "predictions": [Prediction JSON per prompt] | "reason": str}
    results/<video path>.json   per-video result: the same header, "kind": "video", "video": {"width",
                                "height", "num_frames", "fps"}, "runs": [per prompt: {"question", "answer",
                                "mode", "objects": [{"id", "phrase"}], "notes", "frames": [frames.jsonl
                                lines, in frame order]}] | "reason": str
    errors.jsonl                one {"file": ..., "reason": ...} per unreadable file
    instances.json              --format coco      (see apps/exporters.py for every format's conventions)
    labels/, data.yaml          --format yolo
    labelme/                    --format labelme
    overlays/<image path>.png   --overlays: what the files say, drawn on the image
    overlays/<video path>.mp4   --overlays: the same for a video (each object in its own colour)

Resume. A per-file result is written atomically after its overlay, so it exists only for finished
files; it is reused when its ``signature`` (hash of the question template, the prompts and the model's
files; for a video also ``--video-every``) and ``source`` (the file's size and mtime) match, otherwise
redone. A run killed at any point and started again therefore ends with the same files as an
uninterrupted one. The final files are rewritten from the per-file results at the end of every run
(cheap), in sorted order, with no timestamps or absolute paths. A lock file keeps two runs from writing
into one OUT_DIR at once.

Sharding. ``--num-procs N`` starts N processes, each with its own model, sharing nothing with the
parent but the per-file result files (apps/annotate_workers.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional, Sequence

import typer
from PIL import Image

from apps.annotate_common import (DEFAULT_VIDEO_EVERY, IMAGE, OVERLAYS_DIR, QUESTION, RECORD_VERSION, VIDEO,
                                  VIDEO_KEY_FRAME, AnnotateError, GrounderFactory, Item, Settings, overlay_path,
                                  read_record, record_path)
from apps.annotate_common import RESULTS_DIR, question_for  # noqa: F401  (re-export: public names of this command)
from apps.annotate_video import VIDEO_SUFFIXES, is_video, video_frames
from apps.annotate_workers import annotate_items, instances_from, run_workers
from apps.exporters import WRITERS, AnnotatedImage, frame_file
from grounding.config import CONFIG_NAME
from grounding.errors import CheckpointError, DatasetError, PromptError
from grounding.images import list_images
from grounding.progress import progress_bar
from grounding.result import Prediction, atomic_write_text

ERRORS_FILE = "errors.jsonl"
LOCK_FILE = ".annotate.lock"
FORMATS = tuple(WRITERS)
# Files of a model folder that do not change what it predicts (the model card, its loss plots).
_NOT_MODEL = {".md", ".png", ".jpg", ".jpeg"}
_HUGE = 1 << 30  # model files above this are fingerprinted by size, mtime and their first and last 64 MiB
# Temporary files of grounding.result.atomic_write_bytes left behind by a killed run.
_TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{32}\.tmp$")


# --------------------------------------------------------------------------- the command


def annotate_command(
    input_dir: Annotated[Path, typer.Argument(help="Folder of images and videos (searched recursively; "
                                              "recognised by content).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder; rerunning into it resumes.")],
    prompts: Annotated[Optional[str], typer.Option(help="Comma-separated prompts, each a category: "
                                                   "\"the red circle,all blue shapes\".")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="A text file with one prompt per line "
                                                         "(blank lines and lines starting with # skipped).")] = None,
    format: Annotated[str, typer.Option("--format", help="coco, yolo, labelme, or several comma-separated.")] = "coco",
    overlays: Annotated[bool, typer.Option("--overlays", help="Also draw OUT/overlays/<image>.png (a video: <video>.mp4).")] = False,
    num_procs: Annotated[int, typer.Option(min=1, help="Worker processes (each loads the model).")] = 1,
    model: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: the embedded model).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per forward pass.")] = 8,
    video_every: Annotated[int, typer.Option(min=0, help="Videos, checkpoints without SAM2 memory: ask the model "
                                             "again every N frames (0: only on frame 0).")] = DEFAULT_VIDEO_EVERY,
    mask_threshold: Annotated[float, typer.Option(help="Mask = decoder logit above this (0: probability 0.5).")] = 0.0,
) -> None:
    """Annotate every image and video of a folder with a mask per object each prompt names (COCO / YOLO-seg /
    LabelMe); video objects keep one track id across frames."""
    from apps.cli import DEFAULT_MODEL

    summary = annotate_folder(input_dir, read_prompts(prompts, prompts_file), out, formats=parse_formats(format),
                              overlays=overlays, num_procs=num_procs, model_dir=model or DEFAULT_MODEL,
                              device=device, batch_size=batch_size, progress=True, video_every=video_every,
                              mask_threshold=mask_threshold)
    typer.echo(summary.text())


def read_prompts(text: str | None, file: Path | None) -> list[str]:
    """Prompts from ``--prompts`` (comma-separated) or ``--prompts-file`` (one per line), cleaned: spaces
    collapsed, a trailing full stop removed. Raises PromptError for none, both, or duplicates."""
    if (text is None) == (file is None):
        raise PromptError("give the prompts with --prompts \"a,b\" or --prompts-file FILE (one of the two)")
    if file is not None:
        if not Path(file).is_file():
            raise PromptError(f"prompts file not found: {file}")
        raw = [line for line in Path(file).read_text(encoding="utf-8").splitlines() if not line.strip().startswith("#")]
    else:
        raw = text.split(",")  # type: ignore[union-attr]
    found = [" ".join(p.split()).rstrip(".").strip() for p in raw]
    found = [p for p in found if p]
    if not found:
        raise PromptError("no prompts: the list is empty")
    repeated = sorted({p for p in found if found.count(p) > 1})
    if repeated:
        raise PromptError(f"prompt {repeated[0]!r} is given twice; each prompt is one category")
    return found


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise PromptError(f"unknown --format {unknown[0] if unknown else text!r}; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


# --------------------------------------------------------------------------- a run


@dataclass
class Summary:
    images: int = 0            # images annotated (now or earlier)
    done_now: int = 0          # files the model ran on in this run (errors included)
    reused: int = 0            # files whose earlier result was still valid
    errors: int = 0            # files listed in errors.jsonl
    objects: dict[str, int] = field(default_factory=dict)  # per prompt: image instances + video tracks
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    videos: int = 0            # videos annotated (now or earlier)
    frames: int = 0            # their frames

    @property
    def images_per_second(self) -> float:
        return self.done_now / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        counts = ", ".join(f"{name} {n}" for name, n in self.objects.items())
        videos = f" and {self.videos} videos ({self.frames} frames)" if self.videos else ""
        unit = "files" if self.videos else "images"
        lines = [f"annotated {self.images} images{videos} ({self.done_now} files processed now at "
                 f"{self.images_per_second:.2f} {unit}/s, {self.reused} from earlier results); "
                 f"{sum(self.objects.values())} objects: {counts}"]
        if self.errors:
            lines.append(f"skipped {self.errors} unreadable files: see {self.outputs[0]}")
        lines.append("wrote " + ", ".join(str(p) for p in self.outputs))
        return "\n".join(lines)


def annotate_folder(input_dir: str | os.PathLike, prompts: Sequence[str], out_dir: str | os.PathLike,
                    formats: Sequence[str] = ("coco",), overlays: bool = False, num_procs: int = 1,
                    model_dir: str | os.PathLike | None = None, device: str = "auto", batch_size: int = 8,
                    progress: bool = False, grounder_factory: GrounderFactory | None = None,
                    video_every: int = DEFAULT_VIDEO_EVERY, mask_threshold: float = 0.0) -> Summary:
    """Annotate ``input_dir`` into ``out_dir`` (see the module doc); returns what was done.

    grounder_factory(model_dir, device) -> an object with ``predict_batch(queries, batch_size)`` and, for
    videos, ``predict_video(reader, question, key_frame, every=...)`` returning a ``grounding.video.VideoRun``
    (default: :func:`load_grounder`); it must be picklable (a module-level function) for ``num_procs > 1``. The
    model fingerprint in the signature is always taken from ``model_dir``. ``video_every``: re-ask period in
    frames for videos on checkpoints without SAM2 memory (0: only the key frame). ``mask_threshold``: mask = decoder
    logit above it (part of the signature when not 0: changing it redoes the masks).
    """
    from apps.cli import DEFAULT_MODEL

    started = time.perf_counter()
    root, out = Path(input_dir), Path(out_dir)
    if not root.is_dir():
        raise DatasetError(f"input folder not found: {root}" if not root.exists() else f"not a folder: {root}")
    prompts = tuple(prompts)
    if not prompts or any(not p.strip() for p in prompts):
        raise PromptError("give at least one non-empty prompt")
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise PromptError(f"unknown format {bad[0] if bad else '(none)'!r}; choose from {', '.join(FORMATS)}")
    if num_procs < 1:
        raise PromptError(f"--num-procs must be at least 1, got {num_procs}")
    if not isinstance(video_every, int) or video_every < 0:
        raise PromptError(f"--video-every must be 0 (never re-ask) or more, got {video_every!r}")
    model = Path(model_dir) if model_dir is not None else DEFAULT_MODEL
    signature = run_signature(prompts, model, mask_threshold)
    video_options = {"signature": signature, "key_frame": VIDEO_KEY_FRAME, "every": video_every}
    settings = Settings(str(root), str(out), prompts, signature, overlays, str(model), device, batch_size,
                        video_every, hashlib.sha256(json.dumps(video_options, sort_keys=True).encode()).hexdigest(),
                        float(mask_threshold))
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        _remove_temporaries(out)
        files = find_media(root, exclude=out)
        todo, reused = _plan(settings, files)
        factory = grounder_factory or load_grounder
        with _progress_bar(len(files), len(files) - len(todo), progress) as advance:
            if num_procs == 1 or len(todo) <= 1:
                if todo:
                    annotate_items(settings, todo, factory(settings.model_dir, device), advance)
            else:
                run_workers(settings, todo, num_procs, factory, advance)
        summary = _merge(settings, files, formats)
    summary.done_now = sum(not item.overlay_only for item in todo)
    summary.reused = reused
    summary.seconds = time.perf_counter() - started
    return summary


def load_grounder(model_dir: str, device: str):
    """The default grounder factory: the checkpoint at ``model_dir``."""
    from grounding import Grounder
    return Grounder.from_pretrained(model_dir, device=device)


# --------------------------------------------------------------------------- files, signature, plan


def find_media(root: Path, exclude: Path | None = None) -> list[tuple[str, str]]:
    """``(relative POSIX path, "image" | "video")`` of the files to annotate (see the module doc), sorted by
    path components. Content decides: an image (Pillow reads it) first, else a video (:func:`is_video`), else
    the extension (an unreadable file named like an image or a video is kept, to be reported)."""
    Image.init()
    suffixes = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    skip = exclude.resolve() if exclude is not None else None
    inside = lambda p: skip is not None and (p.resolve() == skip or skip in p.resolve().parents)
    images = {p for p in list_images(root) if not inside(p)}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not inside(Path(dirpath) / d)]
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            suffix = path.suffix.lower()
            if path in images:
                kind = IMAGE
            elif is_video(path):
                kind = VIDEO
            elif suffix in suffixes:
                kind = IMAGE
            elif suffix in VIDEO_SUFFIXES:
                kind = VIDEO
            else:
                continue
            found.append((path.relative_to(root), kind))
    return [(p.as_posix(), kind) for p, kind in sorted(found, key=lambda f: f[0].parts)]


def run_signature(prompts: Sequence[str], model_dir: Path, mask_threshold: float = 0.0) -> str:
    """Hash of what decides a per-image result: record format, question template, prompts, model files, a mask
    threshold other than 0. (Device, precision and batch size are not in it: they do not change what is asked.)"""
    data = {"version": RECORD_VERSION, "question": QUESTION, "prompts": list(prompts),
            "model": model_fingerprint(model_dir)}
    if mask_threshold:   # absent at 0, so runs made before the option existed resume
        data["mask_threshold"] = float(mask_threshold)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """Content hash of a checkpoint: every file of the folder (but the model card and pictures) and the
    official files its ``groundseg.json`` points at. Files over 1 GiB: size, mtime, first and last 64 MiB."""
    model_dir = Path(model_dir)
    config = model_dir / CONFIG_NAME
    if not config.is_file():
        raise CheckpointError(f"not a groundseg checkpoint: {config} does not exist")
    external = json.loads(config.read_text(encoding="utf-8"))
    bases = [model_dir] + [Path(external[k]) for k in ("vlm_path", "decoder_checkpoint") if external.get(k)]
    digest = hashlib.blake2b(digest_size=16)
    for base in bases:
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(base) if path != base else Path(path.name)
            if any(part.startswith(".") for part in rel.parts) or (base == model_dir and len(rel.parts) == 1
                                                                    and path.suffix.lower() in _NOT_MODEL):
                continue
            digest.update(f"{base.name}/{rel.as_posix()}\0".encode())
            digest.update(_file_digest(path))
    return digest.hexdigest()


def _file_digest(path: Path) -> bytes:
    stat = path.stat()
    digest = hashlib.blake2b(f"{stat.st_size}".encode(), digest_size=16)
    with open(path, "rb") as handle:
        if stat.st_size <= _HUGE:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        else:
            digest.update(f"{stat.st_mtime_ns}".encode())
            digest.update(handle.read(1 << 26))
            handle.seek(-(1 << 26), os.SEEK_END)
            digest.update(handle.read())
    return digest.digest()


def _source(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _valid(record: dict | None, settings: Settings, item_source: tuple[int, int], kind: str) -> bool:
    return (record is not None and record.get("version") == RECORD_VERSION
            and record.get("kind", IMAGE) == kind and record.get("signature") == settings.signature_for(kind)
            and tuple(record.get("source", ())) == item_source)


def _plan(settings: Settings, files: list[tuple[str, str]]) -> tuple[list[Item], int]:
    """-> (files to do, in order; number of valid earlier results). Invalid results are deleted, so an
    existing result file always means a finished file (the progress bar counts them)."""
    todo, reused = [], 0
    for file, kind in files:
        source = _source(Path(settings.input_dir) / file)
        path = record_path(settings, file)
        record = read_record(path)
        if not _valid(record, settings, source, kind):
            if path.exists():
                path.unlink()
            todo.append(Item(file, source, kind=kind))
            continue
        reused += 1
        if settings.overlays and record["status"] == "ok" and not overlay_path(settings, file, kind).is_file():
            todo.append(Item(file, source, overlay_only=True, kind=kind))
    return todo, reused


# --------------------------------------------------------------------------- merge, lock, progress


def _merge(settings: Settings, files: list[tuple[str, str]], formats: Sequence[str]) -> Summary:
    """Read every per-file result (sorted order) and write errors.jsonl and the chosen formats. Track ids run
    1, 2, ... over the whole output: video by video, prompt by prompt, object id by object id."""
    out = Path(settings.out_dir)
    ok = []
    errors = []
    for file, kind in files:
        record = read_record(record_path(settings, file))
        if not _valid(record, settings, _source(Path(settings.input_dir) / file), kind):
            raise AnnotateError(f"no valid result for {file} after the run (was it changed meanwhile?); run again")
        if record["status"] == "error":  # type: ignore[index]
            errors.append({"file": file, "reason": record["reason"]})  # type: ignore[index]
        else:
            ok.append((file, kind, record))
    names = []
    for file, kind, record in ok:
        names += [frame_file(file, i) for i in range(record["video"]["num_frames"])] if kind == VIDEO else [file]
    writers = [WRITERS[f](out, settings.prompts, names) for f in formats]
    summary = Summary(objects={p: 0 for p in settings.prompts})
    next_track = 1
    for file, kind, record in ok:
        if kind == VIDEO:
            images, tracks = video_frames(file, record, next_track)
            next_track += len(tracks)
            for category, _ in tracks:
                summary.objects[settings.prompts[category]] += 1
            summary.videos += 1
            summary.frames += record["video"]["num_frames"]
        else:
            height, width = record["image_size"]
            instances = instances_from([Prediction.from_json(p) for p in record["predictions"]])
            images = [AnnotatedImage(file, width, height, instances)]
            for inst in instances:
                summary.objects[settings.prompts[inst.category]] += 1
            summary.images += 1
        for image in images:
            for writer in writers:
                writer.add(image)
    errors_path = atomic_write_text(out / ERRORS_FILE, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
    summary.outputs = [errors_path] + [w.finish() for w in writers]
    if settings.overlays:
        summary.outputs.append(out / OVERLAYS_DIR)
    summary.errors = len(errors)
    return summary


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold a lock on ``out`` (released by the OS even when the process is killed)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise AnnotateError(f"another groundseg annotate is writing into {out}; wait for it or use "
                                "another --out folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_temporaries(out: Path) -> None:
    for dirpath, _dirs, filenames in os.walk(out):
        for name in filenames:
            if _TEMPORARY.match(name):
                (Path(dirpath) / name).unlink(missing_ok=True)


@contextmanager
def _progress_bar(total: int, completed: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (images done / total, images/s of this run), or nothing."""
    started, done = time.perf_counter(), [0]
    with progress_bar(total, "annotate", enabled=enabled, completed=completed, fields={"rate": "{} images/s"}) as step:
        def advance(n: int) -> None:
            done[0] += n
            step(n, rate=f"{done[0] / max(time.perf_counter() - started, 1e-9):.2f}")
        yield advance
