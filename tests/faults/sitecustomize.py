"""Fault injection for the workflow tests, kept out of the production code.

A test puts this folder first on PYTHONPATH of its snakemake run, so every job's Python
imports this module at start-up (Python imports ``sitecustomize`` by itself). When the
variable LABELFLOW_FAULT is set, ``labelflow.training`` is patched as it is imported:

    LABELFLOW_FAULT="raise:<stage>:<epoch>"              raise after that epoch's state is saved
                                                         (before its checkpoints are written)
    LABELFLOW_FAULT="raise-before-best:<stage>:<epoch>"  raise just before that epoch's best.pt
                                                         is written (its state already is)
    LABELFLOW_FAULT="sigterm-epoch:<stage>:<epoch>"      SIGTERM to the job itself after the
                                                         first batch of that epoch
    LABELFLOW_FAULT="sigterm-save:<stage>:<epoch>"       SIGTERM to the job itself while that
                                                         epoch's state is saved: after its temp
                                                         file is written, before the rename

A fault fires once per workflow: a marker file in LABELFLOW_FAULT_DIR records it, so a retry
(snakemake --retries) or a rerun goes through.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import signal
import sys
from pathlib import Path

FAULT = os.environ.get("LABELFLOW_FAULT", "")
KINDS = ("raise", "raise-before-best", "sigterm-epoch", "sigterm-save")


def _fire_once(name: str) -> bool:
    marker = Path(os.environ["LABELFLOW_FAULT_DIR"]) / f"{name}.fired"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _patch_training(training) -> None:
    kind, stage, epoch = FAULT.split(":")
    if kind not in KINDS:
        raise ValueError(f"LABELFLOW_FAULT={FAULT!r}: unknown kind {kind!r}; one of {KINDS}")
    epoch = int(epoch)
    current = {"stage": None}  # the stage run_stage is training
    real_run_stage, real_train_one_epoch = training.run_stage, training.train_one_epoch
    real_save_state, real_save_checkpoint = training.save_state, training.save_checkpoint

    def fires(kind_here: str, at_epoch: int) -> bool:
        return kind == kind_here and current["stage"] == stage and at_epoch == epoch and _fire_once(FAULT)

    def run_stage(model, loaders, spec, **kwargs):
        current["stage"] = spec.name
        return real_run_stage(model, loaders, spec, **kwargs)

    def train_one_epoch(*args, epoch, on_step=None, **kwargs):
        if fires("sigterm-epoch", epoch):
            on_step = lambda step, lr, loss: _sigterm_self() if step == 1 else False
        return real_train_one_epoch(*args, epoch=epoch, on_step=on_step, **kwargs)

    def save_state(path, fingerprint, end):
        if not fires("sigterm-save", end.epoch):
            real_save_state(path, fingerprint, end)
            if fires("raise", end.epoch):
                raise RuntimeError(f"injected failure after epoch {epoch} of stage {stage}")
            return
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst) == Path(path) and Path(src).is_file():
                _sigterm_self()
            return real_replace(src, dst)

        os.replace = replace
        try:
            real_save_state(path, fingerprint, end)
        finally:
            os.replace = real_replace

    def save_checkpoint(path, model, extra=None):
        if Path(path).name == "best.pt" and fires("raise-before-best", (extra or {}).get("epoch")):
            raise RuntimeError(f"injected failure before best.pt of epoch {epoch} of stage {stage}")
        real_save_checkpoint(path, model, extra)

    training.run_stage, training.train_one_epoch = run_stage, train_one_epoch
    training.save_state, training.save_checkpoint = save_state, save_checkpoint


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs the patch right after labelflow.training executes, in whichever job imports it."""

    def find_spec(self, name, path, target=None):
        if name != "labelflow.training":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch_training(module)

        spec.loader.exec_module = exec_module
        return spec


if FAULT:
    sys.meta_path.insert(0, _PatchOnImport())
