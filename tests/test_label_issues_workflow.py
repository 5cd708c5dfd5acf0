"""End to end: `snakemake label_issues` on a tiny dataset with deliberately flipped labels (3 folds,
1 epoch per stage), the cleaned run, and a corrections.csv round trip."""

from __future__ import annotations

import json
import shutil
import urllib.parse

import numpy as np
import pandas as pd
import pytest

from conftest import make_tiny_dataset
from workflow_helpers import TINY_EXPERIMENT, job_counts, run_snakemake, write_tiny_config

pytestmark = pytest.mark.e2e

ONE_EPOCH = {
    **TINY_EXPERIMENT,
    "stages": {
        "stage1": {"epochs": 1, "lr": 0.01, "batch_size": 8, "freeze_encoder": True},
        "stage2": {"epochs": 1, "lr": 0.003, "batch_size": 8},
    },
}
# images moved into another class's folder: their given label is wrong
FLIPS = {"class_00/img_001.png": "class_01/flipped_a.png", "class_02/img_004.png": "class_00/flipped_b.png"}


@pytest.fixture(scope="module")
def issues_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("label_issues")
    dataset = make_tiny_dataset(base / "images", per_class=12)
    for source, target in FLIPS.items():
        shutil.move(dataset / source, dataset / target)
    corrections = base / "corrections.csv"
    corrections.write_text("path,label\n")  # nothing reviewed yet
    workdir = base / "work"
    config = write_tiny_config(
        workdir,
        dataset,
        experiments={"softmax": ONE_EPOCH},
        corrections=str(corrections),
        label_issues={"neighbours": 3, "action": "relabel"},
    )
    result = run_snakemake(workdir, "label_issues", "--configfile", str(config), timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return workdir, config, corrections


def test_scores_come_from_out_of_fold_probabilities(issues_run):
    workdir, _, _ = issues_run
    results = workdir / "results"
    oof = pd.read_csv(results / "kfold/softmax/oof_predictions.csv")
    probs = np.load(results / "kfold/softmax/oof_probabilities.npy")
    assert probs.shape == (36, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(oof["confidence"], probs.max(axis=1), rtol=1e-5)  # row i is row i
    scores = pd.read_csv(results / "label_issues/scores.csv")
    assert scores["path"].tolist() == oof["path"].tolist() and scores["fold"].tolist() == oof["fold"].tolist()
    # self-confidence is the held-out model's probability of the given label
    np.testing.assert_allclose(scores["self_confidence"], probs[np.arange(36), oof["class"]], rtol=1e-5)
    assert scores["given_label"].tolist() == oof["label"].tolist()
    assert scores["label_quality"].between(0, 1).all() and sorted(scores["rank"]) == list(range(1, 37))
    assert scores["neighbour_disagreement"].between(0, 1).all()  # 3 neighbours from each fold's index


def test_flipped_images_are_flagged_worst_first(issues_run):
    """Even a 1-epoch model (about 80 % right) finds both flips: its neighbours in each fold's
    index, all of the image's true class, settle it (measured: label quality 0.14 and 0.27, the
    next image 0.59)."""
    workdir, _, _ = issues_run
    scores = pd.read_csv(workdir / "results/label_issues/scores.csv").set_index("path")
    flipped = scores.loc[list(FLIPS.values())]
    assert flipped["flagged"].all() and sorted(flipped["rank"]) == [1, 2]
    assert flipped["suggested_label"].tolist() == ["class_00", "class_02"]  # their true classes
    assert (flipped["neighbour_disagreement"] == 1).all()


def test_issue_tables_summary_and_sheet(issues_run):
    workdir, _, _ = issues_run
    out = workdir / "results/label_issues"
    scores = pd.read_csv(out / "scores.csv")
    issues = pd.read_csv(out / "issues.csv", keep_default_na=False)
    assert list(issues.columns[:6]) == ["rank", "path", "given_label", "suggested_label", "label_quality", "signals"]
    assert issues["path"].tolist() == scores[scores["flagged"]].sort_values("rank")["path"].tolist()
    assert (issues["given_label"] != issues["suggested_label"]).all() and (issues["signals"] != "").all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 36 and summary["n_flagged"] == len(issues)
    assert set(summary["noise_rate_per_class"]) == {"class_00", "class_01", "class_02"}
    assert summary["parameters"]["neighbours"] == 3 and summary["experiment"] == "softmax"
    page = (out / "sheet/index.html").read_text()
    assert page.count("<tr>") == len(issues) + 1 and len(list((out / "sheet/thumbs").glob("*.png"))) == len(issues)


def test_the_cleaned_run_trains_on_the_relabelled_table(issues_run):
    workdir, _, _ = issues_run
    data = workdir / "results/data"
    given = pd.read_csv(data / "dataset_corrected.csv")
    assert (given["source"] == "given").all()
    cleaned = pd.read_csv(workdir / "results/label_issues/dataset.csv")
    flagged = pd.read_csv(workdir / "results/label_issues/issues.csv")
    assert len(cleaned) == len(given) - int((flagged["label_quality"] > 0.25).sum())
    relabelled = cleaned[cleaned["source"] == "label-issue-relabelled"]
    assert len(relabelled) == int((flagged["label_quality"] <= 0.25).sum())
    assert (cleaned.set_index("path")["fold"] == given.set_index("path")["fold"].reindex(cleaned["path"])).all()
    summary = json.loads((workdir / "results/cleaned/softmax/summary.json").read_text())
    assert summary["experiment"] == "cleaned/softmax"


def test_corrections_change_the_table_and_rerun_only_what_follows(issues_run):
    workdir, config, corrections = issues_run
    corrections.write_text("path,label\nclass_01/flipped_a.png,class_00\nclass_02/img_000.png,drop\n")
    dry = run_snakemake(workdir, "label_issues", "-n", "--configfile", str(config))
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = job_counts(dry.stdout + dry.stderr)
    assert jobs["apply_corrections"] == 1 and jobs["train_stage"] == 8 and jobs["kfold_summary"] == 1
    assert not {"demo_dataset", "tag2label", "split"} & set(jobs)  # upstream of the corrections: untouched

    done = run_snakemake(workdir, "results/data/dataset_corrected.csv", "--configfile", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    split = pd.read_csv(workdir / "results/data/dataset.csv").set_index("path")
    corrected = pd.read_csv(workdir / "results/data/dataset_corrected.csv").set_index("path")
    row = corrected.loc["class_01/flipped_a.png"]
    assert (row["tag"], row["class"], row["source"]) == ("class_00", 0, "human-corrected")
    assert row["fold"] == split.loc["class_01/flipped_a.png", "fold"]  # folds stay put
    assert "class_02/img_000.png" not in corrected.index and len(corrected) == 35
    assert split.loc["class_01/flipped_a.png", "tag"] == "class_01"  # split's table is not edited
    report = pd.read_csv(workdir / "results/data/corrections_applied.csv").set_index("path")["action"]
    assert report.to_dict() == {"class_01/flipped_a.png": "relabelled", "class_02/img_000.png": "dropped"}
    again = job_counts(
        (r := run_snakemake(workdir, "label_issues", "-n", "--configfile", str(config))).stdout + r.stderr
    )
    assert "apply_corrections" not in again and again["train_stage"] == 8
    # an answer for the autolabel pile in the same file does not touch the main dataset's table
    corrections.write_text(corrections.read_text() + "raw/pile/x.png,class_01\n")
    third = run_snakemake(workdir, "results/data/dataset_corrected.csv", "-n", "--configfile", str(config))
    assert third.returncode == 0 and "Nothing to be done" in third.stdout + third.stderr


def test_sheet_renders_in_headless_chromium(issues_run, tmp_path):
    """Every thumbnail of the issues sheet loads in a browser, and each path links to its image."""
    from test_contact_sheet import _PROBE, ProbeParser, find_chromium, run_chromium

    chromium = find_chromium()
    workdir, _, _ = issues_run
    sheet = workdir / "results/label_issues/sheet"
    probe = sheet / "probe.html"  # beside index.html, so its relative links hold
    probe.write_text((sheet / "index.html").read_text().replace("</body>", _PROBE + "</body>"))
    try:
        dom = run_chromium(chromium, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    parser = ProbeParser()
    parser.feed(dom)
    rows = parser.result["rows"]
    issues = pd.read_csv(workdir / "results/label_issues/issues.csv")
    assert [r["cells"][2] for r in rows] == issues["path"].tolist()
    assert all(len(r["images"]) == 1 and r["images"][0]["complete"] and r["images"][0]["naturalWidth"] > 0 for r in rows)
    dataset = workdir.parent / "images"
    for row, path in zip(rows, issues["path"]):
        assert {urllib.parse.unquote(href) for href in row["links"]} == {"file://" + str(dataset / path)}


def test_dry_run_label_issues_target(tmp_path):
    """On the default config (digits demo): the k-fold runs of the first experiment, then the
    label-issue rules; with action relabel also the cleaned run."""
    result = run_snakemake(tmp_path, "label_issues", "-n", "--config", "label_issues={action: relabel}")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    jobs = job_counts(out)
    assert jobs["kfold_summary"] == 1 and jobs["label_issues_find"] == 1 and jobs["label_issues_sheet"] == 1
    assert jobs["label_issues_dataset"] == 1 and jobs["train_stage"] == 2 * 6  # 5 folds + cleaned/softmax
    assert "apply_corrections" not in jobs and not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["results/cleaned/softmax/summary.json"], "label_issues.action"),  # report: nothing to train
        (["label_issues", "--config", "label_issues={action: fix}"], "action"),
        (["label_issues", "--config", "label_issues={experiment: bce}"], "kfold.experiments"),
        (["label_issues", "--config", "corrections=/no/such.csv"], "corrections"),
    ],
)
def test_label_issue_config_errors_name_the_key(tmp_path, args, expected):
    result = run_snakemake(tmp_path, "-n", *args)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and expected in out
    assert not (tmp_path / "results").exists()
