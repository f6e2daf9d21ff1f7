"""Image I/O at the edge: every input kind reads back as uint8 RGB [H, W, 3] in RGB order."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cellnet.data import imageio
from cellnet.errors import CellnetError
from cellnet.data.imageio import read_rgb, to_rgb8, write_image
from cellnet.files import write_text

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (40, 56), dtype=np.uint8)


def blocks() -> np.ndarray:
    """Flat red / green / blue / grey blocks: survives JPEG and shows a BGR swap at once."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[:32, :32] = (220, 30, 30)
    image[:32, 32:] = (30, 200, 40)
    image[32:, :32] = (20, 40, 210)
    image[32:, 32:] = (128, 128, 128)
    return image


def check_blocks(array: np.ndarray) -> None:
    """Each block's interior (away from JPEG's chroma-subsampled edges) keeps its colour."""
    assert array.dtype == np.uint8 and array.shape == (64, 64, 3)
    expected = blocks()
    for rows in (slice(6, 26), slice(38, 58)):
        for cols in (slice(6, 26), slice(38, 58)):
            mean = array[rows, cols].reshape(-1, 3).mean(axis=0)
            assert np.abs(mean - expected[rows, cols][0, 0]).max() < 8


def check_rgb8(array: np.ndarray, expected: np.ndarray, tolerance: int = 0) -> None:
    assert array.dtype == np.uint8 and array.shape == expected.shape[:2] + (3,)
    assert np.abs(array.astype(int) - expected.astype(int)).max() <= tolerance


# ----------------------------------------------------------------------------- TIFF

def test_tiff_rgb8(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", RGB, photometric="rgb")
    check_rgb8(read_rgb(tmp_path / "a.tif"), RGB)


def test_tiff_rgba_drops_alpha(tmp_path):
    alpha = RNG.integers(0, 256, RGB.shape[:2] + (1,), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tiff", np.concatenate([RGB, alpha], -1), photometric="rgb")
    check_rgb8(read_rgb(tmp_path / "a.tiff"), RGB)


def test_tiff_grayscale_becomes_three_equal_channels(tmp_path):
    tifffile.imwrite(tmp_path / "g.tif", GRAY, photometric="minisblack")
    check_rgb8(read_rgb(tmp_path / "g.tif"), np.repeat(GRAY[..., None], 3, -1))


def test_tiff_16bit_keeps_the_high_byte(tmp_path):
    wide = (RGB.astype(np.uint16) << 8) | RNG.integers(0, 256, RGB.shape).astype(np.uint16)
    tifffile.imwrite(tmp_path / "w.tif", wide, photometric="rgb")
    check_rgb8(read_rgb(tmp_path / "w.tif"), RGB)
    gray16 = GRAY.astype(np.uint16) * 256
    tifffile.imwrite(tmp_path / "w1.tif", gray16, photometric="minisblack")
    check_rgb8(read_rgb(tmp_path / "w1.tif"), np.repeat(GRAY[..., None], 3, -1))


def test_tiff_planar_and_float(tmp_path):
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(RGB, -1, 0), photometric="rgb", planarconfig="separate")
    check_rgb8(read_rgb(tmp_path / "p.tif"), RGB)
    tifffile.imwrite(tmp_path / "f.tif", RGB.astype(np.float32) / 255, photometric="rgb")
    check_rgb8(read_rgb(tmp_path / "f.tif"), RGB, tolerance=1)


# ----------------------------------------------------------------------------- PNG / JPEG

def test_png_rgb_is_not_bgr(tmp_path):
    assert cv2.imwrite(str(tmp_path / "a.png"), RGB[..., ::-1])  # OpenCV writes BGR order
    check_rgb8(read_rgb(tmp_path / "a.png"), RGB)


def test_png_rgba_gray_and_16bit(tmp_path):
    bgra = np.concatenate([RGB[..., ::-1], np.full(RGB.shape[:2] + (1,), 90, np.uint8)], -1)
    assert cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    check_rgb8(read_rgb(tmp_path / "rgba.png"), RGB)
    assert cv2.imwrite(str(tmp_path / "gray.png"), GRAY)
    check_rgb8(read_rgb(tmp_path / "gray.png"), np.repeat(GRAY[..., None], 3, -1))
    assert cv2.imwrite(str(tmp_path / "wide.png"), (RGB[..., ::-1].astype(np.uint16) << 8) | 0xFF)
    check_rgb8(read_rgb(tmp_path / "wide.png"), RGB)


def test_jpeg_keeps_rgb_order(tmp_path):
    assert cv2.imwrite(str(tmp_path / "b.jpg"), blocks()[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    check_blocks(read_rgb(tmp_path / "b.jpg"))


def test_write_image_round_trips_every_suffix(tmp_path):
    for name in ("a.tif", "a.tiff", "a.png"):
        write_image(tmp_path / name, RGB)
        check_rgb8(read_rgb(tmp_path / name), RGB)
    assert tifffile.TiffFile(tmp_path / "a.tif").pages[0].photometric == tifffile.PHOTOMETRIC.RGB
    write_image(tmp_path / "b.jpeg", blocks())
    check_blocks(read_rgb(tmp_path / "b.jpeg"))


def test_to_rgb8_rejects_odd_shapes():
    with pytest.raises(CellnetError, match="x.tif: unsupported image shape"):
        to_rgb8(np.zeros((10, 10, 5), np.uint8), "x.tif")


# ----------------------------------------------------------------------------- bad files

def one_line_error_naming(path: Path, call) -> str:
    with pytest.raises(CellnetError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("name", ["t.tif", "t.png"])
def test_truncated_file_is_a_one_line_error(tmp_path, name):
    path = tmp_path / name
    write_image(path, RGB)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in one_line_error_naming(path, lambda: read_rgb(path))


def test_truncated_jpeg_is_a_one_line_error(tmp_path):
    path = tmp_path / "t.jpg"
    write_image(path, RGB)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.8)])  # cut inside the entropy-coded data
    one_line_error_naming(path, lambda: read_rgb(path))


def test_missing_empty_and_non_image_files(tmp_path):
    assert "no such file" in one_line_error_naming(tmp_path / "nope.png", lambda: read_rgb(tmp_path / "nope.png"))
    (tmp_path / "empty.png").write_bytes(b"")
    one_line_error_naming(tmp_path / "empty.png", lambda: read_rgb(tmp_path / "empty.png"))
    (tmp_path / "notes.txt").write_text("hello")
    assert "not an image" in one_line_error_naming(tmp_path / "notes.txt", lambda: read_rgb(tmp_path / "notes.txt"))


# ----------------------------------------------------------------------------- atomic writes

def test_write_leaves_only_the_final_file(tmp_path):
    write_image(tmp_path / "out" / "a.tif", RGB)
    write_text(tmp_path / "out" / "notes.txt", "x\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.tif", "notes.txt"]


def test_interrupted_write_leaves_no_temp_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.tif"
    write_image(target, RGB)
    before = target.read_bytes()

    def half_write(path, *args, **kwargs):
        Path(path).write_bytes(b"II*\x00partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(imageio.tifffile, "imwrite", half_write)
    with pytest.raises(KeyboardInterrupt):
        write_image(target, np.zeros_like(RGB))
    with pytest.raises(KeyboardInterrupt):
        write_image(tmp_path / "new.tif", RGB)
    assert [p.name for p in tmp_path.iterdir()] == ["a.tif"]
    assert target.read_bytes() == before


# ----------------------------------------------------------------------------- bit depth, content

def notes_of(path: Path) -> tuple[np.ndarray, list[str]]:
    heard: list[str] = []
    array = read_rgb(path, lambda where, problem: heard.append(f"{where}: {problem}"))
    return array, heard


def test_twelve_bit_tiff_reads_at_its_real_brightness(tmp_path):
    path = tmp_path / "camera.tif"
    tifffile.imwrite(path, RGB.astype(np.uint16) << 4, photometric="rgb")  # 12-bit data, 16-bit samples
    array, heard = notes_of(path)
    check_rgb8(array, RGB)
    assert heard == [f"{path}: 16-bit TIFF holding 12-bit data (inferred from its largest value): "
                     "scaled to 8 bits by 1/16"]


def test_declared_bit_depth_wins_over_the_largest_value(tmp_path):
    dark = (RGB // 4).astype(np.uint16) << 4  # 12-bit data whose largest value fits 10 bits
    tifffile.imwrite(tmp_path / "packed.tif", dark, photometric="rgb", bitspersample=12)
    tifffile.imwrite(tmp_path / "tagged.tif", dark, photometric="rgb", extratags=[(281, "H", 1, 4095, True)])
    for name in ("packed.tif", "tagged.tif"):
        array, heard = notes_of(tmp_path / name)
        check_rgb8(array, RGB // 4)
        assert len(heard) == 1 and "12-bit data (declared in the file)" in heard[0]


def test_full_range_16_bit_is_not_reported(tmp_path):
    tifffile.imwrite(tmp_path / "w.tif", RGB.astype(np.uint16) << 8, photometric="rgb")
    array, heard = notes_of(tmp_path / "w.tif")
    check_rgb8(array, RGB)
    assert heard == []


@pytest.mark.parametrize("name, content", [("a.jpg", ".png"), ("a.png", ".tif"), ("a.tif", ".png")])
def test_content_decides_the_format(tmp_path, name, content):
    write_image(tmp_path / f"real{content}", RGB)
    (tmp_path / name).write_bytes((tmp_path / f"real{content}").read_bytes())
    array, heard = notes_of(tmp_path / name)
    check_rgb8(array, RGB)
    fmt = {".png": "PNG", ".tif": "TIFF"}[content]
    assert heard == [f"{tmp_path / name}: named {Path(name).suffix} but holds {fmt} data; read as {fmt}"]


def test_the_default_note_is_a_warning_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("cellnet.errors.PROG", "cellnet")  # the command line sets it per command
    write_image(tmp_path / "real.png", RGB)
    (tmp_path / "a.jpg").write_bytes((tmp_path / "real.png").read_bytes())
    read_rgb(tmp_path / "a.jpg")
    assert capsys.readouterr().err.splitlines() == [
        f"cellnet: warning: {tmp_path / 'a.jpg'}: named .jpg but holds PNG data; read as PNG"]


def test_truncated_jpeg_under_another_name_is_still_truncated(tmp_path):
    write_image(tmp_path / "t.jpg", RGB)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: int(len(data) * 0.8)])
    assert "truncated JPEG" in one_line_error_naming(tmp_path / "t.png", lambda: notes_of(tmp_path / "t.png"))


def test_a_declared_full_16_bit_range_is_kept_for_a_dark_image(tmp_path):
    dark = (RGB // 16).astype(np.uint16) << 8  # largest value fits 12 bits, but the file says 16
    tifffile.imwrite(tmp_path / "d.tif", dark, photometric="rgb", extratags=[(281, "H", 1, 65535, True)])
    array, heard = notes_of(tmp_path / "d.tif")
    check_rgb8(array, RGB // 16)
    assert heard == []
