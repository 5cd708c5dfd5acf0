"""Smoke tests: every benchmark runs at its smallest size and prints its figures (no timing asserts)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(script, *args):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                            capture_output=True, text=True, timeout=600)
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
