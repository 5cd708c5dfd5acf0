"""The one training loop: every rule that trains (stage1, stage2 of the default experiments,
grid points, k-fold folds, the OOD run and every autolabel round) calls :func:`run_stage`,
and the LR finder runs the same :func:`train_one_epoch`.

Shaped after torchvision's reference script: ``train_one_epoch``, ``evaluate``, a checkpoint
dict with model/optimizer/scheduler/epoch. What happens after each epoch (TensorBoard scalars,
best/top-k checkpoints, the resume state) is a list of hooks, so the loop stays readable.
Training state is saved atomically after every epoch in ``state_dir`` (not a declared
Snakemake output, which would be deleted on failure) so a killed job resumes where it
stopped; declared outputs are written once, at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from labelflow.device import autocast, images_for, place_model, to_device
from labelflow.io import atomic_output, write_json_atomic
from labelflow.losses import get_loss
from labelflow.metrics import HeadMetrics
from labelflow.models import MultiHeadNet, atomic_torch_save, save_checkpoint

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("constant", "cosine", "step", "onecycle")


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


def build_optimizer(model: torch.nn.Module, spec: StageSpec) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=True
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
) -> dict[str, float]:
    model.train()
    metrics = HeadMetrics(model.spec.heads)
    started = time.perf_counter()
    for step, batch in enumerate(loader, start=1):
        batch = to_device(batch, device)
        with autocast(device):
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


def fingerprint(*parts: Any) -> str:
    """Stable hash of a stage's config and inputs: resume only into the same training."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Terminated(Exception):
    """SIGTERM arrived (SLURM pre-emption, timeout): stop after saving what is saved."""


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class StageProgress:
    """What a stage has done so far; saved with the model each epoch so a rerun resumes."""

    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    topk: list[dict[str, Any]] = field(default_factory=list)  # {"epoch", "value", "file"}, best first
    best_value: float | None = None

    @property
    def next_epoch(self) -> int:
        return self.history[-1]["epoch"] + 1 if self.history else 1


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


EpochHook = Callable[[EpochEnd], None]


class TensorBoardScalars:
    """Every train/valid metric and the lr of an epoch as TensorBoard scalars."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, end: EpochEnd) -> None:
        for split_name in ("train", "valid"):
            for key, value in end.record[split_name].items():
                self.writer.add_scalar(f"{end.spec.name}/{split_name}/{key}", value, end.epoch)
        self.writer.add_scalar(f"{end.spec.name}/lr", end.record["lr"], end.epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CheckpointKeeper:
    """best.pt when the epoch's valid ``main_metric`` beats the best so far; ``checkpoints/``
    keeps the top-k epochs, named with the value."""

    def __init__(self, state_dir: Path, main_metric: str):
        self.state_dir = state_dir
        self.main_metric = main_metric

    def __call__(self, end: EpochEnd) -> None:
        progress, spec, epoch = end.progress, end.spec, end.epoch
        value = end.record["valid"][self.main_metric]
        meta = {"epoch": epoch, self.main_metric: value}
        if progress.best_value is None or value > progress.best_value:
            progress.best_value = value
            save_checkpoint(self.state_dir / "best.pt", end.model, meta)
        if spec.top_k > 0 and (len(progress.topk) < spec.top_k or value > progress.topk[-1]["value"]):
            name = f"epoch={epoch:03d}-{self.main_metric}={value:.4f}.pt"
            save_checkpoint(self.state_dir / "checkpoints" / name, end.model, meta)
            progress.topk.append({"epoch": epoch, "value": value, "file": name})
            progress.topk.sort(key=lambda t: (-t["value"], t["epoch"]))
            for dropped in progress.topk[spec.top_k:]:
                (self.state_dir / "checkpoints" / dropped["file"]).unlink(missing_ok=True)
            progress.topk = progress.topk[: spec.top_k]


class StateSaver:
    """The resume state (model, optimizer, scheduler, progress) after every epoch."""

    def __init__(self, state_dir: Path, stage_fingerprint: str):
        self.path = state_dir / "state.pt"
        self.fingerprint = stage_fingerprint

    def __call__(self, end: EpochEnd) -> None:
        save_state(self.path, self.fingerprint, end)


def save_state(path: Path, stage_fingerprint: str, end: EpochEnd) -> None:
    atomic_torch_save(
        {
            "fingerprint": stage_fingerprint,
            "epoch": end.epoch,
            "model": end.model.state_dict(),
            "optimizer": end.optimizer.state_dict(),
            "scheduler": end.scheduler.state_dict(),
            "history": end.progress.history,
            "topk": end.progress.topk,
            "best_value": end.progress.best_value,
        },
        path,
    )


def resume(state_dir: Path, stage_fingerprint: str, name: str, model, optimizer, scheduler) -> StageProgress:
    """The saved progress when ``state_dir`` holds this very stage (same fingerprint), else a
    fresh start (a state of another config or input is removed)."""
    state_path = state_dir / "state.pt"
    if not state_path.exists():
        return StageProgress()
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != stage_fingerprint:
        log.info(
            "starting stage %s fresh: saved state %s belongs to another config or input "
            "(fingerprint %s, now %s)", name, state_path, state.get("fingerprint"), stage_fingerprint,
        )
        shutil.rmtree(state_dir)
        return StageProgress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    progress = StageProgress(state["history"], state["topk"], state["best_value"])
    log.info("resuming stage %s at epoch %d from %s", name, progress.next_epoch, state_path)
    return progress


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
) -> dict[str, Any]:
    """Train one epoch, evaluate, and return the epoch's record. With an upright loader (rotation
    heads), the rotated valid images' metrics get the prefix ``aug_`` and the upright images give
    the plain valid metrics, so class accuracy compares with the other experiments."""
    started = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    train_metrics = train_one_epoch(
        model, loaders.train, criteria, optimizer, scheduler, device, epoch=epoch, progress_every=progress_every
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
    stage_fingerprint: str,
    main_metric: str = "accuracy",
    extra_hooks: Sequence[EpochHook] = (),
) -> dict[str, Any]:
    """Train `model` for one stage; resume from `state_dir` when its fingerprint matches.

    After every epoch the hooks run in order: TensorBoard scalars, best/top-k checkpoints,
    the resume state, then ``extra_hooks``. At the end it writes into out_dir best.pt, last.pt,
    checkpoints/ (top-k by `main_metric` on valid), metrics.json and the TensorBoard log, and
    removes `state_dir`. Returns the metrics (also in metrics.json).
    """
    out_dir, state_dir = Path(out_dir), Path(state_dir)
    spec = spec.for_loader(len(loaders.train))
    model.freeze_encoder(spec.freeze_encoder)
    place_model(model, device)
    criteria = build_criteria(model)
    optimizer = build_optimizer(model, spec)
    scheduler = build_scheduler(optimizer, spec, len(loaders.train))
    progress = resume(state_dir, stage_fingerprint, spec.name, model, optimizer, scheduler)
    (state_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    tensorboard = TensorBoardScalars(state_dir / "tensorboard")
    hooks = [tensorboard, CheckpointKeeper(state_dir, main_metric), StateSaver(state_dir, stage_fingerprint), *extra_hooks]
    _log_start(model, loaders, spec)
    progress_every = max(1, len(loaders.train) // 4) if len(loaders.train) >= 40 else 0
    try:
        with terminate_on_sigterm():
            for epoch in range(progress.next_epoch, spec.epochs + 1):
                seed_epoch(loaders.train, seed, epoch)
                record = run_epoch(
                    model, loaders, criteria, optimizer, scheduler, device, epoch=epoch, progress_every=progress_every
                )
                progress.history.append(record)
                _log_epoch(spec, record)
                for hook in hooks:
                    hook(EpochEnd(spec, epoch, record, model, optimizer, scheduler, progress))
    except Terminated:
        log.error(
            "stage %s terminated by SIGTERM; epochs up to %d are saved in %s and a rerun "
            "(snakemake --rerun-incomplete) resumes from there", spec.name, progress.next_epoch - 1, state_dir,
        )
        raise SystemExit(143) from None
    finally:
        tensorboard.close()
    metrics = stage_metrics(spec, progress, main_metric)
    publish(out_dir, state_dir, model, metrics)
    # The state is there to resume an interrupted stage; once the outputs are published it
    # would only double the disk (model + optimizer moments + copies of every checkpoint).
    shutil.rmtree(state_dir, ignore_errors=True)
    return metrics


def _log_start(model: MultiHeadNet, loaders: StageLoaders, spec: StageSpec) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "stage %s: %d epochs, %d train / %d valid images, %d trainable parameters, encoder %s",
        spec.name, spec.epochs, len(loaders.train.dataset), len(loaders.valid.dataset), trainable,
        "frozen" if spec.freeze_encoder else "trained",
    )


def _log_epoch(spec: StageSpec, record: dict[str, Any]) -> None:
    train, valid = record["train"], record["valid"]
    log.info(
        "stage %s epoch %d/%d lr=%.2e train_loss=%.4f train_acc=%.4f valid_loss=%.4f valid_acc=%.4f (%.1fs)",
        spec.name, record["epoch"], spec.epochs, record["lr"], train["loss"], train.get("accuracy", float("nan")),
        valid["loss"], valid.get("accuracy", float("nan")), record["seconds"],
    )


def stage_metrics(spec: StageSpec, progress: StageProgress, main_metric: str) -> dict[str, Any]:
    """metrics.json of a finished stage: the spec as trained, every epoch, the best one."""
    history = progress.history
    best_epoch = max(history, key=lambda r: (r["valid"][main_metric], -r["epoch"]))["epoch"]
    return {
        "stage": spec.name,
        "spec": asdict(spec),
        "main_metric": f"valid/{main_metric}",
        "best": {"epoch": best_epoch, "value": progress.best_value},
        "epochs": history,
    }


def publish(out_dir: Path, state_dir: Path, model: MultiHeadNet, metrics: dict[str, Any]) -> None:
    """Copy the finished stage from its state folder into the declared outputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    last_epoch = metrics["epochs"][-1]["epoch"]
    save_checkpoint(out_dir / "last.pt", model, {"epoch": last_epoch})
    with atomic_output(out_dir / "best.pt") as tmp:
        shutil.copyfile(state_dir / "best.pt", tmp)
    for name in ("checkpoints", "tensorboard"):
        target = out_dir / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(state_dir / name, target)
    write_json_atomic(metrics, out_dir / "metrics.json")
