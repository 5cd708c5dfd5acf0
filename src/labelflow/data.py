"""Data steps: image loading and checking, the digits demo set, tag2label, fold split.

Every bad-input problem raises :class:`DatasetError` with a message that names the
file, folder or config key at fault and says what to do, so the CLI (and Snakemake
logs) can show it verbatim instead of a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

PathLike = str | os.PathLike[str]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)

# Snakemake drops this marker into every directory() output; it is not user data.
SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"

_MAX_LISTED = 5  # how many bad rows an error message quotes before "... and N more"


class DatasetError(ValueError):
    """Bad input data or configuration; the message says what is wrong and what to do."""


# --------------------------------------------------------------------------- images


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
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        return f"not an image file (extension {suffix or 'none'})"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file"  # opening a FIFO or device could block forever
        load_image(path)
    except UnidentifiedImageError as err:
        return f"not an image: {err}"
    except Image.DecompressionBombError as err:
        return f"too large: {err}"
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        return f"unreadable: {err.strerror}"
    except DatasetError as err:
        return f"unsupported image: {err}"
    except Exception as err:  # noqa: BLE001 - see docstring
        return f"corrupt or truncated: {err}"
    return None


# --------------------------------------------------------------------------- digits


def write_digits_dataset(out_dir: PathLike, image_size: int = 32) -> int:
    """Write scikit-learn's bundled 8x8 digits as ``out_dir/<digit>/<n:04d>.png``.

    ``n`` is the image's index in ``load_digits()``, so files trace back to the source.
    Values 0..16 are scaled to 0..255 grayscale and upscaled bilinearly to
    ``image_size``. The set is written to a hidden temporary sibling and renamed into
    place, so an interrupted run never leaves a half-written dataset; an existing
    ``out_dir`` is refused rather than overwritten. Returns the number of images.
    """
    from sklearn.datasets import load_digits  # only this step needs it; keep import cheap

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image size must be a positive integer, got {image_size!r}")
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        raise DatasetError(
            f"output folder {out} already exists; refusing to overwrite it - "
            "remove it or choose another folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        digits = load_digits()
        pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        for n, (image, target) in enumerate(zip(pixels, digits.target, strict=True)):
            class_dir = tmp / str(int(target))
            class_dir.mkdir(exist_ok=True)
            big = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR)
            # Pillow's PNG writer adds no timestamps, so every run gives the same bytes.
            big.save(class_dir / f"{n:04d}.png")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(pixels)


# --------------------------------------------------------------------------- tag2label


@dataclass(frozen=True)
class Tag2LabelResult:
    """Outcome of :func:`tag2label`; all paths are POSIX and relative to the dataset."""

    dataset: pd.DataFrame  # path, tag; sorted by (tag, path)
    tag2cls: dict[str, int]  # sorted tag -> 0..n-1
    skipped: pd.DataFrame  # path, reason
    duplicates: pd.DataFrame  # path, duplicate_of (identical bytes; not an error)


def tag2label(dataset_dir: PathLike) -> Tag2LabelResult:
    """Scan a folder-per-class dataset into a table of usable images and their tags.

    Each immediate sub-folder is a class (its name is the tag); files anywhere below it
    belong to it. Symlinks are followed, with a guard against loops. Hidden entries,
    non-image files and unreadable images are skipped and reported, never fatal; a
    class left without images, or fewer than two classes, is a :class:`DatasetError`.
    """
    root = Path(dataset_dir)
    if not root.exists():
        raise DatasetError(
            f"dataset folder {root} does not exist; set config key `dataset` to a folder "
            "holding one sub-folder of images per class"
        )
    if not root.is_dir():
        raise DatasetError(
            f"dataset {root} is not a folder; set config key `dataset` to a folder "
            "holding one sub-folder of images per class"
        )

    def rel(path: PathLike) -> str:
        # Lexical, not resolved: a symlinked dataset or class folder keeps its own names.
        return Path(os.path.relpath(path, root)).as_posix()

    skipped: list[tuple[str, str]] = []
    candidates: list[tuple[str, str]] = []  # (tag, absolute-ish path)
    tags: list[str] = []
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name == SNAKEMAKE_TIMESTAMP:
                continue
            if entry.name.startswith("."):
                skipped.append((entry.name, "hidden folder" if entry.is_dir() else "hidden file"))
            elif entry.is_dir():
                tags.append(entry.name)
                candidates += [(entry.name, p) for p in walk_images(entry.path, rel, skipped)]
            else:
                skipped.append((entry.name, "not inside a class folder"))

    with ThreadPoolExecutor() as pool:  # decoding releases the GIL; order is preserved
        checked = list(pool.map(inspect_image, [path for _, path in candidates]))

    rows: list[tuple[str, str, str]] = []  # tag, path, sha1
    for (tag, path), (reason, digest) in zip(candidates, checked, strict=True):
        if reason is None:
            rows.append((tag, rel(path), digest or ""))
        else:
            skipped.append((rel(path), reason))
    rows.sort()

    with_images = {tag for tag, _, _ in rows}
    empty = [t for t in tags if t not in with_images]
    if empty:
        names = ", ".join(repr(t) for t in empty)
        raise DatasetError(
            f"class folder {names} has no readable images; remove it or add images "
            f"(dataset folder {root})"
        )
    if len(tags) < 2:
        raise DatasetError(
            f"dataset folder {root} has {len(tags)} class folder(s) ({', '.join(tags) or 'none'}); "
            "at least 2 are needed - put each class's images in its own sub-folder"
        )

    first_with: dict[str, str] = {}
    duplicates: list[tuple[str, str]] = []
    for _, path, digest in rows:
        if digest in first_with:
            duplicates.append((path, first_with[digest]))
        else:
            first_with[digest] = path

    return Tag2LabelResult(
        dataset=pd.DataFrame([(p, t) for t, p, _ in rows], columns=["path", "tag"]),
        tag2cls={tag: i for i, tag in enumerate(sorted(tags))},
        skipped=pd.DataFrame(sorted(skipped), columns=["path", "reason"]),
        duplicates=pd.DataFrame(sorted(duplicates), columns=["path", "duplicate_of"]),
    )


def walk_images(
    class_dir: str, rel: Callable[[PathLike], str], skipped: list[tuple[str, str]]
) -> Iterator[str]:
    """Yield candidate file paths below ``class_dir``; record hidden/looping entries."""

    def unreadable(err: OSError) -> None:
        skipped.append((rel(err.filename), f"unreadable folder: {err.strerror}"))

    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=unreadable, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a symlink
            skipped.append((rel(dirpath), "folder already visited (symlink loop)"))
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        for name in [d for d in dirnames if d.startswith(".")]:
            skipped.append((rel(os.path.join(dirpath, name)), "hidden folder"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name == SNAKEMAKE_TIMESTAMP:
                continue
            if name.startswith("."):
                skipped.append((rel(path), "hidden file"))
            else:
                yield path


def file_sha1(path: PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def inspect_image(path: str) -> tuple[str | None, str | None]:
    """(reason it is unusable or None, sha1 of its bytes if usable)."""
    reason = check_image(path)
    if reason is not None:
        return reason, None
    try:
        return None, file_sha1(path)
    except OSError as err:
        return f"unreadable: {err.strerror}", None


def tag2label_csv(labels_csv: PathLike, root: PathLike) -> Tag2LabelResult:
    """A labels table (``path,labels``; labels separated by ``;``; paths relative to ``root``)
    → the same shapes as :func:`tag2label`, plus a ``labels`` column (sorted, ``;``-joined).

    ``tag`` is the first label (sorted), used to stratify folds. Rows whose path is absolute,
    escapes ``root``, is missing or is not a readable image, and rows without labels, are
    skipped and reported; a file listed twice is an error.
    """
    labels_csv, root = Path(labels_csv), Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; set config key `dataset` to the root of labels_csv paths")
    try:
        table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    except FileNotFoundError as err:
        raise DatasetError(f"labels table {labels_csv} does not exist; check config key `labels_csv`") from err
    _require_columns(table, ["path", "labels"], f"labels table {labels_csv}")
    repeated = table["path"][table["path"].duplicated()].tolist()
    if repeated:
        raise DatasetError(f"labels table {labels_csv} lists {_quote(repeated[:5])} more than once; keep one row per image")
    base = os.path.abspath(root)
    skipped: list[tuple[str, str]] = []
    rows: list[tuple[str, str, str, str]] = []  # path, tag, labels, sha1
    for path, raw in zip(table["path"], table["labels"]):
        labels = sorted({label.strip() for label in raw.split(";") if label.strip()})
        problem = _path_problem(path, base, check_exists=True)
        if problem is None and not labels:
            problem = "no labels"
        if problem is None:
            problem, digest = inspect_image(os.path.join(base, path))
        if problem is not None:
            skipped.append((path, problem))
            continue
        rows.append((Path(path).as_posix(), labels[0], ";".join(labels), digest or ""))
    rows.sort()
    all_labels = sorted({label for _, _, labels, _ in rows for label in labels.split(";")})
    if len(all_labels) < 2:
        raise DatasetError(f"labels table {labels_csv} has {len(all_labels)} usable label(s); at least 2 are needed")
    first_with: dict[str, str] = {}
    duplicates = []
    for path, _, _, digest in rows:
        if digest in first_with:
            duplicates.append((path, first_with[digest]))
        else:
            first_with[digest] = path
    return Tag2LabelResult(
        dataset=pd.DataFrame([r[:3] for r in rows], columns=["path", "tag", "labels"]),
        tag2cls={label: i for i, label in enumerate(all_labels)},
        skipped=pd.DataFrame(sorted(skipped), columns=["path", "reason"]),
        duplicates=pd.DataFrame(sorted(duplicates), columns=["path", "duplicate_of"]),
    )


# --------------------------------------------------------------------------- folds


def split(
    dataset: pd.DataFrame, tag2cls: dict[str, int], n_folds: int = 5, seed: int = 42
) -> pd.DataFrame:
    """Add ``class`` and a stratified ``fold`` (0..n_folds-1) to a ``path,tag`` table.

    Rows are sorted by path first, so the result depends only on the content and the
    seed, not on the order the table arrived in. Returns ``path,tag,class,fold``.
    """
    from sklearn.model_selection import StratifiedKFold

    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise DatasetError(f"config key `n_folds` must be an integer >= 2, got {n_folds!r}")
    _require_columns(dataset, ["path", "tag"], "dataset table")
    # Multilabel tables (from a labels CSV) carry `labels`; `tag` is then the first label,
    # the key the folds are stratified on.
    columns = ["path", "tag"] + (["labels"] if "labels" in dataset.columns else [])
    df = dataset[columns].sort_values("path", kind="stable").reset_index(drop=True)

    unknown = sorted(set(df["tag"]) - set(tag2cls))
    if unknown:
        raise DatasetError(
            f"tags {_quote(unknown)} are not in the tag-to-class mapping; "
            "rerun tag2label so the dataset table and tag2cls.json match"
        )
    counts = df["tag"].value_counts()
    # Every class must reach every fold; in a multilabel table only the first labels
    # (the stratification key) are checked, since other labels ride along.
    keys = sorted(set(df["tag"])) if "labels" in df.columns else sorted(tag2cls)
    small = {tag: int(counts.get(tag, 0)) for tag in keys if counts.get(tag, 0) < n_folds}
    if small:
        listed = ", ".join(f"{tag!r} ({n} images)" for tag, n in small.items())
        raise DatasetError(
            f"class(es) {listed} have fewer images than n_folds={n_folds}; "
            "lower config key `n_folds` or add images to those classes"
        )

    df["class"] = df["tag"].map(tag2cls).astype(np.int64)
    df["fold"] = np.int64(-1)
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(folds.split(np.zeros(len(df)), df["class"])):
        df.loc[test, "fold"] = fold
    return df[["path", "tag", "class", "fold"] + columns[2:]]


def resolve_valid_folds(n_folds: int, valid_folds: Sequence[int] | int | None) -> list[int]:
    """Normalise config key `valid_folds` to sorted, non-negative fold indices.

    ``None`` means the last fold; negative indices count from the end, as in Python.
    """
    if valid_folds is None:
        return [n_folds - 1]
    folds = [valid_folds] if isinstance(valid_folds, int) else list(valid_folds)
    bad = [
        f
        for f in folds
        if isinstance(f, bool) or not isinstance(f, int) or not -n_folds <= f < n_folds
    ]
    if bad:
        raise DatasetError(
            f"config key `valid_folds` has {bad}, out of range for n_folds={n_folds}; "
            f"use fold numbers 0..{n_folds - 1} (or -{n_folds}..-1)"
        )
    resolved = sorted({f % n_folds for f in folds})
    if not resolved or len(resolved) == n_folds:
        raise DatasetError(
            f"config key `valid_folds` ({folds}) leaves no "
            f"{'validation' if not resolved else 'training'} data; "
            f"choose between 1 and {n_folds - 1} of the {n_folds} folds"
        )
    return resolved


def valid_mask(dataset: pd.DataFrame, valid_folds: Sequence[int]) -> pd.Series:
    """Boolean Series, True for the rows whose fold is a validation fold."""
    _require_columns(dataset, ["fold"], "dataset table")
    return dataset["fold"].isin(list(valid_folds))


# --------------------------------------------------------------------------- files


def read_dataset_csv(
    csv_path: PathLike, root: PathLike | None, required: Sequence[str] = ("path", "tag")
) -> pd.DataFrame:
    """Read a dataset table and check every ``path`` is a file inside ``root``.

    Paths must be relative and must not climb out of ``root`` (checked lexically, so a
    symlinked dataset still works). With ``root=None`` only the table itself and the
    lexical path rules are checked, not that the files exist.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"dataset table {csv_path} does not exist; run the tag2label step first")
    # Only empty cells are missing values: a tag called "NA" or "None" is a real tag,
    # and tags/paths that look numeric (digit folders "0".."9") must stay strings.
    try:
        df = pd.read_csv(
            csv_path,
            dtype={"path": str, "tag": str, "labels": str},
            keep_default_na=False,
            na_values=[""],
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(
            f"dataset table {csv_path} is not a readable CSV ({err}); regenerate it"
        ) from err
    _require_columns(df, list(required), f"dataset table {csv_path}")

    base = os.path.abspath(root if root is not None else ".")
    problems: list[str] = []
    duplicated = df["path"].duplicated(keep="first").tolist()
    no_tag = df["tag"].isna().tolist() if "tag" in df.columns else [False] * len(df)
    for i, path in enumerate(df["path"].tolist()):
        problem = _path_problem(path, base, check_exists=root is not None)
        if problem is None and duplicated[i]:
            problem = "listed twice"
        if problem is None and no_tag[i]:
            problem = "empty tag"
        if problem is not None:
            problems.append(f"line {i + 2} ({path!r}): {problem}")  # +2: header, 1-based
    if problems:
        more = (
            f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        )
        raise DatasetError(
            f"dataset table {csv_path} has {len(problems)} bad row(s): "
            + "; ".join(problems[:_MAX_LISTED])
            + more
            + f". Paths must be relative to {root if root is not None else 'the dataset folder'} "
            "and name existing files; regenerate the table with tag2label"
        )
    return df


def _path_problem(path: Any, base: str, check_exists: bool) -> str | None:
    if not isinstance(path, str) or not path:
        return "empty path"
    if os.path.isabs(path) or path.startswith(("/", "\\")):
        return "absolute path"
    full = os.path.normpath(os.path.join(base, path))
    if full == base or os.path.commonpath([base, full]) != base:
        return "escapes the dataset folder"
    if check_exists and not os.path.isfile(full):
        return "file not found"
    return None


def read_tag2cls(path: PathLike) -> dict[str, int]:
    """Read a tag -> class JSON mapping and check classes are exactly 0..n-1."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DatasetError(
            f"label mapping {path} does not exist; run the tag2label step first"
        ) from err
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"label mapping {path} is not valid JSON ({err}); rerun tag2label"
        ) from err
    valid = isinstance(mapping, dict) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in mapping.values()
    )
    if not valid or sorted(mapping.values()) != list(range(len(mapping))):
        raise DatasetError(
            f"label mapping {path} must map each tag to a distinct class 0..n-1; rerun tag2label"
        )
    return mapping


def _require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetError(
            f"{what} lacks column(s) {_quote(missing)} (has {_quote(list(df.columns))}); "
            "regenerate it with the step that writes it"
        )


def _quote(items: Sequence[Any]) -> str:
    return ", ".join(repr(i) for i in items)


@contextmanager
def atomic_output(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temp path beside ``path`` for a writer to fill; moved over ``path`` on success.

    Readers (and Snakemake) never see a half-written file: the rename is atomic within a
    directory, and the content is on disk before it. The writer creates the temp file
    itself, so the umask (not 0600 as with ``tempfile``) decides the file's permissions.
    On any error the temp file is removed and ``path`` is left as it was. ``suffix`` is
    for writers that pick a format from the extension (matplotlib's ``savefig``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}{suffix}"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """A temp folder beside ``path`` to fill; it replaces ``path`` (and what was there) on
    success and is removed on any error, leaving ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _atomic_text(path: PathLike) -> Iterator[IO[str]]:
    with atomic_output(path) as tmp, open(tmp, "x", encoding="utf-8", newline="") as f:
        yield f


def write_csv_atomic(df: pd.DataFrame, path: PathLike) -> None:
    """Write ``df`` as UTF-8 CSV without the index, atomically."""
    with _atomic_text(path) as f:
        df.to_csv(f, index=False)


def write_json_atomic(obj: Any, path: PathLike) -> None:
    """Write ``obj`` as indented UTF-8 JSON (non-ASCII kept readable), atomically."""
    with _atomic_text(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=_json_default)
        f.write("\n")


def _json_default(obj: Any) -> Any:
    """Let numpy scalars/arrays and paths (common in metrics and configs) be written."""
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_npy_atomic(path: PathLike, array: np.ndarray) -> None:
    with atomic_output(path) as tmp, open(tmp, "xb") as f:
        np.save(f, array, allow_pickle=False)


def load_npy(path: PathLike) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
