"""Every figure the workflow draws (matplotlib, Agg backend: no display on build or cluster
machines). Functions take tables and arrays, draw, and save a PNG atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from labelflow.io import PathLike, atomic_output  # noqa: E402


def save_figure(fig, path: PathLike) -> None:
    try:
        with atomic_output(path, suffix=Path(path).suffix) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: PathLike, title: str = "") -> Path:
    """A confusion matrix (rows: true, columns: predicted) with its counts."""
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


def plot_lr_finder(records: pd.DataFrame, suggestions: Mapping[str, float], used: str, path: PathLike) -> None:
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


def plot_experiments(table: pd.DataFrame, metrics: Sequence[str], path: PathLike) -> None:
    """Grouped bars: one group per experiment, one bar per metric present in ``table``."""
    metrics = [m for m in metrics if m in table]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(table)), 4))
    width = 0.8 / max(1, len(metrics))
    for i, metric in enumerate(metrics):
        ax.bar(np.arange(len(table)) + i * width, table[metric].fillna(0), width, label=metric)
    ax.set_xticks(np.arange(len(table)) + 0.4 - width / 2, table["experiment"])
    low = np.nanmin(table[metrics].replace(0, np.nan).to_numpy()) if metrics else np.nan
    ax.set_ylim(max(0.0, low - 0.05) if np.isfinite(low) else 0.0, 1.0)
    ax.set_ylabel("valid fold")
    ax.legend(loc="lower right")
    ax.set_title("experiments compared")
    fig.tight_layout()
    save_figure(fig, path)


def plot_fold_curves(curves: Mapping[int, Sequence[float]], title: str, path: PathLike) -> None:
    """Valid accuracy per epoch of each k-fold run and their mean."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for fold, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, alpha=0.5, label=f"fold {fold}")
    if curves:
        length = min(len(c) for c in curves.values())
        mean = np.mean([c[:length] for c in curves.values()], axis=0)
        ax.plot(range(1, length + 1), mean, color="black", linewidth=2, label="mean")
    ax.set_xlabel("epoch (final stage)")
    ax.set_ylabel("valid accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_grid(table: pd.DataFrame, curves: Mapping[str, Sequence[float]], path: PathLike) -> None:
    """Best valid accuracy per grid run (best first) and every run's learning curve."""
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
    save_figure(fig, path)


def plot_autolabel_progress(rounds: pd.DataFrame, path: PathLike) -> None:
    """Accepted per round, cumulative coverage of the raw pile, validation accuracy per round."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = rounds["round"]
    axes[0].bar(x, rounds["accepted"], color="tab:blue")
    axes[0].set(title="pseudo-labels accepted", xlabel="round", ylabel="images")
    axes[1].plot(x, 100 * rounds["coverage"], marker="o", color="tab:green")
    axes[1].set(title="raw pile labelled (cumulative)", xlabel="round", ylabel="coverage %", ylim=(0, 105))
    axes[2].plot(x, 100 * rounds["valid_accuracy"], marker="o", color="tab:red", label="valid accuracy")
    axes[2].set(title="validation (human labels only)", xlabel="round", ylabel="%")
    ece = axes[2].twinx()
    ece.plot(x, rounds["ece_after"], marker="x", ls="--", color="tab:gray", label="ECE (calibrated)")
    ece.set_ylabel("ECE")
    for ax in axes:
        ax.set_xticks(list(x))
    if len(rounds):
        fig.suptitle(f"autolabel: {len(rounds)} round(s), stopped because {rounds.iloc[-1]['reason'] or '-'}")
    fig.tight_layout()
    save_figure(fig, path)


def plot_embeddings_2d(
    xy: np.ndarray,
    table: pd.DataFrame,
    classes: Sequence[str],
    axis_labels: tuple[str, str],
    title: str,
    path: PathLike,
) -> None:
    """2-D points: colour = class (``table.class``), o = correct, x = wrong; valid images drawn
    larger on top of the train images (``table.split``, ``table.correct``)."""
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for split, size, alpha in (("train", 14, 0.45), ("valid", 40, 0.9)):
        for correct, marker in ((True, "o"), (False, "x")):
            in_split = table["split"] == "train" if split == "train" else table["split"] != "train"
            sel = (in_split & (table["correct"] == correct)).to_numpy()
            if sel.any():
                colours = [cmap(c % cmap.N) for c in table["class"][sel]]
                ax.scatter(xy[sel, 0], xy[sel, 1], c=colours, s=size, marker=marker, alpha=alpha, linewidths=1.0)
    handles = [
        Line2D([], [], color=cmap(i % cmap.N), marker="o", linestyle="", label=name)
        for i, name in enumerate(classes[:20])
    ]
    handles += [
        Line2D([], [], color="grey", marker="o", linestyle="", label="correct"),
        Line2D([], [], color="grey", marker="x", linestyle="", label="wrong"),
        Line2D([], [], color="grey", marker="o", markersize=4, alpha=0.45, linestyle="", label="train"),
        Line2D([], [], color="grey", marker="o", markersize=7, linestyle="", label="valid"),
    ]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
