"""Runs that survive, with the real snakemake: SIGKILL mid-training + --rerun-incomplete,
--retries after a failure between the state and best.pt, SIGTERM mid-epoch and while the state
is written, and a corrupt state file.

Every test starts from a copy of the reference run's working directory without its stage2
(outputs, state, log, Snakemake metadata included), so only the stage2 job runs: the faults are
all in stage2, and the runs end compared with the reference's stage2 outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_dataset
from workflow_helpers import REPO, SNAKEMAKE, TINY_EXPERIMENT, fault_env, run_snakemake, write_tiny_config

pytestmark = pytest.mark.e2e

# Enough epochs in stage2 that the kill lands mid-stage.
LONG = {**TINY_EXPERIMENT, "stages": {**TINY_EXPERIMENT["stages"], "stage2": {"epochs": 6, "lr": 0.003, "batch_size": 8}}}
STAGE2 = "results/softmax/stage2"
TARGET = f"{STAGE2}/metrics.json"
STATE = "results/softmax/state/stage2"
LOG = "results/logs/softmax/stage2.log"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (up to stage2) with the same seed and config."""
    base = tmp_path_factory.mktemp("reference")
    dataset = make_tiny_dataset(base / "images")
    config = write_tiny_config(base / "work", dataset, experiments={"softmax": LONG})
    result = run_snakemake(base / "work", TARGET, configfile=config)
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "work", dataset


@pytest.fixture
def workdir(reference, tmp_path):
    """The reference's working directory up to stage1 (data, stage1, Snakemake's records of
    them); its config is the reference's."""
    ref_workdir, dataset = reference
    work = tmp_path / "work"
    shutil.copytree(ref_workdir, work, ignore=shutil.ignore_patterns("stage2*", "locks", "incomplete"))
    write_tiny_config(work, dataset, experiments={"softmax": LONG})
    return work


def _snakemake(workdir: Path, *args: str, fault: str | None = None, marker_dir: Path | None = None):
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args, TARGET,
           "--configfile", str(workdir / "config.yaml")]
    env = fault_env(fault, marker_dir) if fault else None
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _log(workdir: Path) -> str:
    return (workdir / LOG).read_text()


def _epochs(metrics: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in metrics["epochs"]]


def _assert_matches_reference(workdir: Path, ref_workdir: Path) -> None:
    """stage2's outputs equal the reference's: every epoch's metrics, the best epoch, the top-k
    files, and the weights of best.pt and last.pt; best.pt holds metrics.json's best epoch."""
    out, ref = workdir / STAGE2, ref_workdir / STAGE2
    metrics = json.loads((out / "metrics.json").read_text())
    ref_metrics = json.loads((ref / "metrics.json").read_text())
    # CPU determinism: the interrupted run ends exactly where the uninterrupted one does
    assert _epochs(metrics) == _epochs(ref_metrics)
    assert metrics["best"] == ref_metrics["best"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(p.name for p in (ref / "checkpoints").iterdir())
    for name in ("best.pt", "last.pt"):
        mine, theirs = (torch.load(d / name, weights_only=True) for d in (out, ref))
        assert mine["epoch"] == theirs["epoch"], name
        assert mine["model"].keys() == theirs["model"].keys()
        for key, value in theirs["model"].items():
            assert torch.equal(mine["model"][key], value), (name, key)
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == metrics["best"]["epoch"]
    assert not (workdir / STATE).exists()  # a finished stage leaves no resume state behind


def _saved_epoch(state):
    try:
        return torch.load(state, weights_only=True)["epoch"] if state.exists() else 0
    except Exception:  # caught mid-replace: try again
        return 0


@pytest.fixture(scope="module")
def reference_with_workers(tmp_path_factory):
    """The uninterrupted run with a DataLoader worker process (data.num_workers 1, no cache):
    persistent workers, batches seeded by loaders.SeededBatchSampler."""
    base = tmp_path_factory.mktemp("reference_workers")
    dataset = make_tiny_dataset(base / "images")
    experiment = {**LONG, "data": {**LONG["data"], "num_workers": 1, "cache": False}}
    config = write_tiny_config(base / "work", dataset, experiments={"softmax": experiment})
    result = run_snakemake(base / "work", TARGET, configfile=config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 worker process(es)" in (base / "work" / LOG).read_text()
    return base / "work", dataset, experiment


def test_sigkill_then_rerun_incomplete_resumes_and_matches(reference, workdir):
    _kill_mid_stage2_then_resume(workdir, reference[0])


def test_sigkill_with_worker_processes_resumes_and_matches(reference_with_workers, tmp_path):
    """Exact resume also holds with persistent worker processes: a fresh loader seeded for the
    resumed epoch replays the batches the killed run would have drawn."""
    ref_workdir, dataset, experiment = reference_with_workers
    work = tmp_path / "work"
    shutil.copytree(ref_workdir, work, ignore=shutil.ignore_patterns("stage2*", "locks", "incomplete"))
    write_tiny_config(work, dataset, experiments={"softmax": experiment})
    _kill_mid_stage2_then_resume(work, ref_workdir)


def _kill_mid_stage2_then_resume(workdir: Path, ref_workdir: Path) -> None:
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", TARGET,
           "--configfile", str(workdir / "config.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = workdir / STATE / "state.pt"
    deadline = time.time() + 300
    while _saved_epoch(state) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the workflow finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and its jobs, no chance to clean up
    proc.wait()
    killed_at = _saved_epoch(state)
    assert 2 <= killed_at < 6
    assert not (workdir / STAGE2 / "metrics.json").exists()

    # A plain rerun says how to recover: first the lock a killed run leaves behind...
    plain = _snakemake(workdir)
    assert plain.returncode != 0 and "--unlock" in plain.stderr
    assert _snakemake(workdir, "--unlock").returncode == 0

    result = _snakemake(workdir, "--rerun-incomplete")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = [line for line in _log(workdir).splitlines() if "resuming stage stage2 at epoch" in line]
    assert resumed and int(resumed[-1].split("at epoch ")[1].split()[0]) > 1
    _assert_matches_reference(workdir, ref_workdir)


def test_retries_resume_after_a_failure_between_state_and_best_pt(reference, workdir, tmp_path):
    # Stage2's best epoch is its first (accuracy 1.0 at once): the job fails after epoch 1's
    # state is saved and before its best.pt is written, and the retry must supply best.pt.
    assert json.loads((reference[0] / STAGE2 / "metrics.json").read_text())["best"]["epoch"] == 1
    result = _snakemake(workdir, "--retries", "1", fault="raise-before-best:stage2:1", marker_dir=tmp_path / "faults")
    assert result.returncode == 0, result.stderr[-3000:]
    # snakemake reports the failed attempt (the retry's log replaces the job log)...
    assert "injected failure before best.pt of epoch 1 of stage stage2" in result.stdout + result.stderr
    # ...and the retry resumed after the saved epoch and wrote the best.pt the state records
    log = _log(workdir)
    assert "best.pt did not hold the saved best epoch 1: rewrote it from the saved state" in log
    assert "resuming stage stage2 at epoch 2" in log
    _assert_matches_reference(workdir, reference[0])


def test_sigterm_mid_epoch_and_while_saving_then_rerun_matches(reference, workdir, tmp_path):
    faults = tmp_path / "faults"
    state = workdir / STATE

    # SIGTERM after the first batch of epoch 2: epoch 2 is lost, epoch 1 is saved
    first = _snakemake(workdir, fault="sigterm-epoch:stage2:2", marker_dir=faults)
    assert first.returncode != 0 and "exit status 143" in first.stdout + first.stderr
    assert (faults / "sigterm-epoch:stage2:2.fired").exists()
    assert "stage stage2 terminated by SIGTERM; epochs up to 1 are saved in results/softmax/state/stage2 " in _log(workdir)
    assert _saved_epoch(state / "state.pt") == 1
    assert not (workdir / STAGE2 / "metrics.json").exists()

    # SIGTERM between writing epoch 4's state to its temp file and the rename: the epoch's
    # state and checkpoints are completed first, then the job stops
    second = _snakemake(workdir, "--rerun-incomplete", fault="sigterm-save:stage2:4", marker_dir=faults)
    assert second.returncode != 0 and "exit status 143" in second.stdout + second.stderr
    log = _log(workdir)
    assert "resuming stage stage2 at epoch 2" in log
    assert "stage stage2 terminated by SIGTERM; epochs up to 4 are saved in results/softmax/state/stage2 " in log
    saved = torch.load(state / "state.pt", weights_only=True)
    assert saved["epoch"] == 4 and not list(state.glob(".state.pt.tmp-*"))
    assert sorted(p.name for p in (state / "checkpoints").iterdir()) == [t["file"] for t in sorted(saved["topk"], key=lambda t: t["epoch"])]
    assert torch.load(state / "best.pt", weights_only=True)["epoch"] == saved["best_epoch"]

    third = _snakemake(workdir, "--rerun-incomplete")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resuming stage stage2 at epoch 5" in _log(workdir)
    _assert_matches_reference(workdir, reference[0])


def test_corrupt_state_is_moved_aside_and_the_rerun_trains_fresh(reference, workdir):
    # What a state file cut short looks like: the first half of a real torch zip file.
    state = workdir / STATE / "state.pt"
    state.parent.mkdir(parents=True)
    whole = (reference[0] / STAGE2 / "last.pt").read_bytes()
    state.write_bytes(whole[: len(whole) // 2])
    result = _snakemake(workdir, "--rerun-incomplete")
    assert result.returncode == 0, result.stderr[-3000:]
    log = _log(workdir)
    warning = next(line for line in log.splitlines() if "cannot resume stage stage2" in line)
    assert "WARNING" in warning and "cannot read it (" in warning and "starting the stage fresh" in warning
    moved = workdir / warning.split("; moved it to ")[1].split(" and starting")[0]
    assert moved.parent == state.parent.parent and moved.name.startswith("stage2.state.pt.corrupt-")
    assert moved.read_bytes() == whole[: len(whole) // 2]  # kept for inspection
    assert "stage stage2 epoch 1/6" in log and "resuming" not in log
    _assert_matches_reference(workdir, reference[0])
