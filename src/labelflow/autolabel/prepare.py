"""Autolabel step 1: scan the human-labelled ``clean`` folder and the unlabelled ``raw`` pile.

Builds one *autolabel root* holding two symlinks, ``clean -> <clean>`` and ``raw -> <raw>``.
Every table names an image by its path relative to that root (``clean/<class>/x.png``,
``raw/a/b/x.png``): identity is the path, never the basename, and inputs are only read.
Human rows get stratified folds; raw images byte-identical to a clean image take its label
(source ``human-duplicate``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from labelflow.dataset import split, tag2label
from labelflow.images import inspect_images, walk_images
from labelflow.io import DatasetError, PathLike, write_csv_atomic, write_json_atomic

log = logging.getLogger(__name__)

CLEAN, RAW = "clean", "raw"  # the two entries of the autolabel root
RAW_COLUMNS = ["path", "sha1", "duplicate_of", "tag"]


def scan_raw(raw_dir: PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every readable image below ``raw_dir`` (recursively, symlinks followed once).

    Returns ``(images, skipped)``: ``path,sha1`` and ``path,reason`` with POSIX paths
    relative to ``raw_dir``. Hidden entries, non-images and unreadable files are skipped.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DatasetError(f"config key `autolabel.raw`: folder {raw_dir} does not exist")
    rel = lambda p: Path(os.path.relpath(p, raw_dir)).as_posix()  # noqa: E731
    skipped: list[tuple[str, str]] = []
    candidates = list(walk_images(str(raw_dir), rel, skipped))
    checked = inspect_images(candidates)
    rows = []
    for path, (reason, digest) in zip(candidates, checked, strict=True):
        if reason is None:
            rows.append((rel(path), digest))
        else:
            skipped.append((rel(path), reason))
    images = pd.DataFrame(sorted(rows), columns=["path", "sha1"])
    return images, pd.DataFrame(sorted(skipped), columns=["path", "reason"])


def _prefixed(paths: Iterable[str], prefix: str) -> list[str]:
    return [f"{prefix}/{p}" for p in paths]


def make_root(root_dir: PathLike, clean: PathLike, raw: PathLike) -> Path:
    """``root_dir/clean -> abs(clean)`` and ``root_dir/raw -> abs(raw)``; nothing is copied."""
    root = Path(root_dir)
    root.mkdir(parents=True, exist_ok=True)
    for name, target in ((CLEAN, clean), (RAW, raw)):
        link = root / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.abspath(target), link, target_is_directory=True)
    return root


def raw_with_human_duplicates(images: pd.DataFrame, human: pd.DataFrame, digest_of: dict[str, str]) -> pd.DataFrame:
    """raw.csv rows: ``tag`` is set (and ``duplicate_of`` names the clean image) when a raw
    image's bytes equal a clean image's; when identical clean images carry different tags the
    raw image stays unlabelled and ``duplicate_of`` lists them all."""
    by_digest: dict[str, list[tuple[str, str]]] = {}
    for path, tag in zip(human["path"], human["tag"]):
        by_digest.setdefault(digest_of[path], []).append((path, tag))
    duplicate_of, tags = [], []
    for digest in images["sha1"]:
        matches = by_digest.get(digest, [])
        duplicate_of.append(";".join(p for p, _ in matches))
        match_tags = {t for _, t in matches}
        tags.append(match_tags.pop() if len(match_tags) == 1 else "")
    return pd.DataFrame(
        {"path": _prefixed(images["path"], RAW), "sha1": images["sha1"], "duplicate_of": duplicate_of, "tag": tags},
        columns=RAW_COLUMNS,
    )


def prepare(
    *,
    clean: PathLike,
    raw: PathLike,
    root_dir: PathLike,
    human_csv: PathLike,
    tag2cls_json: PathLike,
    raw_csv: PathLike,
    skipped_csv: PathLike,
    n_folds: int,
    seed: int,
) -> dict[str, Any]:
    """Scan clean and raw, build the autolabel root and the human/raw tables.

    * human.csv ``path,tag,class,fold``: clean images with stratified folds 0..n_folds-1;
    * raw.csv ``path,sha1,duplicate_of,tag``: readable raw images (see
      :func:`raw_with_human_duplicates`);
    * skipped.csv ``path,reason`` for clean and raw files that are not usable images.
    """
    for key, folder in (("clean", clean), ("raw", raw)):
        if not Path(folder).is_dir():
            raise DatasetError(f"config key `autolabel.{key}`: folder {folder} does not exist")
    try:
        labelled = tag2label(clean)
    except DatasetError as err:
        raise DatasetError(f"config key `autolabel.clean`: {err}") from None
    human = labelled.dataset.copy()
    human["path"] = _prefixed(human["path"], CLEAN)
    digest_of = dict(zip(human["path"], human["sha1"]))  # split() keeps path,tag,class,fold only
    human = split(human, labelled.tag2cls, n_folds, seed)
    images, raw_skipped = scan_raw(raw)
    raw_table = raw_with_human_duplicates(images, human, digest_of)
    skipped = pd.concat(
        [
            labelled.skipped.assign(path=_prefixed(labelled.skipped["path"], CLEAN)),
            raw_skipped.assign(path=_prefixed(raw_skipped["path"], RAW)),
        ],
        ignore_index=True,
    )
    make_root(root_dir, clean, raw)
    write_csv_atomic(human, human_csv)
    write_json_atomic(labelled.tag2cls, tag2cls_json)
    write_csv_atomic(raw_table, raw_csv)
    write_csv_atomic(skipped, skipped_csv)
    n_dup = int((raw_table["tag"].fillna("") != "").sum())
    summary = {
        "human": len(human),
        "classes": len(labelled.tag2cls),
        "raw": len(raw_table),
        "human_duplicates": n_dup,
        "skipped": len(skipped),
    }
    log.info(
        "%d human-labelled images in %d classes; %d raw images (%d byte-identical to a clean image); %d skipped",
        summary["human"], summary["classes"], summary["raw"], n_dup, summary["skipped"],
    )
    for row in skipped.itertuples():
        log.warning("skipped %s: %s", row.path, row.reason)
    return summary
