"""Classification metrics of one head from its logits and targets (scikit-learn does the maths)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    if activation == "softmax":
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), num_classes), dtype=np.int64)
    out[np.arange(len(labels)), labels.astype(np.int64)] = 1
    return out


def macro_auc(indicator: np.ndarray, scores: np.ndarray) -> float | None:
    """One-vs-rest ROC AUC averaged over the classes that have positives and negatives."""
    present = (indicator.sum(axis=0) > 0) & (indicator.sum(axis=0) < len(indicator))
    if not present.any():
        return None
    return float(roc_auc_score(indicator[:, present], scores[:, present], average="macro"))


def predict_labels(probabilities: np.ndarray, multilabel: bool, threshold: float = 0.5) -> np.ndarray:
    """argmax for single-label data; every class above `threshold` for multilabel data."""
    if multilabel:
        return (probabilities >= threshold).astype(np.int64)
    return probabilities.argmax(axis=1)


def head_metrics(logits: np.ndarray, targets: np.ndarray, activation: str, threshold: float = 0.5) -> dict[str, float]:
    """accuracy (exact match for multilabel), AUC for sigmoid heads, F1/mAP for multilabel."""
    if len(targets) == 0:
        return {}
    probs = activate(logits.astype(np.float64), activation)
    multilabel = targets.ndim == 2
    out: dict[str, float] = {}
    if not multilabel:
        out["accuracy"] = float((probs.argmax(axis=1) == targets).mean())
        indicator = one_hot(targets, logits.shape[1])
    else:
        indicator = (targets > 0.5).astype(np.int64)
        predicted = predict_labels(probs, True, threshold)
        out["accuracy"] = float((predicted == indicator).all(axis=1).mean())
        out["f1_micro"] = float(f1_score(indicator, predicted, average="micro", zero_division=0))
        out["f1_macro"] = float(f1_score(indicator, predicted, average="macro", zero_division=0))
        has_positive = indicator.sum(axis=0) > 0
        out["mAP"] = float(average_precision_score(indicator[:, has_positive], probs[:, has_positive], average="macro"))
    if activation == "sigmoid":
        auc = macro_auc(indicator, probs)
        if auc is not None:
            out["auc"] = auc
    return out


def per_class_f1(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> list[float]:
    """F1 of each class (single-label targets are one-hot encoded first)."""
    if targets.ndim == 1:
        targets, predicted = one_hot(targets, num_classes), one_hot(predicted, num_classes)
    return [float(v) for v in f1_score(targets, predicted, average=None, labels=list(range(num_classes)), zero_division=0)]
