"""Reading user images into one canonical form: RGB ``uint8`` arrays ``H x W x 3``.

Everything downstream (the VLM processor, the mask decoders, the overlay, the caches) takes
that one form, so every oddity of real-world files is settled here, once:

- the EXIF orientation is applied, so ``H x W`` is what a person sees in a viewer, and every
  box / mask / point is in those displayed pixel coordinates;
- grayscale, palette, CMYK, YCbCr, ... become RGB; anything with transparency is composited
  on white (a transparent background is "nothing", and white is how viewers show it);
- 16-bit data is scaled by its full range (``round(v / 257)``) instead of being clipped;
- images are recognised by their content, never by their file extension;
- the pixel count is checked against ``max_pixels`` from the header, before any pixel is
  decoded, so a decompression bomb is refused without being expanded.

Every failure is an :class:`~grounding.errors.ImageError` whose message names the input.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Iterator, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from grounding.errors import ImageError

DEFAULT_MAX_PIXELS = 100_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# EXIF tag 0x0112; values 2..8 need a flip and/or rotation to display upright.
_EXIF_ORIENTATION = 0x0112

# Modes holding one integer or float channel wider than 8 bits. Pillow's own convert("L")
# clips these at 255, which turns a 16-bit scan white; we scale them ourselves.
_WIDE_GRAY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}

# Guards the two Pillow module globals we change for the duration of a decode (see _pillow_guard).
_PILLOW_LOCK = threading.Lock()


# --------------------------------------------------------------------------- public API


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    name: str | None = None,
) -> np.ndarray:
    """Load ``source`` as an upright RGB image.

    Args:
        source: a file path (``str`` / ``os.PathLike``), the encoded file as ``bytes``, a
            ``PIL.Image.Image``, or a numpy array ``H x W``, ``H x W x 1``, ``H x W x 3`` (RGB)
            or ``H x W x 4`` (RGBA) of dtype ``uint8``, ``uint16`` (full 16-bit range),
            ``bool`` or float (values in ``[0, 1]``).
        max_pixels: largest accepted ``H * W``; checked before decoding.
        name: how error messages refer to the input (default: the path, or a description).

    Returns:
        A new, writable, C-contiguous ``uint8`` array ``H x W x 3`` in RGB order, in displayed
        orientation (EXIF applied). Arrays given as input are copied, never aliased.

    Raises:
        ImageError: the input is missing, empty, not an image, corrupt or truncated, has zero
            size, or has more than ``max_pixels`` pixels.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name or "the image array", max_pixels)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, name or "the PIL image", max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or f"the uploaded image ({len(data)} bytes)"
        if not data:
            raise ImageError(f"{label} is empty: no bytes were received")
        return _decode_file(io.BytesIO(data), label, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        _check_readable_file(path, label)
        return _decode_file(path, label, max_pixels)
    raise ImageError(
        f"cannot read an image from a {type(source).__name__}; "
        "give a file path, bytes, a PIL image or a numpy array"
    )


def image_digest(image: np.ndarray) -> str:
    """A content hash of an array (shape, dtype and bytes), for use as a cache key.

    Two arrays get the same digest iff they have the same shape, dtype and values; the memory
    layout does not matter. Returns 32 hex characters (BLAKE2b, 128-bit).
    """
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.shape}|{array.dtype.str}|".encode())
    digest.update(array.reshape(-1).view(np.uint8))  # raw bytes, without a copy
    return digest.hexdigest()


def list_images(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield every image file under ``folder`` (recursively), in sorted path order.

    A file counts as an image when Pillow recognises its content from the header (the pixels
    are not decoded), whatever its extension: ``scan.txt`` holding a PNG is listed, ``notes.jpg``
    holding text is not. Hidden files and folders (name starting with ``.``) are skipped.

    Raises:
        ImageError: ``folder`` does not exist or is not a folder.
    """
    root = Path(folder)
    # Checked here, not in the generator, so a wrong folder fails at the call, not at first use.
    if not root.exists():
        raise ImageError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ImageError(f"not a folder: {root}; give a folder of images")
    return _image_files(root)


def _image_files(root: Path) -> Iterator[Path]:
    # Sort the whole tree by path components first, so the order does not depend on the
    # file system; the (slower) content check then runs lazily, one file at a time.
    for path in sorted(_visible_files(root), key=lambda p: p.relative_to(root).parts):
        if _looks_like_image(path):
            yield path


# --------------------------------------------------------------------------- files and bytes


def _check_readable_file(path: Path, label: str) -> None:
    """Turn the common "wrong path" mistakes into messages before Pillow sees the path."""
    if not path.exists():
        raise ImageError(f"image file not found: {label}")
    if path.is_dir():
        raise ImageError(f"{label} is a folder, not an image file")
    if not path.is_file():
        raise ImageError(f"{label} is not a regular file")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageError(f"cannot read {label}: {err.strerror or err}") from err
    if size == 0:
        raise ImageError(f"{label} is empty (0 bytes)")


def _decode_file(fp: Path | io.BytesIO, label: str, max_pixels: int) -> np.ndarray:
    """Open an encoded image (file path or in-memory file), check its size, decode it."""
    try:
        with _pillow_guard(None):
            image = Image.open(fp)
    except PermissionError as err:
        raise ImageError(f"cannot read {label}: permission denied") from err
    except MemoryError:
        raise
    except UnidentifiedImageError as err:
        raise ImageError(f"{label} is not an image (unknown or unsupported format)") from err
    except Exception as err:  # Pillow raises many types for damaged headers; all mean the same
        raise ImageError(f"{label} is not a readable image ({_reason(err)})") from err
    with image:
        return _pil_to_rgb(image, label, max_pixels)


def _visible_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune hidden folders
        for filename in filenames:
            if not filename.startswith("."):
                yield Path(dirpath) / filename


def _looks_like_image(path: Path) -> bool:
    """True when Pillow identifies ``path``'s content as an image (header only)."""
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        with _pillow_guard(None):
            with Image.open(path):
                return True
    except MemoryError:
        raise
    except Exception:
        return False


# --------------------------------------------------------------------------- PIL images


def _pil_to_rgb(image: Image.Image, label: str, max_pixels: int) -> np.ndarray:
    """Check the size from the header, then decode, orient and convert to RGB ``uint8``."""
    width, height = image.size
    _check_size(height, width, label, max_pixels)
    try:
        with _pillow_guard(width * height):
            image.load()
    except MemoryError:
        raise
    except Exception as err:  # OSError for truncation, SyntaxError/ValueError for bad streams
        raise ImageError(f"{label} is corrupt or truncated ({_reason(err)})") from err
    image = _apply_exif_orientation(image)
    try:
        return _convert_to_rgb(image)
    except ValueError as err:  # Pillow: "conversion from <mode> to RGB not supported"
        raise ImageError(f"{label} has pixel format {image.mode!r}, which cannot be converted to RGB") from err


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Flip/rotate to the orientation a viewer displays (EXIF tag 0x0112)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        # Only transpose when there is something to do: it copies the whole image, which
        # matters for the largest images we accept.
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except Exception:
        # Broken EXIF is broken metadata, not broken pixels: keep the image as stored.
        pass
    return image


def _convert_to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> ``uint8`` ``H x W x 3`` RGB."""
    mode = image.mode
    if mode in _WIDE_GRAY_MODES:
        # 16-bit PNG/TIFF. Mode "I" (32-bit int) also holds 16-bit data in practice, so it is
        # read in the same range; values outside 0..65535 are clipped.
        gray = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return _gray_to_rgb(_uint16_to_uint8(gray))
    if mode == "F":
        return _gray_to_rgb(_float_gray_to_uint8(np.asarray(image)))
    if _has_transparency(image):
        return _composite_on_white(_pixels(image.convert("RGBA")))
    if mode == "L":
        return _gray_to_rgb(_pixels(image))
    if mode != "RGB":
        image = image.convert("RGB")  # 1, P, CMYK, YCbCr, LAB, HSV, ...
    return _pixels(image)


def _pixels(image: Image.Image) -> np.ndarray:
    """A writable ``uint8`` array of an 8-bit image: ``H x W`` (L) or ``H x W x C``.

    ``np.asarray(image)`` would be read-only (it wraps an immutable ``bytes``) and ``np.array``
    copies it a second time; a ``bytearray`` gives a writable buffer with one cheap copy.
    """
    buffer = bytearray(image.tobytes())
    array = np.frombuffer(buffer, dtype=np.uint8)
    channels = len(image.getbands())
    shape = (image.height, image.width) if channels == 1 else (image.height, image.width, channels)
    return array.reshape(shape)


def _has_transparency(image: Image.Image) -> bool:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def _float_gray_to_uint8(values: np.ndarray) -> np.ndarray:
    """Mode "F" (32-bit float, e.g. float TIFF): values within ``[0, 1]`` are read as
    fractions of white; anything else is read on the 0..255 scale, clipped (Pillow's convention)."""
    values = np.nan_to_num(values.astype(np.float32), nan=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)


# --------------------------------------------------------------------------- numpy arrays


def _array_to_rgb(array: np.ndarray, label: str, max_pixels: int) -> np.ndarray:
    """``H x W`` / ``H x W x {1,3,4}`` of uint8, uint16, bool or float in [0, 1] -> RGB uint8."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(
            f"{label} has shape {array.shape}; expected H x W, H x W x 1, H x W x 3 (RGB) "
            "or H x W x 4 (RGBA)"
        )
    _check_size(array.shape[0], array.shape[1], label, max_pixels)
    array = _array_to_uint8(array, label)
    if array.ndim == 2:
        return _gray_to_rgb(array)
    if array.shape[2] == 4:
        return _composite_on_white(array)
    return np.array(array, dtype=np.uint8, order="C", copy=True)  # never alias the caller's data


def _array_to_uint8(array: np.ndarray, label: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype == np.uint16:
        return _uint16_to_uint8(array)
    if np.issubdtype(array.dtype, np.floating):
        return _unit_float_to_uint8(array, label)
    raise ImageError(
        f"{label} has dtype {array.dtype}; give uint8 (0..255), uint16 (0..65535), bool, "
        "or float in [0, 1] (e.g. convert with array.astype(np.uint8))"
    )


def _unit_float_to_uint8(array: np.ndarray, label: str) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise ImageError(f"{label} contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    tolerance = 1e-6  # float rounding in a user's normalisation must not be an error
    if low < -tolerance or high > 1.0 + tolerance:
        raise ImageError(
            f"{label} is a float array with values in [{low:g}, {high:g}]; float images must "
            "be in [0, 1] (divide 0..255 data by 255, or pass uint8)"
        )
    return np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- pixel helpers


def _check_size(height: int, width: int, label: str, max_pixels: int) -> None:
    if height <= 0 or width <= 0:
        raise ImageError(f"{label} has zero size ({width}x{height} pixels)")
    if height * width > max_pixels:
        raise ImageError(
            f"{label} is {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} pixels; downscale it or raise max_pixels"
        )


def _uint16_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale the full 16-bit range onto 8 bits: ``round(v / 257)`` (65535 -> 255, 257k -> k)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """``H x W`` uint8 -> ``H x W x 3`` uint8, C-contiguous."""
    rgb = np.empty(gray.shape + (3,), dtype=np.uint8)
    rgb[...] = gray[:, :, None]  # a broadcast copy; faster than np.repeat on large images
    return rgb


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """``H x W x 4`` uint8 RGBA over a white background -> ``H x W x 3`` uint8 RGB."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    # rgb*a + 255*(255-a) <= 255*255, so uint16 holds the sum; +127 rounds to nearest.
    blended = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return np.ascontiguousarray(blended.astype(np.uint8))


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextlib.contextmanager
def _pillow_guard(pixels: int | None) -> Iterator[None]:
    """Make Pillow strict and leave the size limit to us, for the duration of one step.

    Pillow keeps two process-wide switches: ``Image.MAX_IMAGE_PIXELS`` (a warning above ~89 MP,
    an error above twice that, raised while opening and, for GIF/TIFF, while decoding) and
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` (when True, a truncated file decodes to grey instead of
    failing). We check ``max_pixels`` ourselves from the header, so Pillow's limit must not fire
    first for images under ours, and truncated data must fail.

    ``pixels=None`` (opening a header) always takes the guard; decoding takes it only when a
    switch would matter, so ordinary images decode in parallel threads without the lock.
    """
    limit = Image.MAX_IMAGE_PIXELS
    needed = (
        pixels is None
        or _PILLOW_LOCK.locked()  # another thread has the switches changed: wait for it
        or ImageFile.LOAD_TRUNCATED_IMAGES
        or (limit is not None and pixels > limit)
    )
    if not needed:
        yield
        return
    with _PILLOW_LOCK:
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved
