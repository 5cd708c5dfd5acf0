"""Embeddings of any image set, the TensorBoard projector, a 2-D picture of the embedding space,
similarity search with out-of-class rejection, and the out-of-class (OOD) evaluation.

Everything here composes the core steps (``pipeline.infer`` / ``pca_index`` outputs, the saved
hnswlib index, ``inference.predict``) rather than re-implementing them:

* :func:`embed_images`: a folder or CSV of images → ``embeddings.npy`` + ``index.csv`` (path, label).
* :func:`write_projector`: TensorBoard projector files of the trained model's train+valid embeddings.
* :func:`plot_embeddings_2d`: PCA picture of the same embeddings (colour = class, marker = correct?).
* :func:`calibrate_rejection`: the nearest-neighbour distance above which a query is ``unknown``,
  calibrated on the valid fold and stored beside the index as ``rejection.json``.
* :class:`SimilaritySearch`: loads that JSON (and the index, transform and train paths it names)
  and answers queries: top-k neighbours, kNN vote, or ``unknown``.
* :func:`holdout_classes` and :func:`evaluate_ood`: train without some classes, then measure how
  well the distance tells their images from known ones.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hnswlib
import numpy as np
import pandas as pd

from labelflow import index as knn
from labelflow.data import (
    IMAGE_EXTENSIONS,
    SNAKEMAKE_TIMESTAMP,
    DatasetError,
    atomic_directory,
    check_image,
    load_npy,
    read_dataset_csv,
    read_json,
    read_tag2cls,
    save_npy_atomic,
    write_csv_atomic,
    write_json_atomic,
)

# torch and the model code are imported where a model runs: the rules that only search the
# index (rejection, query_set, ood_dataset, ood_evaluate) then start in a fraction of the time.
if TYPE_CHECKING:
    import torch

    from labelflow.models import MultiHeadNet

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
# A query is rejected when its nearest distance exceeds the threshold by more than this: a train
# image queried again lands at distance ~1e-7 from itself (float rounding), never "far".
DISTANCE_TOLERANCE = 1e-6
LABEL_COLUMNS = ("label", "labels", "tag")  # the first one a CSV has gives the known labels
PROJECTOR_TAG = "train_valid"
SPRITE_MAX_PIXELS = 8192  # TensorBoard's projector refuses larger sprite images
PathLike = str | os.PathLike[str]


def class_names(tag2cls_json: PathLike) -> list[str]:
    """Class names in class-index order."""
    tag2cls = read_tag2cls(tag2cls_json)
    return sorted(tag2cls, key=tag2cls.get)


# --------------------------------------------------------------------------- image sets


@dataclass
class ImageSet:
    """Images to embed: ``table`` (path, label; label "" when unknown) with paths relative to
    ``root`` (or absolute), and the files left out with the reason (``skipped``: path, reason)."""

    table: pd.DataFrame
    root: Path
    skipped: pd.DataFrame


def read_image_set(source: PathLike, classes: Sequence[str] = (), root: PathLike | None = None) -> ImageSet:
    """A folder (searched recursively) or a CSV with a ``path`` column → :class:`ImageSet`.

    Folder: an image's label is its top-level sub-folder when that folder is named like one of
    ``classes`` (a folder-per-class set), else unknown. CSV: labels come from the first of the
    columns label/labels/tag it has; paths are relative to ``root`` (default: the CSV's folder)
    or absolute. Unreadable or missing images are skipped and listed, never fatal.
    """
    source = Path(source)
    if source.is_dir():
        table = _folder_table(source, set(classes))
        root = source
    elif source.is_file() and source.suffix.lower() == ".csv":
        table = _csv_table(source)
        root = Path(root) if root is not None else source.parent
    elif not source.exists():
        raise DatasetError(
            f"image set {source} does not exist; give a folder of images or a CSV with a `path` column "
            "(config key `embed.sets`)"
        )
    else:
        raise DatasetError(f"image set {source} is neither a folder nor a .csv table of image paths")

    full_paths = [str(Path(root) / p) for p in table["path"]]
    with ThreadPoolExecutor() as pool:  # decoding releases the GIL; order is preserved
        reasons = list(pool.map(check_image, full_paths))
    bad = np.array([r is not None for r in reasons], dtype=bool)
    skipped = pd.DataFrame(
        {"path": table["path"][bad].tolist(), "reason": [r for r in reasons if r is not None]},
        columns=["path", "reason"],
    )
    table = table[~bad].reset_index(drop=True)
    if table.empty:
        raise DatasetError(f"image set {source} holds no readable images ({len(skipped)} file(s) skipped)")
    return ImageSet(table=table, root=Path(root), skipped=skipped)


def _folder_table(folder: Path, classes: set[str]) -> pd.DataFrame:
    rows = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name == SNAKEMAKE_TIMESTAMP:
                continue
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = Path(os.path.relpath(os.path.join(dirpath, name), folder)).as_posix()
            parts = rel.split("/")
            rows.append((rel, parts[0] if len(parts) > 1 and parts[0] in classes else ""))
    rows.sort()
    return pd.DataFrame(rows, columns=["path", "label"])


def _csv_table(csv_path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(f"image table {csv_path} is not a readable CSV ({err})") from err
    if "path" not in table.columns:
        raise DatasetError(f"image table {csv_path} has no `path` column (columns: {list(table.columns)})")
    label_column = next((c for c in LABEL_COLUMNS if c in table.columns), None)
    labels = table[label_column] if label_column else pd.Series([""] * len(table), dtype=str)
    empty = table["path"].str.strip() == ""
    if empty.any():
        raise DatasetError(f"image table {csv_path}: line(s) {list(np.flatnonzero(empty) + 2)[:5]} have an empty path")
    return pd.DataFrame({"path": table["path"].tolist(), "label": labels.tolist()})


# --------------------------------------------------------------------------- embedding


def embed_paths(
    model: MultiHeadNet,
    root: PathLike,
    paths: Sequence[str],
    data_cfg: dict[str, Any],
    device: torch.device,
    batch_size: int = 256,
) -> np.ndarray:
    """Embeddings (N, embedding_size) float32 of images under deterministic eval transforms."""
    from labelflow.inference import predict
    from labelflow.loaders import eval_loader

    # decoded per batch, not cached: a large set need not fit in memory
    loader = eval_loader(root, paths, data_cfg, batch_size=batch_size, device=device, cache=False)
    return predict(model, loader, device)["embeddings"].astype(np.float32)


def embed_images(
    *,
    checkpoint: PathLike,
    source: PathLike,
    out_dir: PathLike,
    data_cfg: dict[str, Any],
    tag2cls_json: PathLike | None = None,
    classes: Sequence[str] | None = None,
    root: PathLike | None = None,
    batch_size: int = 256,
    want_gpu: bool = False,
) -> pd.DataFrame:
    """Embed a folder or CSV of images with a trained model → out_dir/embeddings.npy + index.csv.

    Row i of ``embeddings.npy`` is row i of ``index.csv`` (path, label; label empty when unknown).
    The model's classes (``tag2cls_json`` or ``classes``) let class sub-folders give labels.
    """
    from labelflow.models import load_model
    from labelflow.training import select_device

    if classes is None:
        classes = class_names(tag2cls_json) if tag2cls_json else []
    images = read_image_set(source, classes, root)
    for row in images.skipped.itertuples():
        log.warning("skipped %s: %s", row.path, row.reason)
    device = select_device(want_gpu)
    model = load_model(checkpoint)
    n = len(images.table)
    log.info(
        "embedding %d images of %s with %s (%d px, batches of %d; %d with a known label)",
        n, source, checkpoint, data_cfg["image_size"], batch_size, int((images.table["label"] != "").sum()),
    )
    embeddings = embed_paths(model, images.root, images.table["path"], data_cfg, device, batch_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_npy_atomic(out_dir / "embeddings.npy", embeddings)
    write_csv_atomic(images.table, out_dir / "index.csv")
    log.info("wrote %s embeddings to %s", embeddings.shape, out_dir)
    return images.table


def model_section(checkpoint: PathLike, data_cfg: dict[str, Any], here: PathLike) -> dict[str, Any]:
    """How the indexed images were embedded: the checkpoint (relative to ``here``) and the
    deterministic preprocessing; what the CLI needs to embed new images the same way."""
    return {
        "checkpoint": Path(os.path.relpath(checkpoint, here)).as_posix(),
        "image_size": int(data_cfg["image_size"]),
        "mean": [float(v) for v in data_cfg["mean"]],
        "std": [float(v) for v in data_cfg["std"]],
        "num_workers": int(data_cfg.get("num_workers", 0)),
    }


def read_model(experiment_dir: PathLike) -> tuple[dict[str, Any], Path, list[str]]:
    """(preprocessing, checkpoint path, class names) from ``<experiment_dir>/index/rejection.json``."""
    path = Path(experiment_dir) / "index" / "rejection.json"
    if not path.is_file():
        raise DatasetError(
            f"{path} does not exist; build it first with `snakemake {path.as_posix()}` (or target query_all)"
        )
    card = read_json(path)
    return card["model"], path.parent / card["model"]["checkpoint"], card["classes"]


# --------------------------------------------------------------------------- train+valid table


def prediction_table(predictions_csv: PathLike, tag2cls_json: PathLike) -> pd.DataFrame:
    """predictions.csv of rule infer with class names: path, split, class, label, predicted, correct.

    Single-label tables hold class indices in true/predicted; multilabel ones hold ';'-joined
    names already. ``class`` (an index; the first label for multilabel data) is kept for colours.
    """
    classes = class_names(tag2cls_json)
    table = pd.read_csv(
        predictions_csv, dtype={"path": str, "true": str, "predicted": str}, keep_default_na=False
    )
    index_like = table["true"].str.fullmatch(r"\d+").all() and table["predicted"].str.fullmatch(r"\d+").all()
    single_label = bool(index_like and (table["true"] == table["class"].astype(str)).all())
    if single_label:
        names = np.asarray(classes, dtype=object)
        label = names[table["true"].astype(int).to_numpy()]
        predicted = names[table["predicted"].astype(int).to_numpy()]
    else:
        label, predicted = table["true"].to_numpy(), table["predicted"].to_numpy()
    return pd.DataFrame(
        {
            "path": table["path"],
            "split": table["split"],
            "class": table["class"].astype(int),
            "label": label,
            "predicted": predicted,
            "correct": np.asarray(label) == np.asarray(predicted),
        }
    )


def _train_valid(predictions_csv: PathLike, embeddings_npy: PathLike, tag2cls_json: PathLike):
    table = prediction_table(predictions_csv, tag2cls_json)
    embeddings = load_npy(embeddings_npy)
    if len(embeddings) != len(table):
        raise ValueError(f"{embeddings_npy} has {len(embeddings)} rows but {predictions_csv} {len(table)}; rerun infer")
    return table, embeddings


def subsample(n: int, max_items: int, seed: int) -> np.ndarray:
    """Sorted row numbers: all of them, or a seeded random ``max_items`` of them."""
    if n <= max_items:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_items, replace=False))


# --------------------------------------------------------------------------- projector


def _tsv_cell(value: Any) -> str:
    return str(value).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def write_projector(
    *,
    predictions_csv: PathLike,
    embeddings_npy: PathLike,
    tag2cls_json: PathLike,
    root: PathLike,
    out_dir: PathLike,
    max_images: int = 2000,
    thumbnail_size: int = 32,
    seed: int = 42,
) -> dict[str, Any]:
    """TensorBoard projector files (``SummaryWriter.add_embedding``) of the trained model's
    train+valid embeddings: metadata path, split, label, predicted, correct and a thumbnail sprite.

    At most ``max_images`` images (a seeded, sorted subsample). The folder is written beside
    ``out_dir`` and renamed into place, so a failed job leaves no half projector behind.
    """
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from labelflow.loaders import decode_resized

    table, embeddings = _train_valid(predictions_csv, embeddings_npy, tag2cls_json)
    rows = subsample(len(table), max_images, seed)
    chosen = table.iloc[rows].reset_index(drop=True)
    n_per_side = math.ceil(math.sqrt(len(rows)))
    size = min(thumbnail_size, max(1, SPRITE_MAX_PIXELS // n_per_side))
    if size < thumbnail_size:
        log.warning("thumbnails shrunk to %d px so the sprite stays within %d px", size, SPRITE_MAX_PIXELS)
    thumbnails = np.stack([decode_resized(Path(root) / p, size) for p in chosen["path"]])
    label_img = torch.from_numpy(thumbnails).permute(0, 3, 1, 2).float() / 255.0

    columns = ["path", "split", "label", "predicted", "correct"]
    metadata = [[_tsv_cell(v) for v in record] for record in chosen[columns].itertuples(index=False)]
    with atomic_directory(out_dir) as tmp, SummaryWriter(log_dir=str(tmp)) as writer:
        writer.add_embedding(
            embeddings[rows], metadata=metadata, metadata_header=columns, label_img=label_img,
            global_step=0, tag=PROJECTOR_TAG,
        )
    info = {
        "n_images": int(len(rows)),
        "n_total": int(len(table)),
        "dim": int(embeddings.shape[1]),
        "thumbnail_size": int(size),
        "tag": PROJECTOR_TAG,
    }
    log.info("projector: %d of %d images (%d-d), thumbnails %d px → %s", len(rows), len(table), embeddings.shape[1], size, out_dir)
    return info


# --------------------------------------------------------------------------- 2-D picture


def plot_embeddings_2d(
    *,
    predictions_csv: PathLike,
    embeddings_npy: PathLike,
    tag2cls_json: PathLike,
    out_png: PathLike,
    title: str = "",
    max_points: int = 5000,
    seed: int = 42,
) -> Path:
    """PCA of the standardised train+valid embeddings to 2-D: colour = class, o = correct,
    x = wrong; valid images drawn larger on top of the train images."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from labelflow.reports import plt, save_figure

    table, embeddings = _train_valid(predictions_csv, embeddings_npy, tag2cls_json)
    rows = subsample(len(table), max_points, seed)
    table, embeddings = table.iloc[rows].reset_index(drop=True), embeddings[rows]
    standardised = StandardScaler().fit_transform(embeddings)
    pca = PCA(n_components=2, svd_solver="full").fit(standardised)
    xy = pca.transform(standardised)
    classes = class_names(tag2cls_json)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")

    fig, ax = plt.subplots(figsize=(7.5, 6))
    for split, size, alpha in (("train", 14, 0.45), ("valid", 40, 0.9)):
        for correct, marker in ((True, "o"), (False, "x")):
            sel = ((table["split"] == split) & (table["correct"] == correct)).to_numpy()
            if sel.any():
                colours = [cmap(c % cmap.N) for c in table["class"][sel]]
                ax.scatter(xy[sel, 0], xy[sel, 1], c=colours, s=size, marker=marker, alpha=alpha, linewidths=1.0)
    from matplotlib.lines import Line2D

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
    ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    n_valid = int((table["split"] == "valid").sum())
    ax.set_title(title or f"embeddings: {len(table)} images ({n_valid} valid, large)")
    fig.tight_layout()
    save_figure(fig, out_png)
    return Path(out_png)


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
        predictions = pd.read_csv(predictions_csv, dtype={"path": str}, keep_default_na=False)
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


def calibrate_rejection(
    *,
    predictions_csv: PathLike,
    embeddings_npy: PathLike,
    transform_npz: PathLike,
    index_bin: PathLike,
    index_json: PathLike,
    tag2cls_json: PathLike,
    checkpoint: PathLike,
    data_cfg: dict[str, Any],
    out_json: PathLike,
    quantile: float = 0.99,
    k: int = 10,
    vote_k: int = 5,
) -> dict[str, Any]:
    """The rejection threshold: the ``quantile`` of the nearest-neighbour distance of the valid
    images whose kNN vote is correct (an observed distance, so at least that fraction of them is
    accepted). Written with the names of the index files and of the model that embedded them
    (relative to ``out_json``), so that :meth:`SimilaritySearch.load` and the CLI need nothing else."""
    classes = class_names(tag2cls_json)
    search = SimilaritySearch.from_files(
        transform_npz=transform_npz, index_bin=index_bin, index_json=index_json,
        predictions_csv=predictions_csv, classes=classes, vote_k=vote_k, k=k,
    )
    predictions = pd.read_csv(predictions_csv, dtype={"path": str}, keep_default_na=False)
    is_valid = (predictions["split"] == "valid").to_numpy()
    labels = predictions["class"].to_numpy()[is_valid]
    result = search.search(load_npy(embeddings_npy)[is_valid])
    correct = result.vote == labels
    pool = result.nearest[correct]
    if not len(pool):
        log.warning("no valid image is voted correctly; the threshold uses all %d valid images", len(labels))
        pool = result.nearest
    threshold = float(np.quantile(pool.astype(np.float64), quantile, method="higher"))
    rejected = result.nearest > threshold + DISTANCE_TOLERANCE
    here = Path(out_json).parent

    def rel(path: PathLike) -> str:
        return Path(os.path.relpath(path, here)).as_posix()

    card = {
        "threshold": threshold,
        "quantile": quantile,
        "distance": f"{search.space} distance to the nearest indexed (train) image, in the index space",
        "space": search.space,
        "k": k,
        "vote_k": vote_k,
        "classes": classes,
        "model": model_section(checkpoint, data_cfg, here),
        "files": {
            "transform": rel(transform_npz),
            "index": rel(index_bin),
            "info": rel(index_json),
            "predictions": rel(predictions_csv),
        },
        "calibration": {
            "n_valid": int(len(labels)),
            "n_correct": int(correct.sum()),
            "knn_accuracy": float(correct.mean()) if len(labels) else float("nan"),
            "valid_rejected": float(rejected.mean()) if len(labels) else float("nan"),
            "correct_rejected": float(rejected[correct].mean()) if correct.any() else float("nan"),
            "nearest_distance_quantiles": {
                str(q): float(np.quantile(result.nearest, q)) for q in (0.5, 0.9, 0.99)
            } if len(labels) else {},
        },
    }
    write_json_atomic(card, out_json)
    log.info(
        "rejection threshold %.5f (%s distance, quantile %.3f of %d correct valid queries); %.1f%% of valid rejected",
        threshold, search.space, quantile, int(correct.sum()), 100 * card["calibration"]["valid_rejected"],
    )
    return card


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


def image_arguments(items: Sequence[PathLike], classes: Sequence[str] = ()) -> pd.DataFrame:
    """Files and folders given on a command line → table path,label (paths as given/found)."""
    rows = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            found = _folder_table(item, set(classes))
            rows += [((item / p).as_posix(), label) for p, label in zip(found["path"], found["label"])]
        else:
            rows.append((item.as_posix(), ""))
    problems = [(p, check_image(p)) for p, _ in rows]
    problems = [f"{p}: {reason}" for p, reason in problems if reason is not None]
    if problems:
        raise DatasetError("cannot read " + "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""))
    if not rows:
        raise DatasetError("no images given (folders are searched for image files)")
    return pd.DataFrame(rows, columns=["path", "label"])


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
    from labelflow.models import load_model
    from labelflow.training import select_device

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
    from sklearn.metrics import roc_auc_score

    search = SimilaritySearch.load(rejection_json)
    predictions = pd.read_csv(predictions_csv, dtype={"path": str}, keep_default_na=False)
    is_valid = (predictions["split"] == "valid").to_numpy()
    known_labels = predictions["class"].to_numpy()[is_valid]
    known = search.search(load_npy(embeddings_npy)[is_valid])
    heldout = pd.read_csv(heldout_index_csv, dtype=str, keep_default_na=False)
    unknown = search.search(load_npy(heldout_embeddings_npy))
    if not len(known_labels) or not len(heldout):
        raise DatasetError(f"OOD evaluation needs known valid images ({len(known_labels)}) and held-out images ({len(heldout)})")
    scores = np.concatenate([known.nearest, unknown.nearest]).astype(np.float64)
    is_unknown = np.r_[np.zeros(len(known_labels)), np.ones(len(heldout))]
    correct = known.vote == known_labels
    accepted = ~known.rejected
    result = {
        "experiment": experiment,
        "held_out": sorted(set(";".join(heldout["label"]).split(";"))),
        "known_classes": search.classes,
        "n_known": int(len(known_labels)),
        "n_unknown": int(len(heldout)),
        "score": f"nearest-neighbour {search.space} distance (higher = more likely unknown)",
        "auroc": float(roc_auc_score(is_unknown, scores)),
        "threshold": float(search.threshold),
        "quantile": search.quantile,
        "unknown_rejected": float(unknown.rejected.mean()),
        "known_rejected": float(known.rejected.mean()),
        "known_knn_accuracy": float(correct.mean()),
        "known_accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else float("nan"),
        "unknown_rejected_per_class": {
            label: float(unknown.rejected[(heldout["label"] == label).to_numpy()].mean())
            for label in sorted(heldout["label"].unique())
        },
        "nearest_distance_median": {
            "known": float(np.median(known.nearest)),
            "unknown": float(np.median(unknown.nearest)),
        },
        "note": "the threshold is calibrated on the same known valid fold, so known_rejected is in-sample",
    }
    write_json_atomic(result, out_json)
    log.info(
        "OOD (%s held out): AUROC %.4f; at threshold %.5f: %.1f%% of unknowns rejected, %.1f%% of knowns wrongly rejected",
        ", ".join(result["held_out"]), result["auroc"], result["threshold"],
        100 * result["unknown_rejected"], 100 * result["known_rejected"],
    )
    return result
