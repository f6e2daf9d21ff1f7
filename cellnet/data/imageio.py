"""Image reading and writing at the edge of the program.

Everything inside cellnet is 8-bit RGB ``uint8 [H, W, 3]``; this module converts whatever arrives
(8/16-bit, RGBA, grayscale, TIFF/PNG/JPEG; OpenCV's BGR) once, and writes files atomically so an
interrupted run never leaves a half-written output under the final name.

A file is decoded by what its first bytes say it is, not by its name: a PNG saved as ``.jpg`` reads
as a PNG (with a warning). 16-bit samples are scaled by their real bit depth — 12-bit camera data
in a 16-bit TIFF would otherwise come out nearly black.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

# OpenCV prints its own decoder warnings ("[ WARN:0@...] global grfmt_png.cpp") to stderr;
# cellnet reports unreadable files itself, in one line that names them.
os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from cellnet.errors import bad, warn
from cellnet.files import atomic_path

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
#: Leading bytes of each format read here (what a file holds), and the format each suffix names.
SIGNATURES = {"TIFF": (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"), "PNG": (b"\x89PNG\r\n\x1a\n",),
              "JPEG": (b"\xff\xd8\xff",)}
SUFFIX_FORMAT = {".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
BIT_DEPTHS = (10, 12, 14, 16)

#: ``note(path, problem)``: told of a problem a file was read despite (a misleading suffix, a
#: guessed bit depth). The default prints a warning line; commands with a summary count them.
Note = Callable[[Path, str], None]


def to_rgb8(array: np.ndarray, path: str | os.PathLike = "<array>", bits: int = 16) -> np.ndarray:
    """Convert an image array (gray, RGB, RGBA; 8/16-bit or float) to uint8 RGB.

    ``bits`` is the significant bits of 16-bit samples (12 for 12-bit data stored in 16 bits).
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar TIFF
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise bad(path, f"unsupported image shape {tuple(array.shape)} (expected HxW, HxWx3 or HxWx4)")
    if a.shape[-1] == 2:  # gray + alpha
        a = a[..., :1]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.uint16:
        return np.minimum(a >> (bits - 8), 255).astype(np.uint8)
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        scale = 255.0 if float(np.nanmax(a)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(a) * scale, 0, 255).round().astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        return np.clip(a, 0, 255).astype(np.uint8)
    raise bad(path, f"unsupported pixel type {a.dtype}")


def sniff(data: bytes) -> str | None:
    """The image format the leading bytes announce (``TIFF``, ``PNG``, ``JPEG``), or None."""
    return next((fmt for fmt, heads in SIGNATURES.items() if data.startswith(heads)), None)


def significant_bits(array: np.ndarray, declared: int | None = None) -> tuple[int, str]:
    """Bits that 16-bit samples really use, and where that came from.

    ``declared`` (a TIFF's BitsPerSample below 16, or its MaxSampleValue) wins; otherwise the
    smallest of 10/12/14/16 bits that holds the largest value.
    """
    if declared is not None:
        return declared, "declared in the file"
    largest = int(array.max()) if array.size else 0
    return next(b for b in BIT_DEPTHS if largest < 1 << b), "inferred from its largest value"


def _declared_bits(tif: tifffile.TiffFile) -> int | None:
    """Significant bits a TIFF declares: BitsPerSample if under 16, else from MaxSampleValue.

    BitsPerSample 16 alone says nothing: 12-bit cameras store 16-bit samples.
    """
    page = tif.pages.first
    if 8 < page.bitspersample < 16:
        return int(page.bitspersample)
    tag = page.tags.get("MaxSampleValue")
    value = int(np.max(tag.value)) if tag is not None else 0
    return min(16, value.bit_length()) if value > 255 else None


def read_rgb(path: str | os.PathLike, note: Note | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB [H, W, 3]; a one-line CellnetError if it can't be read.

    Problems it reads through go to ``note`` (default: a warning line naming the file).
    """
    path = Path(path)
    note = note or warn
    if not path.is_file():
        raise bad(path, "no such file")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise bad(path, f"not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise bad(path, f"unreadable ({exc.strerror or exc})") from None
    if not data:
        raise bad(path, "empty file (0 bytes)")
    fmt = sniff(data)
    if fmt is not None and fmt != SUFFIX_FORMAT[suffix]:
        note(path, f"named {suffix} but holds {fmt} data; read as {fmt}")
    fmt = fmt or SUFFIX_FORMAT[suffix]
    declared = None
    try:
        if fmt == "TIFF":
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                array = tif.asarray()
                declared = _declared_bits(tif)
        else:
            if fmt == "JPEG" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
                raise ValueError("truncated JPEG (no end-of-image marker)")
            array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if array is None:
                raise ValueError("decoder returned nothing")
            if array.ndim == 3 and array.shape[-1] == 3:
                array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
            elif array.ndim == 3 and array.shape[-1] == 4:
                array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
    except Exception as exc:  # any decoder failure is the file's problem, reported in one line
        raise bad(path, f"unreadable or truncated image ({type(exc).__name__}: {str(exc)[:80]})") from None
    if array.size == 0:
        raise bad(path, "empty image")
    bits = 16
    if array.dtype == np.uint16:
        bits, how = significant_bits(array, declared)
        if bits < 16:
            note(path, f"16-bit {fmt} holding {bits}-bit data ({how}): scaled to 8 bits by 1/{1 << (bits - 8)}")
    return to_rgb8(array, path, bits)


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write uint8 RGB as TIFF (.tif/.tiff, deflate) or PNG/JPEG (via OpenCV), atomically."""
    path = Path(path)
    rgb = to_rgb8(rgb, path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in (".tif", ".tiff"):
            tifffile.imwrite(tmp, rgb, photometric="rgb", compression="zlib")
        elif not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise bad(path, "could not write image")
