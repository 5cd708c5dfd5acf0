"""Autolabel step 1: scan the human-labelled ``clean`` folder and the unlabelled ``raw`` pile.

Builds one *autolabel root* holding two symlinks, ``clean -> <clean>`` and ``raw -> <raw>``.
Every table names an image by its path relative to that root (``clean/<class>/x.png``,
``raw/a/b/x.png``): identity is the path, never the basename, and inputs are only read.
Human rows get stratified folds that keep duplicate groups (exact and near copies, see
:mod:`labelflow.near_duplicates`) together; a raw image in one duplicate group with clean
images takes their label when they agree (source ``human-duplicate``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from labelflow.dataset import DEFAULT_DUPLICATES, DuplicateSettings, split, tag2label
from labelflow.images import inspect_images, walk_images
from labelflow.io import DatasetError, PathLike, write_csv_atomic, write_json_atomic
from labelflow.near_duplicates import duplicate_groups

log = logging.getLogger(__name__)

CLEAN, RAW = "clean", "raw"  # the two entries of the autolabel root
RAW_COLUMNS = ["path", "sha1", "duplicate_of", "tag"]


def scan_raw(raw_dir: PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every readable image below ``raw_dir`` (recursively, symlinks followed once).

    Returns ``(images, skipped)``: ``path,sha1,phash`` and ``path,reason`` with POSIX paths
    relative to ``raw_dir``. Hidden entries, names that are not valid UTF-8, non-images and
    unreadable files are skipped.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DatasetError(f"config key `autolabel.raw`: folder {raw_dir} does not exist")
    rel = lambda p: Path(os.path.relpath(p, raw_dir)).as_posix()  # noqa: E731
    skipped: list[tuple[str, str]] = []
    candidates = list(walk_images(str(raw_dir), rel, skipped))
    rows = []
    for path, checked in zip(candidates, inspect_images(candidates), strict=True):
        if checked.reason is None:
            rows.append((rel(path), checked.sha1, checked.phash))
        else:
            skipped.append((rel(path), checked.reason))
    images = pd.DataFrame(sorted(rows), columns=["path", "sha1", "phash"])
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


def raw_with_human_duplicates(
    images: pd.DataFrame,
    human: pd.DataFrame,
    folders: dict[str, PathLike],
    duplicates: DuplicateSettings = DEFAULT_DUPLICATES,
) -> pd.DataFrame:
    """raw.csv rows for the raw ``images`` (``path,sha1,phash``, paths relative to raw).

    Clean and raw images are grouped together (byte-identical, or pHash within
    ``duplicates.max_distance`` bits and pixels correlating at ``duplicates.min_correlation``;
    transitively); ``folders`` maps the paths' first part (``clean``, ``raw``) to the folder
    the pixel check reads them from (human paths start with ``clean/``). A raw image whose
    group holds clean images takes their tag when they all carry the same one; ``duplicate_of``
    names them (``;``-joined). When they disagree, the raw image stays unlabelled (``tag`` empty) and ``duplicate_of``
    still lists them all.
    """
    raw_paths = _prefixed(images["path"], RAW)
    everything = pd.concat(
        [human[["path", "sha1", "phash", "tag"]], images.assign(path=raw_paths, tag="")[["path", "sha1", "phash", "tag"]]],
        ignore_index=True,
    )
    files = [os.path.join(folders[top], rest) for top, rest in (path.split("/", 1) for path in everything["path"])]
    confirm = duplicates.confirm(files)
    everything["group"] = duplicate_groups(
        everything["path"].tolist(), everything["sha1"].tolist(), everything["phash"].tolist(),
        duplicates.max_distance, confirm,
    )  # fmt: skip
    clean = everything.iloc[: len(human)].sort_values("path")
    by_group = clean.groupby("group").agg(
        duplicate_of=("path", ";".join), n_tags=("tag", "nunique"), tag=("tag", "first")
    )
    raw_groups = everything["group"].iloc[len(human) :]
    matched = by_group.reindex(raw_groups.to_numpy())
    agreed = matched["n_tags"].eq(1).to_numpy()
    return pd.DataFrame(
        {
            "path": raw_paths,
            "sha1": images["sha1"].tolist(),
            "duplicate_of": matched["duplicate_of"].fillna("").tolist(),
            "tag": [t if ok else "" for t, ok in zip(matched["tag"].tolist(), agreed)],
        },
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
    duplicates: DuplicateSettings = DEFAULT_DUPLICATES,
) -> dict[str, Any]:
    """Scan clean and raw, build the autolabel root and the human/raw tables.

    * human.csv ``path,tag,class,fold,sha1,group``: clean images with stratified folds
      0..n_folds-1 that keep each duplicate group in one fold (:func:`labelflow.dataset.split`);
      clean label conflicts are handled as ``duplicates.label_conflicts`` says;
    * raw.csv ``path,sha1,duplicate_of,tag``: readable raw images (see
      :func:`raw_with_human_duplicates`);
    * skipped.csv ``path,reason`` for clean and raw files that are not usable images (and
      clean label conflicts left out).
    """
    for key, folder in (("clean", clean), ("raw", raw)):
        if not Path(folder).is_dir():
            raise DatasetError(f"config key `autolabel.{key}`: folder {folder} does not exist")
    try:
        labelled = tag2label(clean, duplicates)
    except DatasetError as err:
        raise DatasetError(f"config key `autolabel.clean`: {err}") from None
    clean_table = labelled.dataset.assign(path=_prefixed(labelled.dataset["path"], CLEAN))
    human = split(clean_table, labelled.tag2cls, n_folds, seed)
    images, raw_skipped = scan_raw(raw)
    raw_table = raw_with_human_duplicates(images, clean_table, {CLEAN: clean, RAW: raw}, duplicates)
    skipped = pd.concat(
        [
            labelled.skipped.assign(
                path=_prefixed(labelled.skipped["path"], CLEAN),
                # a label conflict names the other copy by its path in clean; name it from the root
                reason=labelled.skipped["reason"].str.replace(
                    "^label conflict: duplicate of ", f"label conflict: duplicate of {CLEAN}/", regex=True
                ),
            ),
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
        "%d human-labelled images in %d classes; %d raw images (%d copies of a clean image, exact or near, "
        "took its label); %d skipped",
        summary["human"], summary["classes"], summary["raw"], n_dup, summary["skipped"],
    )
    for row in skipped.itertuples():
        log.warning("skipped %s: %s", row.path, row.reason)
    return summary
