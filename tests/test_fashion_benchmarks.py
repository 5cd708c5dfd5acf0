"""Smoke tests of the Fashion-MNIST benchmarks (scale, fashion, autolabel_fashion): each runs the
real workflow on a small slice of the Debian package dataset-fashion-mnist. Without its files
they skip; LABELFLOW_REQUIRE_FASHION=1 (CI, which installs the package) makes that a failure.
A file of their own: the suite runs files in parallel (pytest-xdist), and these are its longest."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from test_benchmarks import BENCHMARKS, REPO, _run

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
    """100 and 200 images at 28 px through the real workflow (two runs): every job measured,
    the growth table and the goals. The 224 px case is the same workflow at another size; its
    verdict is checked on constructed figures below (a third run would add minutes)."""
    out = _run("scale.py", "--quick", "--skip-224", "--sizes", "100", "200", "--n-folds", "3",
               "--out", str(tmp_path / "out"), "--json", str(tmp_path / "scale.json"), timeout=1200)
    report = json.loads((tmp_path / "scale.json").read_text())
    cases = {case["name"]: case for case in report["cases"]}
    assert set(cases) == {"100x28px", "200x28px"}
    expected = {"tag2label", "split", "train_stage stage1", "train_stage stage2", "infer", "calibrate", "pca_index",
                "evaluate_index", "rejection", "summary", "test_table", "test_evaluation", "embed pile",
                "predict_set pile", "compare_experiments"}
    for case in cases.values():
        jobs = {job["job"]: job for job in case["jobs"]}
        assert expected <= set(jobs), expected - set(jobs)
        assert not set(jobs) & set(case["not_measured"])
        assert all(job["seconds"] > 0 and job["images_per_s"] > 0 for job in jobs.values())
        assert all(job["max_rss_mb"] is None or job["max_rss_mb"] > 0 for job in jobs.values())
        assert jobs["infer"]["images"] == case["n_train"] and jobs["test_evaluation"]["images"] == case["n_test"]
        assert jobs["embed pile"]["images"] == case["images"] == case["n_train"] + case["n_test"]
    assert cases["200x28px"]["n_test"] == 29 and cases["100x28px"]["n_train"] == 86  # 1/7 test, as the full set
    growth = {row["job"]: row for row in report["growth"]}
    assert expected <= set(growth)
    assert all(abs(row["data_growth"] - 2.0) < 0.1 and row["time_growth"] > 0 for row in growth.values())  # 14 -> 29 test images
    assert {row["job"] for row in growth.values() if row["streaming"]} == {"infer", "test_evaluation", "embed pile", "predict_set pile"}
    goals = report["goals"]
    assert len(goals) == 3 and all(goal["passed"] in (True, False, None) for goal in goals)
    assert "autolabel_round (not in this run)" in goals[1]["detail"]
    assert re.search(r"^(PASS|FAIL|NOT MEASURED) +no job above 4096 MB at 200 x 28 px", out, re.M)
    assert "not measured (no benchmark file): none" in out


def test_scale_goals_judge_the_224px_infer():
    from scale import Case, CaseResult, JobFigures, goals

    def case(images: int, size: int, infer_mb: float | None) -> CaseResult:
        jobs = [JobFigures("infer", "infer", "b.tsv", seconds=2.0, max_rss_mb=infer_mb, images=images)]
        return CaseResult(Case(images, size, "png"), 10.0, jobs)

    found = goals([case(1000, 28, 500.0), case(100, 224, 3000.0), case(200, 224, 3500.0), case(300, 224, None)], None)
    verdicts = {g["goal"]: g["passed"] for g in found}
    assert verdicts["no job above 4096 MB at 1,000 x 28 px"] is True
    assert verdicts["infer at 224 px, 100 images: peak RSS <= 3072 MB"] is True
    assert verdicts["infer at 224 px, 200 images: peak RSS <= 3072 MB"] is False
    assert verdicts["infer at 224 px, 300 images: peak RSS <= 3072 MB"] is None  # not measured is not a pass


def test_scale_cases_empty_sizes_run_the_224px_case_alone():
    from argparse import Namespace

    from scale import Case, cases_of

    def cases(**given):
        return cases_of(Namespace(**{"sizes": None, "quick": False, "skip_224": False, "images_224": None, **given}))

    assert cases(sizes=[]) == [Case(10_000, 224, "jpg")]
    assert cases() == [Case(1_000, 28, "png"), Case(10_000, 28, "png"), Case(70_000, 28, "png"), Case(10_000, 224, "jpg")]
    assert cases(quick=True, skip_224=True) == [Case(200, 28, "png"), Case(400, 28, "png")]


@pytest.mark.e2e
def test_fashion_smoke(tmp_path, fashion_files):
    """150 images per split, 1 + 1 epochs of a copy of the float32 `fashion` recipe given by
    --recipe, turned bf16 by --precision: the test figure, the published table, epoch times."""
    candidate = tmp_path / "fashion_candidate.yaml"
    candidate.write_text((REPO / "config/experiments/fashion.yaml").read_text())
    assert "precision" not in candidate.read_text()  # the flag, not the file, makes it bf16
    out = _run("fashion.py", "--limit", "150", "--epochs", "1", "--precision", "bf16", "--recipe", str(candidate),
               "--workflow-seed", "5", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "fashion.json"))
    report = json.loads((tmp_path / "fashion.json").read_text())
    figures = report["experiments"][0]
    assert len(report["experiments"]) == 1 and figures["experiment"] == "fashion_candidate"  # instead of fashion_long
    assert 0.0 <= figures["test_accuracy"] <= 1.0 and 120 <= figures["test_images"] <= 150
    assert {stage: s["epochs"] for stage, s in figures["stages"].items()} == {"stage1": 1, "stage2": 1}
    assert all(s["seconds_per_epoch"] > 0 for s in figures["stages"].values())
    assert figures["job_seconds"] > 0 and figures["peak_rss_mb"] > 0
    assert {"tag2label", "split", "fashion_candidate/stage2", "fashion_candidate/test_evaluation"} <= set(figures["jobs"])
    assert report["goal"]["passed"] is None  # a subset is not judged
    assert "ResNet18" in out and "Human (crowd)" in out and "<- this run" in out and "NOT JUDGED" in out
    run = tmp_path / "out" / "limit150_seed5"
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 5 and report["workflow_seed"] == 5
    recipe = yaml.safe_load((run / "experiments" / "fashion_candidate.yaml").read_text())
    assert {stage["precision"] for stage in recipe["stages"].values()} == {"bf16"}
    log = (run / "work/results/logs/fashion_candidate/stage2.log").read_text()
    assert "training forward pass in bf16 autocast" in log
    assert re.search(r"stage stage2: 1 epochs, .* encoder trained, seed 5$", log, re.M)  # the job used the seed
    missing = subprocess.run([sys.executable, str(BENCHMARKS / "fashion.py"), "--limit", "150", "--recipe", "no_such_recipe",
                              "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "recipe 'no_such_recipe'" in missing.stderr and "does not exist" in missing.stderr


def test_fashion_refuses_an_experiment_name_given_twice(tmp_path):
    """`--recipe fashion --experiment fashion`, or a path named like a shipped recipe, would share
    one results folder: refused before anything is written."""
    from fashion import main

    for given in (["--experiment", "fashion_long"], ["--recipe", "fashion", "--experiment", str(tmp_path / "fashion.yaml")]):
        with pytest.raises(SystemExit, match="experiment name given twice.*fashion"):
            main([*given, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_autolabel_fashion_smoke(tmp_path, fashion_files):
    """10 per class, 100 raw, one round of a 1 + 1 epoch recipe, and the four peers (the loop
    itself is tested in test_autolabel_workflow)."""
    out = _run("autolabel_fashion.py", "--quick", "--seeds", "100", "--raw", "100", "--max-rounds", "1",
               "--out", str(tmp_path / "out"), "--json", str(tmp_path / "autolabel.json"))
    report = json.loads((tmp_path / "autolabel.json").read_text())
    (seed,) = report["seeds"]
    peers = {"LabelSpreading pixels", "SelfTraining pixels", "LabelSpreading embeddings", "SelfTraining embeddings"}
    assert len(seed["rounds"]) == 1
    for row in seed["rounds"]:
        assert 0 <= row["labelled"] <= 100 and 0.0 <= row["coverage"] <= 1.0
        assert row["precision"] is None or 0.0 <= row["precision"] <= 1.0
        assert set(row["peers"]) == peers
        assert all(v is None or 0.0 <= v <= 1.0 for v in row["peers"].values())
        assert set(row["peers_class_mix"]) == peers and set(row["judged_class_mix"]) == peers
        assert all(0 <= n <= row["labelled"] for n in row["judged_class_mix"].values())
        if row["labelled"]:
            assert all(v is not None and 0.0 <= v <= 1.0 for v in row["peers_class_mix"].values())
    assert set(seed["peers_whole_pile"]) == peers
    # 10 labelled images per class: label spreading on pixels is far above chance (0.1)
    assert 0.3 <= seed["peers_whole_pile"]["LabelSpreading pixels"] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in seed["peers_whole_pile"].values())
    assert "1 split seeds (100)" in out
    assert re.search(r"^(PASS|FAIL|NOT JUDGED) workflow precision above every peer at every round's coverage", out, re.M)
    assert re.search(r"^(PASS|FAIL|NOT JUDGED) \(for reference\) workflow precision above every peer at every round's class mix",
                     out, re.M)


def test_label_issues_fashion_dry_run(tmp_path, fashion_files):
    """`--dataset fashion`: class-folder names as labels, official test images held out (as many
    as the pool), the T-shirt/pullover/shirt confusions in the flips, and the DAG accepted (dry
    run); the same --out refused for digits afterwards."""
    import pandas as pd

    out = _run("label_issues.py", "--dataset", "fashion", "--dry-only", "--images", "200", "--noise", "0.2",
               "--out", str(tmp_path))
    assert "fashion: 200 images to the workflow, 200 held out for test" in out
    assert "label_issues_find" in out and "kfold_summary" in out
    data = tmp_path / "noise20_seed0" / "data"
    given = pd.DataFrame({"path": [p.name for p in data.glob("*/*.png")], "given": [p.parent.name for p in data.glob("*/*.png")]})
    truth = pd.DataFrame({"path": [p.name for p in (tmp_path / "fashion_200/train").glob("*/*.png")],
                          "true": [p.parent.name for p in (tmp_path / "fashion_200/train").glob("*/*.png")]})
    joined = given.merge(truth, on="path", validate="one_to_one")
    assert len(joined) == 200 and (tmp_path / "fashion_200/test").is_dir()
    flips = joined[joined["given"] != joined["true"]]
    assert 20 <= len(flips) <= 60  # 20 % x U(0.5, 1.5) per class
    garments = {"t-shirt_top", "pullover", "shirt"}
    from_garment = flips[flips["true"].isin(garments)]
    assert from_garment["given"].isin(garments).mean() >= 0.6  # 80 % go to the other two, some by chance
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "label_issues.py"), "--dry-only", "--out", str(tmp_path)],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "holds the fashion benchmark" in refused.stderr


def test_label_issues_refuses_a_test_fraction_for_fashion(tmp_path):
    """Fashion holds out official test images; a --test-fraction would be silently unused."""
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "label_issues.py"), "--dataset", "fashion",
                              "--test-fraction", "0.3", "--dry-only", "--out", str(tmp_path)],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--test-fraction is for --dataset digits" in refused.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written
