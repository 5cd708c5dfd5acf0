"""Files in and out: atomic writers, JSON/NPY/CSV readers, and the error every bad input raises.

Every artifact the workflow writes goes through :func:`atomic_output` or
:func:`atomic_directory`, so a reader (or Snakemake) never sees a half-written file.
Nothing here pickles: tables are CSV, small facts JSON, arrays ``.npy``/``.npz``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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


# What pandas raises on a malformed file (an unclosed quote, a row longer than the header, no
# header at all, bytes that are not UTF-8).
CSV_ERRORS = (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError)
CSV_FIX = "close every quote, put a field that holds a comma in quotes, and save the file as UTF-8 with a header line"
LONG_ROW_FIX = 'put a field that holds a comma in quotes ("a,b.png") and remove trailing commas'

# pandas' message for a row longer than the header (the C and the python parser say the same).
_LONG_ROW = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
# read_csv arguments that change how a file splits into rows and fields: the first-row check
# reads the file with the same ones.
_TOKENIZING = frozenset(
    {"sep", "delimiter", "compression", "encoding", "encoding_errors", "quotechar", "quoting", "doublequote",
     "escapechar", "comment", "skip_blank_lines", "skipinitialspace", "lineterminator", "engine"}
)


def read_csv(path: PathLike, what: str, fix: str = CSV_FIX, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_csv`` of a CSV a person may have written or edited; a malformed file is a
    :class:`DatasetError` naming ``what`` (say "labels table"), the file and ``fix``, a missing file
    still FileNotFoundError, for the caller to name its config key.

    ``index_col=False``: rows with one field more than the header (an unquoted comma in a file
    name, a trailing comma) must not make the first column the index, shifting every column.
    pandas then drops the extra fields of the first data row silently, and refuses a later row
    longer than the header, so the first row is checked first, by pandas itself (the same
    compression, blank lines and field sizes as the real read).
    """
    tokenizing = {k: v for k, v in kwargs.items() if k in _TOKENIZING}
    try:
        # header=None: the header line is a row like the others, so a longer first data row is
        # pandas' "Expected N fields in line L, saw M", as a longer later row is in the real read.
        pd.read_csv(path, header=None, nrows=2, dtype=str, keep_default_na=False, index_col=False, **tokenizing)
        return pd.read_csv(path, index_col=False, **kwargs)
    except CSV_ERRORS as err:
        raise DatasetError(_csv_problem(path, what, err, fix, tokenizing)) from err


def _csv_problem(path: PathLike, what: str, err: Exception, fix: str, tokenizing: dict[str, Any]) -> str:
    long_row = _LONG_ROW.search(str(err)) if isinstance(err, pd.errors.ParserError) else None
    if long_row is None:
        return f"{what} {path} is not a readable CSV ({str(err).strip()}); {fix}"
    fields, line, saw = long_row.groups()
    try:
        header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False, **tokenizing).iloc[0]
        names = f" ({_shortened(quote(header.tolist()))})"
    except CSV_ERRORS:
        names = ""
    return f"{what} {path}: line {line} has {saw} fields but the header has {fields}{names}; {LONG_ROW_FIX}"


def _shortened(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def normalise_paths(paths: Sequence[str]) -> list[str]:
    """Relative paths as the tables write them (``./a.png`` and ``a//b.png`` -> ``a.png``, ``a/b.png``);
    an empty path stays empty (for the caller's error). Every reader of a path a person typed
    uses this, so one spelling matches another."""
    return [Path(p).as_posix() if p else p for p in paths]


def require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetError(
            f"{what} lacks column(s) {quote(missing)} (has {quote(list(df.columns))}); "
            "regenerate it with the step that writes it"
        )


def quote(items: Sequence[Any]) -> str:
    return ", ".join(repr(i) for i in items)
