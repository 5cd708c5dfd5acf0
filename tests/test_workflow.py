"""End to end: the real snakemake on a tiny generated dataset, asserting files and numbers."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny_dataset
from workflow_helpers import REPO, SNAKEMAKE, TINY_EXPERIMENTS, run_snakemake, write_tiny_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete run on 3 classes x 12 images (16 px) with a corrupt image and a text file."""
    base = tmp_path_factory.mktemp("e2e")
    dataset = make_tiny_dataset(base / "images")
    good = (dataset / "class_00" / "img_000.png").read_bytes()
    (dataset / "class_01" / "broken.png").write_bytes(good[: len(good) // 2])
    (dataset / "class_02" / "notes.txt").write_text("not an image")
    workdir = base / "work"
    config = write_tiny_config(workdir, dataset, experiments=TINY_EXPERIMENTS)
    result = run_snakemake(workdir, configfile=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return workdir, result


def test_data_tables(finished_run):
    workdir, _ = finished_run
    data = workdir / "results/data"
    raw = pd.read_csv(data / "dataset_raw.csv")
    assert list(raw.columns[:2]) == ["path", "tag"] and len(raw) == 36
    assert json.loads((data / "tag2cls.json").read_text()) == {"class_00": 0, "class_01": 1, "class_02": 2}
    skipped = pd.read_csv(data / "skipped.csv").set_index("path")["reason"]
    assert "truncated" in skipped["class_01/broken.png"] or "corrupt" in skipped["class_01/broken.png"]
    assert "not an image" in skipped["class_02/notes.txt"]
    assert "broken.png" in (workdir / "results/logs/tag2label.log").read_text()
    folds = pd.read_csv(data / "dataset.csv")
    assert list(folds.columns) == ["path", "tag", "class", "fold", "sha1", "group"]
    # stratified: every fold holds 4 images of each class
    assert (folds.groupby(["fold", "class"]).size() == 4).all()


def test_stage_outputs(finished_run):
    workdir, _ = finished_run
    for stage, epochs in (("stage1", 1), ("stage2", 2)):
        out = workdir / "results/softmax" / stage
        metrics = json.loads((out / "metrics.json").read_text())
        assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, epochs + 1))
        for record in metrics["epochs"]:
            for split in ("train", "valid"):
                assert record[split]["loss"] > 0 and 0 <= record[split]["accuracy"] <= 1
        best = torch.load(out / "best.pt", weights_only=True)
        assert best["spec"]["heads"][0]["num_outputs"] == 3  # class count from the data
        assert best["epoch"] == metrics["best"]["epoch"]
        assert (out / "last.pt").is_file()
        checkpoints = sorted(p.name for p in (out / "checkpoints").glob("*.pt"))
        assert checkpoints and all("accuracy=" in name for name in checkpoints)
        assert len(checkpoints) <= (2 if stage == "stage2" else 3)
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    log = (workdir / "results/logs/softmax/stage2.log").read_text()
    assert "initialised from results/softmax/stage1/best.pt" in log
    assert "device: cpu" in log and "epoch 2/2" in log


def test_predictions_and_index(finished_run):
    workdir, _ = finished_run
    pred_dir = workdir / "results/softmax/predictions"
    predictions = pd.read_csv(pred_dir / "predictions.csv")
    assert list(predictions.columns) == ["path", "split", "class", "label", "predicted", "confidence"]
    # names, not indices: the label is the class folder, the prediction a class name
    assert (predictions["label"] == predictions["path"].str.split("/").str[0]).all()
    assert predictions["label"].map({"class_00": 0, "class_01": 1, "class_02": 2}).equals(predictions["class"])
    assert set(predictions["predicted"]) <= {"class_00", "class_01", "class_02"}
    assert len(predictions) == 36 and (predictions["split"] != "train").sum() == 12
    # half of the validation fold (2 of each class's 4) is held out from checkpoint selection
    calibration = predictions[predictions["split"] == "calibration"]
    assert calibration.groupby("label").size().to_dict() == {"class_00": 2, "class_01": 2, "class_02": 2}
    probs = np.load(pred_dir / "probabilities.npy")
    assert probs.shape == (36, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.load(pred_dir / "embeddings.npy").shape == (36, 16)
    np.testing.assert_allclose(predictions["confidence"], probs.max(axis=1), rtol=1e-5)

    index_dir = workdir / "results/softmax/index"
    info = json.loads((index_dir / "index.json").read_text())
    assert info["dim"] == 8 and info["n_items"] == 24 and 0 < info["explained_variance"] <= 1.0 + 1e-9
    with np.load(index_dir / "transform.npz", allow_pickle=False) as npz:
        assert npz["components"].shape == (8, 16)
    recall = json.loads((index_dir / "recall.json").read_text())
    values = [recall[f"recall@{k}"] for k in (1, 3, 5, 10)]
    assert all(0 <= v <= 1 for v in values) and values == sorted(values)  # recall grows with k
    assert recall["n_valid"] == 12


def test_summary_and_printed_table(finished_run):
    workdir, result = finished_run
    summary = json.loads((workdir / "results/softmax/summary.json").read_text())
    assert set(summary["valid"]) >= {"accuracy", "loss"}
    calibration = json.loads((workdir / "results/softmax/calibration.json").read_text())
    assert calibration["n"] == 6 and calibration["fitted_on"].startswith("calibration rows")
    assert calibration["temperature"] >= 1.0  # calibration.min_temperature
    assert summary["calibration"]["temperature"] == calibration["temperature"]
    assert set(summary["index"]) >= {"recall@1", "recall@3", "recall@5", "recall@10", "explained_variance"}
    predictions = pd.read_csv(workdir / "results/softmax/predictions/predictions.csv")
    valid = predictions[predictions["split"] == "valid"]
    assert summary["valid"]["accuracy"] == pytest.approx((valid["label"] == valid["predicted"]).mean())
    png = (workdir / "results/softmax/confusion/class.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] >= 200
    assert list((workdir / "results/softmax/summary_tensorboard").glob("events.out.tfevents.*"))
    assert "Results (valid fold)" in result.stdout
    for name in TINY_EXPERIMENTS:
        assert name in result.stdout


def test_four_experiments_compared(finished_run):
    workdir, _ = finished_run
    table = pd.read_csv(workdir / "results/experiments.csv").set_index("experiment")
    assert sorted(table.index) == sorted(TINY_EXPERIMENTS)
    for name in TINY_EXPERIMENTS:
        summary = json.loads((workdir / f"results/{name}/summary.json").read_text())
        assert table.loc[name, "valid_accuracy"] == pytest.approx(summary["valid"]["accuracy"])
        assert table.loc[name, "epochs"] == 3 and table.loc[name, "train_minutes"] > 0
    # AUC is defined for the sigmoid-trained heads only
    assert table.loc[["bce", "focal"], "auc"].between(0, 1).all()
    assert table.loc[["softmax", "augs"], "auc"].isna().all()
    # self-supervised heads: accuracy per head, a rotation confusion matrix, aug_ metrics per epoch
    augs = json.loads((workdir / "results/augs/summary.json").read_text())
    assert set(augs["heads"]) == {"rotation", "class_rotation"}
    assert 0 <= augs["heads"]["rotation"]["accuracy"] <= 1
    # scored on the checkpoint-selection rows, as training validated the heads (not the calibration rows)
    splits = pd.read_csv(workdir / "results/augs/predictions/predictions.csv")["split"]
    assert augs["heads"]["rotation"]["n_images"] == (splits == "valid").sum() < augs["valid"]["n_images"]
    assert (workdir / "results/augs/confusion/rotation.png").is_file()
    heads = pd.read_csv(workdir / "results/augs/predictions/heads.csv")
    assert set(heads["head"]) == {"rotation", "class_rotation"} and heads["true"].between(0, 23).all()
    epoch = json.loads((workdir / "results/augs/stage2/metrics.json").read_text())["epochs"][-1]["valid"]
    assert {"accuracy", "aug_rotation_accuracy", "aug_class_rotation_accuracy"} <= set(epoch)
    assert (workdir / "results/experiments.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_does_nothing(finished_run):
    workdir, _ = finished_run
    result = run_snakemake(workdir, "-n", configfile=workdir / "config.yaml")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_same_seed_same_summary(finished_run, tmp_path):
    workdir, _ = finished_run
    second = tmp_path / "again"
    shutil.copytree(workdir / "experiments", second / "experiments")
    config = (workdir / "config.yaml").read_text().replace(str(workdir), str(second))
    second.joinpath("config.yaml").write_text(config)
    # only the softmax experiment this time: its results must not depend on the others
    result = run_snakemake(second, "--config", "experiments=[softmax]", configfile=second / "config.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((workdir / "results/softmax/summary.json").read_text())
    assert json.loads((second / "results/softmax/summary.json").read_text()) == first


def test_dry_run_default_target(tmp_path):
    result = run_snakemake(tmp_path, "-n")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    rules = ("demo_dataset", "tag2label", "split", "train_stage", "infer", "pca_index", "evaluate_index", "summary")
    for rule in rules + ("compare_experiments",):
        assert rule in out
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", "n_folds=one"], "n_folds"),
        (["--config", "epochs=3"], "epochs"),
        (["--config", "dataset=/no/such/folder"], "dataset"),
        (["--config", "experiments=[nonexistent]"], "nonexistent"),
        (["--config", "valid_folds=[7]"], "valid_folds"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, args, expected):
    result = run_snakemake(tmp_path, "-n", *args)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert expected in out
    assert "jobid" not in out and not (tmp_path / "results").exists()


def test_bad_experiment_file_names_key(tmp_path):
    dataset = make_tiny_dataset(tmp_path / "images")
    broken = {"heads": [{"name": "class"}], "stages": {"stage1": {"epochs": "two", "lr": 0.1}}}
    config = write_tiny_config(tmp_path, dataset, experiments={"broken": broken})
    result = run_snakemake(tmp_path, "-n", configfile=config)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "broken.yaml" in out and "epochs" in out


def test_lint_is_clean():
    result = shutil.which("snakemake") or SNAKEMAKE
    lint = __import__("subprocess").run(
        [str(result), "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Congratulations" in lint.stdout + lint.stderr


def test_rules_are_snakefmt_formatted():
    snakefmt = SNAKEMAKE.parent / "snakefmt"
    check = __import__("subprocess").run(
        [str(snakefmt), "--check", "Snakefile", "workflow"], cwd=REPO, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_report_builds(finished_run):
    workdir, _ = finished_run
    report = workdir / "report.html"
    result = run_snakemake(workdir, "--report", str(report), configfile=workdir / "config.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    html = report.read_text(errors="replace")
    assert len(html) > 10_000 and "experiments.png" in html and "class.png" in html
