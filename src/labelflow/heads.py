"""Heads registry: what each head predicts, how many outputs it has, where its targets come
from and on which images it is evaluated. A head is named by its target in an experiment's
``heads:`` list; the first head must be ``class``.

Adding a head is a change to this module alone: register it with its output size (from the
number of classes), its target (from an image's class target and, for heads that see
rotated images, the rotation/flip code applied to it) and its confusion-matrix labels.
Losses come from :mod:`labelflow.losses`; the model, the loaders, the training loop, the
inference step and the summary all ask this registry.

The self-supervised "augs" heads see images rotated by k*90 degrees after an optional
horizontal flip: code = 2*k + flip (8 codes), drawn per image and recorded as applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ROTATION_CODES = 8


@dataclass(frozen=True)
class Head:
    name: str
    description: str
    output_size: Callable[[int], int]  # number of classes -> outputs
    # target of one image from its class target (int or multi-hot row) and the rotation code
    # applied to it (None: upright, no code); None when the head has no target for it
    target: Callable[[np.ndarray, int | None], int | np.ndarray | None]
    rotated: bool = False  # trained and evaluated on rotated images (needs rotation codes)
    single_label_only: bool = False
    confusion_labels: Callable[[Sequence[str]], list[str] | None] = lambda classes: None


HEADS: dict[str, Head] = {}


def register_head(head: Head) -> Head:
    HEADS[head.name] = head
    return head


def get_head(name: str) -> Head:
    try:
        return HEADS[name]
    except KeyError:
        raise ValueError(
            f"experiment head {name!r} is unknown; a head is named by its target, one of {sorted(HEADS)}"
        ) from None


def rotation_names() -> list[str]:
    return [f"rot{90 * (c // 2)}{'+flip' if c % 2 else ''}" for c in range(ROTATION_CODES)]


register_head(
    Head(
        "class",
        "the labels (class index, or multi-hot row for multilabel data)",
        output_size=lambda num_classes: num_classes,
        target=lambda class_target, code: class_target,
        confusion_labels=lambda classes: list(classes),
    )
)
register_head(
    Head(
        "rotation",
        "the rotation/flip code applied to the image (8 codes)",
        output_size=lambda num_classes: ROTATION_CODES,
        target=lambda class_target, code: code,
        rotated=True,
        confusion_labels=lambda classes: rotation_names(),
    )
)
register_head(
    Head(
        "class_rotation",
        "class and rotation code jointly (classes x 8)",
        output_size=lambda num_classes: num_classes * ROTATION_CODES,
        target=lambda class_target, code: (
            None if code is None or np.ndim(class_target) else int(class_target) * ROTATION_CODES + code
        ),
        rotated=True,
        single_label_only=True,
    )
)


def uses_rotation(head_names: Sequence[str]) -> bool:
    """Whether any of the heads needs rotated images."""
    return any(get_head(name).rotated for name in head_names)


def check_experiment(experiment: dict[str, Any]) -> None:
    """Head names are registered heads and the first head is ``class``; raises ValueError."""
    for head in experiment["heads"]:
        get_head(head["name"])
    if experiment["heads"][0]["name"] != "class":
        raise ValueError("the first head of an experiment must be `class` (the main head)")
