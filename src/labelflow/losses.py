"""Loss registry: each head names a loss; the training loop only looks losses up here.

A loss entry knows how to turn integer (or multi-hot) targets into what its criterion
expects and which activation turns its logits into probabilities, so adding a loss never
touches the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LossSpec:
    name: str
    build: Callable[..., nn.Module]
    # "softmax" (one class per row) or "sigmoid" (independent per-class probabilities).
    activation: str


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, activation: str):
    def decorator(build: Callable[..., nn.Module]):
        LOSSES[name] = LossSpec(name=name, build=build, activation=activation)
        return build

    return decorator


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r} in an experiment's heads; choose one of {sorted(LOSSES)}"
        ) from None


def as_multi_hot(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer class targets → one-hot floats; multi-hot (2-D) targets pass through."""
    if targets.ndim == 1:
        return F.one_hot(targets.long(), num_classes).float()
    return targets.float()


class CrossEntropy(nn.Module):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets.long(), label_smoothing=self.label_smoothing)


class BinaryCrossEntropy(nn.Module):
    """Multilabel BCE on logits; integer targets are turned into one-hot rows."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, as_multi_hot(targets, logits.shape[1]))


class FocalLoss(nn.Module):
    """Per-class sigmoid focal loss (Lin et al. 2017), mean over elements.

    FL = -alpha_t * (1 - p_t)^gamma * log(p_t), with alpha for positives, 1-alpha for negatives.
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25):
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        target = as_multi_hot(targets, logits.shape[1])
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        prob = torch.sigmoid(logits)
        p_t = prob * target + (1 - prob) * (1 - target)
        alpha_t = self.alpha * target + (1 - self.alpha) * (1 - target)
        return (alpha_t * (1 - p_t) ** self.gamma * bce).mean()


register_loss("cross_entropy", activation="softmax")(CrossEntropy)
register_loss("bce", activation="sigmoid")(BinaryCrossEntropy)
register_loss("focal", activation="sigmoid")(FocalLoss)


ACTIVATIONS = ("softmax", "sigmoid")


def probabilities(logits: np.ndarray | torch.Tensor, activation: str, temperature: float = 1.0) -> np.ndarray:
    """softmax rows (summing to 1) or per-class sigmoid of ``logits / temperature``, in float64.

    The one place logits become probabilities: inference, metrics and calibration all call it.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if torch.is_tensor(logits):
        logits = logits.detach().cpu().numpy()
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature
    if activation == "softmax":
        return torch.softmax(z, dim=1).numpy()
    return torch.sigmoid(z).numpy()
