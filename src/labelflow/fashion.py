"""Fashion-MNIST (Zalando) written out as a folder-per-class image dataset.

Fashion-MNIST has 60,000 training and 10,000 test images, 28x28 grayscale, in 10
classes, stored as four IDX files (the MNIST format). Debian ships them in the package
``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist/`` (gzipped). This
module reads those files with a small IDX parser and writes::

    OUT_DIR/train/<class>/<NNNNN>.png      NNNNN = index in the training arrays
    OUT_DIR/test/<class>/<NNNNN>.png       NNNNN = index in the test (t10k) arrays

so each of ``OUT_DIR/train`` and ``OUT_DIR/test`` is a dataset folder that tag2label can
read, and every file traces back to one row of the source arrays. Pixel values are the
source's (0 = background), unchanged at the native 28 px when written as PNG.

Class folders have readable, filesystem-safe names (``t-shirt_top``, ``ankle_boot``);
note that labelflow numbers classes by sorted folder name, which is not the source's
0..9 label order (see :data:`CLASS_FOLDERS`).
"""

from __future__ import annotations

import gzip
import os
import shutil
import uuid
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from labelflow.io import DatasetError

PathLike = str | os.PathLike[str]

# Label i of the source files is FASHION_CLASSES[i] (README "Labels" table).
FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Folder name for label i: lower case, "/" and " " replaced so it is one path component.
CLASS_FOLDERS: tuple[str, ...] = tuple(
    name.lower().replace("/", "_").replace(" ", "_") for name in FASHION_CLASSES
)

# Where `apt-get install dataset-fashion-mnist` puts the files (from `dpkg -L`,
# version 0.0~git20200523.55506a9-1); searched in order when no source folder is given.
DEBIAN_SOURCE_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

# Base names of the IDX files per output split; each may also exist with ".gz".
SOURCE_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Fashion test accuracy of submitted benchmarks, from the README's "Benchmark" table
# (Debian package 0.0~git20200523.55506a9-1). The README says the maintainers have not
# verified them. "Human (crowd)" is majority vote of 3 non-expert labels on 1,000
# randomly sampled test images, not on the full test set. The table has two
# "2 Conv+pooling" rows with no preprocessing: 0.916 (TensorFlow's tutorial) and 0.876.
PUBLISHED_TEST_ACCURACY: dict[str, float] = {
    "WRN40-4 (8.9M params)": 0.967,
    "WRN-28-10 + Random Erasing": 0.963,
    "WRN-28-10": 0.959,
    "Dual path network with WRN-28-10": 0.957,
    "DenseNet-BC (768K params)": 0.954,
    "DENSER": 0.953,
    "MobileNet": 0.950,
    "ResNet18": 0.949,
    "Google AutoML (24 h)": 0.939,
    "VGG16 (26M params)": 0.935,
    "HOG+SVM": 0.926,
    "2 Conv+pooling (TensorFlow tutorial)": 0.916,
    "2 Conv+pooling (Kashif Rasul)": 0.876,
    "MLP 256-128-100": 0.8833,
    "Human (crowd)": 0.835,
}

IMAGE_FORMATS: dict[str, str] = {"png": "PNG", "jpg": "JPEG"}
JPEG_QUALITY = 90  # fixed so that the same run gives the same bytes
# Bilinear (with Pillow's antialiasing when shrinking), as write_digits_dataset uses.
RESAMPLE = Image.Resampling.BILINEAR

_GZIP_MAGIC = b"\x1f\x8b"
# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IMAGES_PER_TASK = 256  # one thread-pool task writes this many files (less overhead)


# --------------------------------------------------------------------------- IDX


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a native-byte-order numpy array.

    The format: two zero bytes, a type byte (0x08 uint8 ... 0x0E float64), the number of
    dimensions, one big-endian uint32 per dimension, then the values, big-endian, C order.
    Gzip is recognised by its magic bytes, not the file name. A truncated or corrupt
    file, a wrong magic number, an unknown type or a data size that disagrees with the
    header raises :class:`DatasetError` naming the file.
    """
    path = Path(path)
    payload = _read_maybe_gzipped(path)
    if len(payload) < 4:
        raise DatasetError(_idx_problem(path, f"truncated: only {len(payload)} bytes"))
    if payload[:2] != b"\x00\x00":
        raise DatasetError(
            _idx_problem(path, f"wrong magic number 0x{payload[:4].hex()} (not an IDX file)")
        )
    type_code, ndim = payload[2], payload[3]
    if type_code not in _IDX_DTYPES:
        raise DatasetError(_idx_problem(path, f"unknown IDX data type 0x{type_code:02x}"))
    header_size = 4 + 4 * ndim
    if len(payload) < header_size:
        raise DatasetError(_idx_problem(path, f"truncated inside the {ndim}-dimension header"))
    shape = tuple(int(d) for d in np.frombuffer(payload, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(payload) - header_size
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DatasetError(
            _idx_problem(
                path,
                f"{what}: header says {shape} x {dtype.itemsize} bytes "
                f"= {expected} data bytes, file holds {found}",
            )
        )
    values = np.frombuffer(payload, dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # a native, writable copy


def _read_maybe_gzipped(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(_idx_problem(path, f"cannot be read ({err.strerror})")) from err
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:  # cut-off stream, bad CRC or header
        raise DatasetError(_idx_problem(path, f"corrupt or truncated gzip data ({err})")) from err


def _idx_problem(path: Path, problem: str) -> str:
    return (
        f"IDX file {path}: {problem}; replace it with a good copy (for the Debian files: "
        "apt-get install --reinstall dataset-fashion-mnist)"
    )


# --------------------------------------------------------------------------- source files


@dataclass(frozen=True)
class FashionSource:
    """The four Fashion-MNIST IDX files, as found on disk."""

    folder: Path
    files: Mapping[str, tuple[Path, Path]]  # split -> (images file, labels file)


def find_source(source_dir: PathLike | None = None) -> FashionSource:
    """Locate the four IDX files in ``source_dir``, or where the Debian package puts them.

    Each file may be plain or end in ``.gz``; the plain one wins when both exist (no
    decompression needed). Raises :class:`DatasetError` naming the folder(s) searched,
    the missing files and how to get them.
    """
    folders = [Path(source_dir)] if source_dir is not None else list(DEBIAN_SOURCE_DIRS)
    missing_by_folder: list[str] = []
    for folder in folders:
        found: dict[str, tuple[Path, Path]] = {}
        missing: list[str] = []
        for split, names in SOURCE_FILES.items():
            paths = [_find_one(folder, name) for name in names]
            missing += [f"{name}[.gz]" for name, p in zip(names, paths, strict=True) if p is None]
            if None not in paths:
                found[split] = (paths[0], paths[1])  # type: ignore[assignment]
        if not missing:
            return FashionSource(folder=folder, files=found)
        state = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        missing_by_folder.append(f"{folder} {state}")
    raise DatasetError(
        "Fashion-MNIST files not found: " + "; ".join(missing_by_folder) + ". Install them with "
        "`apt-get install dataset-fashion-mnist`, or pass --source DIR naming a folder that holds "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (each may be gzipped, ending in .gz)"
    )


def _find_one(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one split's images (``N x H x W`` uint8) and labels (``N`` in 0..9), checked."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"IDX file {images_path} holds {images.dtype} values of shape {images.shape}; "
            "expected uint8 images N x height x width - is it an images file?"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(
            f"IDX file {labels_path} holds {labels.dtype} values of shape {labels.shape}; "
            "expected a uint8 vector of labels - is it a labels file?"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
            "labels; the two files must come from the same split and release"
        )
    if labels.size and int(labels.max()) >= len(FASHION_CLASSES):
        raise DatasetError(
            f"IDX file {labels_path} has label {int(labels.max())}; Fashion-MNIST labels are "
            f"0..{len(FASHION_CLASSES) - 1} - is it a Fashion-MNIST labels file?"
        )
    return images, labels


# --------------------------------------------------------------------------- subsets


def stratified_subset(
    labels: np.ndarray, limit: int | None, seed: int | Sequence[int]
) -> np.ndarray:
    """Sorted indices of a seeded subset of ``limit`` items with class shares kept.

    Each class gets ``limit * class_count / total`` items, rounded down, and the items
    left over go to the classes with the largest rounded-off fractions (lowest label
    first on ties), so a balanced split with ``limit=1000`` gives exactly 100 per class.
    ``None`` or a ``limit`` of at least the split's size keeps everything.
    """
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    counts = np.bincount(labels, minlength=len(FASHION_CLASSES))
    shares = counts * (limit / len(labels))
    quota = np.floor(shares).astype(np.int64)
    leftover = limit - int(quota.sum())
    by_fraction = np.lexsort((np.arange(len(counts)), -(shares - quota)))
    quota[by_fraction[:leftover]] += 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == label), size=int(n), replace=False)
        for label, n in enumerate(quota)
    ]
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------- writer


def write_fashion_dataset(
    out_dir: PathLike,
    *,
    size: int = 28,
    image_format: str = "png",
    source: PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, dict[str, int]]:
    """Write Fashion-MNIST as ``out_dir/{train,test}/<class>/<NNNNN>.<png|jpg>``.

    ``NNNNN`` is the image's index in its split's source arrays. ``size`` resizes the
    28x28 images bilinearly to ``size x size`` (PNG at 28 px is pixel-exact);
    ``image_format`` is ``"png"`` or ``"jpg"`` (quality :data:`JPEG_QUALITY`); images
    stay single-channel grayscale. ``limit`` keeps a seeded, class-stratified subset of
    that many images in each split (``limit=1000`` gives 100 per class in train and in
    test). ``source`` is the folder holding the IDX files (default: the Debian package's).
    ``workers`` threads encode in parallel; the bytes written do not depend on it.

    The set is built in a hidden temporary sibling and renamed into place, so an
    interrupted run never leaves a half dataset; an existing ``out_dir`` is refused.
    Returns the number of images per split and class folder.
    """
    _check_options(size, image_format, limit)
    out = Path(out_dir)
    _refuse_existing(out)
    found = find_source(source)
    splits = {split: load_split(*paths) for split, paths in found.files.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        counts: dict[str, dict[str, int]] = {}
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            for split_number, (split, (images, labels)) in enumerate(splits.items()):
                # Seeded per split, so the train subset does not depend on the test one.
                keep = stratified_subset(labels, limit, seed=[seed, split_number])
                counts[split] = _write_split(
                    tmp / split, images, labels, keep, size, image_format, pool
                )
        _refuse_existing(out)  # someone may have created it while we were writing
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _check_options(size: int, image_format: str, limit: int | None) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DatasetError(f"image size must be a positive integer (pixels), got {size!r}")
    if image_format not in IMAGE_FORMATS:
        raise DatasetError(
            f"image format {image_format!r} is not supported; use one of {', '.join(IMAGE_FORMATS)}"
        )
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or limit < len(FASHION_CLASSES)
    ):
        raise DatasetError(
            f"limit must be an integer of at least {len(FASHION_CLASSES)} (one image per class "
            f"in each split), got {limit!r}; leave it unset to write every image"
        )


def _refuse_existing(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise DatasetError(
            f"output folder {out} already exists; refusing to overwrite it - "
            "remove it or choose another folder"
        )


def _write_split(
    split_dir: Path,
    images: np.ndarray,
    labels: np.ndarray,
    keep: np.ndarray,
    size: int,
    image_format: str,
    pool: ThreadPoolExecutor,
) -> dict[str, int]:
    """Write the images at indices ``keep``; return the count per class folder."""
    for folder in CLASS_FOLDERS:
        (split_dir / folder).mkdir(parents=True)
    # NNNNN: 5 digits cover the 60,000 training images; more only for bigger inputs.
    width = max(5, len(str(len(images) - 1)))
    jobs = [
        (images[i], split_dir / CLASS_FOLDERS[labels[i]] / f"{i:0{width}d}.{image_format}")
        for i in keep.tolist()
    ]
    chunks = [
        jobs[start : start + _IMAGES_PER_TASK] for start in range(0, len(jobs), _IMAGES_PER_TASK)
    ]
    # list() re-raises the first error from any worker (disk full, permissions).
    list(pool.map(_save_images, chunks, [size] * len(chunks), [image_format] * len(chunks)))
    per_class = np.bincount(labels[keep], minlength=len(CLASS_FOLDERS))
    return {folder: int(n) for folder, n in zip(CLASS_FOLDERS, per_class, strict=True)}


def _save_images(jobs: list[tuple[np.ndarray, Path]], size: int, image_format: str) -> None:
    pil_format = IMAGE_FORMATS[image_format]
    options = {"quality": JPEG_QUALITY} if pil_format == "JPEG" else {}
    for pixels, path in jobs:
        image = Image.fromarray(pixels)  # 2-D uint8 -> mode "L" (8-bit grayscale)
        if image.size != (size, size):
            image = image.resize((size, size), RESAMPLE)
        # Neither writer stores timestamps, so the same input gives the same bytes.
        image.save(path, format=pil_format, **options)
