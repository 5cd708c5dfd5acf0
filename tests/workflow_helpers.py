"""Run the real snakemake on tiny generated data in a temporary working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"

# A fast recipe for 16 px images: the test asserts the plumbing and sane numbers, not accuracy.
TINY_EXPERIMENT = {
    "model": {"arch": "resnet18", "embedding_size": 16, "small_input": True},
    "heads": [{"name": "class", "loss": "cross_entropy"}],
    "data": {
        "image_size": 16,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "augmentations": [{"name": "Affine", "params": {"translate_percent": [-0.05, 0.05], "p": 0.5}}],
    },
    "stages": {
        "stage1": {"epochs": 1, "lr": 0.01, "batch_size": 8, "freeze_encoder": True},
        "stage2": {"epochs": 2, "lr": 0.003, "batch_size": 8, "top_k": 2},
    },
}


def tiny_experiment(*heads: dict) -> dict:
    """TINY_EXPERIMENT with other heads, e.g. tiny_experiment({"name": "class", "loss": "bce"})."""
    return {**TINY_EXPERIMENT, "heads": list(heads)}


# The four experiments of config/experiments, at the tiny recipe.
TINY_EXPERIMENTS = {
    "softmax": TINY_EXPERIMENT,
    "bce": tiny_experiment({"name": "class", "loss": "bce"}),
    "focal": tiny_experiment({"name": "class", "loss": "focal", "params": {"gamma": 2.0, "alpha": 0.25}}),
    "augs": tiny_experiment({"name": "class"}, {"name": "rotation"}, {"name": "class_rotation"}),
}


def write_tiny_config(workdir: Path, dataset: Path, experiments: dict[str, dict] | None = None, **overrides) -> Path:
    """Experiment files + a config file in `workdir`; returns the config path."""
    experiments = experiments or {"softmax": TINY_EXPERIMENT}
    exp_dir = workdir / "experiments"
    exp_dir.mkdir(parents=True, exist_ok=True)
    for name, experiment in experiments.items():
        (exp_dir / f"{name}.yaml").write_text(yaml.safe_dump(experiment, sort_keys=False))
    config = {
        "dataset": str(dataset),
        "experiments": list(experiments),
        "experiments_dir": str(exp_dir),
        "n_folds": 3,
        "test_fraction": 0.0,  # tests that need a test split set it themselves
        "training": {"state_every_seconds": 0},  # the resume tests look at every epoch's state
        "gpu": 0,
        "threads": 1,
        "index": {"n_components": 8, "ks": [1, 3, 5, 10]},
        **overrides,
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_snakemake(workdir: Path, *args: str, configfile: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args]
    if configfile is not None:  # last: --configfile takes several values
        cmd += ["--configfile", str(configfile)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


FAULTS = Path(__file__).resolve().parent / "faults"


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's "Job stats" table: rule -> number of jobs ({} when nothing is to be done).
    The table is a header (job, count), a rule per line, then a `total` line."""
    if "Job stats:" not in output:
        return {}
    counts = {}
    for line in output.split("Job stats:", 1)[1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total" or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def fault_env(fault: str, marker_dir: Path) -> dict[str, str]:
    """Environment for a snakemake run whose jobs suffer ``fault`` once (tests/faults/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "LABELFLOW_FAULT": fault, "LABELFLOW_FAULT_DIR": str(marker_dir)}
