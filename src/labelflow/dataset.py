"""Dataset tables: tag2label (folder or labels CSV → path,tag), folds, and their readers.

A dataset table has one row per usable image: ``path`` (POSIX, relative to the dataset
folder), ``tag`` (the class folder name; for multilabel data the first label), after
:func:`split` also ``class`` (index into ``tag2cls.json``) and ``fold``, and for multilabel
data ``labels`` (sorted, ``;``-joined). Every bad-input problem raises
:class:`~labelflow.io.DatasetError` naming the file or key at fault.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labelflow.images import SNAKEMAKE_TIMESTAMP, inspect_images, walk_images
from labelflow.io import MAX_LISTED, DatasetError, PathLike, quote, read_table, require_columns


@dataclass(frozen=True)
class Tag2LabelResult:
    """Outcome of :func:`tag2label`; all paths are POSIX and relative to the dataset."""

    dataset: pd.DataFrame  # path, tag[, labels], sha1; sorted by (tag, path) or path
    tag2cls: dict[str, int]  # sorted tag -> 0..n-1
    skipped: pd.DataFrame  # path, reason
    duplicates: pd.DataFrame  # path, duplicate_of (identical bytes; not an error)


def exact_duplicates(paths: Sequence[str], digests: Sequence[str]) -> pd.DataFrame:
    """``path,duplicate_of``: every file whose bytes equal an earlier file's (in table order)."""
    table = pd.DataFrame({"path": list(paths), "sha1": list(digests)})
    first = table.groupby("sha1", sort=False)["path"].transform("first")
    repeated = table["path"] != first
    return (
        pd.DataFrame({"path": table["path"][repeated], "duplicate_of": first[repeated]})
        .sort_values(["path", "duplicate_of"])
        .reset_index(drop=True)
    )


def _class_folder_files(root: Path, rel) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]:
    """(class folder names, (tag, path) of every candidate file below them, skipped entries)."""
    skipped: list[tuple[str, str]] = []
    candidates: list[tuple[str, str]] = []
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
    return tags, candidates, skipped


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

    tags, candidates, skipped = _class_folder_files(root, rel)
    checked = inspect_images([path for _, path in candidates])
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

    dataset = pd.DataFrame([(p, t, d) for t, p, d in rows], columns=["path", "tag", "sha1"])
    return Tag2LabelResult(
        dataset=dataset,
        tag2cls={tag: i for i, tag in enumerate(sorted(tags))},
        skipped=pd.DataFrame(sorted(skipped), columns=["path", "reason"]),
        duplicates=exact_duplicates(dataset["path"], dataset["sha1"]),
    )


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
    require_columns(table, ["path", "labels"], f"labels table {labels_csv}")
    repeated = table["path"][table["path"].duplicated()].tolist()
    if repeated:
        raise DatasetError(f"labels table {labels_csv} lists {quote(repeated[:5])} more than once; keep one row per image")
    base = os.path.abspath(root)
    skipped: list[tuple[str, str]] = []
    listed: list[tuple[str, list[str]]] = []  # path, sorted labels
    for path, raw in zip(table["path"], table["labels"]):
        labels = sorted({label.strip() for label in raw.split(";") if label.strip()})
        problem = _path_problem(path, base, check_exists=True)
        if problem is None and not labels:
            problem = "no labels"
        if problem is None:
            listed.append((path, labels))
        else:
            skipped.append((path, problem))
    checked = inspect_images([os.path.join(base, path) for path, _ in listed])
    rows: list[tuple[str, str, str, str]] = []  # path, tag, labels, sha1
    for (path, labels), (problem, digest) in zip(listed, checked, strict=True):
        if problem is None:
            rows.append((Path(path).as_posix(), labels[0], ";".join(labels), digest or ""))
        else:
            skipped.append((path, problem))
    rows.sort()
    all_labels = sorted({label for _, _, labels, _ in rows for label in labels.split(";")})
    if len(all_labels) < 2:
        raise DatasetError(f"labels table {labels_csv} has {len(all_labels)} usable label(s); at least 2 are needed")
    dataset = pd.DataFrame(rows, columns=["path", "tag", "labels", "sha1"])
    return Tag2LabelResult(
        dataset=dataset,
        tag2cls={label: i for i, label in enumerate(all_labels)},
        skipped=pd.DataFrame(sorted(skipped), columns=["path", "reason"]),
        duplicates=exact_duplicates(dataset["path"], dataset["sha1"]),
    )


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
    require_columns(dataset, ["path", "tag"], "dataset table")
    # Multilabel tables (from a labels CSV) carry `labels`; `tag` is then the first label,
    # the key the folds are stratified on.
    columns = ["path", "tag"] + (["labels"] if "labels" in dataset.columns else [])
    df = dataset[columns].sort_values("path", kind="stable").reset_index(drop=True)

    unknown = sorted(set(df["tag"]) - set(tag2cls))
    if unknown:
        raise DatasetError(
            f"tags {quote(unknown)} are not in the tag-to-class mapping; "
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
    require_columns(dataset, ["fold"], "dataset table")
    return dataset["fold"].isin(list(valid_folds))


def calibration_mask(dataset: pd.DataFrame, valid_folds: Sequence[int], seed: int, share: float) -> np.ndarray:
    """Rows of the validation fold held out from checkpoint selection: the calibration
    temperature is fitted on them, so it is not fitted on the images that chose the checkpoint.

    ``floor(share * n)`` of each class's ``n`` validation groups (column ``group`` when the
    table has one, so near-duplicates stay on one side; else each image alone), seeded.
    Classes are the ``tag`` (the first label of multilabel rows). ``share`` 0 holds out nothing.
    """
    if not 0.0 <= share < 1.0:
        raise DatasetError(f"config key `calibration.holdout` must be in [0, 1), got {share!r}")
    is_valid = valid_mask(dataset, valid_folds).to_numpy()
    held = np.zeros(len(dataset), dtype=bool)
    if share == 0 or not is_valid.any():
        return held
    valid = dataset[is_valid]
    groups = valid["group"] if "group" in valid.columns else valid["path"]
    by_group = pd.DataFrame({"group": groups.to_numpy(), "tag": valid["tag"].to_numpy()}).drop_duplicates("group")
    rng = np.random.default_rng(seed)
    chosen: set = set()
    for _, members in by_group.sort_values(["tag", "group"]).groupby("tag", sort=True):
        order = rng.permutation(len(members))
        chosen.update(members["group"].to_numpy()[order[: int(np.floor(share * len(members) + 1e-9))]])
    held[np.flatnonzero(is_valid)[groups.isin(chosen).to_numpy()]] = True
    return held


def split_names(dataset: pd.DataFrame, valid_folds: Sequence[int], seed: int, share: float) -> np.ndarray:
    """Each row's role in a run: ``train``, ``valid`` (the validation rows that select the
    checkpoint) or ``calibration`` (validation rows held out from selection)."""
    is_valid = valid_mask(dataset, valid_folds).to_numpy()
    names = np.where(is_valid, "valid", "train").astype(object)
    names[calibration_mask(dataset, valid_folds, seed, share)] = "calibration"
    return names


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
    require_columns(df, list(required), f"dataset table {csv_path}")

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
            f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        )
        raise DatasetError(
            f"dataset table {csv_path} has {len(problems)} bad row(s): "
            + "; ".join(problems[:MAX_LISTED])
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
