"""Smoke tests: every benchmark runs at its smallest size and prints its figures (no timing asserts)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=600):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_throughput_smoke():
    out = _run("train_throughput.py", "--images", "128", "--rounds", "1")
    ratios = [float(r) for r in re.findall(r"ratio (\d+\.\d+)", out)]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    assert "data loading alone" in out


def test_workflow_scale_smoke():
    out = _run("workflow_scale.py", "--dry-only", "--folds", "3")
    jobs = int(re.search(r"dry run: (\d+) jobs", out).group(1))
    assert jobs > 100


def test_predict_throughput_smoke():
    out = _run("predict_throughput.py", "--images", "64", "--rounds", "1")
    assert re.search(r"ratio predict/bare: per round \d+\.\d+", out)
    assert "predict " in out and "bare " in out and "torch " in out


# --------------------------------------------------------------------------- Fashion-MNIST benchmarks
# They run the real workflow on Fashion-MNIST from the Debian package dataset-fashion-mnist;
# without its files they skip (LABELFLOW_REQUIRE_FASHION=1 makes that a failure, for CI images
# that install the package).


@pytest.fixture
def fashion_files():
    from labelflow.fashion import find_source
    from labelflow.io import DatasetError

    try:
        return find_source()  # where the Debian package puts them
    except DatasetError as err:
        reason = str(err)  # names the folder searched and `apt-get install dataset-fashion-mnist`
        if os.environ.get("LABELFLOW_REQUIRE_FASHION") == "1":
            pytest.fail(f"LABELFLOW_REQUIRE_FASHION=1 but {reason}")
        pytest.skip(reason)


@pytest.mark.e2e
def test_scale_smoke(tmp_path, fashion_files):
    """200 and 400 images at 28 px and 100 at 224 px through the real workflow (three runs)."""
    out = _run("scale.py", "--quick", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "scale.json"),
               timeout=1200)
    report = json.loads((tmp_path / "scale.json").read_text())
    cases = {case["name"]: case for case in report["cases"]}
    assert set(cases) == {"200x28px", "400x28px", "100x224px"}
    expected = {"tag2label", "split", "train_stage stage1", "train_stage stage2", "infer", "pca_index",
                "evaluate_index", "rejection", "summary", "test_evaluation", "embed pile", "predict_set pile",
                "compare_experiments"}
    for case in cases.values():
        jobs = {job["job"]: job for job in case["jobs"]}
        assert expected <= set(jobs), expected - set(jobs)
        assert not set(jobs) & set(case["not_measured"])
        assert all(job["seconds"] > 0 and job["images_per_s"] > 0 for job in jobs.values())
        assert all(job["max_rss_mb"] is None or job["max_rss_mb"] > 0 for job in jobs.values())
        assert jobs["infer"]["images"] == case["n_train"] and jobs["test_evaluation"]["images"] == case["n_test"]
        assert jobs["embed pile"]["images"] == case["images"] == case["n_train"] + case["n_test"]
    assert cases["400x28px"]["n_test"] == 57 and cases["100x224px"]["n_train"] == 86
    growth = {row["job"]: row for row in report["growth"]}
    assert expected <= set(growth)
    assert all(abs(row["data_growth"] - 2.0) < 0.05 and row["time_growth"] > 0 for row in growth.values())
    assert {row["job"] for row in growth.values() if row["streaming"]} == {"infer", "test_evaluation", "embed pile", "predict_set pile"}
    goals = report["goals"]
    assert len(goals) == 4 and all(goal["passed"] in (True, False, None) for goal in goals)
    assert "autolabel_round" in goals[1]["detail"]  # reported as not measured
    assert re.search(r"^(PASS|FAIL|NOT MEASURED) +infer at 224 px, 100 images", out, re.M)
    assert "not measured (no benchmark file):" in out


@pytest.mark.e2e
def test_fashion_smoke(tmp_path, fashion_files):
    """300 images per split, 1 + 1 epochs: the test figure, the published table, epoch times."""
    out = _run("fashion.py", "--limit", "300", "--epochs", "1", "--out", str(tmp_path / "out"),
               "--json", str(tmp_path / "fashion.json"))
    report = json.loads((tmp_path / "fashion.json").read_text())
    figures = report["experiments"][0]
    assert figures["experiment"] == "fashion"
    assert 0.0 <= figures["test_accuracy"] <= 1.0 and 250 <= figures["test_images"] <= 300
    assert {stage: s["epochs"] for stage, s in figures["stages"].items()} == {"stage1": 1, "stage2": 1}
    assert all(s["seconds_per_epoch"] > 0 for s in figures["stages"].values())
    assert figures["job_seconds"] > 0 and figures["peak_rss_mb"] > 0
    assert {"tag2label", "split", "fashion/stage2", "fashion/test_evaluation"} <= set(figures["jobs"])
    assert report["goal"]["passed"] is None  # a subset is not judged
    assert "ResNet18" in out and "Human (crowd)" in out and "<- this run" in out and "NOT JUDGED" in out


@pytest.mark.e2e
def test_autolabel_fashion_smoke(tmp_path, fashion_files):
    """10 per class, 200 raw, 2 rounds of a 1 + 1 epoch recipe, and the four peers."""
    out = _run("autolabel_fashion.py", "--quick", "--seeds", "100", "--out", str(tmp_path / "out"),
               "--json", str(tmp_path / "autolabel.json"))
    report = json.loads((tmp_path / "autolabel.json").read_text())
    (seed,) = report["seeds"]
    peers = {"LabelSpreading pixels", "SelfTraining pixels", "LabelSpreading embeddings", "SelfTraining embeddings"}
    assert 1 <= len(seed["rounds"]) <= 2
    for row in seed["rounds"]:
        assert 0 <= row["labelled"] <= 200 and 0.0 <= row["coverage"] <= 1.0
        assert row["precision"] is None or 0.0 <= row["precision"] <= 1.0
        assert set(row["peers"]) == peers
        assert all(v is None or 0.0 <= v <= 1.0 for v in row["peers"].values())
    assert set(seed["peers_whole_pile"]) == peers
    # 10 labelled images per class: label spreading on pixels is far above chance (0.1)
    assert 0.3 <= seed["peers_whole_pile"]["LabelSpreading pixels"] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in seed["peers_whole_pile"].values())
    assert "1 split seeds (100)" in out
    assert re.search(r"^(PASS|FAIL|NOT JUDGED) workflow precision above every peer", out, re.M)
