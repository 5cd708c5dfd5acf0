"""Summaries and comparison tables of finished runs: summary.json per run, experiments.csv,
the k-fold and grid tables. Figures are drawn by :mod:`labelflow.plots`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from labelflow.dataset import (
    class_names,
    class_targets,
    is_multilabel,
    read_dataset_csv,
    read_head_predictions,
    read_predictions,
    read_tag2cls,
)
from labelflow.heads import get_head
from labelflow.io import (
    PathLike,
    atomic_output,
    load_npy,
    read_json,
    save_npy_atomic,
    write_csv_atomic,
    write_json_atomic,
)
from labelflow.plots import plot_confusion, plot_experiments, plot_fold_curves, plot_grid

log = logging.getLogger(__name__)

EXPERIMENT_PLOT_METRICS = ("valid_accuracy", "recall@1", "recall@5", "auc")
CALIBRATION_KEYS = ("temperature", "n", "ece_before", "ece_after", "ece_after_method", "fitted_on")


def valid_class_metrics(
    logits: np.ndarray, targets: np.ndarray, head: dict[str, Any], classes: Sequence[str], multilabel: bool
) -> tuple[dict[str, Any], np.ndarray]:
    """Class-head metrics of un-augmented valid images: loss, accuracy (AUC for sigmoid heads,
    F1/mAP for multilabel data), per-class F1; and the predicted labels."""
    import torch

    from labelflow.losses import get_loss, probabilities
    from labelflow.metrics import head_metrics, per_class_f1, predict_labels

    loss_spec = get_loss(head["loss"])
    criterion = loss_spec.build(**head.get("loss_params", {}))
    with torch.no_grad():
        loss = float(criterion(torch.from_numpy(logits), torch.from_numpy(targets)))
    valid = {"loss": loss, **head_metrics(logits, targets, loss_spec.activation, head["decision_threshold"])}
    predicted = predict_labels(probabilities(logits, loss_spec.activation), multilabel, head["decision_threshold"])
    valid["per_class_f1"] = dict(zip(classes, per_class_f1(targets, predicted, len(classes))))
    valid["n_images"] = int(len(targets))
    return valid, predicted


def summarize(
    *,
    run: str,
    inputs: Mapping[str, PathLike],
    stage_metrics: Mapping[str, PathLike],
    out_json: PathLike,
    confusion_dir: PathLike,
    tensorboard_dir: PathLike | None = None,
) -> dict[str, Any]:
    """summary.json of the final model on the valid fold + a confusion-matrix PNG per head.

    ``inputs``: dataset, tag2cls, predictions, logits, heads (heads.csv), checkpoint, index
    (recall.json), calibration (calibration.json). valid: class-head metrics of the validation
    fold on un-augmented images; heads: accuracy of the rotation heads; index: recall@k;
    calibration: the temperature and ECE; stages: best epoch of each stage.
    """
    from labelflow.models import load_checkpoint

    dataset = read_dataset_csv(inputs["dataset"], root=None)
    tag2cls = read_tag2cls(inputs["tag2cls"])
    classes = class_names(tag2cls)
    predictions = read_predictions(inputs["predictions"])
    if list(predictions["path"]) != list(dataset["path"]):
        raise ValueError(f"{inputs['predictions']} and {inputs['dataset']} list different images; rerun infer")
    is_valid = (predictions["split"] != "train").to_numpy()
    targets = class_targets(dataset, tag2cls)[is_valid]
    head = load_checkpoint(inputs["checkpoint"])["spec"]["heads"][0]
    multilabel = is_multilabel(dataset)
    valid, predicted = valid_class_metrics(load_npy(inputs["logits"])[is_valid], targets, head, classes, multilabel)
    index = read_json(inputs["index"])
    summary: dict[str, Any] = {
        "experiment": run,
        "multilabel": multilabel,
        "valid": valid,
        "heads": {},
        "index": {k: index[k] for k in index if k.startswith("recall@")}
        | {"knn_accuracy": index["knn_accuracy"], "explained_variance": index["explained_variance"]},
        "calibration": {k: v for k, v in read_json(inputs["calibration"]).items() if k in CALIBRATION_KEYS},
        "stages": {},
    }
    confusion_dir = Path(confusion_dir)
    confusion_dir.mkdir(parents=True, exist_ok=True)  # a directory() output, even when empty
    figures = {}
    if not multilabel:
        figures["class"] = _confusion(targets, predicted, classes, confusion_dir / "class.png", f"{run}: class (valid)")
    summary["heads"] = rotated_head_accuracy(read_head_predictions(inputs["heads"]), classes, confusion_dir, run, figures)
    for stage, path in stage_metrics.items():
        metrics = read_json(path)
        summary["stages"][stage] = {
            "epochs": len(metrics["epochs"]),
            "best_epoch": metrics["best"]["epoch"],
            "best_valid_accuracy": metrics["best"]["value"],
        }
    if tensorboard_dir is not None:
        _figures_to_tensorboard(figures, tensorboard_dir)
    write_json_atomic(summary, out_json)
    return summary


def rotated_head_accuracy(
    heads: pd.DataFrame, classes: Sequence[str], confusion_dir: Path, run: str, figures: dict[str, Path]
) -> dict[str, dict[str, float]]:
    """Accuracy of each rotation head on its rotated valid images (the checkpoint-selection rows,
    as in training: fewer than the class head's ``valid`` block, which has the calibration rows
    too; ``n_images`` says how many); a confusion matrix PNG for the heads the registry gives
    labels for (added to ``figures``)."""
    result = {}
    for name, rows in heads.groupby("head"):
        result[name] = {"accuracy": float((rows["true"] == rows["predicted"]).mean()), "n_images": int(len(rows))}
        labels = get_head(name).confusion_labels(classes)
        if labels is not None:
            figures[name] = _confusion(
                rows["true"].to_numpy(), rows["predicted"].to_numpy(), labels, confusion_dir / f"{name}.png",
                f"{run}: {name} (valid)",
            )
    return result


def _confusion(y_true, y_pred, labels: Sequence[str], path: Path, title: str) -> Path:
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    return plot_confusion(matrix, labels, path, title)


def _figures_to_tensorboard(figures: Mapping[str, Path], tensorboard_dir: PathLike) -> None:
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tensorboard_dir)) as writer:
        for name, figure_path in figures.items():
            writer.add_image(f"confusion/{name}", plt.imread(figure_path)[..., :3], dataformats="HWC")


def training_seconds(stage_metrics_paths: Sequence[PathLike]) -> float:
    """Wall time spent in training epochs, summed over stages (from metrics.json)."""
    return float(sum(e["seconds"] for p in stage_metrics_paths for e in read_json(p)["epochs"]))


def compare_experiments(
    summaries: Mapping[str, PathLike],
    stage_metrics: Mapping[str, Sequence[PathLike]],
    out_csv: PathLike,
    out_png: PathLike,
    tests: Mapping[str, PathLike] | None = None,
) -> pd.DataFrame:
    """experiments.csv (one row per experiment) and a bar chart of the main metrics. With a test
    set (``tests``: test.json per experiment), the test columns come first: they are the figures
    to report; the valid ones come from the images that chose the checkpoint."""
    rows = []
    for name, path in summaries.items():
        s = read_json(path)
        valid = s["valid"]
        rows.append(
            {
                "experiment": name,
                **(_test_columns(read_json(tests[name])) if tests else {}),
                "valid_accuracy": valid["accuracy"],
                "valid_loss": valid["loss"],
                **{k: v for k, v in s["index"].items() if k.startswith("recall@")},
                "auc": valid.get("auc", float("nan")),
                "f1_macro": valid.get("f1_macro", float("nan")),
                **{f"{head}_accuracy": v["accuracy"] for head, v in s["heads"].items()},
                "epochs": sum(stage["epochs"] for stage in s["stages"].values()),
                "train_minutes": training_seconds(stage_metrics[name]) / 60,
            }
        )
    table = pd.DataFrame(rows)
    write_csv_atomic(table, out_csv)
    plot_experiments(table, ("test_accuracy",) + EXPERIMENT_PLOT_METRICS if tests else EXPERIMENT_PLOT_METRICS, out_png)
    return table


def _test_columns(test: dict[str, Any]) -> dict[str, Any]:
    return {
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_loss": test["loss"],
        "test_ece": test["ece"],
        "test_images": test["n_images"],
    }


def format_experiments(csv_path: PathLike) -> str:
    """The comparison table as text, for the end of the main command."""
    if not Path(csv_path).exists():
        return ""
    table = pd.read_csv(csv_path).dropna(axis=1, how="all")
    what = "test set; valid_* on the fold that chose the checkpoint" if "test_accuracy" in table else "valid fold"
    return f"Results ({what})\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def heldout_accuracy(predictions_csv: PathLike) -> tuple[float | None, int]:
    """(accuracy, images) of the final model on the validation rows held out from checkpoint
    selection (``split == "calibration"``): a score that did not choose the checkpoint. None
    without such rows (calibration.holdout 0)."""
    predictions = read_predictions(predictions_csv)
    held = predictions[predictions["split"] == "calibration"]
    if held.empty:
        return None, 0
    return float((held["label"] == held["predicted"]).mean()), int(len(held))


def _final_stage_metrics(path: PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    metrics = read_json(path)
    best = next(e for e in metrics["epochs"] if e["epoch"] == metrics["best"]["epoch"])
    return best, metrics["epochs"]


def kfold_summary(
    *,
    experiment: str,
    folds: Mapping[int, Mapping[str, PathLike]],
    out_csv: PathLike,
    out_json: PathLike,
    out_png: PathLike,
    out_oof: PathLike,
    out_oof_probabilities: PathLike | None = None,
) -> dict[str, Any]:
    """One row per fold (accuracy on the fold's held-out validation rows, which did not choose
    the checkpoint; metrics of the whole validation fold; index recall), mean ± std, per-fold
    learning curves with their mean, and the out-of-fold predictions.

    `folds[k]` holds the paths of fold k's run: "metrics" (final stage metrics.json),
    "summary" (summary.json), "predictions" (predictions.csv) and, with
    ``out_oof_probabilities``, "probabilities" (probabilities.npy of rule infer, rows in
    predictions.csv order). The out-of-fold table has every image once, predicted by the fold
    model that never trained on it (rows whose split is not ``train``), sorted by path;
    ``out_oof_probabilities`` gets the full class-probability vector of each of its rows, row i
    of the array for row i of the table (a separate .npy rather than one CSV column per class:
    it stays exact, small and fast for many classes).
    """
    rows, curves, oof, oof_probabilities = [], {}, [], []
    for fold, paths in sorted(folds.items()):
        best, epochs = _final_stage_metrics(paths["metrics"])
        summary = read_json(paths["summary"])
        rows.append(
            {
                "fold": fold,
                "heldout_accuracy": heldout_accuracy(paths["predictions"])[0],
                "valid_accuracy": summary["valid"]["accuracy"],
                "valid_loss": summary["valid"]["loss"],
                **{k: v for k, v in summary["index"].items() if k.startswith("recall@")},
                "best_epoch": best["epoch"],
                "train_minutes": sum(e["seconds"] for e in epochs) / 60,
            }
        )
        curves[fold] = [e["valid"]["accuracy"] for e in epochs]
        predictions = read_predictions(paths["predictions"])
        held_out = (predictions["split"] != "train").to_numpy()
        oof.append(predictions[held_out].assign(fold=fold))
        if out_oof_probabilities is not None:
            oof_probabilities.append(_held_out_probabilities(paths["probabilities"], held_out))
    table = pd.DataFrame(rows)
    write_csv_atomic(table, out_csv)
    metrics = [c for c in table.columns if c not in ("fold", "best_epoch")]
    summary = {
        "experiment": experiment,
        "n_folds": len(rows),
        # sample std (ddof=1): the spread one would expect from another fold
        **{m: {"mean": float(table[m].mean()), "std": float(table[m].std(ddof=1)) if len(table) > 1 else 0.0} for m in metrics},
    }
    write_json_atomic(summary, out_json)
    oof_table = pd.concat(oof, ignore_index=True)
    order = np.argsort(oof_table["path"].to_numpy(dtype=str), kind="stable")
    write_csv_atomic(oof_table.iloc[order], out_oof)
    if out_oof_probabilities is not None:
        save_npy_atomic(out_oof_probabilities, np.concatenate(oof_probabilities)[order].astype(np.float32))
    accuracy = summary["valid_accuracy"]
    plot_fold_curves(curves, f"{experiment}: k-fold, accuracy {accuracy['mean']:.4f} ± {accuracy['std']:.4f}", out_png)
    return summary


def _held_out_probabilities(path: PathLike, held_out: np.ndarray) -> np.ndarray:
    """The rows of a fold's probabilities.npy that its model never trained on."""
    probabilities = load_npy(path)
    if len(probabilities) != len(held_out):
        raise ValueError(f"{path} has {len(probabilities)} rows but its predictions.csv {len(held_out)}; rerun infer")
    return probabilities[held_out]


def grid_comparison(
    *,
    runs: Mapping[str, Mapping[str, Any]],
    metrics_paths: Mapping[str, PathLike],
    predictions_paths: Mapping[str, PathLike],
    configs_out: Mapping[str, PathLike],
    out_csv: PathLike,
    out_png: PathLike,
    tensorboard_dir: PathLike,
) -> pd.DataFrame:
    """comparison.csv: per grid point the varied values, ``heldout_accuracy`` (its final model on
    the validation rows held out from checkpoint selection), the valid metrics of the epoch the
    checkpoint was chosen on (optimistic: they chose it) and of the last epoch, epochs and wall
    time; sorted by ``rank_score``, a score that did not choose the checkpoint: the held-out
    accuracy, or without held-out rows (calibration.holdout 0) the last epoch's valid accuracy.
    Also comparison.png, each run's resolved config and TensorBoard hparams."""
    import yaml

    rows, curves = [], {}
    for run_id, run in runs.items():
        best, epochs = _final_stage_metrics(metrics_paths[run_id])
        held, n_held = heldout_accuracy(predictions_paths[run_id])
        last = epochs[-1]["valid"]["accuracy"]
        rows.append(
            {
                "run": run_id,
                **dict(run["values"]),
                "rank_score": held if held is not None else last,
                "heldout_accuracy": held,
                "heldout_images": n_held,
                "valid_accuracy": best["valid"]["accuracy"],
                "valid_loss": best["valid"]["loss"],
                "last_valid_accuracy": last,
                "best_epoch": best["epoch"],
                "epochs": len(epochs),
                "train_minutes": sum(e["seconds"] for e in epochs) / 60,
            }
        )
        curves[run_id] = [e["valid"]["accuracy"] for e in epochs]
        with atomic_output(configs_out[run_id]) as tmp:
            tmp.write_text(yaml.safe_dump(run["experiment"], sort_keys=False), encoding="utf-8")
    table = pd.DataFrame(rows).sort_values(["rank_score", "valid_loss"], ascending=[False, True], kind="stable")
    write_csv_atomic(table, out_csv)
    _grid_hparams(table, runs, tensorboard_dir)
    plot_grid(table, curves, out_png)
    return table


def _grid_hparams(table: pd.DataFrame, runs: Mapping[str, Mapping[str, Any]], tensorboard_dir: PathLike) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for row in table.itertuples(index=False):
        values = runs[row.run]["values"]
        with SummaryWriter(log_dir=str(Path(tensorboard_dir) / row.run.replace("/", "_"))) as writer:
            writer.add_hparams(
                {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()},
                {"hparam/rank_score": row.rank_score, "hparam/valid_accuracy": row.valid_accuracy},
                run_name=".",
            )
