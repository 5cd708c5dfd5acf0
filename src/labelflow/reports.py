"""Summaries, tables and plots of finished runs (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on build or cluster machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from labelflow.data import atomic_output, load_npy, read_json, write_csv_atomic, write_json_atomic  # noqa: E402
from labelflow.losses import get_loss  # noqa: E402
from labelflow.models import load_checkpoint  # noqa: E402


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
    logits = load_npy(logits_npy)[is_valid]
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

    index = read_json(index_metrics_json)
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
        metrics = read_json(path)
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
    return float(sum(e["seconds"] for p in stage_metrics_paths for e in read_json(p)["epochs"]))


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
    try:
        with atomic_output(path, suffix=Path(path).suffix) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def compare_experiments(
    summaries: dict[str, str | Path],
    stage_metrics: dict[str, Sequence[str | Path]],
    out_csv: str | Path,
    out_png: str | Path,
) -> pd.DataFrame:
    """experiments.csv (one row per experiment) and a bar chart of the main metrics."""
    rows = []
    for name, path in summaries.items():
        s = read_json(path)
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


def plot_lr_finder(records: pd.DataFrame, suggestions: dict[str, float], used: str, path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(records["lr"], records["loss"], alpha=0.3, label="loss")
    ax.plot(records["lr"], records["smoothed_loss"], label="smoothed loss")
    for name, lr in suggestions.items():
        ax.axvline(lr, linestyle="--" if name != used else "-", color="red" if name == used else "grey")
        ax.text(lr, ax.get_ylim()[1], f" {name}{' (used)' if name == used else ''}\n {lr:.2g}", va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("LR finder")
    ax.legend(loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)


def _final_stage_metrics(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    metrics = read_json(path)
    best = next(e for e in metrics["epochs"] if e["epoch"] == metrics["best"]["epoch"])
    return best, metrics["epochs"]


def kfold_summary(
    *,
    experiment: str,
    folds: dict[int, dict[str, str | Path]],
    out_csv: str | Path,
    out_json: str | Path,
    out_png: str | Path,
    out_oof: str | Path,
) -> dict[str, Any]:
    """One row per fold (best valid metrics of the final stage, index recall), mean ± std,
    per-fold learning curves with their mean, and the out-of-fold predictions.

    `folds[k]` holds the paths of fold k's run: "metrics" (final stage metrics.json),
    "summary" (summary.json) and "predictions" (predictions.csv).
    """
    rows, curves, oof = [], {}, []
    for fold, paths in sorted(folds.items()):
        best, epochs = _final_stage_metrics(paths["metrics"])
        summary = read_json(paths["summary"])
        rows.append(
            {
                "fold": fold,
                "valid_accuracy": summary["valid"]["accuracy"],
                "valid_loss": summary["valid"]["loss"],
                **{k: v for k, v in summary["index"].items() if k.startswith("recall@")},
                "best_epoch": best["epoch"],
                "train_minutes": sum(e["seconds"] for e in epochs) / 60,
            }
        )
        curves[fold] = [e["valid"]["accuracy"] for e in epochs]
        predictions = pd.read_csv(paths["predictions"], dtype={"path": str}, keep_default_na=False)
        valid = predictions[predictions["split"] == "valid"].assign(fold=fold)
        oof.append(valid)
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
    oof_table = pd.concat(oof, ignore_index=True).sort_values("path", kind="stable")
    write_csv_atomic(oof_table, out_oof)

    fig, ax = plt.subplots(figsize=(6, 4))
    for fold, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, alpha=0.5, label=f"fold {fold}")
    if curves:
        length = min(len(c) for c in curves.values())
        mean = np.mean([c[:length] for c in curves.values()], axis=0)
        ax.plot(range(1, length + 1), mean, color="black", linewidth=2, label="mean")
    ax.set_xlabel("epoch (final stage)")
    ax.set_ylabel("valid accuracy")
    ax.set_title(f"{experiment}: k-fold, accuracy {summary['valid_accuracy']['mean']:.4f} ± {summary['valid_accuracy']['std']:.4f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png)
    return summary


def grid_comparison(
    *,
    runs: dict[str, dict[str, Any]],
    metrics_paths: dict[str, str | Path],
    configs_out: dict[str, str | Path],
    out_csv: str | Path,
    out_png: str | Path,
    tensorboard_dir: str | Path,
) -> pd.DataFrame:
    """comparison.csv (varied values, best valid metrics of the final stage, epochs, wall time),
    sorted best first; comparison.png; each run's resolved config; TensorBoard hparams."""
    import yaml
    from torch.utils.tensorboard import SummaryWriter

    rows, curves = [], {}
    for run_id, run in runs.items():
        best, epochs = _final_stage_metrics(metrics_paths[run_id])
        rows.append(
            {
                "run": run_id,
                **{key: value for key, value in run["values"].items()},
                "valid_accuracy": best["valid"]["accuracy"],
                "valid_loss": best["valid"]["loss"],
                "best_epoch": best["epoch"],
                "epochs": len(epochs),
                "train_minutes": sum(e["seconds"] for e in epochs) / 60,
            }
        )
        curves[run_id] = [e["valid"]["accuracy"] for e in epochs]
        with atomic_output(configs_out[run_id]) as tmp:
            tmp.write_text(yaml.safe_dump(run["experiment"], sort_keys=False), encoding="utf-8")
    table = pd.DataFrame(rows).sort_values(["valid_accuracy", "valid_loss"], ascending=[False, True], kind="stable")
    write_csv_atomic(table, out_csv)
    for row in table.itertuples(index=False):
        values = runs[row.run]["values"]
        with SummaryWriter(log_dir=str(Path(tensorboard_dir) / row.run.replace("/", "_"))) as writer:
            writer.add_hparams(
                {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()},
                {"hparam/valid_accuracy": row.valid_accuracy, "hparam/valid_loss": row.valid_loss},
                run_name=".",
            )

    fig, (bars, lines) = plt.subplots(1, 2, figsize=(11, 4))
    bars.barh(table["run"], table["valid_accuracy"])
    bars.invert_yaxis()
    bars.set_xlabel("best valid accuracy")
    bars.set_xlim(max(0.0, table["valid_accuracy"].min() - 0.05), 1.0)
    for run_id, curve in curves.items():
        lines.plot(range(1, len(curve) + 1), curve, label=run_id)
    lines.set_xlabel("epoch (final stage)")
    lines.set_ylabel("valid accuracy")
    lines.legend(fontsize=7)
    fig.suptitle("grid search")
    fig.tight_layout()
    save_figure(fig, out_png)
    return table
