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


def test_label_issues_benchmark_smoke(tmp_path):
    """The benchmark builds its noisy and clean digits folders and the workflow accepts them
    (dry run: the real one trains dozens of models)."""
    out = _run("label_issues.py", "--dry-only", "--out", str(tmp_path), "--noise", "0.2")
    assert re.search(r"600 images to the workflow, 360 held out for test", out)
    for rule in ("kfold_summary", "label_issues_find", "label_issues_dataset"):
        assert rule in out
    truth = sorted(p.name for p in (tmp_path / "noise20_seed0" / "data").iterdir())
    assert truth == [str(d) for d in range(10)]
