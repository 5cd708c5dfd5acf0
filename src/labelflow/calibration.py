"""Confidence calibration: one temperature fitted on validation logits, and the ECE that checks it.

Temperature scaling (Guo et al. 2017) divides every logit by one scalar ``T`` fitted by
minimising the negative log-likelihood of held-out (validation) labels. It never changes
which class is predicted, only how confident the prediction claims to be, so that a
calibrated confidence of 0.9 means about 90 % of such predictions are right.

Softmax heads (cross-entropy) use the softmax NLL. Sigmoid heads (BCE, focal) give each
class an independent probability; there ``T`` minimises the binary cross-entropy of
``sigmoid(logits / T)`` against the one-hot (or multi-hot) targets, and a row's confidence
is the calibrated sigmoid of its predicted (top) class.

Autolabel fits T on a small human validation fold. When the model gets every validation
image right, the NLL keeps falling as T -> 0, and a free fit returns the lower bound: every
confidence becomes 1.0 and any threshold accepts everything (measured on digits: the last
round accepted 56 of 57 leftover images at 75 % precision). :func:`calibrate` therefore takes
a ``min_temperature``; autolabel's default 1.0 lets calibration soften an overconfident model
but never make it surer of itself than its own softmax.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from labelflow.losses import ACTIVATIONS, probabilities

# Bounds on T: a tiny validation set that is all correct would otherwise drive T to 0
# (every confidence 1.0); one that is mostly wrong would drive it to infinity.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
ECE_BINS = 15


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _targets_matrix(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(targets))
    if t.ndim == 1:
        return F.one_hot(t.long(), num_classes).double()
    return t.double()


def nll(logits: np.ndarray, targets: np.ndarray, activation: str, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` under ``logits / temperature``."""
    _check_activation(activation)
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature
    if len(z) == 0:
        return float("nan")
    if activation == "softmax":
        return float(F.cross_entropy(z, torch.as_tensor(np.asarray(targets)).long()))
    return float(F.binary_cross_entropy_with_logits(z, _targets_matrix(targets, z.shape[1])))


def fit_temperature(
    logits: np.ndarray,
    targets: np.ndarray,
    activation: str = "softmax",
    *,
    bounds: tuple[float, float] = (MIN_TEMPERATURE, MAX_TEMPERATURE),
) -> float:
    """The temperature minimising the validation NLL (LBFGS on log T, clipped to ``bounds``).

    ``targets`` are class indices (N,) or, for sigmoid heads, multi-hot rows (N, C).
    No rows gives 1.0 (nothing to fit).
    """
    _check_activation(activation)
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.ndim != 2 or len(z) == 0:
        return 1.0
    if activation == "softmax":
        y = torch.as_tensor(np.asarray(targets)).long()
        loss_fn = lambda scaled: F.cross_entropy(scaled, y)  # noqa: E731
    else:
        y = _targets_matrix(targets, z.shape[1])
        loss_fn = lambda scaled: F.binary_cross_entropy_with_logits(scaled, y)  # noqa: E731

    # The NLL is unimodal in T, so the bounded optimum is the free one clipped to the bounds.
    # The free search starts at T=1 inside a wide clamp (for numbers, not for the answer):
    # starting on a bound would leave it there with a zero gradient.
    wide = math.log(MIN_TEMPERATURE / 10), math.log(MAX_TEMPERATURE * 10)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(z / log_t.clamp(*wide).exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    value = min(max(float(log_t.detach().clamp(*wide).exp()), bounds[0]), bounds[1])
    # LBFGS can stop on a flat stretch; never return a temperature worse than no scaling
    # (or the allowed temperature nearest to it)
    plain = min(max(1.0, bounds[0]), bounds[1])
    if nll(logits, targets, activation, value) > nll(logits, targets, activation, plain):
        return plain
    return value


def top_confidence(logits: np.ndarray, temperature: float, activation: str) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class = argmax of the logits, calibrated probability of that class)."""
    probs = probabilities(logits, activation, temperature)
    predicted = np.asarray(logits).argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    return predicted, probs[np.arange(len(probs)), predicted]


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: |accuracy - mean confidence| per equal-width confidence bin, weighted by bin size.

    Bins are (0, 1/n], (1/n, 2/n], ...; a confidence of 0 falls in the first bin.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return float("nan")
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


@dataclass(frozen=True)
class Calibration:
    activation: str
    temperature: float
    min_temperature: float
    n: int
    accuracy: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(
    logits: np.ndarray,
    labels: np.ndarray,
    activation: str,
    n_bins: int = ECE_BINS,
    min_temperature: float = MIN_TEMPERATURE,
) -> Calibration:
    """Fit the temperature (``min_temperature`` .. MAX_TEMPERATURE) on validation ``logits`` and
    single-label class indices ``labels``; report accuracy, ECE and NLL before (T=1) and after."""
    if not MIN_TEMPERATURE <= min_temperature <= MAX_TEMPERATURE:
        raise ValueError(f"min_temperature must be within [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {min_temperature}")
    labels = np.asarray(labels)
    temperature = fit_temperature(logits, labels, activation, bounds=(min_temperature, MAX_TEMPERATURE))
    predicted, before = top_confidence(logits, 1.0, activation)
    _, after = top_confidence(logits, temperature, activation)
    correct = predicted == labels
    return Calibration(
        activation=activation,
        temperature=temperature,
        min_temperature=min_temperature,
        n=int(len(labels)),
        accuracy=float(correct.mean()) if len(labels) else float("nan"),
        ece_before=expected_calibration_error(before, correct, n_bins),
        ece_after=expected_calibration_error(after, correct, n_bins),
        nll_before=nll(logits, labels, activation, 1.0),
        nll_after=nll(logits, labels, activation, temperature),
    )
