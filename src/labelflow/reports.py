"""Summaries, tables and plots of finished runs (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on build or cluster machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from labelflow.data import write_csv_atomic, write_json_atomic  # noqa: E402
from labelflow.losses import get_loss  # noqa: E402
from labelflow.models import load_checkpoint  # noqa: E402


def _read_json(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def summarize(
    *,
    experiment: str,
    dataset_csv: str | Path,
    tag2cls_json: str | Path,
    predictions_csv: str | Path,
    logits_npy: str | Path,
    heads_csv: str | Path,
    checkpoint: str | Path,
    stage_metrics: dict[str, str | Path],
    index_metrics_json: str | Path,
    out_json: str | Path,
    confusion_dir: str | Path,
    tensorboard_dir: str | Path | None = None,
) -> dict[str, Any]:
    """summary.json of the final model on the valid fold + a confusion-matrix PNG per head.

    valid: class-head metrics on un-augmented images (accuracy, loss; AUC for sigmoid heads;
    F1/mAP for multilabel data); heads: accuracy of the self-supervised heads; index:
    recall@k; stages: best epoch and training time of each stage.
    """
    from labelflow.data import read_dataset_csv, read_tag2cls
    from labelflow.metrics import head_metrics, per_class_f1, predict_labels, activate
    from labelflow.pipeline import class_targets, is_multilabel

    dataset = read_dataset_csv(dataset_csv, root=None)
    tag2cls = read_tag2cls(tag2cls_json)
    classes = sorted(tag2cls, key=tag2cls.get)
    predictions = pd.read_csv(predictions_csv, dtype={"path": str}, keep_default_na=False)
    if list(predictions["path"]) != list(dataset["path"]):
        raise ValueError(f"{predictions_csv} and {dataset_csv} list different images; rerun infer")
    is_valid = (predictions["split"] == "valid").to_numpy()
    logits = np.load(logits_npy, allow_pickle=False)[is_valid]
    targets = class_targets(dataset, tag2cls)[is_valid]
    head = load_checkpoint(checkpoint)["spec"]["heads"][0]
    spec = get_loss(head["loss"])
    criterion = spec.build(**head.get("loss_params", {}))
    with torch.no_grad():
        loss = float(criterion(torch.from_numpy(logits), torch.from_numpy(targets)))
    valid = {"loss": loss, **head_metrics(logits, targets, spec.activation, head["threshold"])}
    multilabel = is_multilabel(dataset)
    predicted = predict_labels(activate(logits.astype(np.float64), spec.activation), multilabel, head["threshold"])
    valid["per_class_f1"] = dict(zip(classes, per_class_f1(targets, predicted, len(classes))))
    valid["n_images"] = int(is_valid.sum())

    index = _read_json(index_metrics_json)
    summary: dict[str, Any] = {
        "experiment": experiment,
        "multilabel": multilabel,
        "valid": valid,
        "heads": {},
        "index": {k: index[k] for k in index if k.startswith("recall@")}
        | {"knn_accuracy": index["knn_accuracy"], "explained_variance": index["explained_variance"]},
        "stages": {},
    }
    confusion_dir = Path(confusion_dir)
    confusion_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    if not multilabel:
        figures["class"] = plot_confusion(targets, predicted, classes, confusion_dir / "class.png", f"{experiment}: class (valid)")
    heads = pd.read_csv(heads_csv)
    for name, rows in heads.groupby("head"):
        summary["heads"][name] = {"accuracy": float((rows["true"] == rows["predicted"]).mean())}
        if name == "rotation":
            codes = [f"rot{90 * (c // 2)}{'+flip' if c % 2 else ''}" for c in range(8)]
            figures[name] = plot_confusion(
                rows["true"].to_numpy(), rows["predicted"].to_numpy(), codes, confusion_dir / "rotation.png",
                f"{experiment}: rotation (valid)",
            )
    for stage, path in stage_metrics.items():
        metrics = _read_json(path)
        summary["stages"][stage] = {
            "epochs": len(metrics["epochs"]),
            "best_epoch": metrics["best"]["epoch"],
            "best_valid_accuracy": metrics["best"]["value"],
        }
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(tensorboard_dir)) as writer:
            for name, figure_path in figures.items():
                image = plt.imread(figure_path)[..., :3]
                writer.add_image(f"confusion/{name}", image, dataformats="HWC")
    write_json_atomic(summary, out_json)
    return summary


def training_seconds(stage_metrics_paths: Sequence[str | Path]) -> float:
    """Wall time spent in training epochs, summed over stages (from metrics.json)."""
    return float(sum(e["seconds"] for p in stage_metrics_paths for e in _read_json(p)["epochs"]))


def plot_confusion(y_true, y_pred, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)


def save_figure(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def compare_experiments(
    summaries: dict[str, str | Path],
    stage_metrics: dict[str, Sequence[str | Path]],
    out_csv: str | Path,
    out_png: str | Path,
) -> pd.DataFrame:
    """experiments.csv (one row per experiment) and a bar chart of the main metrics."""
    rows = []
    for name, path in summaries.items():
        s = _read_json(path)
        valid = s["valid"]
        rows.append(
            {
                "experiment": name,
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

    metrics = ["valid_accuracy", "recall@1", "recall@5", "auc"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(table)), 4))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        if metric in table:
            ax.bar(np.arange(len(table)) + i * width, table[metric].fillna(0), width, label=metric)
    ax.set_xticks(np.arange(len(table)) + 0.4 - width / 2, table["experiment"])
    low = np.nanmin(table[[m for m in metrics if m in table]].replace(0, np.nan).to_numpy())
    ax.set_ylim(max(0.0, low - 0.05) if np.isfinite(low) else 0.0, 1.0)
    ax.set_ylabel("valid fold")
    ax.legend(loc="lower right")
    ax.set_title("experiments compared")
    fig.tight_layout()
    save_figure(fig, out_png)
    return table


def format_experiments(csv_path: str | Path) -> str:
    """The comparison table as text, for the end of the main command."""
    if not Path(csv_path).exists():
        return ""
    table = pd.read_csv(csv_path).dropna(axis=1, how="all")
    return "Results (valid fold)\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}")
