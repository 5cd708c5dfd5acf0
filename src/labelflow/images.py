"""Image files: decode any common format to RGB, check readability, walk folders, hash bytes
and pixels.

One walker (:func:`walk_images`) and one parallel inspector (:func:`inspect_images`) serve
every scan: tag2label, the autolabel piles, embedding sets and command-line folders. The
inspector decodes each file once, for the readability check and the perceptual hash
(:func:`phash_pixels`, grouped into near duplicates by :mod:`labelflow.near_duplicates`).

File names that are not valid UTF-8 (bytes from an old zip file, which Python's ``os``
functions hand over as surrogate-escaped ``str``) are skipped by the walker and reported in
an escaped, writable form (:func:`readable_path`): they could not be written to a UTF-8 CSV.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from labelflow.io import DatasetError, PathLike, file_digest

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)


def is_image_name(path: PathLike) -> bool:
    """Whether ``path`` has an image extension (any case): what a folder scan takes as an image
    file, leaving notes.txt or Thumbs.db beside the images out."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# Snakemake drops this marker into every directory() output; it is not user data.
SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"


def load_image(path: PathLike) -> np.ndarray:
    """Read an image file as an ``H x W x 3`` uint8 RGB array.

    * Transparency (RGBA, LA, palette or RGB with a transparent colour) is composited
      onto black: the colour stored under fully transparent pixels is arbitrary, and
      black keeps "invisible" content invisible the same way for every file.
    * 16-bit images are scaled to 0..255 by dividing by 257 (65535 -> 255); mode ``I``
      holding values in 0..65535 (how Pillow may read 16-bit PNGs) is treated the same
      way, other ``I`` ranges and float (``F``) images are min-max stretched (``F``
      already in 0..1 is just multiplied by 255).
    * The EXIF orientation tag is applied, so phone photos are upright.
    * Multi-frame files (GIF, TIFF) give their first frame.

    Raises the Pillow error (``OSError`` family) for unreadable or truncated files, and
    :class:`DatasetError` for image modes that cannot be turned into RGB.
    """
    with Image.open(path) as img:
        # Decode everything now: Pillow is lazy, and a truncated file would otherwise
        # only fail much later, inside a training DataLoader worker.
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        return _to_rgb(img, path)


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _to_rgb(img: Image.Image, path: PathLike) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16"):
        gray = _to_uint8(np.asarray(img).astype(np.float64) / 257.0)
    elif mode == "I":
        values = np.asarray(img).astype(np.float64)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            gray = _to_uint8(values / 257.0)
        else:
            gray = _stretch(values)
    elif mode == "F":
        values = np.asarray(img).astype(np.float64)
        if values.size and values.min() >= 0 and values.max() <= 1:
            gray = _to_uint8(values * 255.0)
        else:
            gray = _stretch(values)
    else:
        try:
            if mode in _ALPHA_MODES or "transparency" in img.info:
                rgba = np.asarray(img.convert("RGBA")).astype(np.uint16)
                alpha = rgba[..., 3:4]
                return ((rgba[..., :3] * alpha + 127) // 255).astype(np.uint8)
            # copy(): arrays viewing Pillow memory are read-only, and torch warns on those
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
        except ValueError as err:  # e.g. LAB or HSV, which Pillow cannot convert
            raise DatasetError(
                f"{path}: image mode {mode!r} cannot be converted to RGB; "
                "re-save the file as an ordinary RGB or grayscale image"
            ) from err
    return np.repeat(gray[..., None], 3, axis=2)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Min-max scale to 0..255; a constant (or empty) image becomes black."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.max() == finite.min():
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = float(finite.min()), float(finite.max())
    return _to_uint8(
        (np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo) - lo) * (255.0 / (hi - lo))
    )


def check_image(path: PathLike) -> str | None:
    """Return ``None`` if ``path`` is a fully readable image, else a short reason.

    Never raises for a bad file: Pillow's decoders fail with many exception types on
    garbage input, and one bad file must not stop a scan of thousands.
    """
    return _decode_checked(path)[0]


def _decode_checked(path: PathLike) -> tuple[str | None, np.ndarray | None]:
    """(reason the file is unusable, None) or (None, its pixels): see :func:`check_image`."""
    if not is_image_name(path):
        suffix = Path(path).suffix.lower()
        return f"not an image file (extension {suffix or 'none'})", None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file", None  # opening a FIFO or device could block forever
        return None, load_image(path)
    except UnidentifiedImageError as err:
        return f"not an image: {err}", None
    except Image.DecompressionBombError as err:
        return f"too large: {err}", None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        return f"unreadable: {err.strerror}", None
    except DatasetError as err:
        return f"unsupported image: {err}", None
    except Exception as err:  # noqa: BLE001 - see check_image
        return f"corrupt or truncated: {err}", None


def phash_pixels(pixels: np.ndarray) -> int:
    """64-bit pHash (``imagehash.phash``, 8x8) of a ``uint8`` ``H x W x 3`` or ``H x W`` array.

    The bits are the ``imagehash`` 8x8 boolean matrix read row by row, most significant
    bit first, so ``f"{h:016x}"`` equals ``str(imagehash.phash(...))``. Raises
    ``ValueError`` for an array of another dtype or shape.
    """
    import imagehash  # only scans that hash need it

    is_gray = pixels.ndim == 2
    is_rgb = pixels.ndim == 3 and pixels.shape[2] == 3
    if not (is_gray or is_rgb) or pixels.dtype != np.uint8 or pixels.size == 0:
        raise ValueError(
            "perceptual_hash needs a non-empty uint8 array of shape (H, W) or (H, W, 3); "
            f"got dtype {pixels.dtype} and shape {pixels.shape}"
        )
    bits = imagehash.phash(Image.fromarray(np.ascontiguousarray(pixels)), hash_size=8).hash
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


def is_valid_utf8(name: str) -> bool:
    """False for a name ``os`` read from bytes that are not UTF-8 (it holds lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def readable_path(path: str) -> str:
    """``path`` with bytes that are not UTF-8 written as ``\\xff``: safe to print and to write."""
    return path if is_valid_utf8(path) else os.fsencode(path).decode("utf-8", "backslashreplace")


NOT_UTF8_FILE = "file name is not valid UTF-8"
NOT_UTF8_FOLDER = "folder name is not valid UTF-8"


def walk_images(
    class_dir: str, rel: Callable[[PathLike], str], skipped: list[tuple[str, str]]
) -> Iterator[str]:
    """Yield candidate file paths below ``class_dir``; record hidden, looping and badly named
    entries in ``skipped`` as ``(readable relative path, reason)``."""

    def skip(path: str, reason: str) -> None:
        skipped.append((readable_path(rel(path)), reason))

    def unreadable(err: OSError) -> None:
        skip(err.filename, f"unreadable folder: {err.strerror}")

    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=unreadable, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a symlink
            skip(dirpath, "folder already visited (symlink loop)")
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        for name in sorted(dirnames):
            if not is_valid_utf8(name):
                skip(os.path.join(dirpath, name), NOT_UTF8_FOLDER)
            elif name.startswith("."):
                skip(os.path.join(dirpath, name), "hidden folder")
        dirnames[:] = sorted(d for d in dirnames if is_valid_utf8(d) and not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name == SNAKEMAKE_TIMESTAMP:
                continue
            if not is_valid_utf8(name):
                skip(path, NOT_UTF8_FILE)
            elif name.startswith("."):
                skip(path, "hidden file")
            else:
                yield path


class Inspection(NamedTuple):
    """What :func:`inspect_image` found out about one file."""

    reason: str | None  # why it is unusable, None if it is a readable image
    sha1: str | None  # hex digest of its bytes (usable images, when hashing)
    phash: str | None  # 64-bit pHash of its pixels as 16 hex digits (usable images, when hashing)


def inspect_image(path: str, hashes: bool = True) -> Inspection:
    """Decode ``path`` once: the readability check and, with ``hashes``, the SHA-1 of its
    bytes and the pHash of the decoded pixels (hex strings: a CSV column of 64-bit integers
    would become floats in pandas and lose bits)."""
    reason, pixels = _decode_checked(path)
    if reason is not None or not hashes:
        return Inspection(reason, None, None)
    try:
        digest = file_digest(path, "sha1")
    except OSError as err:
        return Inspection(f"unreadable: {err.strerror}", None, None)
    return Inspection(None, digest, f"{phash_pixels(pixels):016x}")


def inspect_images(paths: Sequence[str], hashes: bool = True) -> list[Inspection]:
    """:func:`inspect_image` of every path, in order, on a thread pool (decoding releases the GIL).
    With ``hashes=False`` only readability is checked (``sha1`` and ``phash`` are None)."""
    with ThreadPoolExecutor() as pool:
        return list(pool.map(lambda p: inspect_image(p, hashes), paths))


def decode_resized(path: PathLike, image_size: int) -> np.ndarray:
    """The image as an ``image_size`` square RGB array (area filter when shrinking)."""
    import cv2  # only model jobs resize; the index jobs import this module without OpenCV

    image = load_image(path)
    if image.shape[:2] != (image_size, image_size):
        shrinking = image.shape[0] > image_size or image.shape[1] > image_size
        image = cv2.resize(
            image,
            (image_size, image_size),
            interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR,
        )
    return image
