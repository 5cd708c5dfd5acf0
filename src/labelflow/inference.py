"""Run a trained model over images: logits, probabilities and embeddings per image."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from labelflow.device import autocast, images_for, place_model
from labelflow.losses import get_loss, probabilities
from labelflow.models import MultiHeadNet

log = logging.getLogger(__name__)


@torch.inference_mode()
def predict(
    model: MultiHeadNet, loader: DataLoader, device: torch.device, head: str | None = None, with_targets: bool = False
) -> dict[str, np.ndarray]:
    """Returns {"logits", "probabilities", "embeddings"} for `head` (default: the first head),
    and with `with_targets` the loader's targets for that head as "targets"."""
    head_spec = model.spec.heads[0] if head is None else next(h for h in model.spec.heads if h.name == head)
    activation = get_loss(head_spec.loss).activation
    place_model(model.eval(), device)
    n = len(loader.dataset)
    # preallocated: no list of batches concatenated at the end (which would hold both at once)
    logits = np.empty((n, head_spec.num_outputs), dtype=np.float32)
    embeddings = np.empty((n, model.spec.embedding_size), dtype=np.float32)
    targets: list[torch.Tensor] = []
    started, done = time.perf_counter(), 0
    report_every = max(1, len(loader) // 4) if len(loader) >= 40 else 0
    for step, batch in enumerate(loader, start=1):
        images = images_for(batch["image"].to(device, non_blocking=device.type == "cuda"), device)
        with autocast(device):
            outputs = model(images)
        logits[done : done + len(images)] = outputs[head_spec.name].float().cpu().numpy()
        embeddings[done : done + len(images)] = outputs["embedding"].float().cpu().numpy()
        if with_targets:
            targets.append(batch[head_spec.name])
        done += len(images)
        if report_every and step % report_every == 0:
            log.info("inference: %d/%d images (%.0f img/s)", done, n, done / (time.perf_counter() - started))
    result = {
        "logits": logits,
        "probabilities": probabilities(logits, activation),
        "embeddings": embeddings,
    }
    if with_targets:
        result["targets"] = torch.cat(targets).numpy() if targets else np.empty(0, dtype=np.int64)
    return result
