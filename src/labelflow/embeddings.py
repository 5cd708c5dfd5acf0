"""Embeddings of any image set, the TensorBoard projector and a 2-D picture of the embedding space.

Everything here composes the core steps (``experiment.infer`` outputs, ``inference.predict``)
rather than re-implementing them:

* :func:`embed_images`: a folder or CSV of images → ``embeddings.npy`` + ``index.csv`` (path, label).
* :func:`write_projector`: TensorBoard projector files of the trained model's train+valid embeddings.
* :func:`plot_embeddings_2d`: PCA picture of the same embeddings (colour = class, marker = correct?).

Similarity search, out-of-class rejection and the OOD evaluation are in :mod:`labelflow.search`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from labelflow.dataset import class_names, read_image_list, read_predictions, read_tag2cls
from labelflow.images import (
    NOT_UTF8_FILE,
    NOT_UTF8_FOLDER,
    inspect_images,
    is_image_name,
    walk_images,
)
from labelflow.io import (
    DatasetError,
    PathLike,
    atomic_directory,
    load_npy,
    read_json,
    save_npy_atomic,
    write_csv_atomic,
)

# torch and the model code are imported where a model runs: the rules that only search the
# index (rejection, query_set, ood_dataset, ood_evaluate) then start in a fraction of the time.
if TYPE_CHECKING:
    import torch

    from labelflow.models import MultiHeadNet

log = logging.getLogger(__name__)

PROJECTOR_TAG = "train_valid"
SPRITE_MAX_PIXELS = 8192  # TensorBoard's projector refuses larger sprite images


def classes_of(tag2cls_json: PathLike) -> list[str]:
    """Class names in class-index order, from a tag2cls.json file."""
    return class_names(read_tag2cls(tag2cls_json))


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
    or absolute. Unreadable or missing images, and files or folders whose names are not valid
    UTF-8, are skipped and listed, never fatal.
    """
    source = Path(source)
    listed = pd.DataFrame(columns=["path", "reason"])
    if source.is_dir():
        table, listed = _folder_table(source, set(classes))
        root = source
    elif source.is_file() and source.suffix.lower() == ".csv":
        table = read_image_list(source)
        root = Path(root) if root is not None else source.parent
    elif not source.exists():
        raise DatasetError(
            f"image set {source} does not exist; give a folder of images or a CSV with a `path` column "
            "(config key `embed.sets`)"
        )
    else:
        raise DatasetError(f"image set {source} is neither a folder nor a .csv table of image paths")

    full_paths = [str(Path(root) / p) for p in table["path"]]
    reasons = [checked.reason for checked in inspect_images(full_paths, hashes=False)]
    bad = np.array([r is not None for r in reasons], dtype=bool)
    unreadable = pd.DataFrame(
        {"path": table["path"][bad].tolist(), "reason": [r for r in reasons if r is not None]},
        columns=["path", "reason"],
    )
    skipped = pd.concat([listed, unreadable], ignore_index=True)
    table = table[~bad].reset_index(drop=True)
    if table.empty:
        raise DatasetError(f"image set {source} holds no readable images ({len(skipped)} file(s) skipped)")
    return ImageSet(table=table, root=Path(root), skipped=skipped)


def _folder_table(folder: Path, classes: set[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(path,label of the image files below ``folder``, path,reason of the entries skipped).

    Hidden entries and other extensions are left out silently; names that are not valid
    UTF-8, unreadable folders and symlink loops are listed as skipped (paths written in an
    escaped, readable form). The label is the top-level sub-folder when it is named like a class.
    """

    def rel(path: PathLike) -> str:
        return Path(os.path.relpath(path, folder)).as_posix()

    rows = []
    walked: list[tuple[str, str]] = []
    for path in walk_images(str(folder), rel, skipped=walked):
        if is_image_name(path):
            parts = rel(path).split("/")
            rows.append((rel(path), parts[0] if len(parts) > 1 and parts[0] in classes else ""))
    rows.sort()
    skipped = sorted((p, reason) for p, reason in walked if not reason.startswith("hidden "))
    return pd.DataFrame(rows, columns=["path", "label"]), pd.DataFrame(skipped, columns=["path", "reason"])


def image_arguments(items: Sequence[PathLike], classes: Sequence[str] = ()) -> pd.DataFrame:
    """Files and folders given on a command line → table path,label (paths as given/found).
    Any file that cannot be read, or whose name is not valid UTF-8, is an error naming it."""
    rows: list[tuple[str, str]] = []
    problems: list[str] = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            found, skipped = _folder_table(item, set(classes))
            rows += [((item / p).as_posix(), label) for p, label in zip(found["path"], found["label"])]
            bad_names = skipped[skipped["reason"].isin([NOT_UTF8_FILE, NOT_UTF8_FOLDER])]
            problems += [f"{(item / p).as_posix()}: {r}" for p, r in zip(bad_names["path"], bad_names["reason"])]
        else:
            rows.append((item.as_posix(), ""))
    checked = inspect_images([p for p, _ in rows], hashes=False)
    problems += [f"{p}: {c.reason}" for (p, _), c in zip(rows, checked) if c.reason is not None]
    if problems:
        raise DatasetError("cannot read " + "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""))
    if not rows:
        raise DatasetError("no images given (folders are searched for image files)")
    return pd.DataFrame(rows, columns=["path", "label"])


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

    loader = eval_loader(root, paths, data_cfg, batch_size=batch_size, device=device)  # streams
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
    from labelflow.device import select_device
    from labelflow.models import load_model

    if classes is None:
        classes = classes_of(tag2cls_json) if tag2cls_json else []
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
        "num_workers": data_cfg.get("num_workers", "auto"),
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


def prediction_table(predictions_csv: PathLike) -> pd.DataFrame:
    """predictions.csv of rule infer with a ``correct`` column (label == predicted)."""
    table = read_predictions(predictions_csv)
    table["correct"] = (table["label"] == table["predicted"]).to_numpy()
    return table


def _train_valid(predictions_csv: PathLike, embeddings_npy: PathLike):
    table = prediction_table(predictions_csv)
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

    from labelflow.images import decode_resized

    table, embeddings = _train_valid(predictions_csv, embeddings_npy)
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
    """PCA of the standardised train+valid embeddings to 2-D (see :func:`plots.plot_embeddings_2d`)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from labelflow.plots import plot_embeddings_2d as draw

    table, embeddings = _train_valid(predictions_csv, embeddings_npy)
    rows = subsample(len(table), max_points, seed)
    table, embeddings = table.iloc[rows].reset_index(drop=True), embeddings[rows]
    standardised = StandardScaler().fit_transform(embeddings)
    pca = PCA(n_components=2, svd_solver="full").fit(standardised)
    ratio = pca.explained_variance_ratio_
    n_valid = int((table["split"] != "train").sum())
    draw(
        pca.transform(standardised), table, classes_of(tag2cls_json),
        (f"PC1 ({ratio[0]:.0%} of variance)", f"PC2 ({ratio[1]:.0%} of variance)"),
        title or f"embeddings: {len(table)} images ({n_valid} valid, large)", out_png,
    )
    return Path(out_png)
