"""Torch datasets and loaders over a dataset table: decode once, augment only for training."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset

from labelflow.heads import ROTATION_CODES, get_head
from labelflow.images import decode_resized

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_augmentations(specs: Sequence[dict[str, Any]]) -> list[A.BasicTransform]:
    """[{name: Affine, params: {...}}, ...] → albumentations transforms, with clear errors."""
    transforms = []
    for i, spec in enumerate(specs):
        name = spec["name"]
        cls = getattr(A, name, None)
        if cls is None or not isinstance(cls, type):
            raise ValueError(f"data.augmentations[{i}]: albumentations has no transform {name!r}")
        try:
            # albumentations only warns about unknown arguments; a typo must not silently
            # give a do-nothing transform
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                transforms.append(cls(**spec.get("params", {})))
        except (TypeError, ValueError, UserWarning) as exc:
            raise ValueError(f"data.augmentations[{i}] ({name}): {exc}") from exc
    return transforms


def build_transform(
    augmentations: Sequence[dict[str, Any]] = (),
    *,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
) -> A.Compose:
    """Training: augmentations + normalise. Validation/inference: normalise only (deterministic)."""
    steps = build_augmentations(augmentations) if train else []
    steps += [A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()]
    return A.Compose(steps, seed=seed)


# Rotation heads (labelflow.heads): code = 2*k + flip, where the image is first flipped
# horizontally (flip=1) and then rotated by k*90 degrees counter-clockwise.
ROTATION_MODES = ("none", "random", "seeded")


def apply_rotation_code(image: torch.Tensor, code: int) -> torch.Tensor:
    """Apply rotation/flip `code` (0..7) to a CHW tensor."""
    k, flip = divmod(int(code), 2)
    if flip:
        image = torch.flip(image, dims=[-1])
    return torch.rot90(image, k, dims=[-2, -1]) if k else image


class ImageTableDataset(Dataset):
    """Images named by paths relative to `root`, resized once to `image_size`.

    With cache=True every image is decoded and resized once, when the dataset is built:
    small datasets then cost no decoding per epoch.

    `targets` are class indices (N,) or multi-hot rows (N, C); each item carries the target
    of every head in `heads` that has one for it (labelflow.heads). With rotation="random"
    (training) or "seeded" (validation: the same transform for an image on every pass)
    each image gets a known rotation/flip (with probability `rotation_p`, else it stays
    upright: code 0), recorded as applied and never re-derived; rotation heads take their
    targets from that code.
    """

    def __init__(
        self,
        root: str | Path,
        paths: Sequence[str],
        targets: Sequence[int] | np.ndarray | None,
        image_size: int,
        transform: A.Compose,
        cache: bool = True,
        rotation: str = "none",
        rotation_seed: int = 0,
        rotation_p: float = 1.0,
        heads: Sequence[str] = ("class",),
    ):
        if rotation not in ROTATION_MODES:
            raise ValueError(f"rotation must be one of {ROTATION_MODES}, got {rotation!r}")
        self.root = Path(root)
        self.paths = list(paths)
        self.targets = None if targets is None else np.asarray(targets)
        self.image_size = image_size
        self.transform = transform
        self.rotation = rotation
        self.rotation_seed = rotation_seed
        self.rotation_p = rotation_p
        self.heads = [get_head(name) for name in heads]
        self.rng = np.random.default_rng(rotation_seed)
        self.images = [self._decode(i) for i in range(len(self.paths))] if cache else None

    def _decode(self, index: int) -> np.ndarray:
        return decode_resized(self.root / self.paths[index], self.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index] if self.images is not None else self._decode(index)
        item = {"image": self.transform(image=image)["image"], "index": index}
        code = None
        if self.rotation != "none":
            rng = self.rng if self.rotation == "random" else np.random.default_rng([self.rotation_seed, index])
            # with probability 1 - rotation_p the image stays upright (code 0)
            code = int(rng.integers(ROTATION_CODES)) if rng.random() < self.rotation_p else 0
            item["image"] = apply_rotation_code(item["image"], code)
        if self.targets is not None:
            for head in self.heads:
                target = head.target(self.targets[index], code)
                if target is not None:
                    item[head.name] = torch.as_tensor(target, dtype=torch.float32 if np.ndim(target) else torch.int64)
        return item

    def reseed(self, seed: int) -> None:
        """Make the augmentation stream a function of (seed), e.g. seed+epoch, for exact resume."""
        self.transform.set_random_seed(seed)
        self.rng = np.random.default_rng(seed)


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(torch.initial_seed() % 2**32)


def make_loader(
    dataset: ImageTableDataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        persistent_workers=False,
    )


def eval_loader(
    root: str | Path,
    paths: Sequence[str],
    data_cfg: dict[str, Any],
    *,
    batch_size: int,
    device: torch.device | None = None,
    targets: Sequence[int] | np.ndarray | None = None,
    cache: bool | None = None,
    **dataset_options: Any,
) -> DataLoader:
    """Deterministic, un-augmented loader over `paths` with an experiment's data section:
    what inference, embedding and autolabel prediction all run on."""
    transform = build_transform(train=False, mean=data_cfg["mean"], std=data_cfg["std"])
    dataset = ImageTableDataset(
        root, list(paths), targets, data_cfg["image_size"], transform,
        data_cfg.get("cache", True) if cache is None else cache, **dataset_options,
    )
    return make_loader(
        dataset, batch_size=batch_size, shuffle=False, seed=0,
        num_workers=data_cfg.get("num_workers", 0), pin_memory=device is not None and device.type == "cuda",
    )
