"""Unit tests for labelflow.label_issues: confident learning by hand, flags on seeded synthetic noise, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from labelflow.label_issues import (
    SCORE_METHODS,
    calibrate_joint,
    confident_class,
    confident_learning,
    confident_thresholds,
    count_joint,
    find_label_issues,
    flag_metrics,
    label_quality,
    make_synthetic_problem,
    neighbour_disagreement,
    neighbour_votes,
    prune_by_noise_rate,
    round_preserving_row_totals,
    validate_inputs,
)

# Eight images, three classes. Worked by hand below:
#   t = [mean(.9, .7, .2), mean(.8, .6), mean(.8, .2, .6)] = [0.6, 0.7, 0.5333]
#   confident class: 0, 0, 1 (p1 = .7 = t1), 1, none (p1 = .6 < .7), 2, 0 (p0 = .6 = t0), 2
#   raw confident joint rows (given 0, 1, 2): [2, 1, 0], [0, 1, 0], [1, 0, 2]
#   calibrated: row 1 counts 1 confident image of 2 labelled -> [0, 2, 0]; the others already sum to their counts
#   prune by noise rate: (0 -> 1) one image: largest p1 - p0 among images 0-2 is image 2;
#                        (2 -> 0) one image: largest p0 - p2 among images 5-7 is image 6
TINY_PROBS = np.array(
    [
        [0.9, 0.05, 0.05],
        [0.7, 0.2, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.8, 0.1],
        [0.1, 0.6, 0.3],
        [0.1, 0.1, 0.8],
        [0.6, 0.2, 0.2],
        [0.3, 0.1, 0.6],
    ]
)
TINY_LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2])


def test_thresholds_are_per_class_mean_self_confidence():
    np.testing.assert_allclose(confident_thresholds(TINY_PROBS, TINY_LABELS), [0.6, 0.7, 1.6 / 3])


def test_confident_joint_matches_hand_computed_example():
    thresholds = confident_thresholds(TINY_PROBS, TINY_LABELS)
    guess = confident_class(TINY_PROBS, thresholds)
    np.testing.assert_array_equal(guess, [0, 0, 1, 1, -1, 2, 0, 2])
    np.testing.assert_array_equal(count_joint(TINY_LABELS, guess, 3), [[2, 1, 0], [0, 1, 0], [1, 0, 2]])

    learning = confident_learning(TINY_PROBS, TINY_LABELS)
    np.testing.assert_array_equal(learning.calibrated_joint, [[2, 1, 0], [0, 2, 0], [1, 0, 2]])
    np.testing.assert_allclose(learning.joint.sum(), 1.0)
    np.testing.assert_allclose(learning.noise_rates, [1 / 3, 0.0, 1 / 3])
    np.testing.assert_array_equal(np.flatnonzero(learning.off_diagonal), [2, 6])
    np.testing.assert_array_equal(np.flatnonzero(learning.noise_rate_pruned), [2, 6])


def test_confident_class_is_the_most_probable_of_the_confident_classes():
    # class 0 is the most probable but under its threshold; of the confident classes 1 and 2, 1 wins
    probs = np.array([[0.5, 0.3, 0.2], [0.2, 0.1, 0.7], [0.4, 0.25, 0.35]])
    np.testing.assert_array_equal(confident_class(probs, np.array([0.9, 0.25, 0.1])), [1, 2, 2])
    np.testing.assert_array_equal(confident_class(probs, np.array([0.9, 0.9, 0.9])), [-1, -1, -1])


def test_calibration_gives_an_empty_diagonal_one_image_instead_of_full_noise():
    raw = np.array([[0, 3], [0, 5]])
    calibrated = calibrate_joint(raw, np.array([4, 5]))
    np.testing.assert_array_equal(calibrated.sum(axis=1), [4, 5])
    np.testing.assert_array_equal(calibrated, [[1, 3], [0, 5]])


def test_round_preserving_row_totals_keeps_totals_and_stays_within_one():
    rng = np.random.default_rng(0)
    matrix = rng.dirichlet(np.ones(7), size=50) * rng.integers(1, 500, size=(50, 1))
    rounded = round_preserving_row_totals(matrix)
    np.testing.assert_array_equal(rounded.sum(axis=1), np.round(matrix.sum(axis=1)))
    assert np.abs(rounded - matrix).max() < 1.0
    # tied remainders: the earlier column gets the +1
    np.testing.assert_array_equal(round_preserving_row_totals(np.array([[0.6, 0.6, 0.8]])), [[1, 0, 1]])


def test_prune_by_noise_rate_takes_the_largest_margins_and_keeps_one_per_class():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.2, 0.8]])
    labels = np.array([0, 0, 0, 0, 1])
    # two images labelled 0 to prune towards 1: the largest p1 - p0 are images 2 (0.4) and 3 (0.1)
    np.testing.assert_array_equal(prune_by_noise_rate(probs, labels, np.array([[2, 2], [0, 1]])), [0, 0, 1, 1, 0])
    # asking for all four still leaves one image of class 0 unflagged (the one most like class 0)
    np.testing.assert_array_equal(prune_by_noise_rate(probs, labels, np.array([[0, 4], [0, 1]])), [0, 1, 1, 1, 0])


def test_find_label_issues_on_the_tiny_example():
    result = find_label_issues(
        TINY_PROBS, TINY_LABELS, classes=["a", "b", "c"], paths=[f"img{i}.png" for i in range(8)]
    )
    # worst first: normalized margin (0.2 - 0.7 + 1) / 2 = 0.25 for image 2, (0.2 - 0.6 + 1) / 2 = 0.3 for image 6
    assert result.issues["path"].tolist() == ["img2.png", "img6.png"]
    assert result.issues["label_quality"].tolist() == pytest.approx([0.25, 0.3])
    assert result.issues["suggested_label"].tolist() == ["b", "a"]
    assert result.issues["given_label"].tolist() == ["a", "c"]
    assert result.issues["rank"].tolist() == [1, 2]
    assert result.summary["confused_pairs"][0] == {"given": "a", "true": "b", "estimated_images": 1, "flagged": 1}
    assert result.summary["noise_rate_per_class"] == pytest.approx({"a": 1 / 3, "b": 0.0, "c": 1 / 3})


@pytest.mark.parametrize("noise_rate, min_precision, min_recall", [(0.1, 0.88, 0.95), (0.2, 0.93, 0.95)])
def test_flags_find_injected_flips_better_than_argmax(noise_rate, min_precision, min_recall):
    problem = make_synthetic_problem(2000, noise_rate=noise_rate, seed=0)
    result = find_label_issues(problem.probs, problem.labels, problem.neighbour_labels)
    flagged = result.scores["flagged"].to_numpy()
    ours = flag_metrics(flagged, problem.flipped)
    baseline = flag_metrics(problem.probs.argmax(axis=1) != problem.labels, problem.flipped)
    assert ours["precision"] >= min_precision and ours["recall"] >= min_recall, ours
    assert ours["f1"] > baseline["f1"], (ours, baseline)
    # the suggestion for a caught flip is nearly always the class it was flipped from
    caught = flagged & problem.flipped
    assert (result.scores["suggested_index"].to_numpy()[caught] == problem.true_labels[caught]).mean() >= 0.97
    # flagged images rank among the lowest label quality
    assert result.scores.loc[flagged, "label_quality"].max() < 0.5


@pytest.mark.parametrize("noise_rate", [0.1, 0.2])
def test_noise_rate_estimates_are_close_to_the_injected_rates(noise_rate):
    problem = make_synthetic_problem(2000, noise_rate=noise_rate, seed=0)
    summary = find_label_issues(problem.probs, problem.labels, problem.neighbour_labels).summary
    injected = np.array([problem.flipped[problem.labels == c].mean() for c in range(10)])
    estimated = np.array(list(summary["noise_rate_per_class"].values()))
    assert abs(summary["estimated_noise_rate"] - problem.flipped.mean()) < 0.015
    assert np.abs(estimated - injected).mean() < 0.015
    # the structured pairs are the most confused ones
    top = {(p["given"], p["true"]) for p in summary["confused_pairs"][:4]}
    assert top == {("4", "9"), ("9", "4"), ("3", "5"), ("5", "3")}


def test_neighbours_raise_precision_and_recall_where_probs_are_ambiguous():
    # A weak classifier (Dirichlet probs only mildly favouring the true class) and an independent,
    # better neighbourhood (80 % of neighbours carry the true class): the digits-with-pixel-kNN case.
    rng = np.random.default_rng(1)
    n_images, n_classes, k = 3000, 10, 10
    true_labels = rng.integers(0, n_classes, n_images)
    flipped = rng.random(n_images) < 0.1
    labels = np.where(flipped, (true_labels + rng.integers(1, n_classes, n_images)) % n_classes, true_labels)
    alpha = np.ones((n_images, n_classes))
    alpha[np.arange(n_images), true_labels] = 4.0
    probs = np.stack([rng.dirichlet(a) for a in alpha])
    neighbours = np.where(
        rng.random((n_images, k)) < 0.8, true_labels[:, None], rng.integers(0, n_classes, (n_images, k))
    )

    alone = flag_metrics(find_label_issues(probs, labels).scores["flagged"], flipped)
    with_neighbours = flag_metrics(find_label_issues(probs, labels, neighbours).scores["flagged"], flipped)
    assert with_neighbours["precision"] > alone["precision"] + 0.1, (alone, with_neighbours)
    assert with_neighbours["recall"] > alone["recall"] + 0.05, (alone, with_neighbours)


def test_neighbour_padding_is_ignored():
    neighbours = np.array([[1, 1, -1], [-1, -1, -1], [0, 1, 2]])
    votes = neighbour_votes(neighbours, 3)
    np.testing.assert_array_equal(votes, [[0, 2, 0], [0, 0, 0], [1, 1, 1]])
    disagreement = neighbour_disagreement(votes, np.array([0, 0, 0]))
    np.testing.assert_allclose(disagreement[[0, 2]], [1.0, 2 / 3])
    assert np.isnan(disagreement[1])


def test_label_quality_methods():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    labels = np.array([0, 2, 0])
    np.testing.assert_allclose(label_quality(probs, labels, "self_confidence"), [0.7, 0.3, 0.0])
    np.testing.assert_allclose(label_quality(probs, labels, "normalized_margin"), [0.75, 0.4, 0.0])
    assert set(SCORE_METHODS) == {"self_confidence", "normalized_margin"}


def test_scores_issues_and_summary_are_complete_and_json_ready():
    problem = make_synthetic_problem(500, noise_rate=0.1, seed=3)
    paths = [f"raw/{i}.png" for i in range(500)]
    result = find_label_issues(
        problem.probs, problem.labels, problem.neighbour_labels, classes=[f"digit{i}" for i in range(10)], paths=paths
    )
    scores = result.scores
    assert scores["path"].tolist() == paths  # input order
    assert sorted(scores["rank"]) == list(range(1, 501))
    assert scores["label_quality"].between(0, 1).all()
    for column in ("flagged", "model_disagrees", "neighbours_disagree", "confident_joint", "noise_rate_pruned"):
        assert scores[column].dtype == bool, column
    assert result.issues["flagged"].all() and len(result.issues) == scores["flagged"].sum()
    assert result.issues["rank"].is_monotonic_increasing
    assert (result.issues["suggested_label"] != result.issues["given_label"]).all()
    json.loads(json.dumps(result.summary))  # plain types only
    assert result.summary["n_flagged"] == len(result.issues)
    assert result.summary["parameters"]["neighbours"] == 10
    json.loads(scores.to_json(orient="records"))

    without = find_label_issues(problem.probs, problem.labels)
    assert without.scores["neighbour_disagreement"].isna().all()
    assert not without.scores["neighbours_disagree"].any()
    assert list(without.scores.columns) == list(scores.columns)
    assert isinstance(without.scores, pd.DataFrame) and without.summary["parameters"]["neighbours"] == 0


def test_agrees_with_cleanlab_prune_by_noise_rate():
    cleanlab_filter = pytest.importorskip("cleanlab.filter")  # benchmark-only dependency
    cleanlab_count = pytest.importorskip("cleanlab.count")
    problem = make_synthetic_problem(2000, noise_rate=0.2, seed=0)
    probs, labels, _ = validate_inputs(problem.probs, problem.labels)
    learning = confident_learning(probs, labels)
    theirs_joint = cleanlab_count.compute_confident_joint(problem.labels, problem.probs)
    # the same up to the order among tied rounding remainders
    assert np.abs(learning.calibrated_joint - theirs_joint).sum() <= 2 * 10
    ours = learning.noise_rate_pruned & (probs.argmax(axis=1) != labels)
    theirs = cleanlab_filter.find_label_issues(problem.labels, problem.probs)
    assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.98


GOOD_PROBS = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
GOOD_LABELS = np.array([0, 1, 0])


@pytest.mark.parametrize(
    "probs, labels, neighbours, message",
    [
        (np.array([0.5, 0.5]), [0], None, "2-D array"),
        (np.ones((3, 1)), [0, 0, 0], None, "2 classes"),
        (np.array([[2.0, -1.0], [0.5, 0.5], [0.5, 0.5]]), GOOD_LABELS, None, "not logits"),
        (np.array([[0.8, 0.3], [0.3, 0.7], [0.6, 0.4]]), GOOD_LABELS, None, "sum to 1.*first row 0"),
        (np.array([[np.nan, 0.5], [0.3, 0.7], [0.6, 0.4]]), GOOD_LABELS, None, "finite"),
        (GOOD_PROBS, [0, 1], None, r"labels must have shape \(3,\)"),
        (GOOD_PROBS, [0, 2, 0], None, r"0\.\.1.*found \[2\]"),
        (GOOD_PROBS, [0, -1, 0], None, r"found \[-1\]"),
        (GOOD_PROBS, [0.0, 0.5, 0.0], None, "integer class indices"),
        (GOOD_PROBS, [0, 0, 0], None, r"classes \[1\] have no labelled images"),
        (GOOD_PROBS, GOOD_LABELS, np.zeros((2, 3), dtype=int), r"neighbour_labels must have shape \(3, k\)"),
        (GOOD_PROBS, GOOD_LABELS, np.zeros(3, dtype=int), r"neighbour_labels must have shape \(3, k\)"),
        (GOOD_PROBS, GOOD_LABELS, np.full((3, 2), 5), r"-1 \(no neighbour\) or 0\.\.1"),
    ],
)
def test_bad_inputs_raise_clear_errors(probs, labels, neighbours, message):
    with pytest.raises(ValueError, match=message):
        find_label_issues(probs, labels, neighbours)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": ["a"]}, "2 distinct names"),
        ({"classes": ["a", "a"]}, "2 distinct names"),
        ({"paths": ["x.png"]}, r"one entry per probs row \(3\)"),
        ({"score_method": "entropy"}, "unknown score_method"),
        ({"neighbour_weight": -1.0}, "neighbour_weight"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        find_label_issues(GOOD_PROBS, GOOD_LABELS, **kwargs)
