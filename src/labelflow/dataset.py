"""Dataset tables: tag2label (folder or labels CSV → path,tag), duplicate groups, folds, and
their readers.

A dataset table has one row per usable image: ``path`` (POSIX, relative to the dataset
folder), ``tag`` (the class folder name; for multilabel data the first label), for
multilabel data ``labels`` (sorted, ``;``-joined), ``sha1`` (of the file's bytes), from
tag2label also ``phash`` (16 hex digits) and ``group`` (copies of one picture, exact or near,
share it: :mod:`labelflow.near_duplicates`), and after :func:`split` also ``class`` (index
into ``tag2cls.json``) and ``fold``; a group never spans folds. Every bad-input problem
raises :class:`~labelflow.io.DatasetError` naming the file or key at fault.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labelflow.images import (
    NOT_UTF8_FILE,
    NOT_UTF8_FOLDER,
    SNAKEMAKE_TIMESTAMP,
    inspect_images,
    is_valid_utf8,
    readable_path,
    walk_images,
)
from labelflow.io import (
    CSV_FIX,
    MAX_LISTED,
    DatasetError,
    PathLike,
    normalise_paths,
    quote,
    read_csv,
    read_table,
    require_columns,
)
from labelflow.near_duplicates import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MIN_CORRELATION,
    PixelCheck,
    duplicate_groups,
    group_report,
)

log = logging.getLogger(__name__)

LABEL_CONFLICT_ACTIONS = ("drop", "keep")


@dataclass(frozen=True)
class DuplicateSettings:
    """Config section ``duplicates`` (defaults in config/schemas/config.schema.yaml; the same
    values here serve callers outside the workflow, and a test keeps them equal)."""

    max_distance: int = DEFAULT_MAX_DISTANCE  # pHash bits; -1: exact (byte-identical) copies only
    label_conflicts: str = "drop"  # a group whose members carry different labels: drop | keep
    min_correlation: float | None = DEFAULT_MIN_CORRELATION  # pixel check of pHash pairs; None: none

    def __post_init__(self) -> None:
        if self.label_conflicts not in LABEL_CONFLICT_ACTIONS:
            raise DatasetError(
                f"config key `duplicates.label_conflicts` must be one of {LABEL_CONFLICT_ACTIONS}, "
                f"got {self.label_conflicts!r}"
            )
        distance = self.max_distance
        if isinstance(distance, bool) or not isinstance(distance, int) or not -1 <= distance <= 32:
            raise DatasetError(
                f"config key `duplicates.max_distance` must be an integer in -1..32, got {distance!r}"
            )
        correlation = self.min_correlation
        if correlation is not None and (
            isinstance(correlation, bool) or not isinstance(correlation, (int, float)) or not 0 <= correlation <= 1
        ):
            raise DatasetError(
                f"config key `duplicates.min_correlation` must be a number in 0..1 or null (no pixel check), "
                f"got {correlation!r}"
            )

    def confirm(self, files: Sequence[PathLike]) -> PixelCheck | None:
        """The pixel check of pHash pairs over these image files (row i: files[i]), or None."""
        return None if self.min_correlation is None else PixelCheck(files, self.min_correlation)

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> DuplicateSettings:
        return cls(**{name: section[name] for name in cls.__dataclass_fields__})


DEFAULT_DUPLICATES = DuplicateSettings()


@dataclass(frozen=True)
class Tag2LabelResult:
    """Outcome of :func:`tag2label`; all paths are POSIX and relative to the dataset."""

    dataset: pd.DataFrame  # path, tag[, labels], sha1, phash, group; sorted by (tag, path) or path
    tag2cls: dict[str, int]  # sorted tag -> 0..n-1
    skipped: pd.DataFrame  # path, reason (label conflicts dropped with `drop` among them)
    duplicates: pd.DataFrame  # groups of 2+ copies: group, size, members, classes, label_conflict, kind


SKIPPED_COLUMNS = ["path", "reason"]
DUPLICATE_COLUMNS = ["group", "size", "members", "classes", "label_conflict", "kind"]


def group_duplicates(
    table: pd.DataFrame, settings: DuplicateSettings, root: PathLike, label_column: str = "tag"
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Give each row of a ``path,<label_column>,sha1,phash`` table its duplicate ``group``
    (paths relative to ``root``, where the pixel check reads them).

    Returns ``(table, skipped, report)``: the table with ``group`` (without the members of
    label-conflict groups when ``settings.label_conflicts`` is ``drop``), the dropped rows
    as ``path,reason``, and :func:`~labelflow.near_duplicates.group_report` of every group
    of two or more (a label conflict: members whose label values differ; for multilabel
    data, different label sets). Each conflict is logged as a warning naming its files.
    """
    files = [os.path.join(root, path) for path in table["path"]]
    groups = duplicate_groups(
        table["path"].tolist(), table["sha1"].tolist(), table["phash"].tolist(), settings.max_distance,
        settings.confirm(files),
    )  # fmt: skip
    table = table.assign(group=groups)
    report = group_report(table["path"], table[label_column], groups, table["sha1"])
    conflicts = report.loc[report["label_conflict"], "group"]
    in_conflict = table["group"].isin(conflicts)
    action = "dropped" if settings.label_conflicts == "drop" else "kept"
    for group, members in table[in_conflict].groupby("group"):
        _warn_conflict(int(group), members, label_column, action)
    if settings.label_conflicts == "keep" or not in_conflict.any():
        return table, pd.DataFrame(columns=SKIPPED_COLUMNS), report
    skipped = _conflict_reasons(table[in_conflict], label_column)
    return table[~in_conflict].reset_index(drop=True), skipped, report


def _warn_conflict(group: int, members: pd.DataFrame, label_column: str, action: str) -> None:
    """One warning per conflict group: each of its labels with one of its files."""
    by_label = members.sort_values("path").groupby(label_column)["path"]
    labels = ", ".join(
        f"{label} ({paths.iloc[0]}{f' and {len(paths) - 1} more' if len(paths) > 1 else ''})"
        for label, paths in by_label
    )
    log.warning(
        "label conflict: duplicate group %d (%d copies of one picture) carries different labels: %s; %s "
        "(config key `duplicates.label_conflicts`; members listed in duplicates.csv)",
        group, len(members), labels, action,
    )


def _conflict_reasons(members: pd.DataFrame, label_column: str) -> pd.DataFrame:
    """``path,reason`` for members of label-conflict groups: each names one copy (the first
    by path) whose label differs from its own. One row per member of a conflict group."""
    rows = []
    for _, group in members.sort_values("path").groupby("group"):
        for path, label in zip(group["path"], group[label_column]):
            other = group[group[label_column] != label].iloc[0]
            what = "classes" if ";" in str(other[label_column]) else "class"
            rows.append((path, f"label conflict: duplicate of {other['path']} in {what} {other[label_column]}"))
    return pd.DataFrame(rows, columns=SKIPPED_COLUMNS)


def _class_folder_files(root: Path, rel) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]:
    """(class folder names, (tag, path) of every candidate file below them, skipped entries)."""
    skipped: list[tuple[str, str]] = []
    candidates: list[tuple[str, str]] = []
    tags: list[str] = []
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name == SNAKEMAKE_TIMESTAMP:
                continue
            if not is_valid_utf8(entry.name):
                reason = NOT_UTF8_FOLDER if entry.is_dir() else NOT_UTF8_FILE
                skipped.append((readable_path(entry.name), reason))
            elif entry.name.startswith("."):
                skipped.append((entry.name, "hidden folder" if entry.is_dir() else "hidden file"))
            elif entry.is_dir():
                tags.append(entry.name)
                candidates += [(entry.name, p) for p in walk_images(entry.path, rel, skipped)]
            else:
                skipped.append((entry.name, "not inside a class folder"))
    return tags, candidates, skipped


def tag2label(dataset_dir: PathLike, duplicates: DuplicateSettings = DEFAULT_DUPLICATES) -> Tag2LabelResult:
    """Scan a folder-per-class dataset into a table of usable images and their tags.

    Each immediate sub-folder is a class (its name is the tag); files anywhere below it
    belong to it. Symlinks are followed, with a guard against loops. Hidden entries,
    names that are not valid UTF-8, non-image files and unreadable images are skipped and
    reported, never fatal; a class left without images, fewer than two classes, or a class
    folder name with ``;`` (the separator of multilabel labels) is a :class:`DatasetError`.
    Copies of one picture (byte-identical, or near-identical: pHash within
    ``duplicates.max_distance`` and pixels correlating at ``duplicates.min_correlation``) share
    a ``group``; see :func:`group_duplicates` for groups whose members sit in different classes.
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

    tags, candidates, skipped = _class_folder_files(root, rel)
    # `;` separates the labels of multilabel data (labels, corrections, group reports).
    with_separator = [t for t in tags if ";" in t]
    if with_separator:
        raise DatasetError(
            f"class folder {quote(with_separator)} has `;` in its name (dataset folder {root}); `;` separates "
            "the labels of an image, so rename the folder without it"
        )
    images, unusable = _inspected([path for _, path in candidates], [rel(p) for _, p in candidates])
    images.insert(1, "tag", [tag for (tag, _), usable in zip(candidates, unusable["usable"]) if usable])
    skipped += unusable.loc[~unusable["usable"], ["path", "reason"]].itertuples(index=False, name=None)
    images = images.sort_values(["tag", "path"], ignore_index=True)
    _check_class_folders(root, tags, set(images["tag"]), "has no readable images; remove it or add images")
    dataset, conflicts, report = group_duplicates(images, duplicates, root)
    _check_class_folders(
        root, tags, set(dataset["tag"]),
        "has no images left: all are copies of images in other classes (label conflicts, see "
        "duplicates.csv); fix the labels or set config key `duplicates.label_conflicts: keep`",
    )  # fmt: skip
    return Tag2LabelResult(
        dataset=dataset,
        tag2cls={tag: i for i, tag in enumerate(sorted(tags))},
        skipped=_skipped_table(skipped, conflicts),
        duplicates=report,
    )


def _inspected(paths: Sequence[str], names: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(``path,sha1,phash`` of the usable images, ``path,usable,reason`` of every file), with
    the files named by ``names``; each file is decoded once (:func:`inspect_images`)."""
    checked = inspect_images(list(paths))
    status = pd.DataFrame(
        {"path": list(names), "usable": [c.reason is None for c in checked], "reason": [c.reason for c in checked]}
    )
    usable = status["usable"].to_numpy(dtype=bool)
    images = pd.DataFrame(
        {
            "path": status["path"][usable].tolist(),
            "sha1": [c.sha1 for c in checked if c.reason is None],
            "phash": [c.phash for c in checked if c.reason is None],
        },
        columns=["path", "sha1", "phash"],
    )
    return images, status


def _skipped_table(skipped: Sequence[tuple[str, str]], *more: pd.DataFrame) -> pd.DataFrame:
    table = pd.concat([pd.DataFrame(list(skipped), columns=SKIPPED_COLUMNS), *more], ignore_index=True)
    return table.sort_values(SKIPPED_COLUMNS, ignore_index=True)


def _check_class_folders(root: Path, tags: Sequence[str], with_images: set[str], problem: str) -> None:
    empty = [t for t in tags if t not in with_images]
    if empty:
        names = ", ".join(repr(t) for t in empty)
        raise DatasetError(f"class folder {names} {problem} (dataset folder {root})")
    if len(tags) < 2:
        raise DatasetError(
            f"dataset folder {root} has {len(tags)} class folder(s) ({', '.join(tags) or 'none'}); "
            "at least 2 are needed - put each class's images in its own sub-folder"
        )


def tag2label_csv(
    labels_csv: PathLike, root: PathLike, duplicates: DuplicateSettings = DEFAULT_DUPLICATES
) -> Tag2LabelResult:
    """A labels table (``path,labels``; labels separated by ``;``; paths relative to ``root``)
    → the same shapes as :func:`tag2label`, plus a ``labels`` column (sorted, ``;``-joined).

    ``tag`` is the first label (sorted), used to stratify folds. Rows whose path is absolute,
    escapes ``root``, is missing or is not a readable image, and rows without labels, are
    skipped and reported; a file listed twice is an error. Copies share a ``group``; a group
    whose members carry different label sets is a label conflict (:func:`group_duplicates`).
    """
    labels_csv, root = Path(labels_csv), Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; set config key `dataset` to the root of labels_csv paths")
    try:
        table = read_csv(labels_csv, "labels table", dtype=str, keep_default_na=False)
    except FileNotFoundError as err:
        raise DatasetError(f"labels table {labels_csv} does not exist; check config key `labels_csv`") from err
    require_columns(table, ["path", "labels"], f"labels table {labels_csv}")
    # Normalised before the check, so `./a.png` and `a.png` (or `a//b.png`, `a/b.png`) are one image.
    table["path"] = normalise_paths(table["path"].tolist())
    repeated = table["path"][table["path"].duplicated()].tolist()
    if repeated:
        raise DatasetError(f"labels table {labels_csv} lists {quote(repeated[:5])} more than once; keep one row per image")
    base = os.path.abspath(root)
    skipped: list[tuple[str, str]] = []
    listed: list[tuple[str, list[str]]] = []  # path, sorted labels
    problems = path_problems(table[["path"]], base, check_files=True)
    for i, (path, raw) in enumerate(zip(table["path"], table["labels"])):
        labels = sorted({label.strip() for label in raw.split(";") if label.strip()})
        problem = problems.get(table.index[i])
        if problem is None and not labels:
            problem = "no labels"
        if problem is None:
            listed.append((path, labels))
        else:
            skipped.append((path, problem))
    images, status = _inspected([os.path.join(base, p) for p, _ in listed], [p for p, _ in listed])
    skipped += status.loc[~status["usable"], ["path", "reason"]].itertuples(index=False, name=None)
    usable_labels = [labels for (_, labels), usable in zip(listed, status["usable"]) if usable]
    images.insert(1, "tag", [labels[0] for labels in usable_labels])
    images.insert(2, "labels", [";".join(labels) for labels in usable_labels])
    images = images.sort_values("path", ignore_index=True)
    dataset, conflicts, report = group_duplicates(images, duplicates, base, label_column="labels")
    all_labels = sorted({label for labels in dataset["labels"] for label in labels.split(";")})
    if len(all_labels) < 2:
        raise DatasetError(f"labels table {labels_csv} has {len(all_labels)} usable label(s); at least 2 are needed")
    return Tag2LabelResult(
        dataset=dataset,
        tag2cls={label: i for i, label in enumerate(all_labels)},
        skipped=_skipped_table(skipped, conflicts),
        duplicates=report,
    )


def split(
    dataset: pd.DataFrame, tag2cls: dict[str, int], n_folds: int = 5, seed: int = 42
) -> pd.DataFrame:
    """Add ``class`` and a stratified, group-aware ``fold`` (0..n_folds-1) to a ``path,tag`` table.

    Folds come from scikit-learn's ``StratifiedGroupKFold(shuffle=True, random_state=seed)``
    on the table's ``group`` column (tag2label's duplicate groups), so copies of a picture
    never straddle folds; a table without ``group`` is split image by image. Every class
    needs at least ``n_folds`` groups. Rows are sorted by path first, so the result depends
    only on the content and the seed, not on the order the table arrived in. Returns
    ``path,tag,class,fold`` (``+labels`` for multilabel data, ``+sha1``, ``+group`` when the
    input has them).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise DatasetError(f"config key `n_folds` must be an integer >= 2, got {n_folds!r}")
    require_columns(dataset, ["path", "tag"], "dataset table")
    # Multilabel tables (from a labels CSV) carry `labels`; `tag` is then the first label,
    # the key the folds are stratified on.
    columns = ["path", "tag"] + [c for c in ("labels", "sha1", "group") if c in dataset.columns]
    df = dataset[columns].sort_values("path", kind="stable").reset_index(drop=True)
    if "group" not in df.columns:
        df["group"] = np.arange(len(df))

    unknown = sorted(set(df["tag"]) - set(tag2cls))
    if unknown:
        raise DatasetError(
            f"tags {quote(unknown)} are not in the tag-to-class mapping; "
            "rerun tag2label so the dataset table and tag2cls.json match"
        )
    _check_groups_per_class(df, tag2cls, n_folds)

    df["class"] = df["tag"].map(tag2cls).astype(np.int64)
    df["fold"] = np.int64(-1)
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(folds.split(np.zeros(len(df)), df["class"], df["group"])):
        df.loc[test, "fold"] = fold
    return df[["path", "tag", "class", "fold"] + columns[2:]]


def _check_groups_per_class(df: pd.DataFrame, tag2cls: dict[str, int], n_folds: int) -> None:
    """Every class must reach every fold: it needs ``n_folds`` groups (copies share one fold).

    In a multilabel table only the first labels (the stratification key) are checked, since
    other labels ride along.
    """
    groups = df.groupby("tag")["group"].nunique()
    images = df["tag"].value_counts()
    keys = sorted(set(df["tag"])) if "labels" in df.columns else sorted(tag2cls)
    small = [tag for tag in keys if groups.get(tag, 0) < n_folds]
    if small:
        listed = ", ".join(
            f"{tag!r} ({int(groups.get(tag, 0))} groups, {int(images.get(tag, 0))} images)" for tag in small
        )
        raise DatasetError(
            f"class(es) {listed} have fewer groups than n_folds={n_folds}; copies of a picture "
            "(duplicate groups) stay in one fold, so each class needs n_folds distinct pictures: "
            "lower config key `n_folds` or add images to those classes"
        )


def duplicate_folds(duplicates: pd.DataFrame, dataset: pd.DataFrame) -> pd.DataFrame:
    """The duplicate-group report (tag2label's duplicates.csv) with ``fold``: the fold that
    holds the group's members in the split ``dataset`` (one per group; empty for a group
    left out of the dataset as a label conflict)."""
    require_columns(dataset, ["group", "fold"], "split dataset table")
    folds = dataset.groupby("group")["fold"].agg(lambda f: ";".join(str(v) for v in sorted(set(f))))
    return duplicates.assign(fold=duplicates["group"].map(folds).fillna("").astype(str))


def read_duplicates(path: PathLike) -> pd.DataFrame:
    """duplicates.csv of tag2label (see :func:`group_duplicates`); member and class names stay text."""
    table = read_table(path, text_columns=("members", "classes", "kind"))
    require_columns(table, DUPLICATE_COLUMNS, f"duplicates table {path}")
    return table


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
    require_columns(dataset, ["fold"], "dataset table")
    return dataset["fold"].isin(list(valid_folds))


def pick_groups(table: pd.DataFrame, share: float, seed: int) -> np.ndarray:
    """Rows of ``floor(share * n)`` of each class's ``n`` groups (column ``group`` when the table
    has one, so copies of a picture stay together; else each image alone), seeded. The class is
    the ``tag`` (the first label of multilabel rows)."""
    held = np.zeros(len(table), dtype=bool)
    if share == 0 or table.empty:
        return held
    groups = table["group"] if "group" in table.columns else table["path"]
    by_group = pd.DataFrame({"group": groups.to_numpy(), "tag": table["tag"].to_numpy()}).drop_duplicates("group")
    rng = np.random.default_rng(seed)
    chosen: set = set()
    for _, members in by_group.sort_values(["tag", "group"]).groupby("tag", sort=True):
        order = rng.permutation(len(members))
        chosen.update(members["group"].to_numpy()[order[: int(np.floor(share * len(members) + 1e-9))]])
    return groups.isin(chosen).to_numpy()


def calibration_mask(dataset: pd.DataFrame, valid_folds: Sequence[int], seed: int, share: float) -> np.ndarray:
    """Rows of the validation fold held out from checkpoint selection: the calibration
    temperature is fitted on them, so it is not fitted on the images that chose the checkpoint
    (:func:`pick_groups` of the validation rows). ``share`` 0 holds out nothing."""
    if not 0.0 <= share < 1.0:
        raise DatasetError(f"config key `calibration.holdout` must be in [0, 1), got {share!r}")
    is_valid = valid_mask(dataset, valid_folds).to_numpy()
    held = np.zeros(len(dataset), dtype=bool)
    held[np.flatnonzero(is_valid)] = pick_groups(dataset[is_valid], share, seed)
    return held


def split_names(dataset: pd.DataFrame, valid_folds: Sequence[int], seed: int, share: float) -> np.ndarray:
    """Each row's role in a run: ``train``, ``valid`` (the validation rows that select the
    checkpoint) or ``calibration`` (validation rows held out from selection)."""
    is_valid = valid_mask(dataset, valid_folds).to_numpy()
    names = np.where(is_valid, "valid", "train").astype(object)
    names[calibration_mask(dataset, valid_folds, seed, share)] = "calibration"
    return names


def read_dataset_csv(
    csv_path: PathLike, root: PathLike | None, required: Sequence[str] = ("path", "tag"), check_files: bool = False
) -> pd.DataFrame:
    """Read a dataset table and check its rows, vectorised (a model job reads it for every
    round and stage; a Python loop or a ``stat`` per row would grow with the dataset).

    Paths must be relative and must not climb out of ``root`` (checked lexically, so a
    symlinked dataset still works); a path listed twice or a row without a tag is an error.
    ``check_files`` also checks that every file exists below ``root``: tag2label has checked
    them when it wrote the table, so model jobs leave it off (a file deleted since then fails
    when the job decodes it, naming the file).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"dataset table {csv_path} does not exist; run the tag2label step first")
    # Only empty cells are missing values: a tag called "NA" or "None" is a real tag,
    # and tags/paths that look numeric (digit folders "0".."9") must stay strings.
    # A malformed file (a row longer than the header included) is a DatasetError naming it.
    df = read_csv(
        csv_path,
        "dataset table",
        fix=f"regenerate it with tag2label (a table you wrote: {CSV_FIX})",
        dtype={"path": str, "tag": str, "labels": str, "sha1": str, "phash": str},
        keep_default_na=False,
        na_values=[""],
    )
    require_columns(df, list(required), f"dataset table {csv_path}")
    problems = path_problems(df, root, check_files)
    if len(problems):
        listed = "; ".join(f"line {i + 2} ({df['path'].iloc[i]!r}): {why}" for i, why in problems.head(MAX_LISTED).items())
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DatasetError(
            f"dataset table {csv_path} has {len(problems)} bad row(s): {listed}{more}. Paths must be relative "
            f"to {root if root is not None else 'the dataset folder'} and name existing files; regenerate "
            "the table with tag2label"
        )
    return df


def path_problems(df: pd.DataFrame, root: PathLike | None, check_files: bool) -> pd.Series:
    """The first problem of each bad row (index: row number), vectorised with pandas."""
    paths = df["path"].fillna("").astype(str)
    problems = pd.Series(np.nan, index=df.index, dtype=object)

    def flag(mask, why: str) -> None:
        problems[mask & problems.isna()] = why

    flag(paths == "", "empty path")
    flag(paths.str.startswith(("/", "\\")) | paths.str.match(r"^[A-Za-z]:[\\/]"), "absolute path")
    posix = paths.str.replace("\\", "/", regex=False)
    climbs = posix.str.contains(r"(?:^|/)\.\.(?:/|$)") | posix.str.fullmatch(r"[./]*")
    # only paths with a ".." segment (rare) are walked segment by segment
    escapes = np.zeros(len(df), dtype=bool)
    rare = np.flatnonzero(climbs.to_numpy())
    escapes[rare] = [_lowest_depth(posix.iloc[i].split("/")) < 0 for i in rare]
    flag(pd.Series(escapes, index=df.index), "escapes the dataset folder")
    flag(paths.duplicated(keep="first"), "listed twice")
    if "tag" in df.columns:
        flag(df["tag"].isna(), "empty tag")
    if check_files and root is not None:
        base = os.path.abspath(root)
        unchecked = problems.isna()
        missing = np.zeros(len(df), dtype=bool)
        missing[unchecked.to_numpy()] = [not os.path.isfile(os.path.join(base, p)) for p in paths[unchecked]]
        flag(pd.Series(missing, index=df.index), "file not found")
    return problems.dropna()


def _lowest_depth(parts: list[str]) -> int:
    """How deep below the root a path goes at its shallowest point (``..`` climbs one); a path
    that is the root itself counts as escaping it."""
    depth, lowest = 0, 0
    for part in parts:
        if part == "..":
            depth -= 1
        elif part not in ("", "."):
            depth += 1
        lowest = min(lowest, depth)
    return lowest if depth > 0 else -1


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




def class_names(tag2cls: dict[str, int]) -> list[str]:
    """Class names in class-index order."""
    return sorted(tag2cls, key=tag2cls.get)


def is_multilabel(dataset: pd.DataFrame) -> bool:
    """A dataset from a labels CSV with at least one image carrying several labels."""
    return "labels" in dataset.columns and bool(dataset["labels"].str.contains(";").any())


def class_targets(dataset: pd.DataFrame, tag2cls: dict[str, int]) -> np.ndarray:
    """Class indices (N,) for single-label data, multi-hot rows (N, C) for multilabel data."""
    if not is_multilabel(dataset):
        return dataset["class"].to_numpy()
    targets = np.zeros((len(dataset), len(tag2cls)), dtype=np.float32)
    for row, labels in enumerate(dataset["labels"]):
        targets[row, [tag2cls[label] for label in labels.split(";")]] = 1.0
    return targets


PREDICTION_COLUMNS = ("path", "split", "class", "label", "predicted", "confidence")


def read_predictions(path: PathLike) -> pd.DataFrame:
    """predictions.csv of an infer step: one row per image of the run, in dataset order.

    ``path``; ``split`` (train, valid or calibration: see :func:`split_names`; the validation fold
    is every row that is not train); ``class`` (index of the image's (first) label, what the
    index's recall@k counts); ``label`` and ``predicted`` (class names, ``;``-joined for
    multilabel data, empty when a multilabel model predicts no class); ``confidence`` (the
    highest class probability).
    """
    table = read_table(path)
    require_columns(table, PREDICTION_COLUMNS, f"predictions table {path}")
    table["class"] = table["class"].astype(np.int64)
    table[["label", "predicted"]] = table[["label", "predicted"]].fillna("")
    return table


def read_head_predictions(path: PathLike) -> pd.DataFrame:
    """heads.csv of an infer step: path, head, true, predicted (codes of the rotation heads)."""
    table = pd.read_csv(path, dtype={"path": str, "head": str, "true": np.int64, "predicted": np.int64}, keep_default_na=False)
    require_columns(table, ["path", "head", "true", "predicted"], f"head predictions table {path}")
    return table


IMAGE_LIST_LABELS = ("label", "labels", "tag")  # the first one an image list has gives the labels


def read_image_list(csv_path: PathLike, require_labels: bool = False) -> pd.DataFrame:
    """A CSV of images: ``path`` and, from its first column of label/labels/tag, ``label`` (""
    when it has none). The one reader of the image lists users give to embed, predict and
    evaluate. Empty paths are an error naming the lines; with ``require_labels`` so are a
    missing label column and empty labels."""
    table = read_csv(csv_path, "image table", dtype=str, keep_default_na=False)
    column = next((c for c in IMAGE_LIST_LABELS if c in table.columns), None)
    if "path" not in table.columns or (require_labels and column is None):
        wanted = "path,label" if require_labels else "a `path` column"
        raise DatasetError(f"image table {csv_path} needs {wanted} (columns: {list(table.columns)})")
    labels = table[column] if column else pd.Series([""] * len(table), dtype=str)
    for what, empty in (("an empty path", table["path"].str.strip() == ""), ("no label", labels.str.strip() == "")):
        if empty.any() and (what != "no label" or require_labels):
            raise DatasetError(f"image table {csv_path}: line(s) {(np.flatnonzero(empty) + 2)[:5].tolist()} have {what}")
    return pd.DataFrame({"path": table["path"].tolist(), "label": labels.tolist()})
