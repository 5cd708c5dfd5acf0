"""Fault injection for the workflow tests, kept out of the production code.

A test puts this folder first on PYTHONPATH of its snakemake run, so every job's Python
imports this module at start-up (Python imports ``sitecustomize`` by itself). When the
variable LABELFLOW_FAULT is set, ``labelflow.training`` is patched as it is imported:

    LABELFLOW_FAULT="raise:<stage>:<epoch>"   raise after that epoch's state is saved

A fault fires once per workflow: a marker file in LABELFLOW_FAULT_DIR records it, so a retry
(snakemake --retries) or a rerun goes through.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

FAULT = os.environ.get("LABELFLOW_FAULT", "")


def _fire_once(name: str) -> bool:
    marker = Path(os.environ["LABELFLOW_FAULT_DIR"]) / f"{name}.fired"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def _patch_training(training) -> None:
    kind, stage, epoch = FAULT.split(":")
    real_save_state = training.save_state

    def save_state(path, fingerprint, end):
        real_save_state(path, fingerprint, end)
        if kind == "raise" and end.spec.name == stage and end.epoch == int(epoch) and _fire_once(FAULT):
            raise RuntimeError(f"injected failure after epoch {epoch} of stage {stage}")

    training.save_state = save_state


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
