"""Files in and out: atomic writers, JSON/NPY/CSV readers, and the error every bad input raises.

Every artifact the workflow writes goes through :func:`atomic_output` or
:func:`atomic_directory`, so a reader (or Snakemake) never sees a half-written file.
Nothing here pickles: tables are CSV, small facts JSON, arrays ``.npy``/``.npz``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

PathLike = str | os.PathLike[str]

MAX_LISTED = 5  # how many bad rows an error message quotes before "... and N more"

# Columns of our CSVs that hold names, never numbers: a class folder "0" or "NA" is a name.
TEXT_COLUMNS = frozenset(
    {"path", "tag", "label", "labels", "predicted", "sha1", "duplicate_of", "source", "decision", "reason", "split"}
)


class DatasetError(ValueError):
    """Bad input data or configuration; the message says what is wrong and what to do."""


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
    success and is removed on any error, leaving ``path`` as it was.

    ``path`` is never missing once it existed: the old one is renamed aside, the new one renamed
    in, and only then is the old one deleted. A process killed between those steps leaves a
    ``.<name>.old-*`` (or ``.<name>.tmp-*``) sibling, which the next call for the same ``path``
    puts right first (:func:`recover_directory`). One writer per ``path`` at a time, as
    Snakemake guarantees for an output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        old = _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        _remove(old)


def _swap_in(tmp: Path, path: Path) -> Path | None:
    """Rename ``path`` aside (if there) and ``tmp`` into its place; returns the old one's new
    name. If the second rename fails, the old one is put back before the error goes on."""
    old = None
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    return old


def recover_directory(path: PathLike) -> None:
    """Put right what a killed :func:`atomic_directory` left beside ``path``: a ``.<name>.old-*``
    folder is renamed back when ``path`` is missing (the kill came between the two renames) and
    deleted when ``path`` exists (the kill came before the old one was deleted); a
    ``.<name>.tmp-*`` folder (a kill while it was being filled) is deleted."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    old_prefix, tmp_prefix = f".{path.name}.old-", f".{path.name}.tmp-"
    for leftover in sorted(path.parent.iterdir()):
        if leftover.name.startswith(old_prefix):
            if path.exists() or path.is_symlink():
                _remove(leftover)
            else:
                os.rename(leftover, path)
        elif leftover.name.startswith(tmp_prefix) and leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


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


def file_digest(path: PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_table(path: PathLike, text_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read one of our CSVs: name columns stay text ("0", "NA" are real tags), empty = missing."""
    header = pd.read_csv(path, nrows=0).columns
    text = TEXT_COLUMNS | set(text_columns)
    return pd.read_csv(
        path, dtype={c: str for c in header if c in text}, keep_default_na=False, na_values=[""]
    )


def require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetError(
            f"{what} lacks column(s) {quote(missing)} (has {quote(list(df.columns))}); "
            "regenerate it with the step that writes it"
        )


def quote(items: Sequence[Any]) -> str:
    return ", ".join(repr(i) for i in items)
