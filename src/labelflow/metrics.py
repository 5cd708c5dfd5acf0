"""Classification metrics of one head from its logits and targets (scikit-learn does the maths)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from labelflow.losses import get_loss, probabilities


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


def predict_labels(probs: np.ndarray, multilabel: bool, decision_threshold: float = 0.5) -> np.ndarray:
    """argmax for single-label data; every class reaching `decision_threshold` for multilabel data."""
    if multilabel:
        return (probs >= decision_threshold).astype(np.int64)
    return probs.argmax(axis=1)


def head_metrics(
    logits: np.ndarray, targets: np.ndarray, activation: str, decision_threshold: float = 0.5
) -> dict[str, float]:
    """accuracy (exact match for multilabel), macro F1 over the classes present in ``targets``
    (a class absent from the targets has no F1, rather than an F1 of 0), AUC for sigmoid heads,
    micro F1 and mAP for multilabel."""
    if len(targets) == 0:
        return {}
    probs = probabilities(logits, activation)
    multilabel = targets.ndim == 2
    out: dict[str, float] = {}
    if not multilabel:
        predicted_class = probs.argmax(axis=1)
        out["accuracy"] = float((predicted_class == targets).mean())
        present = np.unique(targets)
        out["f1_macro"] = float(f1_score(targets, predicted_class, labels=present, average="macro", zero_division=0))
        indicator = one_hot(targets, logits.shape[1])
    else:
        indicator = (targets > 0.5).astype(np.int64)
        predicted = predict_labels(probs, True, decision_threshold)
        out["accuracy"] = float((predicted == indicator).all(axis=1).mean())
        out["f1_micro"] = float(f1_score(indicator, predicted, average="micro", zero_division=0))
        has_positive = indicator.sum(axis=0) > 0
        out["f1_macro"] = float(
            f1_score(indicator, predicted, labels=np.flatnonzero(has_positive), average="macro", zero_division=0)
        )
        out["mAP"] = float(average_precision_score(indicator[:, has_positive], probs[:, has_positive], average="macro"))
    if activation == "sigmoid":
        auc = macro_auc(indicator, probs)
        if auc is not None:
            out["auc"] = auc
    return out


def per_class_f1(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> list[float | None]:
    """F1 of each class (single-label targets are one-hot encoded first); None for a class with
    no image in ``targets``, whose F1 says nothing about the model."""
    if targets.ndim == 1:
        targets, predicted = one_hot(targets, num_classes), one_hot(predicted, num_classes)
    values = f1_score(targets, predicted, average=None, labels=list(range(num_classes)), zero_division=0)
    present = targets.sum(axis=0) > 0
    return [float(v) if has else None for v, has in zip(values, present)]


class HeadMetrics:
    """Loss sums over one pass and every head's logits/targets, for metrics at the end.

    Everything stays where the model put it (on the GPU during CUDA training) until a figure is
    read: converting a loss to a Python float every step would make the CPU wait for the GPU
    every step. A head whose target is not in the batch (e.g. `rotation` on upright images) is
    skipped.
    """

    def __init__(self, heads):
        self.heads = heads
        self.count = 0
        self.head_count = {h.name: 0 for h in heads}
        self._loss: list[torch.Tensor] = []
        self._head_loss: dict[str, list[torch.Tensor]] = {h.name: [] for h in heads}
        self.logits: dict[str, list[torch.Tensor]] = {h.name: [] for h in heads}
        self.targets: dict[str, list[torch.Tensor]] = {h.name: [] for h in heads}

    def update(self, outputs, batch, losses: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        n = len(batch["index"])
        self.count += n
        self._loss.append(total.detach().double() * n)
        for name, loss in losses.items():
            self._head_loss[name].append(loss.detach().double() * n)
            self.head_count[name] += n
            self.logits[name].append(outputs[name].detach().float())
            self.targets[name].append(batch[name].detach())

    @property
    def loss(self) -> float:
        """Sum of the batch losses times their sizes (one wait for the device, when read)."""
        return _sum(self._loss)

    def result(self) -> dict[str, float]:
        out = {"loss": self.loss / max(1, self.count)}
        for head in self.heads:
            if not self.head_count[head.name]:
                continue
            out[f"{head.name}_loss"] = _sum(self._head_loss[head.name]) / self.head_count[head.name]
            values = head_metrics(
                torch.cat(self.logits[head.name]).cpu().numpy(),
                torch.cat(self.targets[head.name]).cpu().numpy(),
                get_loss(head.loss).activation,
                head.decision_threshold,
            )
            out.update({f"{head.name}_{key}": value for key, value in values.items()})
        main = self.heads[0].name  # the first head is the main one
        if f"{main}_accuracy" in out:
            out["accuracy"] = out[f"{main}_accuracy"]
        return out


def _sum(values: list[torch.Tensor]) -> float:
    return float(torch.stack(values).sum()) if values else 0.0
