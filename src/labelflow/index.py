"""Embedding post-processing (standardise + PCA + L2) and an hnswlib KNN index.

The fitted transform is stored as plain arrays in an ``.npz`` so that nothing in the
workflow ever has to unpickle a file; the index uses hnswlib's own binary format.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import hnswlib
import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from labelflow.data import atomic_output

SPACES = ("cosine", "ip", "l2")

PathLike = str | os.PathLike[str]


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
) -> hnswlib.Index:
    """Build an HNSW index whose ids are the row numbers 0..n-1 of ``vectors``.

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
    # One thread: with several, insertion order (and hence the graph) varies between runs.
    index.add_items(data, np.arange(n, dtype=np.int64), num_threads=1)
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

    votes = np.empty(nb.shape[0], dtype=nb.dtype)
    for i, row in enumerate(nb):
        classes, first_pos, counts = np.unique(row, return_index=True, return_counts=True)
        tied = np.flatnonzero(counts == counts.max())
        votes[i] = classes[tied[np.argmin(first_pos[tied])]]
    return votes


def evaluate_index(
    train_vectors: np.ndarray,
    train_labels: np.ndarray,
    valid_vectors: np.ndarray,
    valid_labels: np.ndarray,
    *,
    ks: Sequence[int] = (1, 3, 5, 10),
    vote_k: int = 5,
    space: str = "cosine",
    M: int = 16,
    ef_construction: int = 200,
    ef: int = 64,
    seed: int = 42,
) -> dict[str, float | int]:
    """Index the train set, query it with the valid set; JSON-ready recall@k and KNN accuracy."""
    train_labels = np.asarray(train_labels)
    valid_labels = np.asarray(valid_labels)
    if len(valid_labels) != len(valid_vectors):
        raise ValueError(f"got {len(valid_labels)} labels for {len(valid_vectors)} vectors")
    index = build_index(
        train_vectors, train_labels, space=space, M=M, ef_construction=ef_construction,
        ef=ef, seed=seed,
    )
    ids, distances = query_index(index, valid_vectors, max(max(ks), vote_k))
    neighbour_labels = train_labels[ids]

    metrics: dict[str, float | int] = dict(recall_at_k(valid_labels, neighbour_labels, ks))
    predicted = knn_vote(neighbour_labels, vote_k, distances)
    metrics["knn_accuracy"] = float(np.mean(predicted == valid_labels))
    metrics["n_train"] = int(len(train_labels))
    metrics["n_valid"] = int(len(valid_labels))
    return metrics
