"""Reading videos as streams of frames, and writing MP4s, with checks that fail early and clearly.

Every frame comes out as the project's one image form: RGB ``uint8`` ``H x W x 3``, upright (the
container's display rotation is applied, as EXIF orientation is for images). Frame ``i`` is the
``i``-th frame in PRESENTATION order, counted from 0; its time is ``time_s(i)`` seconds from the
first frame.

A :class:`VideoReader` never holds the video: ``frames(start, stop)`` decodes lazily (seeking to
the nearest key frame before ``start``), ``frames_reversed(start, stop, chunk)`` walks backwards
by decoding ``chunk`` frames at a time and reversing each chunk, so at most ``chunk`` frames are
alive. Opening a file demuxes it once without decoding (packet timestamps only: a few bytes per
frame) to count frames, find key frames, measure the frame rate and spot truncation, and decodes
frame 0 to prove the codec works.

Sources: a video file (anything FFmpeg reads, through PyAV), a folder of image files (sorted by
name; e.g. the synthetic videos' ``frame_00000.png`` ...), or frames already in memory (a list of
arrays or an ``N x H x W x 3`` array). Failures raise :class:`~grounding.errors.VideoError`:
missing file, not a video, no video stream, zero frames, truncated file (fewer frames than its
header promises, or decoding stops early), undecodable frames, more than ``max_pixels`` pixels
per frame (checked before any frame is decoded), repeated timestamps, and — with
``strict_frame_rate=True`` — a variable frame rate. A variable frame rate is accepted by default:
frames keep their own timestamps (``time_s``), which the writer can reproduce.
"""
from __future__ import annotations

import abc
import bisect
import os
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from grounding.errors import ImageError, VideoError

DEFAULT_MAX_VIDEO_PIXELS = 4096 * 4096   # per frame: 4K UHD and DCI 4K pass, 8K is refused
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

VideoSource = Union[str, os.PathLike, Sequence[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class VideoInfo:
    """What a reader knows before decoding: ``num_frames`` is exact (counted, not the header's guess);
    ``fps`` is the average rate (frames / duration); ``width``/``height`` are after display rotation."""

    name: str
    width: int
    height: int
    num_frames: int
    fps: float
    variable_frame_rate: bool
    codec: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``, the project's order for image sizes."""
        return self.height, self.width


class VideoReader:
    """A video as a random-access-by-seeking stream of frames (see the module docstring)."""

    def __init__(self, source: VideoSource, *, max_pixels: int = DEFAULT_MAX_VIDEO_PIXELS,
                 strict_frame_rate: bool = False, fps: float = 25.0):
        """``fps`` is used only for image folders and in-memory frames, which carry no timing."""
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            self._backend: _Backend = _FolderBackend(Path(source), max_pixels, fps)
        elif isinstance(source, (str, os.PathLike)):
            self._backend = _PyAVBackend(Path(source), max_pixels)
        elif isinstance(source, np.ndarray) or isinstance(source, (list, tuple)):
            self._backend = _ArrayBackend(source, max_pixels, fps)
        else:
            raise VideoError(f"a video must be a file path, a folder of frames or a list of frames, "
                             f"got {type(source).__name__}")
        self.info = self._backend.info
        if strict_frame_rate and self.info.variable_frame_rate:
            raise VideoError(f"{self.info.name} has a variable frame rate; re-encode it at a constant rate "
                             f"(e.g. ffmpeg -i IN -vsync cfr OUT.mp4) or accept it (strict_frame_rate=False)")

    def __len__(self) -> int:
        return self.info.num_frames

    def time_s(self, index: int) -> float:
        """Seconds from the first frame to frame ``index``."""
        return self._backend.time_s(self._check_index(index))

    def frames(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, rgb)`` for ``start <= index < stop`` in increasing order, decoded one at a time."""
        stop = self.info.num_frames if stop is None else stop
        if not 0 <= start <= stop <= self.info.num_frames:
            raise VideoError(f"frame range [{start}, {stop}) is outside the {self.info.num_frames} frames "
                             f"of {self.info.name}")
        if start == stop:
            return iter(())
        return self._backend.frames(start, stop)

    def frames_reversed(self, start: int = 0, stop: int | None = None,
                        chunk: int = 16) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, rgb)`` for ``stop - 1`` down to ``start``: chunks of ``chunk`` frames are decoded
        forwards (one seek each) and handed out backwards, so at most ``chunk`` frames are alive."""
        stop = self.info.num_frames if stop is None else stop
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        end = stop
        while end > start:
            begin = max(start, end - chunk)
            block = list(self.frames(begin, end))
            while block:
                yield block.pop()
            end = begin

    def read(self, index: int) -> np.ndarray:
        """One frame (decodes from the key frame before it)."""
        self._check_index(index)
        for _, rgb in self.frames(index, index + 1):
            return rgb
        raise VideoError(f"frame {index} of {self.info.name} could not be read")  # pragma: no cover

    def _check_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or not 0 <= int(index) < self.info.num_frames:
            raise VideoError(f"frame {index!r} does not exist: {self.info.name} has "
                             f"{self.info.num_frames} frames (0..{self.info.num_frames - 1})")
        return int(index)


# ---- sources --------------------------------------------------------------------------------------------


class _Backend(abc.ABC):
    """One kind of video source (in-memory frames, a folder of images, a file PyAV decodes)."""
    info: VideoInfo

    def time_s(self, index: int) -> float:
        return index / self.info.fps

    @abc.abstractmethod
    def frames(self, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, uint8 H x W x 3 RGB)`` for frames ``start <= index < stop``, in order."""


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise VideoError(f"{name} has no readable frame size ({width}x{height})")
    if width * height > max_pixels:
        raise VideoError(f"{name} is {width}x{height} ({width * height / 1e6:.1f} MP per frame), more than "
                         f"the {max_pixels / 1e6:.1f} MP accepted; downscale it (e.g. ffmpeg -vf scale=-2:2160) "
                         f"or raise max_pixels")


class _ArrayBackend(_Backend):
    """Frames already in memory (tests, the web app): every frame must be ``uint8`` ``H x W x 3`` of one size."""

    def __init__(self, frames, max_pixels: int, fps: float):
        self._frames = frames
        n = len(frames)
        if n == 0:
            raise VideoError("the video has no frames")
        first = np.asarray(frames[0])
        if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3:
            raise VideoError(f"in-memory frames must be uint8 H x W x 3 RGB arrays, got {first.dtype} {first.shape}")
        _check_pixels("the in-memory video", first.shape[1], first.shape[0], max_pixels)
        if fps <= 0:
            raise VideoError(f"fps must be positive, got {fps}")
        self.info = VideoInfo("the in-memory video", first.shape[1], first.shape[0], n, float(fps), False)

    def frames(self, start, stop):
        for i in range(start, stop):
            rgb = np.asarray(self._frames[i])
            if rgb.shape != (self.info.height, self.info.width, 3) or rgb.dtype != np.uint8:
                raise VideoError(f"in-memory frame {i} is {rgb.dtype} {rgb.shape}, expected uint8 "
                                 f"{(self.info.height, self.info.width, 3)}")
            yield i, np.array(rgb)


class _FolderBackend(_Backend):
    """A folder of image files, one per frame, in file-name order."""

    def __init__(self, folder: Path, max_pixels: int, fps: float):
        from PIL import Image

        self._files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._files:
            raise VideoError(f"{folder} holds no frames (image files named in frame order)")
        if fps <= 0:
            raise VideoError(f"fps must be positive, got {fps}")
        self._max_pixels = max_pixels
        try:
            with Image.open(self._files[0]) as im:   # header only
                width, height = im.size
        except OSError as err:
            raise VideoError(f"{self._files[0]} is not a readable image: {err}") from err
        _check_pixels(str(folder), width, height, max_pixels)
        self.info = VideoInfo(str(folder), width, height, len(self._files), float(fps), False)

    def frames(self, start, stop):
        from grounding.images import load_image

        for i in range(start, stop):
            try:
                rgb = load_image(self._files[i], max_pixels=self._max_pixels)
            except ImageError as err:
                raise VideoError(f"frame {i} ({self._files[i].name}): {err}") from err
            if rgb.shape[:2] != self.info.size:
                raise VideoError(f"frame {i} ({self._files[i].name}) is {rgb.shape[1]}x{rgb.shape[0]}, the "
                                 f"first frame is {self.info.width}x{self.info.height}: frames must share one size")
            yield i, rgb


class _PyAVBackend(_Backend):
    """A video file read with PyAV (FFmpeg). See the module docstring for what is checked."""

    def __init__(self, path: Path, max_pixels: int):
        try:
            import av
        except ImportError as err:  # pragma: no cover - av is a dependency
            raise VideoError("reading video files needs PyAV: pip install av") from err
        self._av = av
        self.path = path
        name = str(path)
        if not path.is_file():
            raise VideoError(f"no video file at {path}")
        if path.stat().st_size == 0:
            raise VideoError(f"{path} is empty (0 bytes)")
        container = self._open()
        try:
            if not container.streams.video:
                raise VideoError(f"{path} has no video stream (not a video, a video without frames, or one truncated "
                                 f"before its index)")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            _check_pixels(name, int(ctx.width), int(ctx.height), max_pixels)
            header_frames = int(stream.frames or 0)
            pts, keys = [], []
            try:
                for packet in container.demux(stream):
                    if packet.size == 0:
                        continue   # the demuxer's end-of-stream marker
                    pts.append(packet.pts)
                    if packet.is_keyframe:
                        keys.append(packet.pts)
            except self._av.FFmpegError as err:
                raise VideoError(f"{path} is corrupt after {len(pts)} frames: {err}") from err
            self._time_base = stream.time_base or Fraction(1, 1)
            codec = ctx.name
            average_rate = stream.average_rate
        finally:
            container.close()
        if not pts:
            raise VideoError(f"{path} has no frames")
        if header_frames > len(pts):
            raise VideoError(f"{path} is truncated: its header announces {header_frames} frames but the file "
                             f"holds {len(pts)}")
        self._seekable = all(p is not None for p in pts)
        if self._seekable:
            order = sorted(pts)
            if len(set(order)) != len(order):
                raise VideoError(f"{path} repeats frame timestamps: the file is damaged; re-encode it")
            self._pts = order
            self._index = {p: i for i, p in enumerate(order)}
            self._keys = sorted(k for k in keys if k is not None) or [order[0]]
            deltas = np.diff(np.asarray(order, dtype=np.int64))
            duration = float((order[-1] - order[0]) * self._time_base)
            fps = (len(order) - 1) / duration if duration > 0 else float(average_rate or 25)
            median = float(np.median(deltas)) if len(deltas) else 0.0
            variable = bool(len(deltas)) and bool(
                (np.abs(deltas - median) > max(2.0, 0.1 * median)).any())
        else:   # no timestamps (some raw streams): frames are counted, seeking decodes from the start
            self._pts, self._index, self._keys = [], {}, []
            fps, variable = float(average_rate or 25), False
        # Decode frame 0 now: an unsupported codec or a broken first frame fails here, not mid-job.
        self._rotation = 0
        self.info = VideoInfo(name, int(ctx.width), int(ctx.height), len(pts), float(fps), variable, codec)
        frames = self._decode(0, 1, seek=False)
        first = next(frames)[1]
        frames.close()
        self.info = VideoInfo(name, first.shape[1], first.shape[0], len(pts), float(fps), variable, codec)

    def _open(self):
        try:
            return self._av.open(str(self.path), metadata_errors="ignore")
        except self._av.error.EOFError as err:
            raise VideoError(f"{self.path} ends before its first frame (an empty or truncated video)") from err
        except self._av.FFmpegError as err:
            # FFmpeg's own words without its errno and the file name it repeats: "[Errno 1094995529] Invalid data
            # found when processing input: '...'" -> "invalid data found when processing input"
            reason = (getattr(err, "strerror", None) or str(err)).strip().rstrip(".")
            raise VideoError(f"{self.path} is not a readable video (not a video, or a truncated or corrupt one: "
                             f"{reason[:1].lower() + reason[1:]})") from err

    def time_s(self, index: int) -> float:
        if not self._pts:
            return index / self.info.fps
        return float((self._pts[index] - self._pts[0]) * self._time_base)

    def frames(self, start, stop):
        return self._decode(start, stop, seek=self._seekable)

    def _decode(self, start: int, stop: int, seek: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Frames ``start .. stop-1``. With ``seek``: jump to the last key frame at or before ``start`` and
        index frames by timestamp; if that lands after ``start`` (or timestamps disagree with the demuxer's),
        decode from the beginning and count frames instead (slow but always right)."""
        by_pts = seek and start > 0
        container = self._open()
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if by_pts:
                key = self._keys[max(0, bisect.bisect_right(self._keys, self._pts[start]) - 1)]
                container.seek(int(key), stream=stream, backward=True, any_frame=False)
            expected, counter, fallback = start, 0, False
            for frame in self._frames_of(container, stream, expected):
                if by_pts:
                    index = self._index.get(frame.pts)
                    if index is None or index > expected:
                        fallback = True
                        break
                else:
                    index, counter = counter, counter + 1
                if index < expected:
                    continue
                yield index, self._to_rgb(frame, index)
                expected += 1
                if expected >= stop:
                    return
            if not fallback:
                raise VideoError(f"{self.path} is truncated or corrupt: decoding stopped at frame {expected} "
                                 f"of {self.info.num_frames}")
        finally:
            container.close()
        yield from self._decode(expected, stop, seek=False)

    def _frames_of(self, container, stream, expected: int):
        try:
            for frame in container.decode(stream):
                yield frame
        except self._av.FFmpegError as err:
            raise VideoError(f"{self.path}: frame {expected} or after cannot be decoded (truncated or corrupt "
                             f"file): {err}") from err

    def _to_rgb(self, frame, index: int) -> np.ndarray:
        rgb = frame.to_ndarray(format="rgb24")
        quarter = int(round((getattr(frame, "rotation", 0) or 0) / 90.0)) % 4
        if quarter:   # display matrix: rotate counter-clockwise by `rotation` degrees to show upright
            rgb = np.ascontiguousarray(np.rot90(rgb, k=quarter))
        if index > 0 and rgb.shape[:2] != self.info.size:
            raise VideoError(f"{self.path}: frame {index} is {rgb.shape[1]}x{rgb.shape[0]} but frame 0 is "
                             f"{self.info.width}x{self.info.height}; frame size changes are not supported")
        return rgb


# ---- writing --------------------------------------------------------------------------------------------


class VideoWriter:
    """Encode RGB frames into an MP4, one at a time: H.264 (``libx264``, yuv420p, plays in browsers) when
    available, else MPEG-4 Part 2. yuv420p needs even sides: an odd width or height is padded by one
    pixel (edge replicated). Timestamps: ``write(rgb, time_s)`` keeps each frame's own time (variable
    frame rates survive); without ``time_s`` frames are ``1 / fps`` apart.

    Writes to ``path`` directly: callers that need atomicity give a temporary name and rename it."""

    TIME_BASE = Fraction(1, 90_000)

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float, crf: int = 23):
        import av

        self._av = av
        self.path = Path(path)
        self.width, self.height = int(width), int(height)
        self._padded = (self.width + self.width % 2, self.height + self.height % 2)
        rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(25)
        self._container = av.open(str(self.path), "w", format="mp4")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._stream = self._container.add_stream(codec, rate=rate)
        self._stream.width, self._stream.height = self._padded
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = self.TIME_BASE
        if codec == "libx264":
            self._stream.options = {"crf": str(crf), "preset": "veryfast"}
        self._step = 1.0 / float(rate)
        self._count, self._last_pts = 0, -1

    def write(self, rgb: np.ndarray, time_s: float | None = None) -> None:
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"expected uint8 {(self.height, self.width, 3)}, got {rgb.dtype} {rgb.shape}")
        if self._padded != (self.width, self.height):
            rgb = np.pad(rgb, ((0, self._padded[1] - self.height), (0, self._padded[0] - self.width), (0, 0)),
                         mode="edge")
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        seconds = self._count * self._step if time_s is None else float(time_s)
        pts = max(int(round(seconds / self.TIME_BASE)), self._last_pts + 1)
        frame.pts, frame.time_base = pts, self.TIME_BASE
        self._last_pts = pts
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self._count += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def temporary_name(final: Path) -> Path:
    """A hidden sibling of ``final`` for writing before an atomic rename (same folder, same suffix)."""
    return final.with_name(f".{final.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{final.suffix}")
