"""End to end: train on 3 classes x 12 images (16 px, one epoch per stage), then the targets
predict_all, evaluate_all and export through the real snakemake, asserting the files."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from conftest import make_tiny_dataset
from workflow_helpers import TINY_EXPERIMENT, run_snakemake, write_tiny_config

pytestmark = pytest.mark.e2e

ONE_EPOCH = {
    **TINY_EXPERIMENT,
    "stages": {name: {**stage, "epochs": 1} for name, stage in TINY_EXPERIMENT["stages"].items()},
}
TARGETS = ("all", "predict_all", "evaluate_all", "export")
# ONNX when the export extra is installed (make test installs it), else TorchScript
ONNX = all(importlib.util.find_spec(name) for name in ("onnxscript", "onnxruntime"))
FORMAT = "onnx" if ONNX else "torchscript"


@pytest.fixture(scope="module")
def use_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("use_e2e")
    dataset = make_tiny_dataset(base / "images")
    new = base / "new"
    (new / "deeper").mkdir(parents=True)
    shutil.copy(dataset / "class_00/img_000.png", new / "a.png")
    shutil.copy(dataset / "class_02/img_005.png", new / "deeper/b.png")
    (new / "corrupt.png").write_bytes((dataset / "class_01/img_001.png").read_bytes()[:80])
    (new / "notes.txt").write_text("not an image")
    held = base / "held"
    for name in ("class_00", "class_01"):
        shutil.copytree(dataset / name, held / name)
    workdir = base / "work"
    config = write_tiny_config(
        workdir, dataset, experiments={"softmax": ONE_EPOCH},
        predict={"sets": {"new": str(new)}, "top_k": 2, "batch_size": 4},
        evaluate={"sets": {"held": str(held)}, "batch_size": 8},
        export={"format": FORMAT}, test_fraction=0.25,
    )
    result = run_snakemake(workdir, "--printshellcmds", *TARGETS, configfile=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return workdir, new


def test_held_out_test_set_is_never_trained_on_and_reports(use_run):
    workdir, _ = use_run
    results = workdir / "results"
    test = pd.read_csv(results / "data/test.csv")
    dataset = pd.read_csv(results / "data/dataset.csv")
    assert test.groupby("tag").size().to_dict() == {"class_00": 3, "class_01": 3, "class_02": 3}  # 25 % of 12
    assert not set(test["path"]) & set(dataset["path"]) and len(test) + len(dataset) == 36
    trained_on = pd.read_csv(results / "softmax/predictions/predictions.csv")["path"]
    assert not set(test["path"]) & set(trained_on)  # not in any split of the run
    metrics = json.loads((results / "softmax/test.json").read_text())
    per_image = pd.read_csv(results / "softmax/test/predictions.csv")
    assert metrics["n_images"] == 9 and sorted(per_image["path"].str.split("/images/").str[-1]) == sorted(test["path"])
    assert metrics["accuracy"] == pytest.approx((per_image["label"] == per_image["predicted"]).mean())
    table = pd.read_csv(results / "experiments.csv").set_index("experiment")
    assert table.loc["softmax", "test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert table.columns[0] == "test_accuracy" and table.loc["softmax", "test_images"] == 9


def test_predict_all(use_run):
    workdir, new = use_run
    out = pd.read_csv(workdir / "results/softmax/predict/new.csv")
    assert out["path"].tolist() == [f"{new.as_posix()}/{p}" for p in ("a.png", "corrupt.png", "deeper/b.png", "notes.txt")]
    assert list(out.columns)[-1] == "error" and "top2_probability" in out.columns and "top3" not in out.columns
    errors = out["error"].fillna("")
    assert errors.str.startswith("corrupt or truncated").sum() == 1 and errors.str.startswith("not an image file").sum() == 1
    readable = out[errors == ""]
    assert set(readable["predicted"]) <= {"class_00", "class_01", "class_02", "unknown"}
    assert ((readable["confidence"] > 0) & (readable["confidence"] <= 1)).all()
    log = (workdir / "results/logs/softmax/predict_new.log").read_text()
    assert "unreadable" in log and "4/4 images" in log and "device: cpu" in log


def test_evaluate_all(use_run):
    workdir, _ = use_run
    folder = workdir / "results/softmax/eval/held"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n_images"] == 24 and metrics["classes_present"] == ["class_00", "class_01"]
    calibration = json.loads((workdir / "results/softmax/calibration.json").read_text())
    assert metrics["calibration"]["temperature"] == calibration["temperature"]
    errors = pd.read_csv(folder / "errors.csv")
    assert len(errors) == metrics["n_misclassified"] and errors["confidence"].is_monotonic_decreasing
    assert (folder / "errors/index.html").is_file() and (folder / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_export_and_its_example(use_run):
    workdir, new = use_run
    folder = workdir / "results/softmax/export"
    card = json.loads((folder / "model_card.json").read_text())
    assert card["format"] == FORMAT and (folder / card["file"]).is_file()
    assert card["classes"] == ["class_00", "class_01", "class_02"] and card["check"]["max_abs_difference"] <= 1e-4
    assert card["metrics"]["experiment"] == "softmax" and card["input"]["image_size"] == 16
    answer = subprocess.run([sys.executable, "example.py", str(new / "a.png")], cwd=folder, capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr[-2000:]
    predicted = pd.read_csv(workdir / "results/softmax/predict/new.csv")
    assert answer.stdout.split("\t")[1] == predicted.loc[predicted["path"].str.endswith("/a.png"), "top1"].item()


def test_targets_rerun_nothing(use_run):
    workdir, _ = use_run
    result = run_snakemake(workdir, "-n", *TARGETS, configfile=workdir / "config.yaml")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr


def test_dry_runs_on_the_default_config(tmp_path):
    result = run_snakemake(tmp_path, "-n", "export")
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "export_model" in out and "calibrate" in out and "results/softmax/export" in out
    for target, key in (("predict_all", "predict.sets"), ("evaluate_all", "evaluate.sets")):
        empty = run_snakemake(tmp_path, "-n", target)
        assert empty.returncode != 0 and key in empty.stdout + empty.stderr, target
