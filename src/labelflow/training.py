"""The one training loop: every rule that trains (stage1, stage2 of the default experiments,
grid points, k-fold folds, the OOD run and every autolabel round) calls :func:`run_stage`,
and the LR finder runs the same :func:`train_one_epoch`.

Shaped after torchvision's reference script: ``train_one_epoch``, ``evaluate``, a checkpoint
dict with model/optimizer/scheduler/epoch. What happens after each epoch (the resume state,
TensorBoard scalars, best/top-k checkpoints) is a list of hooks, so the loop stays readable.
Training state is saved atomically after every epoch in ``state_dir`` (not a declared
Snakemake output, which would be deleted on failure) so a killed job resumes where it
stopped; a state that cannot be read is moved aside and the stage starts fresh, never a
crash loop. Declared outputs are written once, at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from labelflow.device import autocast, compute_platform, describe_precision, images_for, place_model, to_device
from labelflow.io import atomic_directory, atomic_output, write_json_atomic
from labelflow.losses import get_loss
from labelflow.metrics import HeadMetrics
from labelflow.models import MultiHeadNet, atomic_torch_save, save_checkpoint

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("constant", "cosine", "step", "onecycle")
TIE_BREAKS = ("first", "valid_loss")


@dataclass
class StageSpec:
    """One stage of an experiment (``stages.<name>`` after schema validation, which fills every
    default: config/schemas/experiment.schema.yaml is the one place defaults are stated)."""

    name: str
    epochs: int
    lr: float
    optimizer: str
    weight_decay: float
    momentum: float
    scheduler: str
    warmup_epochs: float
    step_epochs: int
    step_gamma: float
    batch_size: int
    freeze_encoder: bool
    top_k: int
    min_steps: int
    precision: str
    tie_break: str

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> StageSpec:
        known = [f for f in cls.__dataclass_fields__ if f != "name"]
        missing = [k for k in known if k not in data]
        if missing:
            raise ValueError(
                f"stages.{name} lacks {missing}; validate the experiment against "
                "config/schemas/experiment.schema.yaml first (it fills the defaults)"
            )
        return cls(name=name, **{k: data[k] for k in known})

    def for_loader(self, steps_per_epoch: int) -> StageSpec:
        """This stage on a loader of `steps_per_epoch` batches: at least `min_steps` optimizer
        steps, so a tiny training set (an autolabel round 0) is not stopped half-trained."""
        epochs = max(self.epochs, math.ceil(self.min_steps / max(1, steps_per_epoch)))
        return replace(self, epochs=epochs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make epoch ``epoch``'s randomness (shuffle, augmentation, dropout) a function of (seed,
    epoch), so a resumed run replays exactly what an uninterrupted one would have done."""
    epoch_seed = seed * 1000 + epoch
    seed_everything(epoch_seed)
    loader.generator.manual_seed(epoch_seed)
    loader.dataset.reseed(epoch_seed)
    set_seed = getattr(loader.batch_sampler, "set_seed", None)  # loaders.SeededBatchSampler
    if set_seed is not None:
        set_seed(epoch_seed)


BATCH_ORDERS = ("seeded", "sampler")


def batch_order(loader: DataLoader) -> str:
    """How ``loader`` draws its batches: ``seeded`` (loaders.SeededBatchSampler: each batch's
    order and augmentation seed drawn in the job's process, the same for any number of worker
    processes) or ``sampler`` (torch's sampler and the dataset's own augmentation stream, no
    workers). The two give different batches from one seed, so a resumed stage draws its
    batches the way its saved state did (:func:`saved_batch_order`)."""
    return "seeded" if hasattr(loader.batch_sampler, "set_seed") else "sampler"


def build_optimizer(model: torch.nn.Module, spec: StageSpec) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "sgd":
        # Nesterov needs momentum; the schema allows momentum 0 (plain SGD)
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
            nesterov=spec.momentum > 0,
        )
    raise ValueError(f"stages.{spec.name}.optimizer={spec.optimizer!r}; choose one of {OPTIMIZERS}")


def lr_factor(spec: StageSpec, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (the scheduler is stepped per batch)."""
    if spec.scheduler not in SCHEDULERS:
        raise ValueError(f"stages.{spec.name}.scheduler={spec.scheduler!r}; choose one of {SCHEDULERS}")
    total = max(1, spec.epochs * steps_per_epoch)
    warmup = int(spec.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if spec.scheduler == "constant":
        return 1.0
    if spec.scheduler == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if spec.scheduler == "step":
        return spec.step_gamma ** ((step // steps_per_epoch) // spec.step_epochs)
    if spec.scheduler == "onecycle":
        # 30 % linear rise from lr/25, then cosine down to lr/1e4 (OneCycleLR's defaults).
        rise = max(1, int(0.3 * total))
        if step < rise:
            return 1 / 25 + (1 - 1 / 25) * step / rise
        progress = (step - rise) / max(1, total - rise)
        return 1e-4 + (1 - 1e-4) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise AssertionError(spec.scheduler)  # unreachable: checked above


def build_scheduler(optimizer, spec: StageSpec, steps_per_epoch: int):
    lr_factor(spec, 0, steps_per_epoch)  # validates the name before training starts
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(spec, step, steps_per_epoch)
    )


def build_criteria(model: MultiHeadNet) -> dict[str, torch.nn.Module]:
    return {h.name: get_loss(h.loss).build(**h.loss_params) for h in model.spec.heads}


def compute_losses(model: MultiHeadNet, outputs, batch, criteria) -> tuple[dict, torch.Tensor]:
    """Loss of every head whose target the batch carries, and their weighted sum."""
    heads = [h for h in model.spec.heads if h.name in batch]
    losses = {h.name: criteria[h.name](outputs[h.name].float(), batch[h.name]) for h in heads}
    total = sum(h.weight * losses[h.name] for h in heads)
    return losses, total


def train_one_epoch(
    model: MultiHeadNet,
    loader: DataLoader,
    criteria,
    optimizer,
    scheduler,
    device: torch.device,
    *,
    epoch: int,
    progress_every: int = 0,
    on_step: Callable[[int, float, float], bool] | None = None,
    precision: str = "auto",
) -> dict[str, float]:
    """One pass over ``loader``; ``precision`` is the forward pass's (device.autocast)."""
    model.train()
    metrics = HeadMetrics(model.spec.heads)
    started = time.perf_counter()
    for step, batch in enumerate(loader, start=1):
        batch = to_device(batch, device)
        with autocast(device, precision):
            outputs = model(images_for(batch["image"], device))
        losses, total = compute_losses(model, outputs, batch, criteria)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics.update(outputs, batch, {k: v.detach() for k, v in losses.items()}, total.detach())
        if on_step is not None and on_step(step, lr, float(total.detach())):
            break  # the caller (e.g. LR finder) asked to stop
        if progress_every and step % progress_every == 0:
            log.info(
                "epoch %d: batch %d/%d loss=%.4f (%.1f img/s)",
                epoch, step, len(loader), metrics.loss / metrics.count,
                metrics.count / (time.perf_counter() - started),
            )
    return metrics.result()


@torch.inference_mode()
def evaluate(model: MultiHeadNet, loader: DataLoader, criteria, device: torch.device) -> dict[str, float]:
    model.eval()
    metrics = HeadMetrics(model.spec.heads)
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device):
            outputs = model(images_for(batch["image"], device))
        losses, total = compute_losses(model, outputs, batch, criteria)
        metrics.update(outputs, batch, losses, total)
    return metrics.result()


# --------------------------------------------------------------------------- fingerprint

Fingerprint = dict[str, Any]  # named parts, e.g. recipe, data, init, folds, seed, weights, code

def digest(*parts: Any) -> str:
    """Stable short hash of JSON-able values (dict key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def changed_parts(saved: Any, now: Fingerprint) -> list[str]:
    """Names of the fingerprint parts in which a saved state and this stage differ, in the order
    of ``now``; a saved fingerprint that is not a dict of parts (older labelflow) gives
    ``["fingerprint format"]``."""
    if not isinstance(saved, dict):
        return ["fingerprint format"]
    names = list(now) + [k for k in saved if k not in now]
    return [k for k in names if k not in saved or k not in now or _canonical(saved[k]) != _canonical(now[k])]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# --------------------------------------------------------------------------- SIGTERM


class Terminated(Exception):
    """SIGTERM arrived (SLURM pre-emption, timeout): stop after saving what is saved."""


class SigtermGuard:
    """While installed, SIGTERM raises :class:`Terminated` at once, except inside a :meth:`held`
    section, which it lets finish first."""

    def __init__(self) -> None:
        self.holding = False
        self.pending = False

    def handle(self, signum, frame) -> None:
        if self.holding:
            self.pending = True
        else:
            raise Terminated()

    @contextmanager
    def held(self, *, then_stop: bool = True) -> Iterator[None]:
        """Hold SIGTERM back during the body; after it, raise Terminated if one came and
        ``then_stop`` (else the caller reads ``pending``)."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending and then_stop:
            raise Terminated()


@contextmanager
def terminate_on_sigterm() -> Iterator[SigtermGuard]:
    guard = SigtermGuard()
    try:
        previous = signal.signal(signal.SIGTERM, guard.handle)
    except ValueError:  # not the main thread: leave signals alone
        yield guard
        return
    try:
        yield guard
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- progress and hooks


@dataclass
class StageProgress:
    """What a stage has done so far; saved with the model each epoch so a rerun resumes."""

    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    topk: list[dict[str, Any]] = field(default_factory=list)  # {"epoch", "value", "file"}, best first
    best_value: float | None = None
    best_epoch: int | None = None

    @property
    def last_epoch(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0

    @property
    def next_epoch(self) -> int:
        return self.last_epoch + 1

    def add(self, record: dict[str, Any], main_metric: str, top_k: int, tie_break: str = "first") -> None:
        """Record an epoch and rank it: the best so far (the highest valid ``main_metric``;
        among tied epochs the first, or with ``tie_break`` valid_loss the lowest valid loss,
        then the first) and the top ``top_k`` epochs in that order. Files are written later,
        by the hooks."""
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break={tie_break!r}; choose one of {TIE_BREAKS}")
        self.history.append(record)
        epoch, value = record["epoch"], record["valid"][main_metric]

        def rank(entry_epoch: int, entry_value: float) -> tuple:  # smaller is better
            loss = self._valid_loss(entry_epoch) if tie_break == "valid_loss" else 0.0
            return (-entry_value, loss, entry_epoch)

        if self.best_value is None or rank(epoch, value) < rank(self.best_epoch, self.best_value):
            self.best_value, self.best_epoch = value, epoch
        if top_k > 0 and (len(self.topk) < top_k or rank(epoch, value) < rank(self.topk[-1]["epoch"], self.topk[-1]["value"])):
            self.topk.append({"epoch": epoch, "value": value, "file": f"epoch={epoch:03d}-{main_metric}={value:.4f}.pt"})
            self.topk.sort(key=lambda t: rank(t["epoch"], t["value"]))
            del self.topk[top_k:]

    def _valid_loss(self, epoch: int) -> float:
        loss = next(r for r in self.history if r["epoch"] == epoch)["valid"].get("loss")
        return math.inf if loss is None or math.isnan(loss) else float(loss)


@dataclass
class EpochEnd:
    """What an epoch-end hook sees: the stage, the epoch's record and the training objects."""

    spec: StageSpec
    epoch: int
    record: dict[str, Any]
    model: MultiHeadNet
    optimizer: torch.optim.Optimizer
    scheduler: Any
    progress: StageProgress
    batch_order: str | None = None  # how the train loader draws batches (:func:`batch_order`)
    platform: dict[str, str] | None = None  # torch and the kernels it runs (device.compute_platform)


EpochHook = Callable[[EpochEnd], None]


class StateSaver:
    """The resume state (model, optimizer, scheduler, progress, fingerprint); ``saved_epoch`` is
    the last epoch the state file holds.

    Writing it costs about half a second per save for a ResNet-18 with Adam (about 135 MB, then
    fsync), which dominates the many short epochs of a small training set (autolabel round 0:
    3 batches an epoch, 100 epochs). So it is saved at most every ``every_seconds`` seconds, and
    always for an epoch that writes a checkpoint file (a new best or top-k epoch: the files must
    match a saved state, see the invariant below) and for the last epoch. A killed stage replays
    the epochs since the last save exactly (each epoch's randomness is a function of seed and
    epoch), so only time is lost."""

    def __init__(self, state_dir: Path, stage_fingerprint: Fingerprint, saved_epoch: int = 0, every_seconds: float = 0.0):
        self.path = state_dir / "state.pt"
        self.fingerprint = stage_fingerprint
        self.saved_epoch = saved_epoch
        self.every_seconds = every_seconds
        self.saved_at = time.monotonic()

    def __call__(self, end: EpochEnd) -> None:
        writes_files = end.progress.best_epoch == end.epoch or any(t["epoch"] == end.epoch for t in end.progress.topk)
        due = time.monotonic() - self.saved_at >= self.every_seconds
        if writes_files or due or end.epoch >= end.spec.epochs:
            save_state(self.path, self.fingerprint, end)
            self.saved_epoch, self.saved_at = end.epoch, time.monotonic()


def save_state(path: Path, stage_fingerprint: Fingerprint, end: EpochEnd) -> None:
    atomic_torch_save(
        {
            "fingerprint": stage_fingerprint,
            "batch_order": end.batch_order,
            "platform": end.platform,
            "epoch": end.epoch,
            "model": end.model.state_dict(),
            "optimizer": end.optimizer.state_dict(),
            "scheduler": end.scheduler.state_dict(),
            "history": end.progress.history,
            "topk": end.progress.topk,
            "best_value": end.progress.best_value,
            "best_epoch": end.progress.best_epoch,
        },
        path,
    )


class TensorBoardScalars:
    """Every train/valid metric and the lr of an epoch as TensorBoard scalars. The log is started
    afresh from ``history`` (a resumed stage's saved epochs), so it holds exactly the state's
    epochs, once each, even when a kill came between the state and the scalars."""

    def __init__(self, log_dir: Path, stage_name: str, history: Sequence[dict[str, Any]] = ()):
        from torch.utils.tensorboard import SummaryWriter

        shutil.rmtree(log_dir, ignore_errors=True)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        for record in history:
            self.write(stage_name, record)

    def __call__(self, end: EpochEnd) -> None:
        self.write(end.spec.name, end.record)

    def write(self, stage_name: str, record: dict[str, Any]) -> None:
        for split_name in ("train", "valid"):
            for key, value in record[split_name].items():
                self.writer.add_scalar(f"{stage_name}/{split_name}/{key}", value, record["epoch"])
        self.writer.add_scalar(f"{stage_name}/lr", record["lr"], record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# How state.pt, best.pt and checkpoints/ agree. state.pt is the record: each epoch it is
# written first (StateSaver runs before CheckpointKeeper), and only then are best.pt and the
# top-k files made to match it. So a kill between the two can leave only these gaps, each
# repaired from the state alone when the stage resumes (reconcile_checkpoints):
#   * best.pt missing or of an older epoch while the state's best is its last epoch
#     -> rewritten from the state's weights, which are that epoch's;
#   * the top-k file of the state's last epoch missing -> rewritten the same way;
#   * a file in checkpoints/ the state does not list (fell out of the top k) -> deleted.
# Gaps no kill can cause (files deleted by hand) are repaired from a copy where one exists
# (best.pt from the top-k file of its epoch), else an older top-k file is dropped from the list
# with a warning, and a state whose best weights are gone altogether is moved aside.


def checkpoint_meta(main_metric: str, epoch: int, value: float | None) -> dict[str, Any]:
    return {"epoch": epoch, main_metric: value}


class CheckpointKeeper:
    """best.pt and ``checkpoints/`` (the top-k epochs by ``main_metric``, named with the value)
    made to match the progress the state has just recorded: the epoch's weights are written
    if it is the new best or in the top k, and files that fell out of the top k are deleted."""

    def __init__(self, state_dir: Path, main_metric: str):
        self.state_dir = state_dir
        self.main_metric = main_metric

    def __call__(self, end: EpochEnd) -> None:
        progress = end.progress
        if progress.best_epoch == end.epoch:
            meta = checkpoint_meta(self.main_metric, end.epoch, progress.best_value)
            save_checkpoint(self.state_dir / "best.pt", end.model, meta)
        for entry in progress.topk:
            if entry["epoch"] == end.epoch:
                meta = checkpoint_meta(self.main_metric, end.epoch, entry["value"])
                save_checkpoint(self.state_dir / "checkpoints" / entry["file"], end.model, meta)
        remove_unlisted_checkpoints(self.state_dir, progress.topk)


def remove_unlisted_checkpoints(state_dir: Path, topk: Sequence[dict[str, Any]]) -> None:
    """Delete what ``checkpoints/`` holds beyond the listed top-k files (temp files included)."""
    listed = {entry["file"] for entry in topk}
    folder = state_dir / "checkpoints"
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        if path.name in listed:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# --------------------------------------------------------------------------- resume

STATE_KEYS = ("fingerprint", "epoch", "model", "optimizer", "scheduler", "history", "topk", "best_value", "best_epoch")


class StateError(Exception):
    """A saved state that cannot be resumed: unreadable, incomplete, not fitting the model, or
    its best epoch's weights are lost."""


def resume(
    state_dir: Path, stage_fingerprint: Fingerprint, name: str, model, optimizer, scheduler, main_metric: str = "accuracy",
    batch_order: str | None = None, platform: dict[str, str] | None = None,
) -> StageProgress:
    """The saved progress when ``state_dir`` holds this very stage, with the model, optimizer
    and scheduler loaded and best.pt / checkpoints/ reconciled with it; else a fresh start in an
    emptied ``state_dir``. A state of another config, input or code is removed and the log names
    the fingerprint parts that differ. An unusable state (see :func:`check_state`) is moved aside
    (:func:`move_aside`) with a warning naming the problem; nothing is loaded from it. A state
    whose batches were drawn another way than ``batch_order`` is resumed with a warning (the
    workflow's stages never do that: :func:`saved_batch_order`), and so is a state saved on
    another ``platform`` (another CPU kind or torch: other rounding, so other numbers)."""
    state_path = state_dir / "state.pt"
    if not state_path.exists():
        shutil.rmtree(state_dir, ignore_errors=True)  # files of a run killed before its first save
        return StageProgress()
    try:
        state = read_state(state_path)
        changed = changed_parts(state.get("fingerprint"), stage_fingerprint)
        if changed:
            log.info(
                "starting stage %s fresh: %s changed since the saved state in %s (removed)",
                name, ", ".join(changed), state_dir,
            )
            shutil.rmtree(state_dir)
            return StageProgress()
        progress, best_source = check_state(state, state_dir, model, optimizer, scheduler)
    except StateError as exc:
        moved = move_aside(state_path, state_dir)
        log.warning("cannot resume stage %s from %s: %s; moved it to %s and starting the stage fresh", name, state_path, exc, moved)
        shutil.rmtree(state_dir)
        return StageProgress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    reconcile_checkpoints(state_dir, progress, model, main_metric, best_source)
    log.info("resuming stage %s at epoch %d from %s", name, progress.next_epoch, state_path)
    saved_order = state.get("batch_order")
    if batch_order is not None and saved_order is not None and saved_order != batch_order:
        log.warning(
            "stage %s: the saved epochs drew their batches as '%s', the resumed ones draw them as '%s': "
            "the result will differ from an uninterrupted run's", name, saved_order, batch_order,
        )
    saved_platform = state.get("platform")
    if platform is not None and isinstance(saved_platform, dict) and saved_platform != platform:
        differ = ", ".join(f"{key} {saved_platform.get(key)} -> {platform.get(key)}"
                           for key in sorted(saved_platform.keys() | platform.keys()) if saved_platform.get(key) != platform.get(key))
        log.warning(
            "stage %s: the saved epochs ran on another platform (%s): the resumed epochs round differently, "
            "so the result will match an uninterrupted run on neither platform", name, differ,
        )
    return progress


def saved_batch_order(state_dir: Path, stage_fingerprint: Fingerprint) -> str | None:
    """How the saved epochs of this very stage drew their batches (:func:`batch_order`), or None
    (no state, another stage's, unreadable, or saved before the order was recorded). The loaders
    of a resumed stage are built to draw them the same way, whatever the loading plan would
    choose today (``data.cache``/``num_workers: auto`` depend on the memory and threads the job
    finds), so the resumed run still replays the uninterrupted one exactly."""
    path = Path(state_dir) / "state.pt"
    if not path.is_file():
        return None
    try:  # mmap: only the small entries are read, not the weights
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - resume() reports an unreadable state and moves it aside
        return None
    if not isinstance(state, dict) or changed_parts(state.get("fingerprint"), stage_fingerprint):
        return None
    order = state.get("batch_order")
    return order if order in BATCH_ORDERS else None


def read_state(path: Path) -> dict[str, Any]:
    """A state file's dict (tensors and plain values only); StateError when it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or garbled bytes, a pickled object, ...
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise StateError(f"cannot read it ({type(exc).__name__}: {first_line})") from exc
    if not isinstance(state, dict):
        raise StateError(f"it holds a {type(state).__name__}, not a state dict")
    return state


def check_state(state: dict[str, Any], state_dir: Path, model, optimizer, scheduler) -> tuple[StageProgress, str | None]:
    """The progress of a state of this stage, and where best.pt comes from (:func:`best_source`),
    after checking that the state can be loaded whole: every key, one record per epoch up to its
    epoch, top-k entries of those epochs, tensors that fit the model and optimizer, the
    scheduler's keys, and the best epoch's weights somewhere. Loads nothing; raises StateError
    naming the first problem."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise StateError(f"it lacks {missing}")
    try:
        progress = StageProgress(list(state["history"]), list(state["topk"]), state["best_value"], state["best_epoch"])
        epochs = [record["epoch"] for record in progress.history]
        if not epochs or epochs != list(range(1, len(epochs) + 1)) or epochs[-1] != state["epoch"]:
            raise StateError(f"its history (epochs {epochs}) does not run from 1 to its epoch {state['epoch']}")
        if progress.best_epoch not in epochs:
            raise StateError(f"its best epoch {progress.best_epoch} is not one of its epochs")
        for entry in progress.topk:
            if entry["epoch"] not in epochs or float(entry["value"]) != entry["value"] or Path(entry["file"]).name != entry["file"]:
                raise StateError(f"its top-k entry {entry} is not one of its epochs' files")
        _check_tensors_fit("model", model.state_dict(), state["model"])
        _check_optimizer_fits(optimizer, state["optimizer"])
        if not isinstance(state["scheduler"], dict) or state["scheduler"].keys() != scheduler.state_dict().keys():
            raise StateError("its scheduler state is not this scheduler's")
        return progress, best_source(state_dir, progress)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise StateError(f"it is malformed ({type(exc).__name__}: {exc})") from exc


def _check_tensors_fit(what: str, expected: dict[str, torch.Tensor], saved: Any) -> None:
    if not isinstance(saved, dict) or saved.keys() != expected.keys():
        keys = saved.keys() if isinstance(saved, dict) else set()
        odd = sorted(set(keys) ^ set(expected))[:3]
        raise StateError(f"its {what} tensors are not this model's (keys differ: {odd})")
    for key, tensor in expected.items():
        value = saved[key]
        if not torch.is_tensor(value) or value.shape != tensor.shape:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise StateError(f"its {what} tensor {key} has shape {shape}, the model's {tuple(tensor.shape)}")


def _check_optimizer_fits(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups]:
        raise StateError("its optimizer has other parameter groups than this model's")
    shapes = {i: p.shape for sg, g in zip(saved_groups, groups) for i, p in zip(sg["params"], g["params"])}
    for index, slot in saved["state"].items():
        for name, value in slot.items():
            if torch.is_tensor(value) and value.ndim > 0 and value.shape != shapes.get(index):
                raise StateError(f"its optimizer {name} of parameter {index} has shape {tuple(value.shape)}")


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a checkpoint file holds; None when it is missing or unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception:
        return None


def best_source(state_dir: Path, progress: StageProgress) -> str | None:
    """Where best.pt's weights come from on resume: None when best.pt already holds the best
    epoch; ``"state"`` when the best epoch is the state's last (its weights are the state's);
    else the name of the best epoch's top-k file. StateError when none of these holds them."""
    if checkpoint_epoch(state_dir / "best.pt") == progress.best_epoch:
        return None
    if progress.best_epoch == progress.last_epoch:
        return "state"
    for entry in progress.topk:
        if entry["epoch"] == progress.best_epoch and (state_dir / "checkpoints" / entry["file"]).is_file():
            return entry["file"]
    raise StateError(f"best.pt does not hold its best epoch {progress.best_epoch} and no top-k copy of it is left")


def reconcile_checkpoints(
    state_dir: Path, progress: StageProgress, model: MultiHeadNet, main_metric: str, best_from: str | None
) -> None:
    """Make best.pt and checkpoints/ match the state just loaded into ``model`` (see the
    invariant above CheckpointKeeper): best.pt from ``best_from`` (:func:`best_source`); a
    missing top-k file of the last epoch rewritten, of an older epoch dropped from the list
    with a warning; files the list does not name deleted."""
    checkpoints = state_dir / "checkpoints"
    if best_from == "state":
        save_checkpoint(state_dir / "best.pt", model, checkpoint_meta(main_metric, progress.best_epoch, progress.best_value))
    elif best_from is not None:
        with atomic_output(state_dir / "best.pt") as tmp:
            shutil.copyfile(checkpoints / best_from, tmp)
    if best_from is not None:
        log.info("best.pt did not hold the saved best epoch %d: rewrote it from %s", progress.best_epoch,
                 "the saved state" if best_from == "state" else best_from)
    kept = []
    for entry in progress.topk:
        if not (checkpoints / entry["file"]).is_file():
            if entry["epoch"] != progress.last_epoch:
                log.warning("top-k checkpoint %s is missing; dropped from the top-k list", checkpoints / entry["file"])
                continue
            save_checkpoint(checkpoints / entry["file"], model, checkpoint_meta(main_metric, entry["epoch"], entry["value"]))
            log.info("top-k checkpoint %s of the saved last epoch was missing: rewrote it from the saved state", entry["file"])
        kept.append(entry)
    progress.topk = kept
    remove_unlisted_checkpoints(state_dir, kept)


def move_aside(state_path: Path, state_dir: Path) -> Path:
    """Move an unusable state file to ``<state folder>.state.pt.corrupt-<UTC time>`` beside the
    state folder (which is then emptied for a fresh start), where it stays for inspection."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = state_dir.with_name(f"{state_dir.name}.state.pt.corrupt-{stamp}")
    os.replace(state_path, target)
    return target


# --------------------------------------------------------------------------- the stage


def run_epoch(
    model: MultiHeadNet,
    loaders: StageLoaders,
    criteria,
    optimizer,
    scheduler,
    device: torch.device,
    *,
    epoch: int,
    progress_every: int,
    precision: str = "auto",
) -> dict[str, Any]:
    """Train one epoch, evaluate, and return the epoch's record. With an upright loader (rotation
    heads), the rotated valid images' metrics get the prefix ``aug_`` and the upright images give
    the plain valid metrics, so class accuracy compares with the other experiments. ``precision``
    applies to training only: evaluation runs as inference does (device.autocast's ``auto``), so
    the metric that picks the checkpoint is the one predict and infer reproduce."""
    started = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    train_metrics = train_one_epoch(
        model, loaders.train, criteria, optimizer, scheduler, device, epoch=epoch, progress_every=progress_every,
        precision=precision,
    )
    valid_metrics = evaluate(model, loaders.valid, criteria, device)
    if loaders.upright is not None:
        valid_metrics = {f"aug_{k}": v for k, v in valid_metrics.items()} | evaluate(
            model, loaders.upright, criteria, device
        )
    seconds = time.perf_counter() - started
    return {"epoch": epoch, "lr": lr, "seconds": round(seconds, 3), "train": train_metrics, "valid": valid_metrics}


@dataclass
class StageLoaders:
    """train (augmented, shuffled), valid, and with rotation heads the upright valid images."""

    train: DataLoader
    valid: DataLoader
    upright: DataLoader | None = None


def run_stage(
    model: MultiHeadNet,
    loaders: StageLoaders,
    spec: StageSpec,
    *,
    out_dir: str | Path,
    state_dir: str | Path,
    device: torch.device,
    seed: int,
    stage_fingerprint: Fingerprint,
    main_metric: str = "accuracy",
    extra_hooks: Sequence[EpochHook] = (),
    state_every_seconds: float = 0.0,
) -> dict[str, Any]:
    """Train `model` for one stage; resume from `state_dir` when its fingerprint matches.
    The resume state is saved as :class:`StateSaver` says (``state_every_seconds``).

    After every epoch the hooks run in order: the resume state, TensorBoard scalars, best/top-k
    checkpoints (after the state: see the invariant above CheckpointKeeper), then
    ``extra_hooks``. A SIGTERM during the hooks waits for them; anywhere else in the loop it
    stops at once (the state holds the epoch before). Either way the log says which epochs are
    saved and the job exits 143. At the end it writes into out_dir best.pt, last.pt,
    checkpoints/ (top-k by `main_metric` on valid), metrics.json and the TensorBoard log, and
    removes `state_dir`; a SIGTERM then waits until that is done and the stage ends normally.
    Returns the metrics (also in metrics.json).
    """
    out_dir, state_dir = Path(out_dir), Path(state_dir)
    spec = spec.for_loader(len(loaders.train))
    model.freeze_encoder(spec.freeze_encoder)
    place_model(model, device)
    criteria = build_criteria(model)
    optimizer = build_optimizer(model, spec)
    scheduler = build_scheduler(optimizer, spec, len(loaders.train))
    order, platform = batch_order(loaders.train), compute_platform(device)
    progress = resume(state_dir, stage_fingerprint, spec.name, model, optimizer, scheduler, main_metric, batch_order=order,
                      platform=platform)
    (state_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    tensorboard = TensorBoardScalars(state_dir / "tensorboard", spec.name, progress.history)
    saver = StateSaver(state_dir, stage_fingerprint, saved_epoch=progress.last_epoch, every_seconds=state_every_seconds)
    hooks = [saver, tensorboard, CheckpointKeeper(state_dir, main_metric), *extra_hooks]
    _log_start(model, loaders, spec, seed)
    log.info("stage %s: training forward pass in %s (precision: %s)", spec.name, describe_precision(device, spec.precision),
             spec.precision)
    progress_every = max(1, len(loaders.train) // 4) if len(loaders.train) >= 40 else 0
    try:
        with terminate_on_sigterm() as sigterm:
            for epoch in range(progress.next_epoch, spec.epochs + 1):
                seed_epoch(loaders.train, seed, epoch)
                record = run_epoch(
                    model, loaders, criteria, optimizer, scheduler, device, epoch=epoch, progress_every=progress_every,
                    precision=spec.precision,
                )
                with sigterm.held():  # a SIGTERM never splits an epoch's state from its checkpoints
                    progress.add(record, main_metric, spec.top_k, spec.tie_break)
                    _log_epoch(spec, record)
                    end = EpochEnd(spec, epoch, record, model, optimizer, scheduler, progress, order, platform)
                    for hook in hooks:
                        hook(end)
            tensorboard.close()
            with sigterm.held(then_stop=False):  # finishing takes seconds: better than losing it
                metrics = finish_stage(out_dir, state_dir, model, spec, progress, main_metric, platform)
            if sigterm.pending:
                log.warning("SIGTERM arrived while stage %s was publishing its outputs; finished them first", spec.name)
    except Terminated:
        _log_terminated(spec.name, saver.saved_epoch, state_dir)
        raise SystemExit(143) from None
    finally:
        tensorboard.close()
    return metrics


def _log_terminated(name: str, saved_epoch: int, state_dir: Path) -> None:
    if saved_epoch:
        log.error(
            "stage %s terminated by SIGTERM; epochs up to %d are saved in %s and a rerun "
            "(snakemake --rerun-incomplete) resumes at epoch %d", name, saved_epoch, state_dir, saved_epoch + 1,
        )
    else:
        log.error("stage %s terminated by SIGTERM before its first epoch was saved; a rerun starts it over", name)


def finish_stage(
    out_dir: Path, state_dir: Path, model: MultiHeadNet, spec: StageSpec, progress: StageProgress, main_metric: str,
    platform: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Publish the finished stage and remove its state; returns the metrics."""
    metrics = stage_metrics(spec, progress, main_metric, platform)
    publish(out_dir, state_dir, model, metrics, [entry["file"] for entry in progress.topk])
    # The state is there to resume an interrupted stage; once the outputs are published it
    # would only double the disk (model + optimizer moments + copies of every checkpoint).
    # state.pt goes first, so a removal cut short leaves no state rather than a partial one.
    (state_dir / "state.pt").unlink(missing_ok=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    return metrics


def _log_start(model: MultiHeadNet, loaders: StageLoaders, spec: StageSpec, seed: int) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "stage %s: %d epochs, %d train / %d valid images, %d trainable parameters, encoder %s, seed %d",
        spec.name, spec.epochs, len(loaders.train.dataset), len(loaders.valid.dataset), trainable,
        "frozen" if spec.freeze_encoder else "trained", seed,
    )


def _log_epoch(spec: StageSpec, record: dict[str, Any]) -> None:
    train, valid = record["train"], record["valid"]
    log.info(
        "stage %s epoch %d/%d lr=%.2e train_loss=%.4f train_acc=%.4f valid_loss=%.4f valid_acc=%.4f (%.1fs)",
        spec.name, record["epoch"], spec.epochs, record["lr"], train["loss"], train.get("accuracy", float("nan")),
        valid["loss"], valid.get("accuracy", float("nan")), record["seconds"],
    )


def stage_metrics(
    spec: StageSpec, progress: StageProgress, main_metric: str, platform: dict[str, str] | None = None
) -> dict[str, Any]:
    """metrics.json of a finished stage: the spec as trained, every epoch, the best one (the
    epoch best.pt holds), and the platform of the job that finished it."""
    return {
        "stage": spec.name,
        "spec": asdict(spec),
        "main_metric": f"valid/{main_metric}",
        "best": {"epoch": progress.best_epoch, "value": progress.best_value},
        "epochs": progress.history,
        "platform": platform,
    }


def publish(
    out_dir: Path, state_dir: Path, model: MultiHeadNet, metrics: dict[str, Any], checkpoint_files: Sequence[str]
) -> None:
    """Copy the finished stage from its state folder into the declared outputs, which agree
    because they come from one reconciled state: last.pt is ``model``, best.pt holds the best
    epoch of ``metrics``, checkpoints/ exactly ``checkpoint_files`` (the top-k list),
    tensorboard/ exactly the epochs of ``metrics``; metrics.json is written last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir / "last.pt", model, {"epoch": metrics["epochs"][-1]["epoch"]})
    with atomic_output(out_dir / "best.pt") as tmp:
        shutil.copyfile(state_dir / "best.pt", tmp)
    with atomic_directory(out_dir / "checkpoints") as tmp:
        for name in checkpoint_files:
            shutil.copyfile(state_dir / "checkpoints" / name, tmp / name)
    with atomic_directory(out_dir / "tensorboard") as tmp:
        shutil.copytree(state_dir / "tensorboard", tmp, dirs_exist_ok=True)
    write_json_atomic(metrics, out_dir / "metrics.json")
