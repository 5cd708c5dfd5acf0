"""Evaluate a trained run on any labelled images: metrics, confusion matrix, the errors to look at.

:func:`evaluate_table` is the core: a table of (path, label) and a :class:`TrainedModel` in,
an :class:`Evaluation` out (metrics and one row per image), with the same batched pass as
``labelflow predict`` (:class:`labelflow.predict.Predictor`). The workflow can call it on any
table, e.g. a held-out test split. :func:`write_evaluation` writes a folder a person can read:

    metrics.json      accuracy, loss, per-class precision/recall/F1, macro F1 over the classes
                      present in the set, ECE of the calibrated confidence, n images, rejection
    confusion.png     rows: true class, columns: the class head's answer
    predictions.csv   every image: label, predicted, confidence, rejected, ..., error
    errors.csv        the misclassified images, most confident first
    errors/index.html the same as a contact sheet (thumbnails; opens from a file browser)

Accuracy and the confusion matrix score the class head alone (its argmax); the out-of-class
rejection is reported beside it (fraction rejected, accuracy of the accepted images).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from labelflow.calibration import ECE_BINS, expected_calibration_error
from labelflow.dataset import read_image_list
from labelflow.images import is_image_name, walk_images
from labelflow.io import DatasetError, PathLike, atomic_directory, write_csv_atomic, write_json_atomic
from labelflow.losses import get_loss, probabilities
from labelflow.predict import ERROR, BatchPredictions, Predictor
from labelflow.progress import Progress
from labelflow.trained import TrainedModel

log = logging.getLogger(__name__)

ERRORS_SHOWN = 500  # rows of the contact sheet; errors.csv has them all


# --------------------------------------------------------------------------- labelled inputs


def labelled_images(source: PathLike, root: PathLike | None = None) -> pd.DataFrame:
    """A folder of class folders, or a CSV with ``path`` and ``label`` (or ``tag``) → table
    path,label. Folder: every image file below a sub-folder has that sub-folder's name as label
    (hidden entries and other extensions are left out, as embeddings' folders do; loose files
    in the folder itself are left out with a warning). CSV: relative paths start at ``root``, by
    default the CSV's folder."""
    source = Path(source)
    if source.is_dir():
        rows = []
        for entry in sorted(p for p in source.iterdir() if not p.name.startswith(".")):
            if entry.is_dir():
                found = (p for p in walk_images(str(entry), str, skipped=[]) if is_image_name(p))
                rows += [(Path(p).as_posix(), entry.name) for p in sorted(found)]
            else:
                log.warning("left out %s: not inside a class folder", entry)
        table = pd.DataFrame(rows, columns=["path", "label"])
    elif source.is_file() and source.suffix.lower() == ".csv":
        table = _labels_csv(source, Path(root) if root is not None else source.parent)
    else:
        raise DatasetError(f"{source} is neither a folder of class folders nor a .csv of path,label")
    if table.empty:
        raise DatasetError(f"{source} holds no labelled files (class sub-folders, or CSV rows of path,label)")
    return table


def _labels_csv(csv_path: Path, root: Path) -> pd.DataFrame:
    table = read_image_list(csv_path, require_labels=True)
    table["path"] = [p if Path(p).is_absolute() else (root / p).as_posix() for p in table["path"]]
    return table


def check_labels(labels: pd.Series, classes: Sequence[str]) -> np.ndarray:
    """Class indices of ``labels``; a label the model does not know is an error listing them."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DatasetError(
            f"class name(s) {unknown} are not classes of the model; its classes are {list(classes)}. "
            "Rename the folders (or labels) to the model's class names, or leave those images out"
        )
    return labels.map(index).to_numpy(dtype=np.int64)


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    predictions: pd.DataFrame  # one row per input: path, label, predicted, confidence, ..., error
    confusion: np.ndarray  # (classes, classes): rows true, columns predicted (readable images)


@dataclass
class _Scored:
    """Per readable image, gathered over the batches (small: a few numbers per image)."""

    rows: list[np.ndarray]
    predicted: list[np.ndarray]
    confidence: list[np.ndarray]
    raw_confidence: list[np.ndarray]
    nearest: list[np.ndarray]
    rejected: list[np.ndarray]
    loss_sum: float = 0.0

    def add(self, batch: BatchPredictions, activation: str, loss: float) -> None:
        self.rows.append(batch.rows)
        self.predicted.append(batch.logits.argmax(axis=1))
        self.confidence.append(batch.probabilities[np.arange(len(batch.rows)), self.predicted[-1]])
        raw = probabilities(batch.logits, activation)
        self.raw_confidence.append(raw[np.arange(len(batch.rows)), self.predicted[-1]])
        self.nearest.append(batch.nearest_distance)
        self.rejected.append(batch.rejected)
        self.loss_sum += loss * len(batch.rows)

    def arrays(self) -> dict[str, np.ndarray]:
        names = ("rows", "predicted", "confidence", "raw_confidence", "nearest", "rejected")
        return {name: np.concatenate(getattr(self, name)) if getattr(self, name) else np.empty(0) for name in names}


def evaluate_table(
    table: pd.DataFrame, trained: TrainedModel, *, batch_size: int = 64, device: torch.device | None = None
) -> Evaluation:
    """Score the class head on ``table`` (path, label; paths relative to the working folder or
    absolute). Unreadable images are rows with an ``error``, left out of the metrics."""
    if trained.multilabel:
        raise DatasetError("evaluate scores single-label sets; this model was trained on multilabel data")
    table = table.reset_index(drop=True)
    targets = check_labels(table["label"], trained.classes)
    head = trained.head
    criterion = get_loss(head.loss).build(**head.loss_params)
    activation = trained.scale.activation
    scored = _Scored([], [], [], [], [], [])
    errors: list[tuple[int, str]] = []
    paths = table["path"].tolist()
    progress = Progress(len(paths))
    for batch in Predictor(trained, device or torch.device("cpu"), batch_size).batches(paths, progress=progress):
        loss = float(criterion(torch.from_numpy(batch.logits), torch.from_numpy(targets[batch.rows]))) if len(batch.rows) else 0.0
        scored.add(batch, activation, loss)
        errors += batch.errors
    progress.close()
    found = scored.arrays()
    rows = found["rows"].astype(np.int64)
    truth = targets[rows]
    predicted = found["predicted"].astype(np.int64)
    confusion = np.zeros((len(trained.classes),) * 2, dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    metrics = evaluation_metrics(truth, predicted, found, trained.classes, loss=scored.loss_sum / max(1, len(rows)))
    metrics.update(n_unreadable=len(errors), calibration={"temperature": trained.scale.temperature, "activation": activation},
                   rejection_threshold=trained.threshold, checkpoint=trained.checkpoint.as_posix())  # fmt: skip
    return Evaluation(metrics, _image_rows(table, found, errors, trained.classes), confusion)


def evaluation_metrics(
    truth: np.ndarray, predicted: np.ndarray, found: dict[str, np.ndarray], classes: Sequence[str], loss: float
) -> dict[str, Any]:
    """Metrics of the readable images (see the module docstring); ``found`` holds the
    per-image confidence, raw_confidence, rejected arrays of :class:`_Scored`."""
    from sklearn.metrics import precision_recall_fscore_support

    correct = truth == predicted
    accepted = ~found["rejected"].astype(bool)
    present = sorted(set(truth.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=present, zero_division=0)
    return {
        "n_images": int(len(truth)),
        "accuracy": float(correct.mean()) if len(truth) else float("nan"),
        "loss": float(loss) if len(truth) else float("nan"),
        "macro_f1": float(np.mean(f1)) if present else float("nan"),
        "classes_present": [classes[c] for c in present],
        "per_class": {
            classes[c]: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(present, precision, recall, f1, support)
        },
        "ece": expected_calibration_error(found["confidence"], correct),
        "ece_uncalibrated": expected_calibration_error(found["raw_confidence"], correct),
        "ece_bins": ECE_BINS,
        "mean_confidence": float(found["confidence"].mean()) if len(truth) else float("nan"),
        "rejected_fraction": float((~accepted).mean()) if len(truth) else float("nan"),
        "accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else float("nan"),
    }


def _image_rows(table: pd.DataFrame, found: dict[str, np.ndarray], errors: list[tuple[int, str]], classes: Sequence[str]) -> pd.DataFrame:
    names = np.asarray(classes, dtype=object)
    rows = found["rows"].astype(np.int64)
    out = table[["path", "label"]].copy()
    out["predicted"], out["confidence"], out["correct"], out["rejected"], out["nearest_distance"] = "", np.nan, None, None, np.nan
    out.loc[rows, "predicted"] = names[found["predicted"].astype(np.int64)]
    out.loc[rows, "confidence"] = found["confidence"]
    out.loc[rows, "correct"] = out.loc[rows, "label"].to_numpy() == out.loc[rows, "predicted"].to_numpy()
    out.loc[rows, "rejected"] = found["rejected"].astype(bool)
    out.loc[rows, "nearest_distance"] = found["nearest"]
    out[ERROR] = ""
    out.loc[[r for r, _ in errors], ERROR] = [e for _, e in errors]
    return out


# --------------------------------------------------------------------------- outputs


def misclassified(predictions: pd.DataFrame) -> pd.DataFrame:
    """The readable images the class head got wrong, most confident first."""
    wrong = predictions[(predictions[ERROR] == "") & (predictions["correct"] == False)]  # noqa: E712 - object column
    return wrong.sort_values("confidence", ascending=False, kind="stable").drop(columns=[ERROR, "correct"]).reset_index(drop=True)


def write_evaluation(evaluation: Evaluation, classes: Sequence[str], out_dir: PathLike, title: str) -> dict[str, Any]:
    """metrics.json, confusion.png, predictions.csv, errors.csv and errors/index.html in ``out_dir``."""
    from labelflow.contact_sheet import write_contact_sheet
    from labelflow.plots import plot_confusion

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = misclassified(evaluation.predictions)
    write_csv_atomic(evaluation.predictions, out_dir / "predictions.csv")
    write_csv_atomic(errors, out_dir / "errors.csv")
    plot_confusion(evaluation.confusion, list(classes), out_dir / "confusion.png", title)
    caption = f"{len(errors)} misclassified of {evaluation.metrics['n_images']} images, most confident first; all in errors.csv"
    with atomic_directory(out_dir / "errors") as tmp:
        sheet = write_contact_sheet(
            errors, image_root=None, out_dir=tmp, title=f"{title}: misclassified images", caption=caption,
            columns=["label", "predicted", "confidence", "rejected", "nearest_distance"], max_rows=ERRORS_SHOWN,
        )
    metrics = {**evaluation.metrics, "n_misclassified": int(len(errors)), "contact_sheet_rows": sheet["rows"]}
    write_json_atomic(metrics, out_dir / "metrics.json")
    return metrics


def evaluate_images(
    source: PathLike, trained: TrainedModel, out_dir: PathLike, *, batch_size: int = 64,
    device: torch.device | None = None, root: PathLike | None = None,
) -> dict[str, Any]:
    """:func:`labelled_images` of ``source``, :func:`evaluate_table`, :func:`write_evaluation`.
    With ``root``, a CSV's relative paths start there instead of at the CSV's folder (the
    workflow's test.csv names images relative to the dataset folder)."""
    table = labelled_images(source, root)
    evaluation = evaluate_table(table, trained, batch_size=batch_size, device=device)
    metrics = write_evaluation(evaluation, trained.classes, out_dir, f"{Path(source).name} ({len(table)} images)")
    log.info(
        "evaluated %d images of %s: accuracy %.4f, macro F1 %.4f, ECE %.4f, %d misclassified, %d unreadable → %s",
        metrics["n_images"], source, metrics["accuracy"], metrics["macro_f1"], metrics["ece"],
        metrics["n_misclassified"], metrics["n_unreadable"], out_dir,
    )
    return metrics
