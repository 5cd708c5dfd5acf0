"""Similarity search with out-of-class rejection, and the out-of-class (OOD) evaluation.

Built on the saved hnswlib index and PCA transform (``index.pca_index``) and on the
embeddings of :mod:`labelflow.embeddings`:

* :func:`calibrate_rejection`: the nearest-neighbour distance above which a query is ``unknown``,
  calibrated on the valid fold and stored beside the index as ``rejection.json``.
* :class:`SimilaritySearch`: loads that JSON (and the index, transform and train paths it names)
  and answers queries: top-k neighbours, kNN vote, or ``unknown``.
* :func:`query_set`, :func:`query_images`: answers for an embedded set, or for image files.
* :func:`holdout_classes` and :func:`evaluate_ood`: train without some classes, then measure how
  well the distance tells their images from known ones.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
import pandas as pd

from labelflow import index as knn
from labelflow.dataset import read_dataset_csv, read_predictions, read_tag2cls
from labelflow.embeddings import classes_of, embed_paths, image_arguments, model_section, read_model
from labelflow.io import DatasetError, PathLike, load_npy, read_json, write_csv_atomic, write_json_atomic

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
# A query is rejected when its nearest distance exceeds the threshold by more than this: a train
# image queried again lands at distance ~1e-7 from itself (float rounding), never "far".
DISTANCE_TOLERANCE = 1e-6


# --------------------------------------------------------------------------- search + rejection


@dataclass
class SearchResult:
    """Answers for n queries; neighbours nearest first."""

    ids: np.ndarray  # (n, k) row numbers of train images
    distances: np.ndarray  # (n, k)
    neighbour_labels: np.ndarray  # (n, k) class indices
    vote: np.ndarray  # (n,) kNN vote (class index), before rejection
    rejected: np.ndarray  # (n,) bool: nearest distance above the threshold

    @property
    def nearest(self) -> np.ndarray:
        return self.distances[:, 0]


@dataclass
class SimilaritySearch:
    """The saved index with what it takes to answer queries (see :meth:`load`)."""

    transform: knn.EmbeddingTransform
    index: hnswlib.Index
    labels: np.ndarray  # class index of each indexed (train) image
    paths: np.ndarray  # path of each indexed image, relative to the dataset folder
    classes: list[str]
    space: str
    vote_k: int = 5
    k: int = 10
    threshold: float = math.inf
    quantile: float | None = None

    @classmethod
    def from_files(
        cls,
        *,
        transform_npz: PathLike,
        index_bin: PathLike,
        index_json: PathLike,
        predictions_csv: PathLike,
        classes: Sequence[str],
        vote_k: int = 5,
        k: int = 10,
        threshold: float = math.inf,
        quantile: float | None = None,
    ) -> SimilaritySearch:
        info = read_json(index_json)
        predictions = read_predictions(predictions_csv)
        paths = predictions["path"][predictions["split"] == "train"].to_numpy()
        labels = np.asarray(info["labels"], dtype=np.int64)
        if len(paths) != len(labels) or len(labels) != info["n_items"]:
            raise ValueError(f"{index_json} indexes {info['n_items']} images but {predictions_csv} has {len(paths)} train rows")
        return cls(
            transform=knn.EmbeddingTransform.load(transform_npz),
            index=knn.load_index(index_bin, dim=info["dim"], space=info["space"], ef=info["ef"]),
            labels=labels,
            paths=paths,
            classes=list(classes),
            space=info["space"],
            vote_k=vote_k,
            k=k,
            threshold=threshold,
            quantile=quantile,
        )

    @classmethod
    def load(cls, rejection_json: PathLike) -> SimilaritySearch:
        """From ``rejection.json`` (rule rejection); its files are named relative to it."""
        path = Path(rejection_json)
        if not path.is_file():
            raise DatasetError(f"{path} does not exist; build it first with `snakemake {path}`")
        card = read_json(path)
        files = {name: path.parent / rel for name, rel in card["files"].items()}
        return cls.from_files(
            transform_npz=files["transform"],
            index_bin=files["index"],
            index_json=files["info"],
            predictions_csv=files["predictions"],
            classes=card["classes"],
            vote_k=card["vote_k"],
            k=card["k"],
            threshold=card["threshold"],
            quantile=card["quantile"],
        )

    def search(self, embeddings: np.ndarray, k: int | None = None) -> SearchResult:
        """Top-max(k, vote_k) neighbours of raw model embeddings, their vote and the rejection."""
        k = max(k or self.k, self.vote_k)
        ids, distances = knn.query_index(self.index, self.transform.transform(embeddings), k)
        neighbour_labels = self.labels[ids]
        if len(ids):
            vote = knn.knn_vote(neighbour_labels, self.vote_k, distances)
        else:
            vote = np.empty(0, dtype=np.int64)
        rejected = distances[:, 0] > self.threshold + DISTANCE_TOLERANCE
        return SearchResult(ids, distances, neighbour_labels, vote, rejected)

    def predicted_names(self, result: SearchResult) -> list[str]:
        return [UNKNOWN if r else self.classes[v] for v, r in zip(result.vote, result.rejected)]

    def as_records(self, result: SearchResult, query_paths: Sequence[str], k: int | None = None) -> list[dict[str, Any]]:
        """JSON-ready answers: one dict per query with its k neighbours."""
        k = k or self.k
        records = []
        for i, (path, predicted) in enumerate(zip(query_paths, self.predicted_names(result))):
            records.append(
                {
                    "path": str(path),
                    "predicted": predicted,
                    "vote": self.classes[result.vote[i]],
                    "rejected": bool(result.rejected[i]),
                    "nearest_distance": float(result.nearest[i]),
                    "threshold": float(self.threshold),
                    "neighbours": [
                        {"path": str(self.paths[j]), "label": self.classes[lab], "distance": float(d)}
                        for j, lab, d in zip(result.ids[i, :k], result.neighbour_labels[i, :k], result.distances[i, :k])
                    ],
                }
            )
        return records

    def as_table(self, result: SearchResult, table: pd.DataFrame, k: int | None = None) -> pd.DataFrame:
        """One row per query: its path and label (from ``table``), the answer and ';'-joined neighbours."""
        k = k or self.k
        out = table[["path", "label"]].copy() if "label" in table else table[["path"]].copy()
        out["predicted"] = self.predicted_names(result)
        out["vote"] = [self.classes[v] for v in result.vote]
        out["rejected"] = result.rejected
        out["nearest_distance"] = result.nearest
        out["neighbours"] = [";".join(self.paths[row[:k]]) for row in result.ids]
        out["neighbour_labels"] = [";".join(self.classes[c] for c in row[:k]) for row in result.neighbour_labels]
        out["neighbour_distances"] = [";".join(f"{d:.6f}" for d in row[:k]) for row in result.distances]
        return out


@dataclass(frozen=True)
class RejectionSettings:
    """How queries are answered and rejected: config ``query.k``, ``query.rejection_quantile``
    and ``index.vote_k`` (defaults in config/schemas/config.schema.yaml)."""

    quantile: float
    k: int
    vote_k: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RejectionSettings:
        return cls(config["query"]["rejection_quantile"], config["query"]["k"], config["index"]["vote_k"])


def calibrate_rejection(
    *,
    index_files: dict[str, PathLike],
    embeddings_npy: PathLike,
    tag2cls_json: PathLike,
    checkpoint: PathLike,
    data_cfg: dict[str, Any],
    out_json: PathLike,
    settings: RejectionSettings,
) -> dict[str, Any]:
    """The rejection threshold: the ``quantile`` of the nearest-neighbour distance of the valid
    images whose kNN vote is correct (an observed distance, so at least that fraction of them is
    accepted). ``index_files`` names transform, index, info and predictions. Written with the
    names of those files and of the model that embedded them (relative to ``out_json``), so that
    :meth:`SimilaritySearch.load` and the CLI need nothing else."""
    classes = classes_of(tag2cls_json)
    search = SimilaritySearch.from_files(
        transform_npz=index_files["transform"], index_bin=index_files["index"], index_json=index_files["info"],
        predictions_csv=index_files["predictions"], classes=classes, vote_k=settings.vote_k, k=settings.k,
    )
    predictions = read_predictions(index_files["predictions"])
    is_valid = (predictions["split"] != "train").to_numpy()
    labels = predictions["class"].to_numpy()[is_valid]
    result = search.search(load_npy(embeddings_npy)[is_valid])
    correct = result.vote == labels
    pool = result.nearest[correct]
    if not len(pool):
        log.warning("no valid image is voted correctly; the threshold uses all %d valid images", len(labels))
        pool = result.nearest
    threshold = float(np.quantile(pool.astype(np.float64), settings.quantile, method="higher"))
    here = Path(out_json).parent
    card = {
        "threshold": threshold,
        "quantile": settings.quantile,
        "distance": f"{search.space} distance to the nearest indexed (train) image, in the index space",
        "space": search.space,
        "k": settings.k,
        "vote_k": settings.vote_k,
        "classes": classes,
        "model": model_section(checkpoint, data_cfg, here),
        "files": {name: Path(os.path.relpath(index_files[name], here)).as_posix() for name in ("transform", "index", "info", "predictions")},
        "calibration": _rejection_calibration(result, correct, threshold),
    }
    write_json_atomic(card, out_json)
    log.info(
        "rejection threshold %.5f (%s distance, quantile %.3f of %d correct valid queries); %.1f%% of valid rejected",
        threshold, search.space, settings.quantile, int(correct.sum()), 100 * card["calibration"]["valid_rejected"],
    )
    return card


def _rejection_calibration(result: SearchResult, correct: np.ndarray, threshold: float) -> dict[str, Any]:
    """What the threshold does on the valid images that set it (an in-sample figure)."""
    n = len(correct)
    rejected = result.nearest > threshold + DISTANCE_TOLERANCE
    return {
        "n_valid": int(n),
        "n_correct": int(correct.sum()),
        "knn_accuracy": float(correct.mean()) if n else float("nan"),
        "valid_rejected": float(rejected.mean()) if n else float("nan"),
        "correct_rejected": float(rejected[correct].mean()) if correct.any() else float("nan"),
        "nearest_distance_quantiles": {
            str(q): float(np.quantile(result.nearest, q)) for q in (0.5, 0.9, 0.99)
        } if n else {},
    }


def query_set(
    *,
    rejection_json: PathLike,
    embeddings_npy: PathLike,
    index_csv: PathLike,
    out_csv: PathLike,
    k: int | None = None,
) -> pd.DataFrame:
    """Answer every image of an embedded set (rule embed) → CSV: path, label, predicted (class or
    ``unknown``), vote, rejected, nearest_distance and the k neighbours (';'-joined)."""
    search = SimilaritySearch.load(rejection_json)
    table = pd.read_csv(index_csv, dtype=str, keep_default_na=False)
    result = search.search(load_npy(embeddings_npy), k)
    answers = search.as_table(result, table, k)
    write_csv_atomic(answers, out_csv)
    known = (table["label"] != "").to_numpy() if "label" in table else np.zeros(len(table), dtype=bool)
    log.info("%d queries, %d rejected as %s", len(table), int(result.rejected.sum()), UNKNOWN)
    if known.any():
        hits = (answers["predicted"] == table["label"]).to_numpy()[known]
        log.info("images with a known label: %d, predicted correctly (unknown counts as wrong): %.4f", known.sum(), hits.mean())
    return answers


def query_images(
    *,
    experiment_dir: PathLike,
    images: Sequence[PathLike],
    k: int | None = None,
    batch_size: int = 64,
    want_gpu: bool = False,
) -> list[dict[str, Any]]:
    """Embed image files (or folders of them) with the experiment's model and answer each from its
    index, as described by ``<experiment_dir>/index/rejection.json``."""
    from labelflow.device import select_device
    from labelflow.models import load_model

    preprocessing, checkpoint, classes = read_model(experiment_dir)
    search = SimilaritySearch.load(Path(experiment_dir) / "index" / "rejection.json")
    table = image_arguments(images, classes)
    model = load_model(checkpoint)
    embeddings = embed_paths(model, ".", table["path"], preprocessing, select_device(want_gpu), batch_size)
    return search.as_records(search.search(embeddings, k), table["path"], k)


# --------------------------------------------------------------------------- out-of-class evaluation


def _row_labels(dataset: pd.DataFrame) -> list[list[str]]:
    if "labels" in dataset.columns:
        return [str(v).split(";") for v in dataset["labels"]]
    return [[t] for t in dataset["tag"]]


def holdout_classes(
    *,
    dataset_csv: PathLike,
    tag2cls_json: PathLike,
    held_out: Sequence[str],
    out_dataset_csv: PathLike,
    out_tag2cls_json: PathLike,
    out_heldout_csv: PathLike,
) -> dict[str, Any]:
    """The dataset without the held-out classes (same folds) and the held-out images.

    The known classes are renumbered 0..n-1 (``tag2cls`` without the held-out tags): the model
    trained on it has no output for classes it never saw, as if they had never been collected.
    An image carrying any held-out label (multilabel data) is held out.
    """
    dataset = read_dataset_csv(dataset_csv, root=None, required=("path", "tag", "class", "fold"))
    tag2cls = read_tag2cls(tag2cls_json)
    held_out = [str(c) for c in held_out]
    unknown = [c for c in held_out if c not in tag2cls]
    if unknown or not held_out:
        raise DatasetError(
            f"config key `ood.classes`: {unknown or 'empty list'} "
            f"{'are not classes of the dataset' if unknown else 'holds no class'}; classes: {sorted(tag2cls)}"
        )
    known_classes = [t for t in sorted(tag2cls, key=tag2cls.get) if t not in set(held_out)]
    if len(known_classes) < 2:
        raise DatasetError(f"config key `ood.classes` holds out {held_out}, leaving fewer than 2 known classes")
    is_held = np.array([bool(set(labels) & set(held_out)) for labels in _row_labels(dataset)], dtype=bool)
    known = dataset[~is_held].reset_index(drop=True)
    reduced = {tag: i for i, tag in enumerate(known_classes)}
    known["class"] = known["tag"].map(reduced).astype(np.int64)
    labels = _row_labels(dataset[is_held])
    heldout = pd.DataFrame(
        {"path": dataset["path"][is_held].tolist(), "label": [";".join(sorted(set(l) & set(held_out))) for l in labels]}
    )
    write_csv_atomic(known, out_dataset_csv)
    write_json_atomic(reduced, out_tag2cls_json)
    write_csv_atomic(heldout, out_heldout_csv)
    log.info("held out %s: %d images; %d images of %d known classes remain", held_out, len(heldout), len(known), len(reduced))
    return {"held_out": held_out, "n_held_out": int(len(heldout)), "n_known": int(len(known))}


def evaluate_ood(
    *,
    rejection_json: PathLike,
    predictions_csv: PathLike,
    embeddings_npy: PathLike,
    heldout_embeddings_npy: PathLike,
    heldout_index_csv: PathLike,
    out_json: PathLike,
    experiment: str = "",
) -> dict[str, Any]:
    """Known = valid fold of the known classes; unknown = every image of the held-out classes.

    AUROC of known vs unknown scored by the nearest-neighbour distance, and at the calibrated
    threshold the fraction of unknowns rejected and of knowns wrongly rejected. The threshold
    comes from the same known valid fold (its correctly voted images), so ``known_rejected`` is
    an in-sample figure; ``unknown_rejected`` is not.
    """
    search = SimilaritySearch.load(rejection_json)
    predictions = read_predictions(predictions_csv)
    is_valid = (predictions["split"] != "train").to_numpy()
    known_labels = predictions["class"].to_numpy()[is_valid]
    known = search.search(load_npy(embeddings_npy)[is_valid])
    heldout = pd.read_csv(heldout_index_csv, dtype=str, keep_default_na=False)
    unknown = search.search(load_npy(heldout_embeddings_npy))
    if not len(known_labels) or not len(heldout):
        raise DatasetError(f"OOD evaluation needs known valid images ({len(known_labels)}) and held-out images ({len(heldout)})")
    result = {"experiment": experiment, **ood_metrics(search, known, known_labels, unknown, heldout["label"])}
    write_json_atomic(result, out_json)
    log.info(
        "OOD (%s held out): AUROC %.4f; at threshold %.5f: %.1f%% of unknowns rejected, %.1f%% of knowns wrongly rejected",
        ", ".join(result["held_out"]), result["auroc"], result["threshold"],
        100 * result["unknown_rejected"], 100 * result["known_rejected"],
    )
    return result


def ood_metrics(
    search: SimilaritySearch, known: SearchResult, known_labels: np.ndarray, unknown: SearchResult, unknown_labels: pd.Series
) -> dict[str, Any]:
    """How well the nearest distance tells unknown images from known ones (see evaluate_ood)."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([known.nearest, unknown.nearest]).astype(np.float64)
    is_unknown = np.r_[np.zeros(len(known_labels)), np.ones(len(unknown_labels))]
    correct = known.vote == known_labels
    accepted = ~known.rejected
    return {
        "held_out": sorted(set(";".join(unknown_labels).split(";"))),
        "known_classes": search.classes,
        "n_known": int(len(known_labels)),
        "n_unknown": int(len(unknown_labels)),
        "score": f"nearest-neighbour {search.space} distance (higher = more likely unknown)",
        "auroc": float(roc_auc_score(is_unknown, scores)),
        "threshold": float(search.threshold),
        "quantile": search.quantile,
        "unknown_rejected": float(unknown.rejected.mean()),
        "known_rejected": float(known.rejected.mean()),
        "known_knn_accuracy": float(correct.mean()),
        "known_accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else float("nan"),
        "unknown_rejected_per_class": {
            label: float(unknown.rejected[(unknown_labels == label).to_numpy()].mean())
            for label in sorted(unknown_labels.unique())
        },
        "nearest_distance_median": {
            "known": float(np.median(known.nearest)),
            "unknown": float(np.median(unknown.nearest)),
        },
        "note": "the threshold is calibrated on the same known valid fold, so known_rejected is in-sample",
    }
