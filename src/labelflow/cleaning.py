"""Label issues in the workflow: the k-fold runs' out-of-fold predictions and fold indexes in,
the tables of likely label mistakes out, and the cleaned dataset a ``cleaned/<experiment>``
run trains on (:mod:`labelflow.runs`). The scoring rule itself is :mod:`labelflow.label_issues`.

Inputs, all written by the ordinary rules of the k-fold runs ``kfold/<experiment>/fold_<k>``
(one of them may be the main run ``<experiment>``, :meth:`labelflow.runs.RunTable.kfold_runs`):

* ``oof_predictions.csv`` + ``oof_probabilities.npy`` (rule kfold_summary): every image once,
  with the class probabilities of the fold model that never trained on it;
* per fold, ``predictions/embeddings.npy`` (rule infer) and the fold's index of its training
  images (rule pca_index: the PCA transform, the HNSW graph, the training images' given labels).

**Neighbours.** An image's neighbours are the ``k`` nearest training images of *its own fold's*
index, found with that fold model's embedding of the image. Neither the embedding nor the
neighbours ever saw the image's label (the fold model did not train on it), which is what makes
their vote evidence about that label; the neighbours' labels are the given, possibly noisy, ones.
The alternative, a label-free embedding (an ImageNet encoder, pixels), is more independent of
the classifier but needs weights we do not ship, and pixels only work for toy data; the fold
index costs nothing (the k-fold runs build it anyway) and is an approximate search with the
recall the index step reports. benchmarks/label_issues.py measures what the neighbours add.

Outputs (:func:`find_issues`): ``scores.csv`` (every image), ``issues.csv`` (the flagged ones,
worst first, with the signals that fired) and ``summary.json`` (estimated noise per class, the
most confused class pairs). :func:`cleaned_dataset` applies an action to the training table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from labelflow.corrections import HUMAN_CORRECTED
from labelflow.dataset import class_names, read_predictions, read_tag2cls
from labelflow.io import (
    DatasetError,
    PathLike,
    atomic_directory,
    load_npy,
    read_json,
    read_table,
    write_csv_atomic,
    write_json_atomic,
)
from labelflow.label_issues import NO_NEIGHBOUR, find_label_issues

log = logging.getLogger(__name__)

ACTIONS = ("report", "drop", "relabel")
SIGNALS = ("model_disagrees", "neighbours_disagree", "confident_joint", "noise_rate_pruned")
ISSUE_COLUMNS = [
    "rank", "path", "given_label", "suggested_label", "label_quality", "signals",
    "self_confidence", "neighbour_disagreement", "log_odds", "fold",
]  # fmt: skip
RELABELLED = "label-issue-relabelled"


@dataclass(frozen=True)
class LabelIssueSettings:
    """Config section ``label_issues`` (defaults in config/schemas/config.schema.yaml)."""

    experiment: str | None  # k-fold experiment whose out-of-fold predictions are scored
    neighbours: int  # k nearest training images of the fold's index; 0: probabilities only
    action: str  # report | drop | relabel
    relabel_threshold: float  # relabel a flagged image when its label quality is at most this
    max_sheet_rows: int

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise DatasetError(f"config key `label_issues.action` must be one of {ACTIONS}, got {self.action!r}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> LabelIssueSettings:
        return cls(**{name: section[name] for name in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- neighbours


def fold_neighbours(
    *, predictions_csv: PathLike, embeddings_npy: PathLike, transform_npz: PathLike, index_bin: PathLike,
    index_json: PathLike, k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(paths, neighbour classes (n, k)) of a fold's held-out images: the given classes of their
    ``k`` nearest training images in the fold's own index, nearest first (-1 pads a short row)."""
    from labelflow.index import EmbeddingTransform, load_index, query_index

    predictions = read_predictions(predictions_csv)
    embeddings = load_npy(embeddings_npy)
    if len(embeddings) != len(predictions):
        raise ValueError(f"{embeddings_npy} has {len(embeddings)} rows but {predictions_csv} {len(predictions)}; rerun infer")
    held_out = (predictions["split"] != "train").to_numpy()
    info = read_json(index_json)
    index = load_index(index_bin, dim=info["dim"], space=info["space"], ef=info["ef"])
    ids, _ = query_index(index, EmbeddingTransform.load(transform_npz).transform(embeddings[held_out]), k)
    labels = np.asarray(info["labels"], dtype=np.int64)[ids]
    padded = np.full((len(labels), k), NO_NEIGHBOUR, dtype=np.int64)
    padded[:, : labels.shape[1]] = labels
    return predictions["path"].to_numpy(dtype=str)[held_out], padded


def oof_neighbours(paths: Sequence[str], folds: Sequence[Mapping[str, PathLike]], k: int) -> np.ndarray:
    """Neighbour classes (len(paths), k) for the out-of-fold table's rows, from every fold's
    :func:`fold_neighbours`; an image no fold held out is an error."""
    found_paths, found = [], []
    for fold in folds:
        fold_paths, labels = fold_neighbours(**fold, k=k)
        found_paths.append(fold_paths)
        found.append(labels)
    rows = pd.Index(np.concatenate(found_paths)).get_indexer(list(paths))
    if (rows < 0).any():
        missing = np.asarray(paths)[rows < 0][:5].tolist()
        raise ValueError(f"images {missing} are held out by no fold; rerun the k-fold runs")
    return np.concatenate(found)[rows]


# --------------------------------------------------------------------------- scoring


def signals_fired(scores: pd.DataFrame) -> pd.Series:
    """``;``-joined names of the signals that fired for each row (see :data:`SIGNALS`)."""
    fired = np.stack([scores[name].to_numpy(dtype=bool) for name in SIGNALS], axis=1)
    names = np.array(SIGNALS, dtype=object)
    return pd.Series([";".join(names[row]) for row in fired], index=scores.index, dtype=object)


def score_oof(
    oof: pd.DataFrame, probabilities: np.ndarray, classes: Sequence[str], neighbour_labels: np.ndarray | None
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(scores, issues, summary) of out-of-fold predictions: :func:`labelflow.label_issues.find_label_issues`
    on the probabilities, the given classes (column ``class``) and the neighbours, with each
    image's ``fold`` and the ``signals`` that fired."""
    if len(probabilities) != len(oof) or probabilities.shape[1] != len(classes):
        raise ValueError(
            f"out-of-fold probabilities {probabilities.shape} do not match {len(oof)} rows x {len(classes)} classes; "
            "rerun kfold_summary"
        )
    # Labels joined by `;` are multilabel data (a class name never holds `;`: tag2label refuses it)
    if oof["label"].astype(str).str.contains(";").any():
        raise DatasetError("label issues need single-label data; this dataset has images with several labels")
    result = find_label_issues(
        probabilities, oof["class"].to_numpy(), neighbour_labels, classes=classes, paths=oof["path"].tolist()
    )
    scores = result.scores.assign(fold=oof["fold"].to_numpy(), signals=signals_fired(result.scores))
    issues = scores[scores["flagged"]].sort_values("rank", kind="stable")[ISSUE_COLUMNS].reset_index(drop=True)
    return scores, issues, result.summary


def find_issues(
    *,
    oof_csv: PathLike,
    oof_probabilities_npy: PathLike,
    tag2cls_json: PathLike,
    folds: Sequence[Mapping[str, PathLike]],
    neighbours: int,
    experiment: str,
    scores_csv: PathLike,
    issues_csv: PathLike,
    summary_json: PathLike,
) -> dict[str, Any]:
    """Score every image of the k-fold runs of ``experiment`` and write scores.csv, issues.csv
    and summary.json. ``folds``: per fold the paths ``predictions_csv``, ``embeddings_npy``,
    ``transform_npz``, ``index_bin``, ``index_json`` (unused with ``neighbours`` 0: probabilities only)."""
    oof = read_predictions(oof_csv)
    classes = class_names(read_tag2cls(tag2cls_json))
    neighbour_labels = oof_neighbours(oof["path"].tolist(), folds, neighbours) if neighbours else None
    scores, issues, summary = score_oof(oof, load_npy(oof_probabilities_npy), classes, neighbour_labels)
    summary = {
        "experiment": experiment,
        "n_folds": int(oof["fold"].nunique()),
        "neighbours_from": "each image's own fold index (training images of the fold model that never saw its label)"
        if neighbours else "none (probabilities only)",
        **summary,
    }
    write_csv_atomic(scores, scores_csv)
    write_csv_atomic(issues, issues_csv)
    write_json_atomic(summary, summary_json)
    log.info(
        "%d of %d images flagged (%.2f %%); estimated noise rate %.4f; most confused: %s",
        summary["n_flagged"], summary["n_images"], 100 * summary["flagged_share"], summary["estimated_noise_rate"],
        ", ".join(f"{p['given']}->{p['true']} ({p['estimated_images']})" for p in summary["confused_pairs"][:3]) or "none",
    )
    return summary


def write_issue_sheet(*, issues_csv: PathLike, image_root: PathLike, out_dir: PathLike, max_rows: int) -> dict[str, int]:
    """The flagged images as a static HTML contact sheet, worst first (``out_dir/index.html``)."""
    from labelflow.contact_sheet import write_contact_sheet

    issues = read_table(issues_csv, text_columns=("given_label", "suggested_label", "signals"))
    with atomic_directory(out_dir) as tmp:
        shown = write_contact_sheet(
            issues, image_root=image_root, out_dir=tmp, title="Likely label mistakes, worst first",
            columns=["rank", "given_label", "suggested_label", "label_quality", "signals"], max_rows=max_rows,
            caption="label_quality: low = likely wrong (below 0.5: another class beats the given label). "
            "Every flagged image is in issues.csv beside this folder; write corrections as path,label.",
        )
    return shown


# --------------------------------------------------------------------------- acting on issues


def cleaned_dataset(
    table: pd.DataFrame, scores: pd.DataFrame, tag2cls: Mapping[str, int], *, action: str, relabel_threshold: float
) -> pd.DataFrame:
    """The training table with the flagged images acted on; the original table is not changed.

    ``drop``: flagged images leave. ``relabel``: a flagged image whose label quality is at most
    ``relabel_threshold`` takes the suggested label (``source`` =
    ``label-issue-relabelled``); the other flagged images leave, since neither label is trusted.
    Rows a person corrected (``source`` = ``human-corrected``) are never touched. Folds stay.
    """
    if action not in ACTIONS:
        raise DatasetError(f"config key `label_issues.action` must be one of {ACTIONS}, got {action!r}")
    if action == "report":
        raise DatasetError("config key `label_issues.action` is `report`; set it to drop or relabel to train on a cleaned table")
    out = table.copy()
    if "source" not in out.columns:
        out["source"] = "given"
    flagged = scores.loc[scores["flagged"].astype(bool), ["path", "suggested_label", "label_quality"]].set_index("path")
    flagged = flagged.reindex(out["path"])
    is_flagged = flagged["label_quality"].notna().to_numpy() & (out["source"] != HUMAN_CORRECTED).to_numpy()
    relabel = np.zeros(len(out), dtype=bool)
    if action == "relabel":
        relabel = is_flagged & (flagged["label_quality"].to_numpy(dtype=float) <= relabel_threshold)
        new = flagged["suggested_label"].to_numpy(dtype=object)[relabel]
        out.loc[relabel, "tag"] = new
        out.loc[relabel, "class"] = np.array([tag2cls[t] for t in new], dtype=np.int64)
        if "labels" in out.columns:  # a labels-CSV dataset (one label per row: score_oof refuses several)
            out.loc[relabel, "labels"] = new
        out.loc[relabel, "source"] = RELABELLED
    kept = ~(is_flagged & ~relabel)
    log.info("%s: %d flagged images, %d relabelled, %d dropped", action, int(is_flagged.sum()), int(relabel.sum()), int((~kept).sum()))
    return out[kept].reset_index(drop=True)
