"""Autolabel step 3, after the last round: the labelled dataset, its evidence and a truth check.

:func:`assemble` writes ``dataset.csv``/``unlabelled.csv``/``rounds.csv``; :func:`plot_progress`,
:func:`evaluate` (with a truth table) and :func:`materialize` (a class-folder tree of symlinks
or copies) report on it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labelflow.autolabel.policy import REJECTIONS
from labelflow.autolabel.prepare import RAW
from labelflow.autolabel.round import read_accepted
from labelflow.io import (
    DatasetError,
    PathLike,
    atomic_directory,
    normalise_paths,
    read_json,
    read_table,
    write_csv_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)

DATASET_COLUMNS = ["path", "label", "source", "round", "confidence"]


def labelled_table(human: pd.DataFrame, duplicates: pd.DataFrame, pseudo: pd.DataFrame) -> pd.DataFrame:
    """dataset.csv ``path,label,source,round,confidence``: human rows and human duplicates
    (round 0, confidence 1) and the accepted pseudo-labels, sorted by path. A human row keeps
    its own ``source`` when it has one (``human-corrected``: :mod:`labelflow.corrections`)."""
    human_source = human["source"] if "source" in human.columns else "human"
    parts = [
        pd.DataFrame({"path": human["path"], "label": human["tag"], "source": human_source, "round": 0, "confidence": 1.0}),
        pd.DataFrame(
            {"path": duplicates["path"], "label": duplicates["tag"], "source": "human-duplicate", "round": 0, "confidence": 1.0}
        ),
        pd.DataFrame(
            {"path": pseudo["path"], "label": pseudo["tag"], "source": "pseudo", "round": pseudo["round"], "confidence": pseudo["confidence"]}
        ),
    ]
    parts = [p for p in parts if len(p)]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=DATASET_COLUMNS)
    table = table[DATASET_COLUMNS].sort_values("path", kind="stable").reset_index(drop=True)
    table["round"] = table["round"].astype(np.int64)
    if table["path"].duplicated().any():
        raise DatasetError(f"images labelled twice: {table['path'][table['path'].duplicated()].tolist()[:5]}; this is a bug")
    return table


def rounds_table(statuses: Sequence[dict], metrics: Sequence[dict], n_raw: int, n_human_raw: int) -> pd.DataFrame:
    """rounds.csv: one row per round with its decisions, cumulative coverage and calibration.
    ``n_human_raw``: the raw images labelled before round 0 (human duplicates, review answers)."""
    cumulative = n_human_raw
    rows = []
    for status, m in zip(statuses, metrics, strict=True):
        cumulative += status["accepted"]
        cal = m["calibration"]
        rows.append(
            {
                "round": status["round"],
                "candidates": m["candidates"],
                "accepted": status["accepted"],
                **{column: m[column] for column in REJECTIONS.values()},
                "remaining": status["remaining"],
                "labelled_raw": cumulative,
                "coverage": cumulative / n_raw if n_raw else float("nan"),
                "valid_accuracy": m["valid_accuracy"],
                "temperature": cal["temperature"],
                "ece_before": cal["ece_before"],
                "ece_after": cal["ece_after"],
                "stop": status["stop"],
                "reason": status["reason"] or "",
            }
        )
    return pd.DataFrame(rows)


def assemble(
    *,
    human_csv: PathLike,
    raw_csv: PathLike,
    accepted_csvs: Sequence[PathLike],
    status_jsons: Sequence[PathLike],
    metrics_jsons: Sequence[PathLike],
    predictions_csv: PathLike,
    dataset_csv: PathLike,
    unlabelled_csv: PathLike,
    rounds_csv: PathLike,
) -> pd.DataFrame:
    """The labelled set after the last round.

    dataset.csv (see :func:`labelled_table`); unlabelled.csv lists the raw images never
    accepted (empty label, with the last round's prediction and calibrated confidence for
    review); rounds.csv has one row per round (:func:`rounds_table`).
    """
    raw = read_table(raw_csv)
    raw["tag"] = raw["tag"].fillna("")
    pseudo = read_accepted(accepted_csvs)
    duplicates = raw[raw["tag"] != ""]
    human = read_table(human_csv)
    # review answers are human rows of raw images (labelflow.corrections): labelled raw too
    answered = int(human["path"].str.startswith(f"{RAW}/").sum())
    table = labelled_table(human, duplicates, pseudo)
    last = read_table(predictions_csv)
    left = raw[~raw["path"].isin(set(table["path"]))][["path"]]
    unlabelled = left.merge(
        last[["path", "tag", "confidence"]].rename(columns={"tag": "predicted"}), on="path", how="left"
    )
    unlabelled.insert(1, "label", "")
    statuses = [read_json(p) for p in status_jsons]
    rounds = rounds_table(statuses, [read_json(p) for p in metrics_jsons], len(raw), len(duplicates) + answered)
    write_csv_atomic(table, dataset_csv)
    write_csv_atomic(unlabelled, unlabelled_csv)
    write_csv_atomic(rounds, rounds_csv)
    if statuses:
        log.info(
            "%d rounds, stopped: %s; %d labelled images (%d pseudo), %d raw images left unlabelled",
            len(statuses), statuses[-1]["reason"], len(table), len(pseudo), len(unlabelled),
        )
    return table


def plot_progress(*, rounds_csv: PathLike, out_png: PathLike) -> None:
    """Accepted per round, cumulative coverage of the raw pile, validation accuracy per round."""
    from labelflow.plots import plot_autolabel_progress

    plot_autolabel_progress(pd.read_csv(rounds_csv, dtype={"reason": str}, keep_default_na=False), out_png)


def read_truth(truth_csv: PathLike) -> pd.DataFrame:
    """``path,label`` with paths relative to the raw folder → paths under the autolabel root."""
    try:
        truth = read_table(truth_csv)
    except FileNotFoundError:
        raise DatasetError(f"config key `autolabel.truth_csv`: file {truth_csv} does not exist") from None
    missing = [c for c in ("path", "label") if c not in truth.columns]
    if missing:
        raise DatasetError(
            f"config key `autolabel.truth_csv`: {truth_csv} lacks column(s) {missing}; "
            "give path,label with paths relative to the raw folder"
        )
    truth = truth[["path", "label"]].dropna()
    truth["path"] = [f"{RAW}/{p}" for p in normalise_paths(truth["path"].tolist())]
    if truth["path"].duplicated().any():
        raise DatasetError(f"config key `autolabel.truth_csv`: {truth_csv} lists an image twice")
    return truth


def evaluate(
    *, dataset_csv: PathLike, raw_csv: PathLike, rounds_csv: PathLike, truth_csv: PathLike, out_json: PathLike
) -> dict[str, Any]:
    """Precision and coverage of the labels given to the raw pile, after every round.

    Only raw images that the truth table knows are counted. ``precision`` is the share of
    pseudo-labels (accepted up to that round) that match the truth, ``coverage`` the share
    of raw images that have a label (pseudo-labels, human duplicates and review answers);
    ``new_precision`` is the precision of that round's pseudo-labels alone.
    """
    labelled = read_table(dataset_csv)
    raw = read_table(raw_csv)
    rounds = pd.read_csv(rounds_csv)
    truth = read_truth(truth_csv)
    known = truth[truth["path"].isin(set(raw["path"]))]
    table = known.merge(labelled[["path", "label", "source", "round"]], on="path", how="left", suffixes=("_true", ""))
    table["correct"] = table["label"] == table["label_true"]
    per_round = []
    for r in rounds["round"]:
        upto = table[table["label"].notna() & (table["round"] <= r)]
        pseudo = upto[upto["source"] == "pseudo"]
        new = pseudo[pseudo["round"] == r]
        per_round.append(
            {
                "round": int(r),
                "labelled": int(len(upto)),
                "pseudo": int(len(pseudo)),
                "precision": float(pseudo["correct"].mean()) if len(pseudo) else None,
                "precision_all": float(upto["correct"].mean()) if len(upto) else None,
                "coverage": float(len(upto) / len(known)) if len(known) else None,
                "new": int(len(new)),
                "new_precision": float(new["correct"].mean()) if len(new) else None,
            }
        )
    result = {
        "raw_images": int(len(raw)),
        "with_truth": int(len(known)),
        "truth_not_in_raw": int(len(truth) - len(known)),
        "rounds": per_round,
        "final": per_round[-1] if per_round else None,
    }
    write_json_atomic(result, out_json)
    for row in per_round:
        log.info(
            "round %d: precision %s, coverage %s (%d pseudo-labels)",
            row["round"], _pct(row["precision"]), _pct(row["coverage"]), row["pseudo"],
        )
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def materialize(*, dataset_csv: PathLike, root: PathLike, out_dir: PathLike, mode: str = "symlink") -> int:
    """Write the labelled set as ``out_dir/<label>/<path>`` (symlinks to the inputs, or copies).

    ``<path>`` keeps the image's path under the autolabel root (``clean/...`` or
    ``raw/...``), so two files with the same basename never collide. Built in a temporary
    sibling folder and renamed into place. Returns the number of files.
    """
    if mode not in ("symlink", "copy"):
        raise DatasetError(f"config key `autolabel.materialize` must be symlink or copy, got {mode!r}")
    table = read_table(dataset_csv)
    with atomic_directory(out_dir) as tmp:
        for path, label in zip(table["path"], table["label"]):
            source = os.path.realpath(Path(root) / path)
            target = tmp / label / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if mode == "symlink":
                os.symlink(source, target)
            else:
                shutil.copy2(source, target)
    log.info("materialised %d labelled images as %ss under %s", len(table), mode, out_dir)
    return len(table)
