from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler, normalize

from labelflow.index import (
    EmbeddingTransform,
    build_index,
    index_metrics,
    knn_vote,
    load_index,
    query_index,
    recall_at_k,
    save_index,
)


def _clusters(
    n_per_class: int, n_classes: int = 4, dim: int = 16, spread: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Tight gaussian blobs around random unit directions: trivially separable."""
    rng = np.random.default_rng(seed)
    centres = normalize(rng.normal(size=(n_classes, dim)))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    return x.astype(np.float32), labels


# --- EmbeddingTransform -------------------------------------------------------------


def test_transform_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 32)) * rng.uniform(0.1, 10.0, size=32) + 3.0
    x[:, 5] = 7.0  # a zero-variance feature must not produce NaN
    t = EmbeddingTransform.fit(x, n_components=8)

    scaler = StandardScaler().fit(x)
    pca = PCA(n_components=8, svd_solver="full").fit(scaler.transform(x))
    new = rng.normal(size=(20, 32)) * 2.0
    expected = normalize(pca.transform(scaler.transform(new)))

    out = t.transform(new)
    assert out.dtype == np.float32 and out.shape == (20, 8)
    assert np.allclose(out, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert t.scaler_scale[5] == 1.0


def test_transform_zero_rows_stay_zero() -> None:
    t = EmbeddingTransform.fit(np.random.default_rng(2).normal(size=(50, 6)), n_components=6)
    t.pca_mean = np.zeros_like(t.pca_mean)  # so the scaler mean projects to exactly 0
    out = t.transform(t.scaler_mean[None, :])
    assert np.array_equal(out, np.zeros((1, 6), np.float32))


def test_n_components_clipped_and_explained_variance() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 10))
    full = EmbeddingTransform.fit(x, n_components=128)
    assert full.n_components == 10
    assert full.explained_variance == pytest.approx(1.0)

    few_samples = EmbeddingTransform.fit(x[:6], n_components=128)
    assert few_samples.n_components == 6

    part = EmbeddingTransform.fit(x, n_components=3)
    assert part.n_components == 3
    assert 0.0 < part.explained_variance < 1.0
    assert isinstance(part.explained_variance, float)


def test_transform_rejects_wrong_width() -> None:
    t = EmbeddingTransform.fit(np.random.default_rng(4).normal(size=(20, 5)), n_components=2)
    with pytest.raises(ValueError, match="5 features"):
        t.transform(np.zeros((3, 4)))


def test_transform_save_load_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 12))
    t = EmbeddingTransform.fit(x, n_components=4)
    path = t.save(tmp_path / "sub" / "transform.npz")
    assert path == tmp_path / "sub" / "transform.npz"
    assert sorted(p.name for p in path.parent.iterdir()) == ["transform.npz"]  # no temp left

    # Every member is a plain array: loading without pickle must work.
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {
            "scaler_mean", "scaler_scale", "pca_mean", "components", "explained_variance_ratio"
        }
    with zipfile.ZipFile(path) as zf:
        assert all(name.endswith(".npy") for name in zf.namelist())

    loaded = EmbeddingTransform.load(path)
    for name in ("scaler_mean", "scaler_scale", "pca_mean", "components",
                 "explained_variance_ratio"):
        a, b = getattr(t, name), getattr(loaded, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert np.array_equal(loaded.transform(x), t.transform(x))


# --- recall@k and voting -------------------------------------------------------------


def test_recall_at_k_hand_made() -> None:
    queries = np.array([0, 1, 2, 3])
    neighbours = np.array([
        [0, 1, 1],  # hit at 1
        [1, 0, 0],  # hit at 1
        [0, 0, 2],  # hit at 3
        [0, 1, 2],  # never
    ])
    r = recall_at_k(queries, neighbours, ks=(1, 2, 3, 10))
    assert r == {"recall@1": 0.5, "recall@2": 0.5, "recall@3": 0.75, "recall@10": 0.75}


def test_recall_at_k_string_labels() -> None:
    r = recall_at_k(np.array(["cat", "dog"]), np.array([["dog", "cat"], ["dog", "dog"]]), ks=(1, 2))
    assert r == {"recall@1": 0.5, "recall@2": 1.0}


def test_knn_vote_majority_and_tie() -> None:
    neighbours = np.array([
        [2, 1, 1, 2, 1],  # majority 1
        [3, 4, 4, 3, 5],  # 3 and 4 tie on two votes; 3 is nearest
        [4, 3, 3, 4, 5],  # same tie the other way round: 4 is nearest
    ])
    assert knn_vote(neighbours, k=5).tolist() == [1, 3, 4]
    assert knn_vote(neighbours, k=1).tolist() == [2, 3, 4]
    # k=2 on row 0: 2 and 1 tie with one vote each; 2 is nearer.
    assert knn_vote(neighbours, k=2)[0] == 2


def test_knn_vote_uses_distances_for_order() -> None:
    neighbours = np.array([[3, 4, 4, 3]])
    distances = np.array([[0.4, 0.1, 0.3, 0.2]])  # nearest is the first 4
    assert knn_vote(neighbours, k=4, distances=distances).tolist() == [4]
    assert knn_vote(neighbours, k=4).tolist() == [3]


# --- hnswlib index ---------------------------------------------------------------------


def test_index_recall_on_separated_clusters() -> None:
    x, y = _clusters(60, seed=10)
    is_valid = np.arange(len(y)) % 6 == 0  # 10 of each class's 60 held out
    train_x, train_y, valid_x, valid_y = x[~is_valid], y[~is_valid], x[is_valid], y[is_valid]
    transform = EmbeddingTransform.fit(train_x, 8)
    index = build_index(transform.transform(train_x))
    metrics = index_metrics(index, transform, train_y, valid_x, valid_y, ks=(1, 5), vote_k=5)
    assert metrics == {"recall@1": 1.0, "recall@5": 1.0, "knn_accuracy": 1.0, "vote_k": 5}
    json.dumps(metrics)  # plain Python types only
    assert all(type(v) in (float, int) for v in metrics.values())


@pytest.mark.parametrize("space", ["cosine", "l2", "ip"])
def test_index_matches_brute_force(space: str) -> None:
    rng = np.random.default_rng(20)
    base = normalize(rng.normal(size=(400, 24))).astype(np.float32)
    queries = normalize(rng.normal(size=(50, 24))).astype(np.float32)
    k = 10
    index = build_index(base, space=space)
    ids, dist = query_index(index, queries, k)
    assert ids.dtype == np.int64 and dist.dtype == np.float32 and ids.shape == (50, k)

    if space == "l2":  # hnswlib reports squared L2
        brute = ((queries[:, None, :] - base[None, :, :]) ** 2).sum(-1)
    else:  # unit vectors: cosine distance == inner-product distance
        brute = 1.0 - queries @ base.T
    expected = np.argsort(brute, axis=1, kind="stable")[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, expected)])
    assert overlap >= 0.99
    assert np.allclose(dist, np.take_along_axis(brute, ids, axis=1), atol=1e-4)


def test_index_save_load_identical(tmp_path: Path) -> None:
    x, _ = _clusters(30, dim=8, seed=30)
    index = build_index(x, ef=32)
    before = query_index(index, x[:20], 5)

    path = save_index(index, tmp_path / "knn.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knn.bin"]
    loaded = load_index(path, dim=8, space="cosine", ef=32)
    after = query_index(loaded, x[:20], 5)
    assert loaded.get_current_count() == len(x)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])


def test_index_deterministic_for_seed() -> None:
    rng = np.random.default_rng(40)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    q = rng.normal(size=(30, 16)).astype(np.float32)
    # Low ef/M make the result depend on the graph, so identical output means an identical graph.
    a = query_index(build_index(x, M=4, ef_construction=10, ef=5, seed=7), q, 5)
    b = query_index(build_index(x, M=4, ef_construction=10, ef=5, seed=7), q, 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_query_k_clipped_to_index_size() -> None:
    x = np.eye(3, dtype=np.float32)
    index = build_index(x, ef=1)
    ids, dist = query_index(index, x, k=10)
    assert ids.shape == (3, 3)
    assert ids[:, 0].tolist() == [0, 1, 2]
    assert np.allclose(dist[:, 0], 0.0, atol=1e-6)
    assert index.ef >= 3


def test_bad_space_names_config_key(tmp_path: Path) -> None:
    x = np.ones((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"index\.space"):
        build_index(x, space="euclid")
    with pytest.raises(ValueError, match=r"index\.space"):
        load_index(tmp_path / "missing.bin", dim=2, space="dot")


def test_build_index_checks_label_length() -> None:
    with pytest.raises(ValueError, match="labels"):
        build_index(np.ones((4, 2), dtype=np.float32), labels=[0, 1, 2])
