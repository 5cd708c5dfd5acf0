"""Autolabel rounds that stay near-linear: the approximate neighbour guard agrees with exact
search, and a round compares with a bounded sample of earlier pseudo-labels."""

from __future__ import annotations

import numpy as np
import pandas as pd

from labelflow.autolabel.policy import nearest_references, neighbour_recall, neighbours_agree
from labelflow.autolabel.round import RoundTables


def _clusters(n: int, classes: int = 5, dim: int = 32, seed: int = 0):
    centres = np.random.default_rng(0).normal(size=(classes, dim)) * 3  # the same classes for every call
    rng = np.random.default_rng(seed)
    labels = rng.integers(classes, size=n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def test_approximate_guard_agrees_with_exact_search():
    references, labels = _clusters(3000)
    candidates, truth = _clusters(1000, seed=1)
    tags = np.array([f"c{v}" for v in labels])
    predicted = np.array([f"c{v}" for v in truth])
    predicted[::10] = "c0"  # some wrong predictions, so both outcomes occur
    exact = neighbours_agree(references, tags, candidates, predicted, k=10, exact=True)
    approximate = neighbours_agree(references, tags, candidates, predicted, k=10)
    assert 0.2 < exact.mean() < 0.95  # the test has both answers to get right
    assert (exact == approximate).mean() >= 0.99
    assert neighbour_recall(references, candidates, 10) >= 0.95
    # nearest first, like exact search
    rows = nearest_references(references, candidates[:5], 3)
    distances = 1 - (references[rows] * candidates[:5, None]).sum(-1) / (
        np.linalg.norm(references[rows], axis=-1) * np.linalg.norm(candidates[:5, None], axis=-1)
    )
    assert (np.diff(distances, axis=1) >= -1e-6).all()


def test_guard_references_are_bounded_per_class_and_never_validation_rows():
    rows = [(f"clean/{i}.png", "a" if i % 2 else "b", 0, i % 3) for i in range(30)]  # human, folds 0-2
    rows += [(f"raw/{i}.png", "a" if i % 3 else "b", 0, -1) for i in range(1000)]  # pseudo-labels
    dataset = pd.DataFrame(rows, columns=["path", "tag", "class", "fold"])
    roles = np.where(dataset["fold"] == 2, "valid", "train")
    tables = RoundTables(dataset, roles, ["a", "b"], {"a": 0, "b": 1}, dataset[dataset["fold"] >= 0],
                         pd.DataFrame({"path": []}), {"a": 15, "b": 15})  # fmt: skip
    keep = tables.reference_rows(per_class=50, seed=0)
    assert not keep[roles == "valid"].any()
    human_train = (dataset["fold"] >= 0) & (roles == "train")
    assert keep[human_train.to_numpy()].all()  # every human training row
    pseudo = dataset[keep & (dataset["fold"] < 0).to_numpy()]
    assert pseudo.groupby("tag").size().to_dict() == {"a": 50, "b": 50}
    assert (tables.reference_rows(per_class=50, seed=0) == keep).all()  # seeded
