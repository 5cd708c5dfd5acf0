"""The held-out test set: images that never train, never choose a checkpoint, never fit a
temperature or a threshold, and only ever report. Either a share of the dataset (config
``test_fraction``) or a separate folder of class folders (``test_dataset``).

``results/data/test.csv`` (``path,tag,class,sha1,group``, paths relative to its root) is what
the test evaluation reads; ``results/data/test_skipped.csv`` lists test images left out and why
(e.g. a copy of a training image, which would make the test a memory test). Human corrections
(config key ``corrections``) of held-out images apply here too: a corrected label is the truth
the test measures against (``source`` ``human-corrected``), a ``drop`` leaves the test set;
``results/data/test_corrections_applied.csv`` lists them as ``corrections_applied.csv`` lists the
training table's (the rule that writes that one does not rerun for a test-set correction).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from labelflow.dataset import DuplicateSettings, pick_groups, tag2label
from labelflow.io import DatasetError, PathLike
from labelflow.near_duplicates import duplicate_groups

log = logging.getLogger(__name__)

TEST_COLUMNS = ["path", "tag", "class", "sha1", "group"]


@dataclass(frozen=True)
class HeldOutSettings:
    """Config keys ``test_fraction`` and ``test_dataset`` (defaults in the config schema)."""

    fraction: float
    folder: str | None

    @classmethod
    def from_config(cls, config: dict) -> HeldOutSettings:
        settings = cls(config["test_fraction"], config["test_dataset"])
        if settings.fraction and settings.folder:
            raise DatasetError(
                "config keys `test_fraction` and `test_dataset` are both set; hold out a share of "
                "`dataset` or give a separate test folder, not both"
            )
        return settings

    @property
    def configured(self) -> bool:
        return bool(self.fraction or self.folder)


def hold_out(table: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rest, the test rows): ``floor(fraction * n)`` of each class's ``n`` duplicate groups,
    seeded (:func:`labelflow.dataset.pick_groups`), so no copy of a test image stays behind."""
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"config key `test_fraction` must be in [0, 1), got {fraction!r}")
    ordered = table.sort_values("path", kind="stable").reset_index(drop=True)
    # a different stream than the calibration holdout's, which uses the seed itself
    test = pick_groups(ordered, fraction, seed + 7919)
    return ordered[~test].reset_index(drop=True), ordered[test].reset_index(drop=True)


def held_out_from_folder(
    folder: PathLike, tag2cls: dict[str, int], train: pd.DataFrame, duplicates: DuplicateSettings,
    train_root: PathLike,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(test rows, skipped rows) of a separate folder of class folders. Its classes must be
    classes of the training data (unknown ones are an error naming them); images that are
    copies (exact or near, ``duplicates.max_distance``) of a training image are left out."""
    found = tag2label(folder, duplicates)
    unknown = sorted(set(found.tag2cls) - set(tag2cls))
    if unknown:
        raise DatasetError(
            f"config key `test_dataset`: class folder(s) {unknown} of {folder} are not classes of the "
            f"training data ({sorted(tag2cls)}); rename or remove them"
        )
    test = found.dataset.copy()
    both = pd.concat([train[["path", "sha1", "phash"]].assign(side="train"), test[["path", "sha1", "phash"]].assign(side="test")])
    keys = [f"{side}:{path}" for side, path in zip(both["side"], both["path"])]
    files = [os.path.join(train_root if side == "train" else folder, path) for side, path in zip(both["side"], both["path"])]
    confirm = duplicates.confirm(files)
    groups = duplicate_groups(keys, both["sha1"].tolist(), both["phash"].tolist(), duplicates.max_distance, confirm)
    train_groups = set(groups[: len(train)])
    copies = np.isin(groups[len(train):], list(train_groups))
    skipped = pd.concat(
        [found.skipped, pd.DataFrame({"path": test["path"][copies], "reason": "copy of a training image"})],
        ignore_index=True,
    )
    test = test[~copies].reset_index(drop=True)
    test["class"] = test["tag"].map(tag2cls).astype(np.int64)
    if "group" not in test.columns:
        test["group"] = np.arange(len(test))
    return test, skipped


def write_held_out_table(*, settings: HeldOutSettings, held_out: PathLike, raw_csv: PathLike, tag2cls: dict[str, int],
                     duplicates: DuplicateSettings, train_root: PathLike, out_csv: PathLike,
                     out_skipped: PathLike, corrections: pd.DataFrame | None = None,
                     out_report: PathLike | None = None) -> pd.DataFrame:  # fmt: skip
    """results/data/test.csv from the split's held-out rows, or from ``settings.folder``
    (``train_root``: the training images' folder, for the pixel check of near copies).

    ``corrections`` (:func:`labelflow.corrections.read_corrections`) relabel or drop held-out
    rows, whose paths are relative to the dataset as the corrections' are; test.csv then has
    ``source``. A separate ``settings.folder`` takes none: its paths are relative to another
    folder, so a dataset path would name a different image. ``out_report``: the corrections
    that applied to the test set (:data:`labelflow.corrections.REPORT_COLUMNS`, actions
    ``relabelled``, ``confirmed``, ``dropped``), the header alone when none did."""
    from labelflow.corrections import REPORT_COLUMNS
    from labelflow.dataset import read_dataset_csv
    from labelflow.io import write_csv_atomic

    skipped = pd.DataFrame(columns=["path", "reason"])
    if settings.folder:
        train = read_dataset_csv(raw_csv, root=None)
        test, skipped = held_out_from_folder(settings.folder, tag2cls, train, duplicates, train_root)
    else:
        test = read_dataset_csv(held_out, root=None, required=("path", "tag"))
        test["class"] = test["tag"].map(tag2cls).astype(np.int64)
    columns = TEST_COLUMNS
    applied = pd.DataFrame(columns=REPORT_COLUMNS)
    if corrections is not None and not settings.folder:
        test, skipped, applied = _corrected(test, corrections, tag2cls, skipped)
        columns = TEST_COLUMNS + ["source"]  # provenance, as in the corrected training table
    write_csv_atomic(test[[c for c in columns if c in test.columns]], out_csv)
    write_csv_atomic(skipped, out_skipped)
    if out_report is not None:
        write_csv_atomic(applied, out_report)
    log.info("test set: %d images (%s); %d left out", len(test), Path(settings.folder) if settings.folder else f"{settings.fraction:.0%} of the dataset", len(skipped))
    return test


def _corrected(
    test: pd.DataFrame, corrections: pd.DataFrame, tag2cls: dict[str, int], skipped: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(test rows, skipped rows, report rows) after the corrections of held-out images (the
    other rows of the file are not in the table, and say nothing about it)."""
    from labelflow.corrections import DROPPED, NOT_FOUND, apply_corrections

    corrected, report = apply_corrections(test, corrections, tag2cls)
    applied = report[report["action"] != NOT_FOUND]
    if len(applied):
        log.info("corrections applied to the test set: %s; e.g. %s", applied["action"].value_counts().to_dict(),
                 applied["path"].head(5).tolist())  # fmt: skip
    dropped = applied.loc[applied["action"] == DROPPED, "path"]
    if len(dropped):
        skipped = pd.concat([skipped, pd.DataFrame({"path": dropped, "reason": "dropped by a correction"})], ignore_index=True)
    return corrected, skipped, applied.reset_index(drop=True)


def split_step(
    *, raw_csv: PathLike, tag2cls_json: PathLike, duplicates_csv: PathLike, n_folds: int, seed: int,
    test_fraction: float, out_dataset: PathLike, out_duplicate_folds: PathLike, out_held_out: PathLike,
) -> pd.DataFrame:
    """The split rule: hold out ``test_fraction`` of the duplicate groups as test rows
    (``out_held_out``), then give the rest stratified, group-aware folds (``out_dataset``) and
    report each duplicate group's fold (``out_duplicate_folds``)."""
    from labelflow.dataset import duplicate_folds, read_dataset_csv, read_duplicates, read_tag2cls, split
    from labelflow.io import write_csv_atomic

    tag2cls = read_tag2cls(tag2cls_json)
    rest, held = hold_out(read_dataset_csv(raw_csv, root=None), test_fraction, seed)
    dataset = split(rest, tag2cls, n_folds, seed)
    write_csv_atomic(dataset, out_dataset)
    write_csv_atomic(held.assign(**{"class": held["tag"].map(tag2cls)}), out_held_out)
    groups = duplicate_folds(read_duplicates(duplicates_csv), dataset)
    write_csv_atomic(groups, out_duplicate_folds)
    log.info("images per fold: %s; %d held out for the test set", dataset.groupby("fold").size().to_dict(), len(held))
    kept = groups["fold"] != ""
    log.info("%d duplicate groups kept, each inside one fold: %s", int(kept.sum()),
             groups.loc[kept, "fold"].value_counts().sort_index().to_dict())  # fmt: skip
    return dataset
