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
a ``min_temperature``; the default 1.0 lets calibration soften an overconfident model but never
make it surer of itself than its own softmax.

The floor is for that degenerate case only. A model trained with label smoothing is
under-confident, and on a held-out set with many errors the fit is well determined: measured on
Fashion-MNIST (3,000 calibration images, ~190 errors) the floor kept T = 1.0 and left a test ECE
of 0.075 (mean confidence 0.86 against 0.935 accuracy). So with ``sharpen_min_errors`` set, the
floor drops to :data:`MIN_TEMPERATURE` when the held-out rows hold at least that many errors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from labelflow.losses import ACTIVATIONS, probabilities
from labelflow.metrics import predict_labels

log = logging.getLogger(__name__)

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
        return float(F.cross_entropy(z, torch.as_tensor(np.array(targets, dtype=np.int64))))
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
        y = torch.as_tensor(np.array(targets, dtype=np.int64))  # a copy: read-only inputs stay untouched
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


def multilabel_decisions(logits: np.ndarray, activation: str, decision_threshold: float) -> np.ndarray:
    """The classes a multilabel head answers: its uncalibrated probability reaches the head's
    ``decision_threshold``, as rule infer and labelflow.predict decide
    (:func:`labelflow.metrics.predict_labels`)."""
    return predict_labels(probabilities(logits, activation), True, decision_threshold).astype(bool)


def confidence_and_correct(
    logits: np.ndarray, targets: np.ndarray, activation: str, temperature: float, decision_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """What ECE bins: for class indices, the top class's calibrated probability and whether it is
    the label; for multi-hot targets, every (image, class) decision (:func:`multilabel_decisions`)
    with the calibrated probability that it is right (p or 1-p) and whether it is."""
    targets = np.asarray(targets)
    if targets.ndim == 1:
        predicted, confidence = top_confidence(logits, temperature, activation)
        return confidence, predicted == targets
    probs = probabilities(logits, activation, temperature)
    decided = multilabel_decisions(logits, activation, decision_threshold)
    return np.where(decided, probs, 1 - probs).ravel(), (decided == (targets > 0.5)).ravel()


@dataclass(frozen=True)
class Calibration:
    activation: str
    temperature: float  # fitted on all the rows given
    min_temperature: float  # the configured floor
    n: int
    accuracy: float
    errors: int  # misclassified rows (multilabel: rows with any wrong decision)
    temperature_floor: float  # the floor applied: min_temperature, or MIN_TEMPERATURE with enough errors
    ece_before: float  # T = 1 (nothing fitted)
    ece_after: float  # cross-fitted: each half scored with the T fitted on the other half
    nll_before: float
    nll_after: float  # cross-fitted, like ece_after
    ece_after_method: str = "cross-fitted (2 halves)"

    def to_dict(self) -> dict:
        return asdict(self)


def _cross_fitted(logits, targets, activation, bounds, n_bins, seed, decision_threshold) -> tuple[float, float, str]:
    """ECE and NLL after scaling, each half scored with the temperature fitted on the other:
    a figure measured on data that did not fit the temperature it is scored with."""
    n = len(targets)
    if n < 4:
        temperature = fit_temperature(logits, targets, activation, bounds=bounds)
        confidence, correct = confidence_and_correct(logits, targets, activation, temperature, decision_threshold)
        return expected_calibration_error(confidence, correct, n_bins), nll(logits, targets, activation, temperature), "in-sample (fewer than 4 images)"
    half = np.zeros(n, dtype=bool)
    half[np.random.default_rng(seed).permutation(n)[: n // 2]] = True
    confidences, corrects, losses = [], [], []
    for scored in (half, ~half):
        temperature = fit_temperature(logits[~scored], targets[~scored], activation, bounds=bounds)
        confidence, correct = confidence_and_correct(
            logits[scored], targets[scored], activation, temperature, decision_threshold
        )
        confidences.append(confidence)
        corrects.append(correct)
        losses.append(nll(logits[scored], targets[scored], activation, temperature) * scored.sum())
    ece = expected_calibration_error(np.concatenate(confidences), np.concatenate(corrects), n_bins)
    return ece, float(sum(losses) / n), "cross-fitted (2 halves)"


def calibrate(
    logits: np.ndarray,
    targets: np.ndarray,
    activation: str,
    n_bins: int = ECE_BINS,
    min_temperature: float = MIN_TEMPERATURE,
    seed: int = 0,
    sharpen_min_errors: int | None = None,
    decision_threshold: float = 0.5,
) -> Calibration:
    """Fit the temperature (floor .. MAX_TEMPERATURE) on held-out ``logits`` and their targets
    (class indices, or multi-hot rows for sigmoid heads); report accuracy, ECE and NLL before
    (T=1) and after, the latter cross-fitted so they are not scored on the images that fitted
    the temperature.

    The floor is ``min_temperature``, or :data:`MIN_TEMPERATURE` when ``sharpen_min_errors`` is
    set and the rows hold at least that many misclassified images (enough errors to tell how
    sure the model should be; none is the case that drives a free fit to T -> 0). The
    cross-fitted halves keep the floor decided on all the rows. Multi-hot rows are right when
    every class is decided right at the head's ``decision_threshold`` (:func:`multilabel_decisions`)."""
    if not MIN_TEMPERATURE <= min_temperature <= MAX_TEMPERATURE:
        raise ValueError(f"min_temperature must be within [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {min_temperature}")
    if sharpen_min_errors is not None and sharpen_min_errors < 1:
        raise ValueError(f"sharpen_min_errors must be at least 1 (or None: never below min_temperature), got {sharpen_min_errors}")
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets)
    if targets.ndim == 1:
        right = logits.argmax(axis=1) == targets if len(targets) else np.zeros(0, dtype=bool)
    else:
        right = (multilabel_decisions(logits, activation, decision_threshold) == (targets > 0.5)).all(axis=1)
    errors = int((~right).sum())
    floor = MIN_TEMPERATURE if sharpen_min_errors is not None and errors >= sharpen_min_errors else min_temperature
    bounds = (floor, MAX_TEMPERATURE)
    temperature = fit_temperature(logits, targets, activation, bounds=bounds)
    before, correct = confidence_and_correct(logits, targets, activation, 1.0, decision_threshold)
    ece_after, nll_after, method = _cross_fitted(logits, targets, activation, bounds, n_bins, seed, decision_threshold)
    return Calibration(
        activation=activation,
        temperature=temperature,
        min_temperature=min_temperature,
        n=int(len(targets)),
        accuracy=float(right.mean()) if len(right) else float("nan"),
        errors=errors,
        temperature_floor=floor,
        ece_before=expected_calibration_error(before, correct, n_bins),
        ece_after=ece_after,
        nll_before=nll(logits, targets, activation, 1.0),
        nll_after=nll_after,
        ece_after_method=method,
    )


# --------------------------------------------------------------------------- the workflow step


@dataclass(frozen=True)
class CalibrationSettings:
    """Config section ``calibration`` (defaults in config/schemas/config.schema.yaml)."""

    holdout: float  # share of the validation fold held out from checkpoint selection
    min_temperature: float
    sharpen_min_errors: int | None  # None: never below min_temperature

    @classmethod
    def from_config(cls, section: dict) -> CalibrationSettings:
        return cls(**{name: section[name] for name in cls.__dataclass_fields__})


def calibration_targets(predictions: pd.DataFrame, tag2cls: dict[str, int], multilabel: bool) -> np.ndarray:
    """Class indices, or multi-hot rows from the ``;``-joined label names of multilabel runs."""
    if not multilabel:
        return predictions["class"].to_numpy()
    targets = np.zeros((len(predictions), len(tag2cls)), dtype=np.float32)
    for row, labels in enumerate(predictions["label"]):
        targets[row, [tag2cls[label] for label in labels.split(";") if label]] = 1.0
    return targets


def calibrate_run(
    *,
    predictions_csv,
    logits_npy,
    tag2cls_json,
    experiment: dict,
    settings: CalibrationSettings,
    seed: int,
    out_json,
) -> dict:
    """calibration.json of a run: the temperature of its class head, fitted on the validation
    rows held out from checkpoint selection (``split == "calibration"`` in predictions.csv), or,
    with no such rows (``calibration.holdout: 0``), on the whole validation fold, which then also
    chose the checkpoint (said in ``fitted_on``)."""
    from labelflow.dataset import read_predictions, read_tag2cls
    from labelflow.io import load_npy, write_json_atomic
    from labelflow.losses import get_loss

    predictions = read_predictions(predictions_csv)
    logits = load_npy(logits_npy).astype(np.float64)
    rows = (predictions["split"] == "calibration").to_numpy()
    fitted_on = "calibration rows: validation images held out from checkpoint selection"
    if not rows.any():
        rows = (predictions["split"] != "train").to_numpy()
        fitted_on = "the validation fold, which also selected the checkpoint (calibration.holdout is 0)"
    head = experiment["heads"][0]
    activation = get_loss(head["loss"]).activation
    multilabel = bool(predictions["label"].str.contains(";").any())
    targets = calibration_targets(predictions[rows], read_tag2cls(tag2cls_json), multilabel)
    calibration = calibrate(
        logits[rows], targets, activation, min_temperature=settings.min_temperature, seed=seed,
        sharpen_min_errors=settings.sharpen_min_errors, decision_threshold=head["decision_threshold"],
    )
    result = {**calibration.to_dict(), "fitted_on": fitted_on, "ece_bins": ECE_BINS}
    write_json_atomic(result, out_json)
    log.info(
        "temperature %.3f (floor %.2f; %s head, %d images, %d errors: %s); ECE %.4f -> %.4f (%s)",
        calibration.temperature, calibration.temperature_floor, activation, calibration.n, calibration.errors, fitted_on,
        calibration.ece_before,
        calibration.ece_after, calibration.ece_after_method,
    )
    return result
