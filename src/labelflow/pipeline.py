"""The workflow's steps as plain functions: each Snakemake script calls exactly one of these.

Inputs are files written by earlier steps plus plain values from the validated config;
outputs are written atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from labelflow import index as knn
from labelflow.data import (
    DatasetError,
    load_npy,
    read_dataset_csv,
    read_json,
    read_tag2cls,
    save_npy_atomic,
    valid_mask,
    write_csv_atomic,
    write_json_atomic,
)
from labelflow.inference import predict
from labelflow.loaders import ROTATION_CLASSES, ImageTableDataset, build_transform, eval_loader, make_loader
from labelflow.losses import get_loss
from labelflow.metrics import predict_labels
from labelflow.models import HeadSpec, ModelSpec, create_model, load_model, load_weights_into
from labelflow.training import StageSpec, file_digest, fingerprint, run_stage, select_device

log = logging.getLogger(__name__)


SELF_SUPERVISED_HEADS = ("rotation", "class_rotation")
HEAD_TARGETS = ("class",) + SELF_SUPERVISED_HEADS


def model_spec(experiment: dict[str, Any], num_classes: int) -> ModelSpec:
    """The experiment's model section with head sizes filled in from the data.

    A head's name says what it predicts: `class` (the labels), `rotation` (8 codes of
    k*90 degree rotation x horizontal flip) or `class_rotation` (class x rotation code).
    """
    sizes = {"class": num_classes, "rotation": ROTATION_CLASSES, "class_rotation": num_classes * ROTATION_CLASSES}
    heads = []
    for head in experiment["heads"]:
        if head["name"] not in sizes:
            raise ValueError(
                f"experiment head {head['name']!r} is unknown; a head is named by its target, one of {HEAD_TARGETS}"
            )
        heads.append(
            HeadSpec(head["name"], sizes[head["name"]], head["loss"], head["weight"], head.get("params", {}), head["threshold"])
        )
    if heads[0].name != "class":
        raise ValueError("the first head of an experiment must be `class` (the main head)")
    m = experiment["model"]
    return ModelSpec(
        arch=m["arch"], heads=heads, embedding_size=m["embedding_size"], dropout=m["dropout"],
        small_input=m["small_input"],
    )


def uses_rotation(spec: ModelSpec) -> bool:
    return any(h.name in SELF_SUPERVISED_HEADS for h in spec.heads)


def is_multilabel(dataset: pd.DataFrame) -> bool:
    """A dataset from a labels CSV with at least one image carrying several labels."""
    return "labels" in dataset.columns and bool(dataset["labels"].str.contains(";").any())


def class_targets(dataset: pd.DataFrame, tag2cls: dict[str, int]) -> np.ndarray:
    """Class indices (N,) for single-label data, multi-hot rows (N, C) for multilabel data."""
    if not is_multilabel(dataset):
        return dataset["class"].to_numpy()
    targets = np.zeros((len(dataset), len(tag2cls)), dtype=np.float32)
    for row, labels in enumerate(dataset["labels"]):
        targets[row, [tag2cls[label] for label in labels.split(";")]] = 1.0
    return targets


def check_heads_fit_data(spec: ModelSpec, multilabel: bool, experiment_name: str = "") -> None:
    if not multilabel:
        return
    for head in spec.heads:
        if head.name == "class" and get_loss(head.loss).activation == "softmax":
            raise DatasetError(
                f"experiment {experiment_name or ''} trains its class head with {head.loss} (one class per "
                "image) but the dataset is multilabel; use an experiment with loss bce or focal"
            )
        if head.name == "class_rotation":
            raise DatasetError("a class_rotation head needs single-label data; remove it for multilabel datasets")


def _transforms(data_cfg: dict[str, Any], seed: int):
    norm = {"mean": data_cfg["mean"], "std": data_cfg["std"]}
    train_tf = build_transform(data_cfg["augmentations"], train=True, seed=seed, **norm)
    eval_tf = build_transform(train=False, **norm)
    return train_tf, eval_tf


def _loader_options(data_cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {"num_workers": data_cfg["num_workers"], "pin_memory": device.type == "cuda"}


@dataclass
class PreparedStage:
    model: Any
    stage_spec: StageSpec
    device: torch.device
    train_loader: Any
    valid_loader: Any
    upright_loader: Any
    fingerprint: str


def stage_loaders(
    root: str | Path,
    dataset: pd.DataFrame,
    targets: np.ndarray,
    is_valid: np.ndarray,
    data_cfg: dict[str, Any],
    *,
    batch_size: int,
    rotation: bool,
    seed: int,
    device: torch.device,
):
    """(train, valid, upright) loaders of a stage. Only training augments; with a rotation
    head the train images get random rotations, the valid ones a fixed seeded set, and the
    upright loader (None without a rotation head) scores the class head on upright images."""
    train_tf, eval_tf = _transforms(data_cfg, seed)
    size, cache, rotation_p = data_cfg["image_size"], data_cfg["cache"], data_cfg["rotation_p"]
    paths = dataset["path"].to_numpy()
    train_ds = ImageTableDataset(
        root, paths[~is_valid], targets[~is_valid], size, train_tf, cache,
        rotation="random" if rotation else "none", rotation_p=rotation_p,
    )
    valid_ds = ImageTableDataset(
        root, paths[is_valid], targets[is_valid], size, eval_tf, cache,
        rotation="seeded" if rotation else "none", rotation_seed=seed, rotation_p=rotation_p,
    )
    options = _loader_options(data_cfg, device)
    # drop_last avoids a 1-image BatchNorm batch at the end of an epoch
    train_loader = make_loader(
        train_ds, batch_size=batch_size, shuffle=True, seed=seed, drop_last=len(train_ds) > batch_size, **options
    )
    valid_loader = make_loader(valid_ds, batch_size=batch_size, shuffle=False, seed=seed, **options)
    upright_loader = None
    if rotation:
        upright_ds = ImageTableDataset(root, paths[is_valid], targets[is_valid], size, eval_tf, cache)
        upright_loader = make_loader(upright_ds, batch_size=batch_size, shuffle=False, seed=seed, **options)
    return train_loader, valid_loader, upright_loader


def stage_model(spec: ModelSpec, weights: str, init_checkpoint: str | Path | None, seed: int):
    """A fresh model (seeded init, encoder ``weights``), or the previous stage's weights."""
    torch.manual_seed(seed)
    model = create_model(spec, weights if init_checkpoint is None else "none")
    if init_checkpoint is not None:
        load_weights_into(model, init_checkpoint)
        log.info("initialised from %s", init_checkpoint)
    return model


def prepare_stage(
    *,
    dataset_csv: str | Path,
    tag2cls_json: str | Path,
    root: str | Path,
    experiment: dict[str, Any],
    stage: str,
    valid_folds: Sequence[int],
    seed: int,
    init_checkpoint: str | Path | None = None,
    want_gpu: bool = False,
    experiment_name: str = "",
    lr: float | None = None,
) -> PreparedStage:
    """Model, loaders and spec of one stage: what both training and the LR finder start from."""
    dataset = read_dataset_csv(dataset_csv, root)
    tag2cls = read_tag2cls(tag2cls_json)
    spec = model_spec(experiment, len(tag2cls))
    check_heads_fit_data(spec, is_multilabel(dataset), experiment_name)
    stage_cfg = dict(experiment["stages"][stage])
    if lr is not None:
        stage_cfg["lr"] = lr
    if stage_cfg["lr"] == "auto":
        raise ValueError(f"stages.{stage}.lr is 'auto' but no LR finder suggestion was given")
    stage_spec = StageSpec.from_dict(stage, stage_cfg)
    device = select_device(want_gpu)

    is_valid = valid_mask(dataset, list(valid_folds)).to_numpy()
    if is_valid.all() or not is_valid.any():
        raise DatasetError(f"{dataset_csv}: valid_folds {list(valid_folds)} leave no train or no valid images")
    data_cfg = experiment["data"]
    loaders = stage_loaders(
        root, dataset, class_targets(dataset, tag2cls), is_valid, data_cfg,
        batch_size=stage_spec.batch_size, rotation=uses_rotation(spec), seed=seed, device=device,
    )
    model = stage_model(spec, experiment["model"]["weights"], init_checkpoint, seed)
    stage_fp = fingerprint(
        spec.to_dict(), stage_cfg, data_cfg, seed, list(valid_folds),
        file_digest(dataset_csv), file_digest(init_checkpoint) if init_checkpoint else None,
        experiment["model"]["weights"],
    )
    return PreparedStage(model, stage_spec, device, *loaders, stage_fp)


def read_lr_suggestion(path: str | Path) -> float:
    suggestion = read_json(path)
    return float(suggestion["suggestions"][suggestion["used"]])


def train_stage(*, out_dir: str | Path, state_dir: str | Path, lr_json: str | Path | None = None, **setup: Any) -> dict[str, Any]:
    """Train one stage of an experiment; a later stage starts from the previous stage's best.

    `setup` is passed to prepare_stage; with `lr_json` (stage lr: auto) the LR finder's
    suggestion is the learning rate.
    """
    if lr_json is not None:
        setup["lr"] = read_lr_suggestion(lr_json)
        log.info("lr %.3g from the LR finder (%s)", setup["lr"], lr_json)
    prepared = prepare_stage(**setup)
    return run_stage(
        prepared.model, prepared.train_loader, prepared.valid_loader, prepared.stage_spec,
        out_dir=out_dir, state_dir=state_dir, device=prepared.device, seed=setup["seed"],
        stage_fingerprint=prepared.fingerprint, upright_loader=prepared.upright_loader,
    )


def lr_finder(
    *,
    out_csv: str | Path,
    out_json: str | Path,
    out_png: str | Path,
    tensorboard_dir: str | Path,
    start_lr: float,
    final_lr: float,
    num_steps: int,
    scale: str,
    smoothing: float,
    diverge_factor: float,
    suggestion: str,
    **setup: Any,
) -> dict[str, Any]:
    """LR range test for one stage (its model, data and optimizer); the model is then discarded."""
    from labelflow.lrfinder import find_lr, suggest
    from labelflow.reports import plot_lr_finder

    prepared = prepare_stage(lr=start_lr, **setup)
    records = find_lr(
        prepared.model, prepared.train_loader, prepared.stage_spec, prepared.device,
        start_lr=start_lr, final_lr=final_lr, num_steps=num_steps, scale=scale,
        smoothing=smoothing, diverge_factor=diverge_factor, seed=setup["seed"],
    )
    suggestions = suggest(records)
    result = {
        "suggestions": suggestions,
        "used": suggestion,
        "lr": suggestions[suggestion],
        "steps": int(len(records)),
        "diverged": bool(len(records) < num_steps),
        "scale": scale,
        "start_lr": start_lr,
        "final_lr": final_lr,
    }
    write_csv_atomic(records, out_csv)
    plot_lr_finder(records, suggestions, suggestion, out_png)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tensorboard_dir)) as writer:
        for row in records.itertuples():
            writer.add_scalar("lrfinder/loss", row.loss, row.step)
            writer.add_scalar("lrfinder/smoothed_loss", row.smoothed_loss, row.step)
            writer.add_scalar("lrfinder/lr", row.lr, row.step)
    write_json_atomic(result, out_json)
    log.info("lrfinder: %d steps, suggestions %s, using %s", len(records), suggestions, suggestion)
    return result


def infer(
    *,
    checkpoint: str | Path,
    dataset_csv: str | Path,
    tag2cls_json: str | Path,
    root: str | Path,
    experiment: dict[str, Any],
    valid_folds: Sequence[int],
    seed: int,
    out_dir: str | Path,
    batch_size: int = 256,
    want_gpu: bool = False,
) -> pd.DataFrame:
    """Best model over train and valid → logits/probabilities/embeddings .npy + predictions.csv.

    Images are un-rotated and un-augmented. For rotation heads, the valid images are also
    predicted under their seeded rotation codes → heads.csv (path, head, true, predicted).
    """
    dataset = read_dataset_csv(dataset_csv, root)
    tag2cls = read_tag2cls(tag2cls_json)
    classes = sorted(tag2cls, key=tag2cls.get)
    device = select_device(want_gpu)
    model = load_model(checkpoint)
    data_cfg = experiment["data"]
    paths = dataset["path"].to_numpy()
    outputs = predict(model, eval_loader(root, paths, data_cfg, batch_size=batch_size, device=device), device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, array in outputs.items():
        save_npy_atomic(out_dir / f"{name}.npy", array.astype(np.float32))

    head = model.spec.heads[0]
    probs = outputs["probabilities"]
    is_valid = valid_mask(dataset, list(valid_folds)).to_numpy()
    # `class` is what the index's recall@k counts (the first label of multilabel images)
    predictions = pd.DataFrame(
        {"path": paths, "split": np.where(is_valid, "valid", "train"), "class": dataset["class"].to_numpy()}
    )
    if is_multilabel(dataset):
        predicted = predict_labels(probs, True, head.threshold)
        predictions["true"] = dataset["labels"].to_numpy()
        predictions["predicted"] = [";".join(classes[i] for i in np.flatnonzero(row)) for row in predicted]
        predictions["confidence"] = probs.max(axis=1)
    else:
        predictions["true"] = dataset["class"].to_numpy()
        predictions["predicted"] = probs.argmax(axis=1)
        predictions["confidence"] = probs.max(axis=1)
    write_csv_atomic(predictions, out_dir / "predictions.csv")

    rows = []
    if uses_rotation(model.spec):
        targets = class_targets(dataset, tag2cls)
        loader = eval_loader(
            root, paths[is_valid], data_cfg, batch_size=batch_size, device=device, targets=targets[is_valid],
            rotation="seeded", rotation_seed=seed, rotation_p=data_cfg["rotation_p"],
        )
        for name in SELF_SUPERVISED_HEADS:
            if name not in model.spec.heads_by_name:
                continue
            head_out = predict(model, loader, device, head=name, with_targets=True)
            rows += [
                (path, name, int(t), int(p))
                for path, t, p in zip(paths[is_valid], head_out["targets"], head_out["logits"].argmax(axis=1))
            ]
    write_csv_atomic(pd.DataFrame(rows, columns=["path", "head", "true", "predicted"]), out_dir / "heads.csv")
    return predictions


def _split_embeddings(predictions_csv: str | Path, embeddings_npy: str | Path):
    predictions = pd.read_csv(predictions_csv)
    embeddings = load_npy(embeddings_npy)
    is_train = (predictions["split"] == "train").to_numpy()
    labels = predictions["class"].to_numpy()
    return embeddings[is_train], labels[is_train], embeddings[~is_train], labels[~is_train]


def pca_index(
    *,
    predictions_csv: str | Path,
    embeddings_npy: str | Path,
    transform_npz: str | Path,
    index_bin: str | Path,
    index_json: str | Path,
    n_components: int,
    space: str,
    M: int,
    ef_construction: int,
    ef: int,
    seed: int,
) -> dict[str, Any]:
    """StandardScaler + PCA + L2 fitted on train embeddings; hnswlib index of the train vectors."""
    train_x, train_y, _, _ = _split_embeddings(predictions_csv, embeddings_npy)
    transform = knn.EmbeddingTransform.fit(train_x, n_components)
    vectors = transform.transform(train_x)
    index = knn.build_index(vectors, space=space, M=M, ef_construction=ef_construction, ef=ef, seed=seed)
    transform.save(transform_npz)
    knn.save_index(index, index_bin)
    info = {
        "n_items": int(len(vectors)),
        "dim": int(transform.n_components),
        "space": space,
        "M": M,
        "ef_construction": ef_construction,
        "ef": ef,
        "explained_variance": float(transform.explained_variance),
        "explained_variance_ratio": [float(v) for v in transform.explained_variance_ratio],
        # row i of the index is train image i in predictions.csv order; its label:
        "labels": [int(v) for v in train_y],
    }
    write_json_atomic(info, index_json)
    log.info(
        "PCA %d → %d components, explained variance %.4f; index of %d train vectors",
        train_x.shape[1], transform.n_components, transform.explained_variance, len(vectors),
    )
    return info


def evaluate_index(
    *,
    predictions_csv: str | Path,
    embeddings_npy: str | Path,
    transform_npz: str | Path,
    index_bin: str | Path,
    index_json: str | Path,
    out_json: str | Path,
    ks: Sequence[int] = (1, 3, 5, 10),
    vote_k: int = 5,
) -> dict[str, Any]:
    """Query the saved index with the valid vectors: recall@k and kNN vote accuracy."""
    _, _, valid_x, valid_y = _split_embeddings(predictions_csv, embeddings_npy)
    info = read_json(index_json)
    transform = knn.EmbeddingTransform.load(transform_npz)
    index = knn.load_index(index_bin, dim=info["dim"], space=info["space"], ef=info["ef"])
    train_labels = np.asarray(info["labels"])
    ids, distances = knn.query_index(index, transform.transform(valid_x), max(max(ks), vote_k))
    neighbour_labels = train_labels[ids]
    result: dict[str, Any] = knn.recall_at_k(valid_y, neighbour_labels, ks)
    result["knn_accuracy"] = float((knn.knn_vote(neighbour_labels, vote_k, distances) == valid_y).mean())
    result["vote_k"] = vote_k
    result["explained_variance"] = info["explained_variance"]
    result["n_train"], result["n_valid"] = info["n_items"], int(len(valid_y))
    write_json_atomic(result, out_json)
    log.info("index: %s", ", ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return result
