"""The workflow's steps as plain functions: each Snakemake script calls exactly one of these.

Inputs are files written by earlier steps plus plain values from the validated config;
outputs are written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from labelflow import index as knn
from labelflow.data import DatasetError, read_dataset_csv, read_tag2cls, valid_mask, write_csv_atomic, write_json_atomic
from labelflow.inference import predict
from labelflow.loaders import ImageTableDataset, build_transform, make_loader
from labelflow.models import HeadSpec, ModelSpec, create_model, load_model, load_weights_into
from labelflow.training import StageSpec, file_digest, fingerprint, run_stage, select_device

log = logging.getLogger(__name__)


def model_spec(experiment: dict[str, Any], num_classes: int) -> ModelSpec:
    """The experiment's model section with head sizes filled in from the data."""
    heads = []
    for head in experiment["heads"]:
        if head["name"] == "class":
            num_outputs = num_classes  # the class count always comes from the data
        elif "num_outputs" in head:
            num_outputs = head["num_outputs"]
        else:
            raise ValueError(f"head {head['name']!r} needs `num_outputs` in the experiment file")
        heads.append(HeadSpec(head["name"], num_outputs, head["loss"], head["weight"], head.get("params", {})))
    m = experiment["model"]
    return ModelSpec(
        arch=m["arch"], heads=heads, embedding_size=m["embedding_size"], dropout=m["dropout"],
        small_input=m["small_input"],
    )


def _datasets(dataset: pd.DataFrame, root: str | Path, data_cfg: dict[str, Any], seed: int, train_augment: bool = True):
    norm = {"mean": data_cfg["mean"], "std": data_cfg["std"]}
    train_tf = build_transform(data_cfg["augmentations"], train=train_augment, seed=seed, **norm)
    eval_tf = build_transform(train=False, **norm)
    return train_tf, eval_tf


def _loader_options(data_cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {"num_workers": data_cfg["num_workers"], "pin_memory": device.type == "cuda"}


def train_stage(
    *,
    dataset_csv: str | Path,
    tag2cls_json: str | Path,
    root: str | Path,
    experiment: dict[str, Any],
    stage: str,
    valid_folds: Sequence[int],
    seed: int,
    out_dir: str | Path,
    state_dir: str | Path,
    init_checkpoint: str | Path | None = None,
    want_gpu: bool = False,
) -> dict[str, Any]:
    """Train one stage of an experiment; stage2 starts from stage1's best weights."""
    dataset = read_dataset_csv(dataset_csv, root)
    tag2cls = read_tag2cls(tag2cls_json)
    spec = model_spec(experiment, len(tag2cls))
    stage_spec = StageSpec.from_dict(stage, experiment["stages"][stage])
    device = select_device(want_gpu)

    is_valid = valid_mask(dataset, list(valid_folds))
    train_df, valid_df = dataset[~is_valid], dataset[is_valid]
    if len(train_df) == 0 or len(valid_df) == 0:
        raise DatasetError(f"{dataset_csv}: valid_folds {list(valid_folds)} leave no train or no valid images")
    data_cfg = experiment["data"]
    train_tf, eval_tf = _datasets(dataset, root, data_cfg, seed)
    size, cache = data_cfg["image_size"], data_cfg["cache"]
    train_ds = ImageTableDataset(root, train_df["path"], train_df["class"], size, train_tf, cache)
    valid_ds = ImageTableDataset(root, valid_df["path"], valid_df["class"], size, eval_tf, cache)
    options = _loader_options(data_cfg, device)
    batch = stage_spec.batch_size
    # drop_last avoids a 1-image BatchNorm batch at the end of an epoch
    train_loader = make_loader(train_ds, batch_size=batch, shuffle=True, seed=seed, drop_last=len(train_ds) > batch, **options)
    valid_loader = make_loader(valid_ds, batch_size=batch, shuffle=False, seed=seed, **options)

    torch.manual_seed(seed)  # model initialisation
    weights = experiment["model"]["weights"] if init_checkpoint is None else "none"
    model = create_model(spec, weights)
    if init_checkpoint is not None:
        load_weights_into(model, init_checkpoint)
        log.info("initialised from %s", init_checkpoint)
    stage_fp = fingerprint(
        spec.to_dict(), experiment["stages"][stage], data_cfg, seed, list(valid_folds),
        file_digest(dataset_csv), file_digest(init_checkpoint) if init_checkpoint else None,
        experiment["model"]["weights"],
    )
    return run_stage(
        model, train_loader, valid_loader, stage_spec,
        out_dir=out_dir, state_dir=state_dir, device=device, seed=seed, stage_fingerprint=stage_fp,
    )


def infer(
    *,
    checkpoint: str | Path,
    dataset_csv: str | Path,
    root: str | Path,
    experiment: dict[str, Any],
    valid_folds: Sequence[int],
    out_dir: str | Path,
    batch_size: int = 256,
    want_gpu: bool = False,
) -> pd.DataFrame:
    """Best model over train and valid → logits/probabilities/embeddings .npy + predictions.csv."""
    dataset = read_dataset_csv(dataset_csv, root)
    device = select_device(want_gpu)
    model = load_model(checkpoint)
    data_cfg = experiment["data"]
    _, eval_tf = _datasets(dataset, root, data_cfg, 0)
    ds = ImageTableDataset(root, dataset["path"], None, data_cfg["image_size"], eval_tf, data_cfg["cache"])
    loader = make_loader(ds, batch_size=batch_size, shuffle=False, seed=0, **_loader_options(data_cfg, device))
    outputs = predict(model, loader, device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, array in outputs.items():
        save_npy_atomic(out_dir / f"{name}.npy", array.astype(np.float32))
    probs = outputs["probabilities"]
    predictions = pd.DataFrame(
        {
            "path": dataset["path"].to_numpy(),
            "split": np.where(valid_mask(dataset, list(valid_folds)), "valid", "train"),
            "true": dataset["class"].to_numpy(),
            "predicted": probs.argmax(axis=1),
            "confidence": probs.max(axis=1),
        }
    )
    write_csv_atomic(predictions, out_dir / "predictions.csv")
    return predictions


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    tmp.replace(path)


def load_npy(path: str | Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _split_embeddings(predictions_csv: str | Path, embeddings_npy: str | Path):
    predictions = pd.read_csv(predictions_csv)
    embeddings = load_npy(embeddings_npy)
    is_train = (predictions["split"] == "train").to_numpy()
    labels = predictions["true"].to_numpy()
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
    with open(index_json, encoding="utf-8") as f:
        info = json.load(f)
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
