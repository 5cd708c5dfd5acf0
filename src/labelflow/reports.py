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

from labelflow.data import write_json_atomic  # noqa: E402
from labelflow.losses import get_loss  # noqa: E402
from labelflow.models import load_checkpoint  # noqa: E402


def _read_json(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def summarize(
    *,
    experiment: str,
    predictions_csv: str | Path,
    logits_npy: str | Path,
    checkpoint: str | Path,
    stage_metrics: dict[str, str | Path],
    index_metrics_json: str | Path,
    tag2cls_json: str | Path,
    out_json: str | Path,
    out_confusion_png: str | Path,
) -> dict[str, Any]:
    """summary.json (valid accuracy/loss of the final model, index recall, per-stage best) + confusion PNG."""
    predictions = pd.read_csv(predictions_csv)
    logits = np.load(logits_npy, allow_pickle=False)
    is_valid = (predictions["split"] == "valid").to_numpy()
    y_true = predictions["true"].to_numpy()[is_valid]
    y_pred = predictions["predicted"].to_numpy()[is_valid]
    head = load_checkpoint(checkpoint)["spec"]["heads"][0]
    criterion = get_loss(head["loss"]).build(**head.get("loss_params", {}))
    with torch.no_grad():
        loss = float(criterion(torch.from_numpy(logits[is_valid]), torch.from_numpy(y_true)))
    index = _read_json(index_metrics_json)
    summary = {
        "experiment": experiment,
        "valid": {"accuracy": float((y_true == y_pred).mean()), "loss": loss, "n_images": int(is_valid.sum())},
        "index": {k: index[k] for k in index if k.startswith("recall@")}
        | {"knn_accuracy": index["knn_accuracy"], "explained_variance": index["explained_variance"]},
        "stages": {},
    }
    for stage, path in stage_metrics.items():
        metrics = _read_json(path)
        best = metrics["best"]
        summary["stages"][stage] = {
            "epochs": len(metrics["epochs"]),
            "best_epoch": best["epoch"],
            "best_valid_accuracy": best["value"],
        }
    tag2cls = _read_json(tag2cls_json)
    classes = sorted(tag2cls, key=tag2cls.get)
    plot_confusion(y_true, y_pred, classes, out_confusion_png, title=f"{experiment}: valid confusion matrix")
    write_json_atomic(summary, out_json)
    return summary


def plot_confusion(y_true, y_pred, classes: Sequence[str], path: str | Path, title: str = "") -> np.ndarray:
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
    return matrix


def save_figure(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def summary_table(summary_paths: Sequence[str | Path]) -> pd.DataFrame:
    rows = []
    for path in summary_paths:
        s = _read_json(path)
        rows.append(
            {
                "experiment": s["experiment"],
                "valid_accuracy": s["valid"]["accuracy"],
                "valid_loss": s["valid"]["loss"],
                **{k: v for k, v in s["index"].items() if k.startswith("recall@")},
                "knn_accuracy": s["index"]["knn_accuracy"],
                "explained_variance": s["index"]["explained_variance"],
            }
        )
    return pd.DataFrame(rows)


def format_summary(summary_paths: Sequence[str | Path]) -> str:
    existing = [p for p in summary_paths if Path(p).exists()]
    if not existing:
        return ""
    table = summary_table(existing)
    return "Results (valid fold)\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}")
