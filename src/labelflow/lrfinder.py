"""LR range test: the stage's own training loop, with the learning rate growing every batch."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from labelflow.models import MultiHeadNet
from labelflow.device import place_model
from labelflow.training import StageSpec, build_criteria, build_optimizer, seed_epoch, train_one_epoch

log = logging.getLogger(__name__)


def lr_schedule(start_lr: float, final_lr: float, num_steps: int, scale: str) -> np.ndarray:
    """The learning rate of each step: evenly spaced on a linear or a log scale, both ends included."""
    if not 0 < start_lr < final_lr:
        raise ValueError(f"lrfinder needs 0 < start_lr < final_lr, got {start_lr} and {final_lr}")
    if scale == "linear":
        return np.linspace(start_lr, final_lr, num_steps)
    if scale == "log":
        return np.geomspace(start_lr, final_lr, num_steps)
    raise ValueError(f"lrfinder.scale={scale!r}; choose linear or log")


def find_lr(
    model: MultiHeadNet,
    train_loader,
    spec: StageSpec,
    device: torch.device,
    *,
    start_lr: float,
    final_lr: float,
    num_steps: int,
    scale: str = "log",
    smoothing: float = 0.98,
    diverge_factor: float = 4.0,
    seed: int = 0,
) -> pd.DataFrame:
    """Train for up to `num_steps` batches with the lr of `lr_schedule`; stop when the smoothed
    loss exceeds `diverge_factor` × its best. Returns step, lr, loss, smoothed_loss per batch.

    The caller throws the model away afterwards: the finder only measures.
    """
    lrs = lr_schedule(start_lr, final_lr, num_steps, scale)
    model.freeze_encoder(spec.freeze_encoder)
    place_model(model, device)
    optimizer = build_optimizer(model, replace(spec, lr=float(lrs[0]), weight_decay=spec.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: float(lrs[min(step, num_steps - 1)] / lrs[0])
    )
    criteria = build_criteria(model)
    records: list[dict[str, Any]] = []
    state = {"avg": 0.0, "best": math.inf, "stop": False}

    def on_step(step: int, lr: float, loss: float) -> bool:
        n = len(records) + 1
        state["avg"] = smoothing * state["avg"] + (1 - smoothing) * loss
        smoothed = state["avg"] / (1 - smoothing**n)  # bias-corrected moving average
        records.append({"step": n, "lr": lr, "loss": loss, "smoothed_loss": smoothed})
        state["best"] = min(state["best"], smoothed)
        if not math.isfinite(loss) or smoothed > diverge_factor * state["best"]:
            log.info("lrfinder: loss diverged at lr=%.3g (step %d); stopping", lr, n)
            state["stop"] = True
        if n >= num_steps:
            state["stop"] = True
        return state["stop"]

    epoch = 0
    while not state["stop"]:
        epoch += 1
        seed_epoch(train_loader, seed, epoch)
        train_one_epoch(model, train_loader, criteria, optimizer, scheduler, device, epoch=epoch, on_step=on_step,
                        precision=spec.precision)
    return pd.DataFrame(records)


def suggest(records: pd.DataFrame) -> dict[str, float]:
    """steepest: lr where the smoothed loss falls fastest (per log-lr); min_div10: lr at the
    smoothed minimum / 10. Only the part before the minimum counts (after it, the loss diverges)."""
    valid = records[np.isfinite(records["smoothed_loss"])]
    if len(valid) < 3:
        raise ValueError("lrfinder recorded fewer than 3 finite losses; raise num_steps or lower start_lr")
    best = int(valid["smoothed_loss"].to_numpy().argmin())
    head = valid.iloc[: max(best + 1, 3)]
    slopes = np.gradient(head["smoothed_loss"].to_numpy(), np.log(head["lr"].to_numpy()))
    return {
        "steepest": float(head["lr"].iloc[int(slopes.argmin())]),
        "min_div10": float(valid["lr"].iloc[best] / 10),
    }
