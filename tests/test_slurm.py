"""The workflow on a real SLURM cluster through profiles/slurm, checked against a local run.

Skipped where no SLURM cluster answers (``sinfo`` missing, failing, slow, or no idle node), so
the suite passes on any machine. CI starts a single-node cluster with ``.ci/slurm-cluster.sh
start`` and sets ``LABELFLOW_REQUIRE_SLURM=1``, which turns that skip into a failure.

The run uses the real profiles/slurm/config.yaml, with a few keys changed for a quick test
(written to a temporary profile): short status polling, no retries, small memory requests.
The partition and account come through the profile's environment variables
LABELFLOW_SLURM_PARTITION / LABELFLOW_SLURM_ACCOUNT (partition: the cluster's default unless set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_dataset
from workflow_helpers import REPO, SNAKEMAKE, job_counts, run_snakemake, write_tiny_config

pytestmark = pytest.mark.e2e

REQUIRE_SLURM = os.environ.get("LABELFLOW_REQUIRE_SLURM") == "1"
# Whole SLURM run: 9 jobs one after the other, each costing ~15 s of job start-up and status
# polling on top of its own work; 5-10 min were measured on 2 cores busy with other work.
RUN_TIMEOUT_S = 900
# Rules that must have run as SLURM jobs (`all` only collects files and runs in snakemake itself).
CORE_RULES = {"tag2label", "split", "train_stage", "infer", "pca_index", "evaluate_index", "summary"}
MODEL_RULES = {"train_stage", "infer"}
SUMMARY = "results/softmax/summary.json"
THREADS = 1  # config key `threads`: the model jobs' threads, in both runs
# What `sacct` reports for each job of the run.
SACCT_FIELDS = [
    "JobID", "JobName", "Comment", "State", "ExitCode", "Partition", "Account", "ReqCPUS", "AllocTRES", "NodeList"
]


def _run(*cmd: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def _why_no_cluster() -> str | None:
    """None when a SLURM cluster with accounting answers here, else the reason it does not."""
    for tool in ("sinfo", "sbatch", "sacct"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    try:
        sinfo = _run("sinfo", "-h", "-o", "%t", timeout=5)
        if sinfo.returncode != 0:
            return f"`sinfo` failed: {sinfo.stderr.strip()[:300]}"
        if "idle" not in sinfo.stdout.split():
            return f"no idle node (`sinfo -h -o %t`: {sinfo.stdout.split()})"
        # Without accounting `sacct` fails, and the SLURM plugin then waits forever.
        sacct = _run("sacct", "-n", "-X", "-S", "now", timeout=10)
        if sacct.returncode != 0:
            return f"`sacct` fails (no accounting?): {sacct.stderr.strip()[:300]}"
    except subprocess.TimeoutExpired as exc:
        return f"`{' '.join(exc.cmd)}` did not answer within {exc.timeout} s"
    return None


@pytest.fixture(scope="module")
def slurm_cluster() -> dict:
    why = _why_no_cluster()
    if why is not None:
        if REQUIRE_SLURM:
            pytest.fail(f"LABELFLOW_REQUIRE_SLURM=1 but no usable SLURM cluster: {why}")
        pytest.skip(
            f"no SLURM cluster answers here ({why}); to run this test: `.ci/slurm-cluster.sh start` "
            "(root, Debian: installs and starts a one-node SLURM), then `make test`, then "
            "`.ci/slurm-cluster.sh stop` (.ci/run does all three)"
        )
    partitions = _run("sinfo", "-h", "-o", "%P").stdout.split()
    default = next((p.rstrip("*") for p in partitions if p.endswith("*")), partitions[0].rstrip("*"))
    return {
        "partition": os.environ.get("LABELFLOW_SLURM_PARTITION") or default,
        "account": os.environ.get("LABELFLOW_SLURM_ACCOUNT") or None,
        # GPUs on the nodes (real, or the CI cluster's fake ones): the model jobs then ask for one.
        "gpu": 1 if "gpu" in _run("sinfo", "-h", "-o", "%G").stdout else 0,
    }


def write_test_profile(folder: Path) -> Path:
    """profiles/slurm/config.yaml with quick polling, no retries and small memory requests."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    profile.update(
        {
            "jobs": 3,
            "retries": 0,
            "keep-going": False,
            "latency-wait": 10,
            "slurm-init-seconds-before-status-checks": 2,
        }
    )
    # The tiny jobs need little memory; requests as small as this fit any CI machine's node.
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        if "mem_mb" in resources:
            resources["mem_mb"] = min(resources["mem_mb"], 1000)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def sacct_jobs(run_id: str, since: datetime, expected: int) -> list[dict]:
    """The run's SLURM jobs (their job name is snakemake's run id), once all are final."""
    rows: list[dict] = []
    for _ in range(20):  # slurmdbd may record the last state a moment after the job ends
        fields = ",".join(f"{field}%100" for field in SACCT_FIELDS)
        start = since.strftime("%Y-%m-%dT%H:%M:%S")
        result = _run("sacct", "-X", "-n", "-P", "--name", run_id, "-S", start, "-o", fields)
        assert result.returncode == 0, result.stderr
        rows = [dict(zip(SACCT_FIELDS, line.split("|"))) for line in result.stdout.splitlines() if line]
        if len(rows) >= expected and all(row["State"] == "COMPLETED" for row in rows):
            break
        time.sleep(1)
    return rows


def test_workflow_on_slurm_matches_local_run(slurm_cluster, tmp_path):
    dataset = make_tiny_dataset(tmp_path / "images")
    gpu = slurm_cluster["gpu"]
    # Same config for both runs; `threads` sets the model jobs' threads here and, through the
    # plugin's default cpus_per_task = threads, their CPUs on SLURM.
    slurm_dir, local_dir = tmp_path / "slurm", tmp_path / "local"
    config = write_tiny_config(slurm_dir, dataset, gpu=gpu, threads=THREADS)
    local_config = write_tiny_config(local_dir, dataset, gpu=gpu, threads=THREADS)
    profile = write_test_profile(tmp_path / "profile")

    env = {**os.environ, "LABELFLOW_SLURM_PARTITION": slurm_cluster["partition"]}
    env.pop("SNAKEMAKE_PROFILE", None)  # only the test profile
    if slurm_cluster["account"]:
        env["LABELFLOW_SLURM_ACCOUNT"] = slurm_cluster["account"]
    # `timeout`: a hung SLURM plugin ignores SIGTERM, hence the SIGKILL 15 s later.
    cmd = ["timeout", "-k", "15", str(RUN_TIMEOUT_S), str(SNAKEMAKE), "-s", str(REPO / "Snakefile")]
    # up to the summary (rejection and the comparison table would add ~13 s of polling each)
    cmd += ["-d", str(slurm_dir), SUMMARY, "--workflow-profile", str(profile), "--configfile", str(config)]
    since = datetime.now() - timedelta(minutes=5)
    with ThreadPoolExecutor(1) as pool:
        # the reference run on this machine, meanwhile (its jobs use the same threads)
        local = pool.submit(run_snakemake, local_dir, SUMMARY, configfile=local_config)
        started = time.monotonic()
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        elapsed = time.monotonic() - started
        local_result = local.result()

    out = result.stdout + result.stderr
    assert result.returncode not in (124, 137), f"SLURM run killed after {RUN_TIMEOUT_S} s:\n{out[-6000:]}"
    assert result.returncode == 0, out[-6000:]
    assert local_result.returncode == 0, (local_result.stdout + local_result.stderr)[-4000:]
    print(f"SLURM run: {elapsed:.0f} s")

    # SLURM ran the jobs: sacct lists one job per workflow job, named by the run id, with the
    # rule in the comment (how the plugin labels jobs), finished on a node.
    run_id = re.search(r"SLURM run ID: (\S+)", out)
    assert run_id, "no 'SLURM run ID' in the output: was the slurm executor used?"
    counts = {rule: n for rule, n in job_counts(out).items() if rule != "all"}
    assert CORE_RULES <= set(counts), counts
    rows = sacct_jobs(run_id.group(1), since, expected=sum(counts.values()))
    # comment: rule_<rule> or rule_<rule>_wildcards_<values>
    assert all(row["Comment"].startswith("rule_") for row in rows), rows
    ran = [row["Comment"].removeprefix("rule_").split("_wildcards_")[0] for row in rows]
    assert {rule: ran.count(rule) for rule in set(ran)} == counts, rows
    for row, rule in zip(rows, ran):
        assert row["State"] == "COMPLETED" and row["ExitCode"] == "0:0", row
        assert row["NodeList"] not in ("", "None assigned"), row
        assert row["Partition"] == slurm_cluster["partition"], row
        if slurm_cluster["account"]:
            assert row["Account"] == slurm_cluster["account"], row
        tres = dict(item.split("=", 1) for item in row["AllocTRES"].split(",") if "=" in item)
        if rule in MODEL_RULES:
            # cpus_per_task follows the rule's threads; `gpu` becomes `--gpus=<gpu>`
            assert row["ReqCPUS"] == str(THREADS) and tres.get("gres/gpu", "0") == str(gpu), row
        elif rule in CORE_RULES:
            assert row["ReqCPUS"] == "1" and "gres/gpu" not in tres, row
    # the plugin's per-job SLURM logs (kept by the profile), one folder per rule
    logs = slurm_dir / ".snakemake/slurm_logs"
    assert {p.name for p in logs.iterdir()} == {f"rule_{rule}" for rule in counts}

    # Same files and numbers as on this machine.
    results = slurm_dir / "results/softmax"
    for name in ("stage2/best.pt", "predictions/predictions.csv", "index/recall.json", "summary.json"):
        assert (results / name).is_file(), name
    summary = json.loads((results / "summary.json").read_text())
    assert summary == json.loads((local_dir / "results/softmax/summary.json").read_text())
