"""What a rule's result depends on beyond its input files: the contents of image folders and the
package code its script runs. Rules pass these digests as ``params``, and Snakemake reruns a job
whose params changed ("Params have changed since last execution"; ``snakemake --list-changes
params`` lists them).

Why params and not input files: a folder as a Snakemake input is judged by the folder's own
modification time, which does not change when an image deep inside it is replaced, and listing
100k images as inputs makes every DAG build slow. A digest of every file's relative path, size
and modification time costs one ``stat`` per file (about 1 s per 100k files) and changes when
an image is added, removed, replaced or renamed anywhere below the folder, symlinked folders
included. A file whose bytes change but whose size and time stay the same is not seen; one
that is only touched counts as changed.

Snakemake already reruns a rule when its script (``workflow/scripts/*.py``) changes; the
package under ``src/labelflow`` is not a script, so :func:`code_digest` hashes the modules a
script imports, directly or through other modules, without their docstrings and comments: a
change to the code a rule runs reruns that rule, and only those rules.
"""

from __future__ import annotations

import ast
import hashlib
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from labelflow.images import walk_images
from labelflow.io import PathLike, read_csv

PACKAGE = Path(__file__).resolve().parent


def files_digest(paths: Iterable[PathLike], root: PathLike) -> str:
    """Digest of (path relative to ``root``, size, mtime) of each path; a missing one counts too."""
    h = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        try:
            st = os.stat(path)
            entry = f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n"
        except OSError:
            entry = f"{os.path.relpath(path, root)}\0missing\n"
        h.update(entry.encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def folder_digest(folder: PathLike) -> str:
    """Digest of every file below ``folder`` that a scan would consider (hidden entries and
    Snakemake's markers are left out, as tag2label leaves them out), symlinks followed once."""
    folder = str(folder)
    if not os.path.isdir(folder):
        return "missing"
    return files_digest(walk_images(folder, lambda p: p, skipped=[]), folder)


def source_digest(source: PathLike) -> str:
    """A folder's :func:`folder_digest`, or for a file (a CSV of image paths) the digest of the
    file and of the files it names in its ``path`` column (relative to its folder)."""
    source = Path(source)
    if source.is_dir():
        return folder_digest(source)
    if not source.is_file():
        return "missing"
    try:
        listed = read_csv(source, "image table", dtype=str, keep_default_na=False, usecols=["path"])["path"]
    except ValueError:  # a malformed CSV (DatasetError) or one without a `path` column
        listed = []  # the file itself is what the job reads, and its reader names the problem
    named = [p if os.path.isabs(p) else str(source.parent / p) for p in listed]
    return files_digest([source, *named], source.parent)


def _labelflow_imports(tree: ast.AST) -> set[str]:
    """labelflow modules a parsed file imports anywhere (function-local imports included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labelflow"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("labelflow")}
    return found


def _module_file(module: str) -> Path | None:
    parts = module.split(".")[1:]
    for candidate in (PACKAGE.joinpath(*parts).with_suffix(".py"), PACKAGE.joinpath(*parts, "__init__.py")):
        if parts and candidate.is_file():
            return candidate
    return PACKAGE / "__init__.py" if not parts else None


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=None)
def _parsed(path: Path) -> tuple[frozenset[str], str]:
    """(labelflow modules the file imports, its code without docstrings as text), once per file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imports = frozenset(_labelflow_imports(tree))
    return imports, ast.dump(_without_docstrings(tree))


@lru_cache(maxsize=None)
def code_digest(script: PathLike) -> str:
    """Digest of the package code ``script`` runs: the labelflow modules it imports, directly
    or through other modules, as parsed code (comments and docstrings do not count)."""
    return modules_digest(_parsed(Path(script))[0])


def modules_digest(modules: Iterable[str]) -> str:
    """Digest of the given labelflow modules and every labelflow module they import, directly or
    through others, as parsed code without docstrings (comments are not in the parse)."""
    pending = set(modules)
    seen: set[Path] = set()
    while pending:
        path = _module_file(pending.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        pending |= _parsed(path)[0]
    h = hashlib.sha256()
    for path in sorted(seen):
        h.update(f"{path.relative_to(PACKAGE)}\0{_parsed(path)[1]}\n".encode())
    return h.hexdigest()[:16]
