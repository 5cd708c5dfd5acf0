"""Runs that survive: SIGKILL mid-training + --rerun-incomplete, and --retries with an injected failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import make_tiny_dataset
from workflow_helpers import REPO, SNAKEMAKE, TINY_EXPERIMENT, fault_env, run_snakemake, write_tiny_config

pytestmark = pytest.mark.e2e

# Enough epochs in stage2 that the kill lands mid-stage.
LONG = {**TINY_EXPERIMENT, "stages": {**TINY_EXPERIMENT["stages"], "stage2": {"epochs": 6, "lr": 0.003, "batch_size": 8}}}


def _epochs(workdir):
    metrics = json.loads((workdir / "results/softmax/stage2/metrics.json").read_text())
    return [{k: v for k, v in e.items() if k != "seconds"} for e in metrics["epochs"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run with the same seed and config."""
    base = tmp_path_factory.mktemp("reference")
    dataset = make_tiny_dataset(base / "images")
    config = write_tiny_config(base / "work", dataset, experiments={"softmax": LONG})
    result = run_snakemake(base / "work", configfile=config)
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "work", dataset


def _saved_epoch(state):
    try:
        return torch.load(state, weights_only=True)["epoch"] if state.exists() else 0
    except Exception:  # caught mid-replace: try again
        return 0


def test_sigkill_then_rerun_incomplete_resumes_and_matches(reference, tmp_path):
    ref_workdir, dataset = reference
    workdir = tmp_path / "work"
    config = write_tiny_config(workdir, dataset, experiments={"softmax": LONG})
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", "--configfile", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = workdir / "results/softmax/state/stage2/state.pt"
    deadline = time.time() + 300
    while _saved_epoch(state) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the workflow finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and its jobs, no chance to clean up
    proc.wait()
    killed_at = _saved_epoch(state)
    assert 2 <= killed_at < 6
    assert not (workdir / "results/softmax/stage2/metrics.json").exists()

    # A plain rerun says how to recover: first the lock a killed run leaves behind...
    plain = run_snakemake(workdir, configfile=config)
    assert plain.returncode != 0 and "--unlock" in plain.stderr
    assert run_snakemake(workdir, "--unlock", configfile=config).returncode == 0

    result = run_snakemake(workdir, "--rerun-incomplete", configfile=config)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (workdir / "results/logs/softmax/stage2.log").read_text()
    resumed = [line for line in log.splitlines() if "resuming stage stage2 at epoch" in line]
    assert resumed and int(resumed[-1].split("at epoch ")[1].split()[0]) > 1
    # CPU determinism: the interrupted run ends exactly where the uninterrupted one does
    assert _epochs(workdir) == _epochs(ref_workdir)
    summary = json.loads((workdir / "results/softmax/summary.json").read_text())
    assert summary == json.loads((ref_workdir / "results/softmax/summary.json").read_text())


def test_retries_resume_after_an_injected_failure(reference, tmp_path):
    ref_workdir, dataset = reference
    workdir = tmp_path / "work"
    config = write_tiny_config(workdir, dataset, experiments={"softmax": LONG})
    env = fault_env("raise:stage2:3", tmp_path / "faults")
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           "--configfile", str(config), "--retries", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # snakemake reports the failed attempt (the retry's log replaces the job log)...
    assert "injected failure after epoch 3" in result.stdout + result.stderr
    # a finished stage leaves no resume state behind
    assert not (workdir / "results/softmax/state/stage2").exists()
    # ...and the retry resumed after the last saved epoch instead of starting over
    log = (workdir / "results/logs/softmax/stage2.log").read_text()
    assert "resuming stage stage2 at epoch 4" in log
    assert _epochs(workdir) == _epochs(ref_workdir)
