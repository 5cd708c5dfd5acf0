"""LR finder, grid search and k-fold runs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny_dataset, stage_spec
from labelflow.loaders import ImageTableDataset, build_transform, make_loader
from labelflow.lrfinder import find_lr, lr_schedule, suggest
from labelflow.models import HeadSpec, ModelSpec, create_model
from labelflow.runs import GridError, RunTable, grid_runs
from workflow_helpers import TINY_EXPERIMENT, run_snakemake, write_tiny_config


@pytest.fixture
def tiny_loader(tmp_path):
    root = make_tiny_dataset(tmp_path / "images")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    targets = [int(p.split("/")[0][-2:]) for p in paths]
    ds = ImageTableDataset(root, paths, targets, 16, build_transform(train=False))
    return make_loader(ds, batch_size=6, shuffle=True, seed=0)


def _model():
    torch.manual_seed(0)
    return create_model(ModelSpec("resnet18", [HeadSpec("class", 3)], embedding_size=8, small_input=True))


@pytest.mark.parametrize("scale", ["linear", "log"])
def test_recorded_lrs_follow_the_schedule_exactly(tiny_loader, scale):
    torch.set_num_threads(1)
    records = find_lr(
        _model(), tiny_loader, stage_spec("s", epochs=1, lr=1e-4, optimizer="sgd"), torch.device("cpu"),
        start_lr=1e-4, final_lr=1e-2, num_steps=9, scale=scale, diverge_factor=1e9,
    )
    # 36 images / 6 per batch = 6 batches an epoch: the finder goes on into a second epoch
    assert len(records) == 9
    np.testing.assert_allclose(records["lr"], lr_schedule(1e-4, 1e-2, 9, scale), rtol=1e-12)
    if scale == "linear":
        assert np.allclose(np.diff(records["lr"]), (1e-2 - 1e-4) / 8)
    else:
        assert np.allclose(np.diff(np.log(records["lr"])), np.log(100) / 8)


def test_the_finder_trains_in_the_stage_precision(tiny_loader):
    torch.set_num_threads(1)
    model, seen = _model(), set()
    model.register_forward_hook(lambda module, inputs, out: seen.add(out["embedding"].dtype))
    find_lr(model, tiny_loader, stage_spec("s", epochs=1, lr=1e-4, optimizer="sgd", precision="bf16"),
            torch.device("cpu"), start_lr=1e-4, final_lr=1e-2, num_steps=2, diverge_factor=1e9)
    assert seen == {torch.bfloat16}


def test_divergence_stops_the_finder(tiny_loader):
    torch.set_num_threads(1)
    records = find_lr(
        _model(), tiny_loader, stage_spec("s", epochs=1, lr=1e-3, optimizer="sgd", momentum=0.9), torch.device("cpu"),
        start_lr=1e-3, final_lr=1e6, num_steps=60, scale="log", smoothing=0.5, diverge_factor=4.0,
    )
    assert 3 <= len(records) < 60
    last = records["smoothed_loss"].iloc[-1]
    assert not np.isfinite(records["loss"].iloc[-1]) or last > 4.0 * records["smoothed_loss"].min()


def test_suggestions_on_a_known_curve():
    lrs = np.geomspace(1e-5, 1, 50)
    # loss falls fastest around lr=1e-3 and is lowest at lr=1e-2
    loss = 2 - np.tanh(np.log10(lrs) + 3) + np.where(lrs > 1e-2, 20 * (np.log10(lrs) + 2) ** 2, 0)
    records = pd.DataFrame({"lr": lrs, "loss": loss, "smoothed_loss": loss})
    s = suggest(records)
    assert 5e-4 < s["steepest"] < 2e-3
    lr_min = lrs[loss.argmin()]
    assert s["min_div10"] == pytest.approx(lr_min / 10)


def test_grid_runs_ids_and_values():
    experiment = {"model": {"embedding_size": 128}, "stages": {"stage1": {"lr": 0.1}, "stage2": {"lr": 0.01}}}
    runs = grid_runs(experiment, {"stages.stage2.lr": [1e-3, 3e-4], "model.embedding_size": [64, 128]})
    assert list(runs) == [
        "lr=0.001,embedding_size=64", "lr=0.001,embedding_size=128",
        "lr=0.0003,embedding_size=64", "lr=0.0003,embedding_size=128",
    ]
    run = runs["lr=0.0003,embedding_size=64"]["experiment"]
    assert run["stages"]["stage2"]["lr"] == 3e-4 and run["model"]["embedding_size"] == 64
    assert experiment["stages"]["stage2"]["lr"] == 0.01  # the base experiment is untouched
    # two keys ending alike get longer, still readable names
    both = grid_runs(experiment, {"stages.stage1.lr": [1, 2], "stages.stage2.lr": [3]})
    assert list(both) == ["stage1.lr=1,stage2.lr=3", "stage1.lr=2,stage2.lr=3"]


def test_grid_bad_key_names_it():
    with pytest.raises(GridError, match="stages.stage3"):
        grid_runs({"stages": {"stage1": {"lr": 1}}}, {"stages.stage3.lr": [1, 2]})


def _run_table(valid_folds, experiments=("softmax", "focal"), kfold=("softmax",)):
    config = {"dataset": "data", "experiments": list(experiments), "kfold": {"experiments": list(kfold)},
              "n_folds": 5, "calibration": {"holdout": 0.0}, "grid": {"params": {}}}
    recipe = {"stages": {"stage1": {"lr": 0.01}}}
    return RunTable.from_config(config, lambda name: {**recipe, "name": name}, validate_experiment=lambda *_: None,
                                valid_folds=valid_folds)


def test_the_main_run_serves_as_the_kfold_fold_it_validates_on():
    """With the last fold validating (valid_folds null), fold 4 of softmax would train the main
    run's model again (same recipe, data, fold and seed): the main run is that fold."""
    runs = _run_table((4,))
    folds = runs.kfold_runs("softmax")
    assert [run.valid_folds for run in folds] == [(0,), (1,), (2,), (3,), (4,)]
    assert folds[4] is runs["softmax"] and folds[4].path("summary.json") == "results/softmax/summary.json"
    assert [run.name for run in folds[:4]] == [f"kfold/softmax/fold_{k}" for k in range(4)]
    assert "kfold/softmax/fold_4" not in runs.static and runs.kfold_runs("focal") == []
    # the main run validating on fold 2 serves as fold 2; with several validation folds, or for
    # an experiment in k-fold only, every fold is its own run
    assert runs_named(_run_table((2,)).kfold_runs("softmax")) == [
        "kfold/softmax/fold_0", "kfold/softmax/fold_1", "softmax", "kfold/softmax/fold_3", "kfold/softmax/fold_4"]
    assert runs_named(_run_table((3, 4)).kfold_runs("softmax")) == [f"kfold/softmax/fold_{k}" for k in range(5)]
    alone = _run_table((4,), experiments=("focal",), kfold=("softmax",)).kfold_runs("softmax")
    assert runs_named(alone) == [f"kfold/softmax/fold_{k}" for k in range(5)] and alone[4].experiment["name"] == "softmax"


def runs_named(runs):
    return [run.name for run in runs]


@pytest.mark.e2e
def test_grid_dry_run_and_bad_key(tmp_path):
    dataset = make_tiny_dataset(tmp_path / "images")
    grid = {"experiment": "softmax", "params": {"stages.stage2.lr": [0.001, 0.0003], "model.embedding_size": [8, 16]}}
    config = write_tiny_config(tmp_path / "work", dataset, grid=grid)
    result = run_snakemake(tmp_path / "work", "-n", "grid", configfile=config)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for run in ("lr=0.001,embedding_size=8", "lr=0.001,embedding_size=16", "lr=0.0003,embedding_size=8", "lr=0.0003,embedding_size=16"):
        assert f"results/grid/{run}/stage2/best.pt" in out
    assert "grid_comparison" in out

    grid["params"]["stages.stage2.learning_rate"] = [1]
    config = write_tiny_config(tmp_path / "bad", dataset, grid=grid)
    result = run_snakemake(tmp_path / "bad", "-n", "grid", configfile=config)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "stages.stage2.learning_rate" in out and "grid.params" in out


@pytest.mark.e2e
def test_lr_auto_depends_on_the_finder(tmp_path):
    dataset = make_tiny_dataset(tmp_path / "images")
    auto = {**TINY_EXPERIMENT, "stages": {**TINY_EXPERIMENT["stages"], "stage2": {"epochs": 1, "lr": "auto", "batch_size": 8}}}
    config = write_tiny_config(tmp_path / "work", dataset, experiments={"softmax": auto})
    result = run_snakemake(tmp_path / "work", "-n", configfile=config)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "results/softmax/lrfinder/stage2/suggestion.json" in out


@pytest.mark.e2e
def test_kfold_and_lrfinder_end_to_end(tmp_path):
    dataset = make_tiny_dataset(tmp_path / "images")
    quick = {**TINY_EXPERIMENT, "stages": {"stage1": {"epochs": 2, "lr": 0.01, "batch_size": 8, "freeze_encoder": True}}}
    config = write_tiny_config(
        tmp_path / "work", dataset, experiments={"softmax": quick}, kfold={"experiments": ["softmax"]},
        lrfinder={"num_steps": 8, "start_lr": 1e-4, "final_lr": 1e-1, "scale": "log"},
    )
    result = run_snakemake(tmp_path / "work", "kfold", "lrfinder", configfile=config)
    assert result.returncode == 0, result.stderr[-4000:]
    results = tmp_path / "work/results"
    table = pd.read_csv(results / "kfold/softmax/summary.csv")
    assert list(table["fold"]) == [0, 1, 2]
    summary = json.loads((results / "kfold/softmax/summary.json").read_text())
    assert summary["valid_accuracy"]["mean"] == pytest.approx(table["valid_accuracy"].mean())
    assert summary["valid_accuracy"]["std"] == pytest.approx(table["valid_accuracy"].std(ddof=1))
    # each fold's held-out validation rows (that did not choose its checkpoint) score it
    assert table["heldout_accuracy"].between(0, 1).all()
    assert summary["heldout_accuracy"]["mean"] == pytest.approx(table["heldout_accuracy"].mean())
    oof = pd.read_csv(results / "kfold/softmax/oof_predictions.csv")
    folds = pd.read_csv(results / "data/dataset.csv").set_index("path")
    assert len(oof) == 36 and oof["path"].is_unique  # every image predicted once...
    assert (oof["fold"].to_numpy() == folds.loc[oof["path"], "fold"].to_numpy()).all()  # ...by the model that held it out
    assert (results / "kfold/softmax/kfold.png").is_file()
    # the last fold is the main run (valid_folds null): trained once, its predictions are that fold's
    assert not (results / "kfold/softmax/fold_2").exists() and (results / "softmax/stage1/best.pt").is_file()
    main = pd.read_csv(results / "softmax/predictions/predictions.csv").set_index("path")
    last = oof[oof["fold"] == 2].set_index("path")
    assert len(last) == 12 and (last[["predicted", "confidence"]] == main.loc[last.index, ["predicted", "confidence"]]).all().all()

    lr_table = pd.read_csv(results / "softmax/lrfinder/stage1/lr_loss.csv")
    np.testing.assert_allclose(lr_table["lr"], lr_schedule(1e-4, 1e-1, 8, "log")[: len(lr_table)], rtol=1e-12)
    suggestion = json.loads((results / "softmax/lrfinder/stage1/suggestion.json").read_text())
    assert suggestion["used"] == "min_div10" and suggestion["lr"] == suggestion["suggestions"]["min_div10"]
    assert (results / "softmax/lrfinder/stage1/lrfinder.png").is_file()
