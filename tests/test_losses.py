"""Tests for labelflow.losses: values checked against hand-written formulas, not torch's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labelflow.losses import LOSSES, get_loss, probabilities

LOGITS = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
TARGETS = [2, 0]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(x: float, y: float) -> float:
    """Binary cross entropy on one logit, written out from the definition."""
    p = _sigmoid(x)
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def _hand_bce_mean(logits, targets) -> float:
    terms = []
    for row, t in zip(logits, targets):
        for j, x in enumerate(row):
            terms.append(_bce(x, 1.0 if j == t else 0.0))
    return sum(terms) / len(terms)


def test_cross_entropy_matches_hand_computed_value():
    # loss_i = log(sum_j exp(z_ij)) - z_i,target ; mean over rows.
    row0 = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(3.0)) - 3.0
    row1 = math.log(math.exp(0.5) + math.exp(-1.0) + math.exp(0.0)) - 0.5
    expected = (row0 + row1) / 2
    assert expected == pytest.approx(0.50587, abs=1e-4)  # sanity of the hand formula itself
    loss = get_loss("cross_entropy").build()(torch.tensor(LOGITS), torch.tensor(TARGETS))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_accepts_float_targets_as_class_indices():
    crit = get_loss("cross_entropy").build()
    a = crit(torch.tensor(LOGITS), torch.tensor(TARGETS))
    b = crit(torch.tensor(LOGITS), torch.tensor([2.0, 0.0]))
    assert float(a) == float(b)


def test_cross_entropy_label_smoothing_hand_value():
    eps = 0.1
    logits, t = LOGITS[0], 2
    lse = math.log(sum(math.exp(z) for z in logits))
    nll = [lse - z for z in logits]
    expected = (1 - eps) * nll[t] + eps * sum(nll) / 3
    loss = get_loss("cross_entropy").build(label_smoothing=eps)(torch.tensor([logits]), torch.tensor([t]))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_bce_integer_targets_equal_bce_on_one_hot_rows():
    expected = _hand_bce_mean(LOGITS, TARGETS)
    crit = get_loss("bce").build()
    loss_int = crit(torch.tensor(LOGITS), torch.tensor(TARGETS))
    assert float(loss_int) == pytest.approx(expected, rel=1e-6)
    # Multi-hot (2-D) targets pass through unchanged: the explicit one-hot rows give the same.
    one_hot = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(crit(torch.tensor(LOGITS), one_hot)) == pytest.approx(expected, rel=1e-6)


def test_focal_gamma0_alpha_half_is_half_bce():
    focal = get_loss("focal").build(gamma=0.0, alpha=0.5)
    loss = focal(torch.tensor(LOGITS), torch.tensor(TARGETS))
    assert float(loss) == pytest.approx(0.5 * _hand_bce_mean(LOGITS, TARGETS), rel=1e-6)


def test_focal_hand_checkable_case():
    # logits [0, 2], target class 0 → one-hot [1, 0].
    # element 0: positive, p = 0.5, p_t = 0.5, alpha_t = 0.25, bce = log 2
    # element 1: negative, p = s(2), p_t = 1 - s(2), alpha_t = 0.75, bce = log(1 + e^2)
    s2 = _sigmoid(2.0)
    e0 = 0.25 * (1 - 0.5) ** 2 * math.log(2.0)
    e1 = 0.75 * s2**2 * math.log(1.0 + math.exp(2.0))
    expected = (e0 + e1) / 2
    focal = get_loss("focal").build(gamma=2.0, alpha=0.25)
    loss = focal(torch.tensor([[0.0, 2.0]]), torch.tensor([0]))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # The default parameters are gamma=2, alpha=0.25.
    assert float(get_loss("focal").build()(torch.tensor([[0.0, 2.0]]), torch.tensor([0]))) == pytest.approx(
        expected, rel=1e-6
    )


def test_focal_down_weights_easy_examples_relative_to_bce():
    # A confidently correct element contributes far less under focal than under plain BCE.
    logits, targets = torch.tensor([[6.0, -6.0]]), torch.tensor([0])
    focal = float(get_loss("focal").build(gamma=2.0, alpha=0.5)(logits, targets))
    bce = float(get_loss("bce").build()(logits, targets))
    assert focal < 0.5 * bce * 1e-3


def test_registry_activations():
    assert set(LOSSES) >= {"cross_entropy", "bce", "focal"}
    assert get_loss("cross_entropy").activation == "softmax"
    assert get_loss("bce").activation == "sigmoid"
    assert get_loss("focal").activation == "sigmoid"


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError) as info:
        get_loss("hinge")
    message = str(info.value)
    assert "'hinge'" in message
    for name in ("bce", "cross_entropy", "focal"):
        assert name in message


def test_probabilities_softmax_rows_sum_to_one():
    logits = torch.tensor(LOGITS)
    probs = probabilities(logits, "softmax")
    assert probs.shape == (2, 3) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), np.ones(2), atol=1e-12)
    denom = math.exp(1.0) + math.exp(2.0) + math.exp(3.0)
    assert float(probs[0, 2]) == pytest.approx(math.exp(3.0) / denom, rel=1e-6)
    assert probs.argmax(axis=1).tolist() == [2, 0]
    # the same from numpy input, and a temperature divides the logits first
    np.testing.assert_array_equal(probabilities(np.asarray(LOGITS), "softmax"), probs)
    np.testing.assert_allclose(probabilities(logits, "softmax", temperature=2.0), probabilities(logits / 2, "softmax"))
    with pytest.raises(ValueError, match="activation"):
        probabilities(logits, "tanh")


def test_probabilities_sigmoid_is_elementwise():
    logits = torch.tensor(LOGITS)
    probs = probabilities(logits, "sigmoid")
    expected = np.array([[_sigmoid(x) for x in row] for row in LOGITS])
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    # Rows are independent probabilities, not a distribution.
    assert float(probs[0].sum()) == pytest.approx(sum(_sigmoid(x) for x in LOGITS[0]), rel=1e-6)
    assert float(probs[0].sum()) > 1.5


def test_probabilities_unknown_activation():
    with pytest.raises(ValueError, match="tanh"):
        probabilities(torch.zeros(1, 2), "tanh")
