"""Files in and out: atomic writers, JSON/NPY/CSV readers, and the error every bad input raises.

Every artifact the workflow writes goes through :func:`atomic_output` or
:func:`atomic_directory`, so a reader (or Snakemake) never sees a half-written file.
Nothing here pickles: tables are CSV, small facts JSON, arrays ``.npy``/``.npz``.
"""

from __future__ import annotations

import csv
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
    """Read one of our CSVs: name columns stay text ("0", "NA" are real tags), empty = missing.
    A malformed file is a :class:`DatasetError` (:func:`read_csv`); a missing one FileNotFoundError."""
    header = read_csv(path, "table", nrows=0).columns
    text = TEXT_COLUMNS | set(text_columns)
    return read_csv(path, "table", dtype={c: str for c in header if c in text}, keep_default_na=False, na_values=[""])


# What pandas and the csv module raise on a malformed file (an unclosed quote, a row longer than
# the rows before it, no header at all, bytes that are not UTF-8).
CSV_ERRORS = (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error)
CSV_FIX = "close every quote, put a field that holds a comma in quotes, and save the file as UTF-8 with a header line"


def read_csv(path: PathLike, what: str, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_csv`` of a CSV a person may have written or edited; a malformed file is a
    :class:`DatasetError` naming ``what`` (say "labels table") and the file, a missing file still
    FileNotFoundError, for the caller to name its config key.

    ``index_col=False``: rows with one field more than the header (an unquoted comma in a file
    name, a trailing comma) must not make the first column the index, shifting every column.
    pandas then drops the extra fields of the first data row silently, and refuses a later row
    longer than that one, so a first row longer than the header is checked here.
    """
    try:
        _check_first_row(path, what)
        return pd.read_csv(path, index_col=False, **kwargs)
    except CSV_ERRORS as err:
        raise DatasetError(f"{what} {path} is not a readable CSV ({str(err).strip()}); {CSV_FIX}") from err


def _check_first_row(path: PathLike, what: str) -> None:
    """The first data row has no more fields than the header (blank lines skipped, as pandas does)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        rows, start = [], 1
        for row in reader:
            if row:
                rows.append((start, row))
                if len(rows) == 2:
                    break
            start = reader.line_num + 1
    if len(rows) == 2 and len(rows[1][1]) > len(rows[0][1]):
        (_, header), (line, row) = rows
        raise DatasetError(
            f"{what} {path}: line {line} has {len(row)} fields but the header has {len(header)} "
            f"({quote(header)}); put a field that holds a comma in quotes (\"a,b.png\") and remove trailing commas"
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
