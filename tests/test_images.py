"""Tests of grounding.images: every input kind and file oddity -> RGB uint8 H x W x 3, or a clear
ImageError. All images are generated in tmp_path at test time."""
from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from grounding.errors import ImageError
from grounding.images import image_digest, list_images, load_image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` RGB, with a few bytes of pixel data: opening it
    is cheap, decoding it would fail (or allocate width*height*4 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def assert_canonical(array: np.ndarray, shape: tuple[int, int]) -> None:
    assert array.dtype == np.uint8
    assert array.shape == (*shape, 3)
    assert array.flags.c_contiguous and array.flags.writeable


# --------------------------------------------------------------------------- errors


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "no such photo.jpg"
    with pytest.raises(ImageError, match="not found") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(ImageError, match="folder") as info:
        load_image(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_not_an_image(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("this is a text file, not a JPEG\n")
    with pytest.raises(ImageError, match="not an image") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageError):
        load_image(b"\x89PNG\r\n\x1a\n garbage after a PNG signature")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_raises_instead_of_grey(tmp_path, fmt):
    data = encode(Image.fromarray(noise()), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_raises_even_if_pillow_was_told_to_allow_it(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(Image.fromarray(noise()), "JPEG")
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_zero_size_array():
    with pytest.raises(ImageError, match="zero size"):
        load_image(np.zeros((0, 5, 3), np.uint8))


def test_unsupported_source_type():
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        load_image(42)


# --------------------------------------------------------------------------- size limits


def test_one_pixel_image(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    out = load_image(path)
    assert_canonical(out, (1, 1))
    assert out[0, 0].tolist() == [10, 20, 30]


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_100_megapixels_is_accepted(tmp_path):
    path = tmp_path / "huge.png"
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow alone would complain (> 89 MP)
        Image.new("L", (10000, 10000), 77).save(path, compress_level=1)  # solid: ~0.5 MB on disk
        Image.open(path).close()
    out = load_image(path)
    assert_canonical(out, (10000, 10000))
    assert out[9999, 9999].tolist() == [77, 77, 77]


def test_over_the_limit_is_refused_from_the_header(monkeypatch):
    # The crafted file has almost no pixel data, so reaching the decoder would fail differently;
    # make sure it is never even called.
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(ImageError) as info:
        load_image(png_with_header(10001, 10000), name="bomb.png")
    message = str(info.value)
    assert "bomb.png" in message and "10001x10000" in message and "100,000,000" in message


def test_pillow_bomb_limit_does_not_fire_before_ours():
    # 400 MP is over twice Pillow's default limit (an error there) but under ours: we must get
    # past the header check and fail on the missing pixel data instead.
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(png_with_header(20000, 20000), max_pixels=500_000_000)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's global limit restored


def test_custom_limit_applies_to_every_source():
    image = np.zeros((10, 10, 3), np.uint8)
    for source in (image, Image.fromarray(image), encode(Image.fromarray(image), "PNG")):
        with pytest.raises(ImageError, match="more than the limit of 99"):
            load_image(source, max_pixels=99)


# --------------------------------------------------------------------------- modes


def test_grayscale_l(tmp_path):
    gray = np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)
    out = load_image(path)
    assert_canonical(out, (48, 64))
    assert np.array_equal(out, np.repeat(gray[..., None], 3, axis=2))


def test_la_composited_on_white():
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (100, 255))
    image.putpixel((1, 0), (100, 0))
    out = load_image(encode(image, "PNG"))
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (200, 10, 10)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0      # fully transparent
    rgba[0, 1, 3] = 128    # half transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = load_image(path)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [200, 10, 10]
    expected = [round((v * 128 + 255 * 127) / 255) for v in (200, 10, 10)]
    assert out[0, 1].tolist() == expected


def test_one_bit_image():
    image = Image.new("1", (3, 2), 0)
    image.putpixel((1, 1), 1)
    out = load_image(encode(image, "PNG"))
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_scaled_by_full_range(fmt):
    values = np.array([[0, 257, 257 * 100, 257 * 254 + 128, 257 * 254 + 129, 65535]], np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = load_image(encode(image, fmt))
    assert out[..., 0].tolist() == [[0, 1, 100, 254, 255, 255]]
    assert np.array_equal(out[..., 0], out[..., 2])


def test_16_bit_colour_png_uses_full_range(tmp_path):
    path = tmp_path / "deep.png"
    bgr = np.zeros((2, 3, 3), np.uint16)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 65535, 257 * 100, 0  # B, G, R as OpenCV writes
    assert cv2.imwrite(str(path), bgr)
    out = load_image(path)
    # Pillow reduces 16-bit colour to 8 bits itself (high byte): within 1 of round(v / 257).
    assert np.abs(out[0, 0].astype(int) - [0, 100, 255]).max() <= 1


def test_int32_and_float_modes():
    out = load_image(Image.fromarray(np.array([[0, 257 * 7, 70000]], np.int32), "I"))
    assert out[0, :, 0].tolist() == [0, 7, 255]
    out = load_image(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F"))
    assert out[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    image = Image.new("P", (2, 2), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    image.putpixel((1, 0), 1)
    out = load_image(encode(image, fmt, transparency=0))
    assert out[0, 0].tolist() == [255, 255, 255]   # index 0 is transparent
    assert out[0, 1].tolist() == [0, 0, 255]


def test_palette_without_transparency():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([10, 20, 30, 40, 50, 60] + [0] * (254 * 3))
    image.putpixel((1, 0), 1)
    assert load_image(image).tolist() == [[[10, 20, 30], [40, 50, 60]]]


def test_cmyk_jpeg():
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    image.paste((0, 0, 0, 0), (0, 0, 8, 16))              # white on the left
    out = load_image(encode(image, "JPEG", quality=100))
    assert np.abs(out[8, 2].astype(int) - [255, 255, 255]).max() <= 4
    assert np.abs(out[8, 13].astype(int) - [255, 0, 0]).max() <= 4


def test_ycbcr_image():
    rgb = Image.new("RGB", (4, 4), (30, 140, 220))
    out = load_image(rgb.convert("YCbCr"))
    assert np.abs(out[0, 0].astype(int) - [30, 140, 220]).max() <= 2


def test_exif_orientation_is_applied(tmp_path):
    stored = np.full((10, 20, 3), 255, np.uint8)   # stored W=20, H=10
    stored[:5, :5] = (255, 0, 0)                   # a red marker at the stored top-left
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6                               # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, quality=100, subsampling=0, exif=exif)
    out = load_image(path)
    assert out.shape == (20, 10, 3)
    # Turned clockwise, the stored top-left corner is displayed at the top-right.
    assert np.abs(out[1, 8].astype(int) - [255, 0, 0]).max() <= 10
    assert np.abs(out[18, 1].astype(int) - [255, 255, 255]).max() <= 10


def test_content_not_extension(tmp_path):
    path = tmp_path / "actually_a_png.txt"
    Image.new("RGB", (3, 2), (1, 2, 3)).save(path, format="PNG")
    assert load_image(path)[0, 0].tolist() == [1, 2, 3]


def test_concurrent_loads_agree_and_restore_pillow_settings(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    paths = []
    for seed in range(4):
        paths.append(tmp_path / f"{seed}.png")
        Image.fromarray(noise(seed=seed)).save(paths[-1])
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(load_image, paths * 4))
    for index, result in enumerate(results):
        assert np.array_equal(result, noise(seed=index % 4))
    assert Image.MAX_IMAGE_PIXELS == limit and ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bytes_pil_and_path_agree(tmp_path):
    pixels = noise()
    path = tmp_path / "n.png"
    Image.fromarray(pixels).save(path)
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), Image.open(path)):
        assert np.array_equal(load_image(source), pixels)


# --------------------------------------------------------------------------- numpy inputs


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1)])
def test_array_gray_uint8(shape):
    gray = np.arange(35, dtype=np.uint8).reshape(shape)
    out = load_image(gray)
    assert_canonical(out, (5, 7))
    assert np.array_equal(out[..., 1], gray.reshape(5, 7))


def test_array_rgb_is_copied_and_made_contiguous():
    base = noise(10, 20)
    view = base[:, ::2]                    # not contiguous
    out = load_image(view)
    assert_canonical(out, (10, 10))
    assert np.array_equal(out, view)
    same = load_image(base)
    same[0, 0] = 0
    assert not np.shares_memory(same, base)


def test_array_rgba_composited():
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (9, 8, 7, 255)
    rgba[0, 1] = (9, 8, 7, 0)
    assert load_image(rgba).tolist() == [[[9, 8, 7], [255, 255, 255]]]


def test_array_uint16_bool_float():
    assert load_image(np.array([[0, 257, 65535]], np.uint16))[0, :, 0].tolist() == [0, 1, 255]
    assert load_image(np.array([[True, False]]))[0, :, 0].tolist() == [255, 0]
    for dtype in (np.float16, np.float32, np.float64):
        out = load_image(np.array([[0.0, 0.5, 1.0]], dtype))
        assert out[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("array, match", [
    (np.array([[0.0, 2.0]]), r"\[0, 1\]"),
    (np.array([[0.0, np.nan]]), "NaN"),
    (np.zeros((3, 3), np.int64), "dtype int64"),
    (np.zeros((3, 3, 5), np.uint8), "shape"),
    (np.zeros((2, 3, 3, 3), np.uint8), "shape"),
])
def test_array_errors(array, match):
    with pytest.raises(ImageError, match=match):
        load_image(array)


# --------------------------------------------------------------------------- digest and listing


def test_image_digest():
    image = noise(8, 8)
    assert image_digest(image) == image_digest(image.copy())
    assert image_digest(image) == image_digest(np.asfortranarray(image))
    changed = image.copy()
    changed[3, 3, 0] ^= 1
    assert image_digest(changed) != image_digest(image)
    assert image_digest(image.reshape(16, 4, 3)) != image_digest(image)
    assert image_digest(image.view(np.int8)) != image_digest(image)
    for other in (np.zeros((0, 3), np.float16), np.ones((2, 2), bool), np.float32(1.5)):
        assert len(image_digest(other)) == 32


def test_list_images_by_content(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "b.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "a_png_named.txt", format="PNG")
    (tmp_path / "text_named.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (2, 2)).save(tmp_path / ".hidden.png")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    Image.new("L", (2, 2)).save(tmp_path / "sub" / "c.jpg")
    Image.new("L", (2, 2)).save(tmp_path / "sub" / "deeper" / "d.tif")
    (tmp_path / ".git").mkdir()
    Image.new("L", (2, 2)).save(tmp_path / ".git" / "e.png")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a_png_named.txt", "b.png", "sub/c.jpg", "sub/deeper/d.tif"]


def test_list_images_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        list_images(tmp_path / "nowhere")  # raises at the call, before iteration
    file = tmp_path / "f.png"
    Image.new("RGB", (2, 2)).save(file)
    with pytest.raises(ImageError, match="not a folder"):
        list(list_images(file))
