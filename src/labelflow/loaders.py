"""Torch datasets and loaders over a dataset table: decode once, augment only for training."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from labelflow.device import job_threads
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


class PathColumn(Sequence[str]):
    """Relative paths kept as one array of UTF-8 bytes, not a list of str. Worker processes are
    forked from the job and, with persistent workers, several loaders' workers live at once: a
    list of str would be copied into each of them page by page as reading it touches every
    object's reference count (pytorch/pytorch#13246); one buffer of bytes and an array of
    offsets have no per-path objects and stay shared. Names that are not valid UTF-8
    round-trip (surrogateescape). A row that is not a path (a missing value, a number) is
    refused here, naming the row, rather than failing later inside a loader's worker."""

    def __init__(self, paths: Sequence[str]):
        encoded = []
        for row, path in enumerate(paths):
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"image path in row {row} is {path!r} ({type(path).__name__}), not a path; "
                                "check the table's path column for missing or non-text values")
            encoded.append(os.fspath(path).encode("utf-8", "surrogateescape"))
        # one buffer and the offsets into it: a fixed-width array would give every path the
        # length of the longest
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # negative indices, and IndexError past the end
        return self._buffer[self._offsets[index]:self._offsets[index + 1]].tobytes().decode("utf-8", "surrogateescape")


class ImageTableDataset(Dataset):
    """Images named by paths relative to `root`, resized to `image_size` when loaded.

    With cache=True an image is kept (decoded and resized) the first time it is loaded, so
    the first batch comes at once, the cache fills during the first epoch and later epochs
    decode nothing. Without it every load decodes (streaming: memory does not grow with the
    number of images). A cache lives in the process that loads, so use it with num_workers 0
    (:func:`plan_loading` does).

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
        cache: bool = False,
        rotation: str = "none",
        rotation_seed: int = 0,
        rotation_p: float = 1.0,
        heads: Sequence[str] = ("class",),
    ):
        if rotation not in ROTATION_MODES:
            raise ValueError(f"rotation must be one of {ROTATION_MODES}, got {rotation!r}")
        self.root = Path(root)
        self._root = os.fspath(self.root)
        self.paths = PathColumn(paths)
        self.targets = None if targets is None else np.asarray(targets)
        self.image_size = image_size
        self.transform = transform
        self.rotation = rotation
        self.rotation_seed = rotation_seed
        self.rotation_p = rotation_p
        self.heads = [get_head(name) for name in heads]
        self.rng = np.random.default_rng(rotation_seed)
        self.images: list[np.ndarray | None] | None = [None] * len(self.paths) if cache else None

    def file(self, index: int) -> str:
        """Item ``index``'s file (a string join: a pathlib join per image was measurable in
        prediction, about 15 us of a 65 us decode of a 28 px PNG)."""
        return os.path.join(self._root, self.paths[index])

    def decode_file(self, path: str) -> np.ndarray:
        return decode_resized(path, self.image_size)

    def _decode(self, index: int) -> np.ndarray:
        return self.decode_file(self.file(index))

    def decoded(self, index: int) -> np.ndarray:
        """The image, decoded and resized (from the cache, filling it, when there is one)."""
        if self.images is None:
            return self._decode(index)
        if self.images[index] is None:
            self.images[index] = self._decode(index)
        return self.images[index]

    def __len__(self) -> int:
        return len(self.paths)

    def _targets(self, index: int, code: int | None) -> dict[str, Any]:
        item: dict[str, Any] = {"index": index}
        if self.targets is not None:
            for head in self.heads:
                target = head.target(self.targets[index], code)
                if target is not None:
                    item[head.name] = torch.as_tensor(target, dtype=torch.float32 if np.ndim(target) else torch.int64)
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.transform(image=self.decoded(index))["image"]
        code = None
        if self.rotation != "none":
            rng = self.rng if self.rotation == "random" else np.random.default_rng([self.rotation_seed, index])
            # with probability 1 - rotation_p the image stays upright (code 0)
            code = int(rng.integers(ROTATION_CODES)) if rng.random() < self.rotation_p else 0
            image = apply_rotation_code(image, code)
        return {"image": image, **self._targets(index, code)}

    @property
    def per_pixel(self) -> bool:
        """Whether each output pixel depends on that input pixel alone, the same on every call
        (fixed-statistics normalise, to tensor; no augmentation or rotation): then a batch goes
        through the transform as one image."""
        steps = self.transform.transforms
        return (
            self.rotation == "none" and self.transform.p == 1
            and all(isinstance(t, (A.Normalize, ToTensorV2)) and t.p == 1 for t in steps)
            and all(t.normalization == "standard" for t in steps if isinstance(t, A.Normalize))
        )  # fmt: skip

    def transform_batch(self, pixels: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 → (N, 3, H, W) float, the same values as the transform per image
        (``per_pixel`` only): the batch is stacked into one tall image, so albumentations is
        called once per batch instead of once per image (measured: the per-image calls and
        collation were half of the loader's cost in un-augmented passes)."""
        n, height, width, channels = pixels.shape
        tall = self.transform(image=pixels.reshape(n * height, width, channels))["image"]
        return tall.reshape(channels, n, height, width).permute(1, 0, 2, 3).contiguous()

    def __getitems__(self, indices: list[int]) -> dict[str, Any] | list[dict[str, Any]]:
        """A whole batch (what DataLoader asks for): collated already when ``per_pixel``, else
        the items one by one. A DataLoader over this dataset needs ``collate_fn=collate_items``
        (:func:`make_loader` sets it): torch's default collate does not take a collated batch.
        A :class:`SeededBatch` first reseeds the augmentation with its seed."""
        if isinstance(indices, SeededBatch):
            self.reseed(indices.seed)
        if not self.per_pixel:
            return [self[index] for index in indices]
        batch = default_collate([self._targets(index, None) for index in indices])
        batch["image"] = self.transform_batch(np.stack([self.decoded(index) for index in indices]))
        return batch

    def reseed(self, seed: int) -> None:
        """Make the augmentation stream a function of (seed), e.g. seed+epoch, for exact resume."""
        self.transform.set_random_seed(seed)
        self.rng = np.random.default_rng(seed)


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(torch.initial_seed() % 2**32)


class SeededBatch(list):
    """The indices of one batch, and the seed its augmentation draws from."""

    def __init__(self, indices: Sequence[int], seed: int):
        super().__init__(indices)
        self.seed = seed


class SeededBatchSampler(Sampler[SeededBatch]):
    """Batches for loaders with worker processes: the order and every batch's augmentation seed
    come from (seed, pass), drawn here in the main process; the worker that loads a batch
    reseeds the dataset with it (:meth:`ImageTableDataset.__getitems__`). So the workers can
    live across epochs (no new processes every epoch: gpu_check measured that cost), the
    augmentation does not depend on which worker, or how many, load a batch, and a resumed
    run replays an epoch exactly: :func:`labelflow.training.seed_epoch` calls
    :meth:`set_seed` as DistributedSampler's users call set_epoch. Without it, each pass
    draws afresh (pass 0, 1, ... of the last seed)."""

    def __init__(self, n_items: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int):
        self.n_items, self.batch_size, self.shuffle, self.drop_last = n_items, batch_size, shuffle, drop_last
        self.set_seed(seed)

    def set_seed(self, seed: int) -> None:
        self.seed, self.passes = int(seed), 0

    def __len__(self) -> int:
        return self.n_items // self.batch_size if self.drop_last else -(-self.n_items // self.batch_size)

    def __iter__(self):
        # SeedSequence mixes (seed, pass) into one 64-bit seed whatever their size
        state = np.random.SeedSequence([self.seed % 2**64, self.passes]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        self.passes += 1
        order = torch.randperm(self.n_items, generator=generator) if self.shuffle else torch.arange(self.n_items)
        seeds = torch.randint(0, 2**31 - 1, (len(self),), generator=generator).tolist()
        for number, seed in enumerate(seeds):
            yield SeededBatch(order[number * self.batch_size:(number + 1) * self.batch_size].tolist(), seed)


def collate_items(data: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """A batch from :meth:`ImageTableDataset.__getitems__`: as it is when already collated."""
    return data if isinstance(data, dict) else default_collate(data)


def make_loader(
    dataset: ImageTableDataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    seeded_batches: bool | None = None,
) -> DataLoader:
    """Without workers: torch's sampler and the dataset's own augmentation stream (reseeded each
    epoch by training.seed_epoch). With workers: persistent worker processes and a
    :class:`SeededBatchSampler`, so the batches do not depend on the number of workers (they
    differ from those of a loader without workers: another random stream). ``seeded_batches``
    True draws the seeded batches without workers too (a resumed stage whose saved epochs had
    workers: :func:`plan_loading`'s ``batch_order``); the default is ``num_workers > 0``."""
    if seeded_batches is None:
        seeded_batches = num_workers > 0
    if num_workers > 0 and not seeded_batches:
        raise ValueError("worker processes need seeded batches (each worker would draw its own augmentation stream)")
    generator = torch.Generator().manual_seed(seed)
    common = {"num_workers": num_workers, "pin_memory": pin_memory, "generator": generator, "collate_fn": collate_items}
    if not seeded_batches:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **common)
    batches = SeededBatchSampler(len(dataset), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
    workers = {"worker_init_fn": _seed_worker, "persistent_workers": True} if num_workers else {}
    return DataLoader(dataset, batch_sampler=batches, **workers, **common)


# Training keeps decoded images in memory only when they fit in this share of the memory
# available when the job starts (data.cache: auto); the rest of the memory is the model's,
# the optimizer's and the other jobs'.
CACHE_MEMORY_SHARE = 0.25
MAX_AUTO_WORKERS = 8


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable of /proc/meminfo; total memory elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class LoadingPlan:
    cache: bool
    num_workers: int
    reason: str
    compute_threads: int  # torch's pool beside the workers (on the CPU they share the job's threads)
    seeded_batches: bool = False  # make_loader's: with workers, or to resume a stage saved with them

    def apply(self) -> None:
        """Size torch's pool for this plan, and run OpenCV sequentially; call before building
        the loaders. OpenCV's default pool is every core of the machine, and it splits a large
        resize or a batch's normalisation (one LUT over a tall image) across them, beside
        torch's threads and regardless of the job's budget. One thread in the main process is
        what the per-image path always used (an image is below OpenCV's parallel size); workers
        inherit it and must not call cv2.setNumThreads themselves: a worker forked after the
        pool had run hung there (tests/test_loaders.py)."""
        torch.set_num_threads(self.compute_threads)
        cv2.setNumThreads(1)


def plan_loading(data_cfg: dict[str, Any], n_images: int, threads: int, device: torch.device | None = None,
                 memory: int | None = None, batch_order: str | None = None) -> LoadingPlan:
    """How a training job loads its images (config ``data.cache``, ``data.num_workers``).

    ``cache: auto`` keeps decoded images in memory when they fit in ``CACHE_MEMORY_SHARE`` of the
    memory available (``image_size``\u00b2 x 3 bytes each), else streams them; on a GPU (unless
    ``num_workers`` is 0) it streams through worker processes instead: there the loader, not the
    model, bounds an epoch (benchmarks/gpu_check.py on an H200: decoding and augmenting in the
    job's one process were 85-92 % of our epoch; 8 workers beat the cache at 32 and 224 px).
    ``num_workers: auto`` is 0 with a cache (nothing to decode after the first epoch; a worker's
    cache would be lost), else DataLoader worker processes decode in parallel with the model: up
    to 8 per GPU job; on the CPU half the job's threads, and none with 2 threads or fewer.

    On the CPU the workers' threads come out of the job's budget (``compute_threads`` = threads
    - workers): torch's OpenMP threads wait for each other at every layer, so one preempted by
    a decoding worker stalls them all. Measured on 2 cores (README, predict_throughput): 2
    compute threads + 1 worker ran at 0.79 of the bare loop, 2 compute threads + no worker at
    0.89, and 2 training processes of 2 threads each took 3-4.5x longer per epoch.

    ``batch_order`` (a resumed stage's, training.saved_batch_order) keeps the batches of the
    saved epochs: ``sampler`` (saved without workers) runs without workers, ``seeded`` (saved
    with workers) draws seeded batches with or without them. The other choices stay as planned.
    """
    size = data_cfg["image_size"]
    needed = n_images * size * size * 3
    budget = int(CACHE_MEMORY_SHARE * (available_memory() if memory is None else memory))
    cache = data_cfg["cache"]
    on_gpu = device is not None and device.type == "cuda"
    workers = data_cfg["num_workers"]
    if cache == "auto" and on_gpu and workers != 0:
        cache, reason = False, "on a GPU worker processes feed the model faster than one process with a cache"
    elif cache == "auto":
        cache = needed <= budget
        reason = f"decoded images {needed / 2**30:.2f} GiB {'<=' if cache else '>'} cache budget {budget / 2**30:.2f} GiB"
    else:
        reason = f"data.cache is {cache}"
    if workers == "auto":
        workers = 0 if cache else min(MAX_AUTO_WORKERS, os.cpu_count() or 1) if on_gpu else threads // 2 if threads > 2 else 0
    if batch_order == "sampler" and workers:
        workers, reason = 0, f"{reason}; no worker processes: the saved epochs of the resumed stage had none"
    if cache and workers:
        cache, reason = False, f"{reason}; no cache with {workers} worker processes (each would keep its own)"
    seeded = workers > 0 or batch_order == "seeded"
    if batch_order == "seeded" and not workers:
        reason = f"{reason}; seeded batches as in the saved epochs of the resumed stage"
    compute = threads if on_gpu else max(1, threads - workers)
    return LoadingPlan(bool(cache), int(workers), reason, compute, seeded)


def streaming_loader(dataset: Dataset, data_cfg: dict[str, Any], *, batch_size: int, device: torch.device | None = None) -> DataLoader:
    """One un-shuffled pass over ``dataset`` that streams (a cache would only hold every image at
    once), with ``data.num_workers`` and torch's threads as :func:`plan_loading` says."""
    plan = plan_loading({**data_cfg, "cache": False, "num_workers": data_cfg.get("num_workers", "auto")}, len(dataset),
                        job_threads(), device)  # fmt: skip
    plan.apply()
    return make_loader(
        dataset, batch_size=batch_size, shuffle=False, seed=0,
        num_workers=plan.num_workers, pin_memory=device is not None and device.type == "cuda",
    )


def eval_dataset(
    root: str | Path,
    paths: Sequence[str],
    data_cfg: dict[str, Any],
    targets: Sequence[int] | np.ndarray | None = None,
    **dataset_options: Any,
) -> ImageTableDataset:
    """Un-augmented, un-cached images of ``paths`` with an experiment's (or a trained run's)
    image size and normalisation."""
    transform = build_transform(train=False, mean=data_cfg["mean"], std=data_cfg["std"])
    return ImageTableDataset(root, list(paths), targets, data_cfg["image_size"], transform, cache=False, **dataset_options)


def eval_loader(
    root: str | Path,
    paths: Sequence[str],
    data_cfg: dict[str, Any],
    *,
    batch_size: int,
    device: torch.device | None = None,
    targets: Sequence[int] | np.ndarray | None = None,
    **dataset_options: Any,
) -> DataLoader:
    """Deterministic, un-augmented, streaming loader over `paths` with an experiment's data
    section: what inference, embedding and autolabel prediction all run on."""
    return streaming_loader(eval_dataset(root, paths, data_cfg, targets, **dataset_options), data_cfg,
                            batch_size=batch_size, device=device)  # fmt: skip
