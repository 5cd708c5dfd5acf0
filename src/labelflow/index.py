"""The similarity index step: standardise + PCA + L2 fitted on the train embeddings, an hnswlib
KNN index of them, and its evaluation by recall@k on the valid embeddings.

The fitted transform is stored as plain arrays in an ``.npz`` so that nothing in the
workflow ever has to unpickle a file; the index uses hnswlib's own binary format. Nothing
here imports torch: the index rules run in envs/index.yaml.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from labelflow.dataset import read_predictions
from labelflow.io import PathLike, atomic_output, load_npy, read_json, write_json_atomic

log = logging.getLogger(__name__)

SPACES = ("cosine", "ip", "l2")


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, dim); got shape {arr.shape}")
    return arr


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero instead of becoming NaN."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@dataclass
class EmbeddingTransform:
    """StandardScaler -> PCA -> L2 normalisation, fitted on train embeddings."""

    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    pca_mean: np.ndarray
    components: np.ndarray  # (n_components, n_features), rows are principal axes
    explained_variance_ratio: np.ndarray

    @classmethod
    def fit(cls, embeddings: np.ndarray, n_components: int = 128) -> EmbeddingTransform:
        # Fit in float64: PCA on float32 loses noticeable precision in the small
        # components, and the stored arrays should not depend on the input dtype.
        x = _as_matrix(embeddings, "embeddings").astype(np.float64)
        n_samples, n_features = x.shape
        if n_samples < 2:
            raise ValueError(f"need at least 2 embeddings to fit PCA; got {n_samples}")
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1; got {n_components}")
        k = min(n_components, n_features, n_samples)

        # StandardScaler gives zero-variance features scale 1, so they become 0, not NaN.
        scaler = StandardScaler().fit(x)
        pca = PCA(n_components=k, svd_solver="full").fit(scaler.transform(x))
        return cls(
            scaler_mean=np.asarray(scaler.mean_, dtype=np.float64),
            scaler_scale=np.asarray(scaler.scale_, dtype=np.float64),
            pca_mean=np.asarray(pca.mean_, dtype=np.float64),
            components=np.asarray(pca.components_, dtype=np.float64),
            explained_variance_ratio=np.asarray(pca.explained_variance_ratio_, dtype=np.float64),
        )

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.components.shape[1])

    @property
    def explained_variance(self) -> float:
        """Fraction of the (standardised) variance kept by the retained components."""
        return float(np.sum(self.explained_variance_ratio))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project rows of ``x`` and L2-normalise them; returns float32 (n, n_components)."""
        arr = _as_matrix(x, "x").astype(np.float64)
        if arr.shape[1] != self.n_features:
            raise ValueError(
                f"expected embeddings with {self.n_features} features; got {arr.shape[1]}"
            )
        z = (arr - self.scaler_mean) / self.scaler_scale
        projected = (z - self.pca_mean) @ self.components.T
        return l2_normalize(projected).astype(np.float32)

    def save(self, path: PathLike) -> Path:
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

        # Write through a file object: np.savez would append ".npz" to a bare name.
        with atomic_output(path) as tmp, open(tmp, "xb") as fh:
            np.savez(fh, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: PathLike) -> EmbeddingTransform:
        with np.load(path, allow_pickle=False) as data:
            missing = [f.name for f in fields(cls) if f.name not in data.files]
            if missing:
                raise ValueError(f"{path}: not an EmbeddingTransform file, missing {missing}")
            return cls(**{f.name: data[f.name] for f in fields(cls)})


def _check_space(space: str) -> str:
    if space not in SPACES:
        raise ValueError(f"index.space must be one of {list(SPACES)}; got {space!r}")
    return space


def build_index(
    vectors: np.ndarray,
    labels: Sequence[object] | np.ndarray | None = None,
    *,
    space: str = "cosine",
    M: int = 16,
    ef_construction: int = 200,
    ef: int = 64,
    seed: int = 42,
    threads: int = 1,
) -> hnswlib.Index:
    """Build an HNSW index whose ids are the row numbers 0..n-1 of ``vectors``.

    ``threads`` > 1 builds faster, but the insertion order, and so the graph and the answers
    near ties, then vary between runs: 1 (the default) gives the same index every time.

    ``labels`` is only checked for length: class labels are looked up by the caller as
    ``labels[ids]``, which keeps the index independent of the label dtype.
    """
    _check_space(space)
    data = np.ascontiguousarray(_as_matrix(vectors, "vectors"), dtype=np.float32)
    n, dim = data.shape
    if n == 0:
        raise ValueError("cannot build an index from zero vectors")
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} vectors")

    index = hnswlib.Index(space=space, dim=dim)
    index.init_index(max_elements=n, ef_construction=ef_construction, M=M, random_seed=seed)
    index.add_items(data, np.arange(n, dtype=np.int64), num_threads=threads)
    index.set_ef(max(int(ef), 1))
    return index


def save_index(index: hnswlib.Index, path: PathLike) -> Path:
    with atomic_output(path) as tmp:
        index.save_index(str(tmp))
    return Path(path)


def load_index(path: PathLike, dim: int, space: str = "cosine", ef: int = 64) -> hnswlib.Index:
    # hnswlib's file does not record the space, so the caller must pass the same one.
    index = hnswlib.Index(space=_check_space(space), dim=dim)
    index.load_index(str(path))
    index.set_ef(max(int(ef), 1))
    return index


def query_index(
    index: hnswlib.Index, vectors: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (ids int64 (n, k'), distances float32 (n, k')) with k' = min(k, items)."""
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    data = np.ascontiguousarray(_as_matrix(vectors, "vectors"), dtype=np.float32)
    k = min(int(k), index.get_current_count())
    if data.shape[0] == 0:
        return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float32)
    # ef < k cannot return k results; raising it mutates the index, which is harmless.
    if index.ef < k:
        index.set_ef(k)
    ids, distances = index.knn_query(data, k=k, num_threads=1)
    return ids.astype(np.int64), distances.astype(np.float32)


def recall_at_k(
    query_labels: np.ndarray,
    neighbour_labels: np.ndarray,
    ks: Sequence[int] = (1, 3, 5, 10),
) -> dict[str, float]:
    """Fraction of queries with at least one same-label item among their first k neighbours.

    A k larger than the number of neighbour columns uses all of them (the key still
    names the requested k).
    """
    q = np.asarray(query_labels)
    nb = _as_matrix(neighbour_labels, "neighbour_labels")
    if q.ndim != 1 or q.shape[0] != nb.shape[0]:
        raise ValueError(f"query_labels {q.shape} does not match neighbour_labels {nb.shape}")
    if q.shape[0] == 0:
        raise ValueError("recall@k needs at least one query")
    matches = nb == q[:, None]
    result: dict[str, float] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        result[f"recall@{k}"] = float(matches[:, :k].any(axis=1).mean())
    return result


def knn_vote(
    neighbour_labels: np.ndarray, k: int, distances: np.ndarray | None = None
) -> np.ndarray:
    """Majority label among the first k neighbours of each row.

    Neighbours are assumed nearest-first; pass ``distances`` to have them sorted. A tie
    goes to the tied class that contains the nearest neighbour, so results never depend
    on label order.
    """
    nb = _as_matrix(neighbour_labels, "neighbour_labels")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if nb.shape[1] == 0:
        raise ValueError("knn_vote needs at least one neighbour per row")
    if distances is not None:
        dist = _as_matrix(distances, "distances")
        if dist.shape != nb.shape:
            raise ValueError(f"distances {dist.shape} does not match labels {nb.shape}")
        order = np.argsort(dist, axis=1, kind="stable")
        nb = np.take_along_axis(nb, order, axis=1)
    nb = nb[:, :k]

    # counts[i, j]: how many of row i's neighbours share neighbour j's label. The first position
    # with the highest count is the first occurrence of the winning class: a majority, and
    # among tied classes the one holding the nearest neighbour.
    counts = (nb[:, :, None] == nb[:, None, :]).sum(axis=2)
    return nb[np.arange(len(nb)), counts.argmax(axis=1)]


# --------------------------------------------------------------------------- the workflow step


@dataclass(frozen=True)
class IndexSettings:
    """Config section ``index`` (defaults in config/schemas/config.schema.yaml)."""

    n_components: int
    space: str
    M: int
    ef_construction: int
    ef: int
    ks: tuple[int, ...]
    vote_k: int

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> IndexSettings:
        return cls(**{**{name: section[name] for name in cls.__dataclass_fields__}, "ks": tuple(section["ks"])})


def split_embeddings(predictions_csv: PathLike, embeddings_npy: PathLike):
    """(train vectors, train classes, valid vectors, valid classes) of an infer step's outputs."""
    predictions = read_predictions(predictions_csv)
    embeddings = load_npy(embeddings_npy)
    is_train = (predictions["split"] == "train").to_numpy()
    labels = predictions["class"].to_numpy()
    return embeddings[is_train], labels[is_train], embeddings[~is_train], labels[~is_train]


def pca_index(
    *,
    predictions_csv: PathLike,
    embeddings_npy: PathLike,
    transform_npz: PathLike,
    index_bin: PathLike,
    index_json: PathLike,
    settings: IndexSettings,
    seed: int,
) -> dict[str, Any]:
    """StandardScaler + PCA + L2 fitted on train embeddings; hnswlib index of the train vectors."""
    train_x, train_y, _, _ = split_embeddings(predictions_csv, embeddings_npy)
    transform = EmbeddingTransform.fit(train_x, settings.n_components)
    vectors = transform.transform(train_x)
    index = build_index(
        vectors, space=settings.space, M=settings.M, ef_construction=settings.ef_construction, ef=settings.ef, seed=seed
    )
    transform.save(transform_npz)
    save_index(index, index_bin)
    info = {
        "n_items": int(len(vectors)),
        "dim": int(transform.n_components),
        "space": settings.space,
        "M": settings.M,
        "ef_construction": settings.ef_construction,
        "ef": settings.ef,
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


def index_metrics(
    index: hnswlib.Index,
    transform: EmbeddingTransform,
    train_labels: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    ks: Sequence[int],
    vote_k: int,
) -> dict[str, Any]:
    """recall@k and kNN-vote accuracy of the valid vectors queried against the index."""
    ids, distances = query_index(index, transform.transform(valid_x), max(max(ks), vote_k))
    neighbour_labels = np.asarray(train_labels)[ids]
    result: dict[str, Any] = recall_at_k(valid_y, neighbour_labels, ks)
    result["knn_accuracy"] = float((knn_vote(neighbour_labels, vote_k, distances) == valid_y).mean())
    result["vote_k"] = vote_k
    return result


def evaluate_index(
    *,
    predictions_csv: PathLike,
    embeddings_npy: PathLike,
    transform_npz: PathLike,
    index_bin: PathLike,
    index_json: PathLike,
    out_json: PathLike,
    settings: IndexSettings,
) -> dict[str, Any]:
    """Query the saved index with the valid vectors: recall@k and kNN vote accuracy."""
    _, _, valid_x, valid_y = split_embeddings(predictions_csv, embeddings_npy)
    info = read_json(index_json)
    transform = EmbeddingTransform.load(transform_npz)
    index = load_index(index_bin, dim=info["dim"], space=info["space"], ef=info["ef"])
    result = index_metrics(index, transform, np.asarray(info["labels"]), valid_x, valid_y, settings.ks, settings.vote_k)
    result["explained_variance"] = info["explained_variance"]
    result["n_train"], result["n_valid"] = info["n_items"], int(len(valid_y))
    write_json_atomic(result, out_json)
    log.info("index: %s", ", ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return result
