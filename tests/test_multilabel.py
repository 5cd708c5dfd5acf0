"""Multilabel data given as a CSV (path,labels with ';'), trained with the bce experiment."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from labelflow.dataset import class_targets, is_multilabel, split, tag2label_csv
from labelflow.io import DatasetError
from labelflow.models import HeadSpec, ModelSpec
from labelflow.experiment import check_heads_fit_data
from workflow_helpers import run_snakemake, tiny_experiment, write_tiny_config


def make_multilabel_dataset(root, per_group=12, size=16, seed=0):
    """Horizontal bar = label h, vertical bar = label v, a cross = both. Returns labels.csv."""
    rng = np.random.default_rng(seed)
    rows = []
    for group, labels in (("h", "h"), ("v", "v"), ("hv", "v;h")):
        folder = root / "images" / group
        folder.mkdir(parents=True)
        for i in range(per_group):
            pixels = np.full((size, size, 3), 20.0) + rng.normal(0, 10, (size, size, 3))
            if "h" in group:
                pixels[size // 2 - 2 : size // 2 + 2, :] = 230
            if "v" in group:
                pixels[:, size // 2 - 2 : size // 2 + 2] = 230
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
            rows.append((f"{group}/{i:02d}.png", labels))
    rows += [("../escape.png", "h"), ("h/missing.png", "v"), ("h/00.png", "")]
    table = pd.DataFrame(rows, columns=["path", "labels"]).drop_duplicates("path", keep="first")
    csv = root / "labels.csv"
    table.to_csv(csv, index=False)
    return root / "images", csv


def test_tag2label_csv_multi_hot_and_skips(tmp_path):
    images, csv = make_multilabel_dataset(tmp_path)
    result = tag2label_csv(csv, images)
    assert result.tag2cls == {"h": 0, "v": 1}
    assert len(result.dataset) == 36
    both = result.dataset.set_index("path").loc["hv/00.png"]
    assert both["labels"] == "h;v" and both["tag"] == "h"  # sorted; first label stratifies
    reasons = result.skipped.set_index("path")["reason"]
    assert "escapes" in reasons["../escape.png"] and "not found" in reasons["h/missing.png"]
    folds = split(result.dataset, result.tag2cls, n_folds=3, seed=1)
    assert "labels" in folds.columns and is_multilabel(folds)
    targets = class_targets(folds, result.tag2cls)
    assert targets.shape == (36, 2) and targets.sum() == 48  # 12 + 12 + 2*12


def test_copies_with_different_label_sets_are_a_label_conflict(tmp_path):
    import shutil

    from labelflow.dataset import DuplicateSettings

    images, csv = make_multilabel_dataset(tmp_path)
    shutil.copy(images / "hv" / "03.png", images / "h" / "cross_copy.png")  # labelled h only
    shutil.copy(images / "v" / "04.png", images / "v" / "same_copy.png")  # same labels: no conflict
    table = pd.read_csv(csv)
    extra = pd.DataFrame({"path": ["h/cross_copy.png", "v/same_copy.png"], "labels": ["h", "v"]})
    pd.concat([table, extra]).to_csv(csv, index=False)

    result = tag2label_csv(csv, images)
    assert result.duplicates[["members", "classes", "label_conflict"]].values.tolist() == [
        ["h/cross_copy.png;hv/03.png", "h;v", True],
        ["v/04.png;v/same_copy.png", "v", False],
    ]
    reasons = result.skipped.set_index("path")["reason"]
    assert reasons["h/cross_copy.png"] == "label conflict: duplicate of hv/03.png in classes h;v"
    assert reasons["hv/03.png"] == "label conflict: duplicate of h/cross_copy.png in class h"
    assert len(result.dataset) == 36 - 1 + 1  # two copies added, the conflicting pair left out
    kept = tag2label_csv(csv, images, DuplicateSettings(label_conflicts="keep"))
    assert len(kept.dataset) == 38
    folds = split(kept.dataset, kept.tag2cls, n_folds=3, seed=1)
    assert (folds.groupby("group")["fold"].nunique() == 1).all()


def test_duplicate_rows_are_an_error(tmp_path):
    images, csv = make_multilabel_dataset(tmp_path)
    table = pd.read_csv(csv)
    pd.concat([table, table.iloc[:1]]).to_csv(csv, index=False)
    with pytest.raises(DatasetError, match="more than once"):
        tag2label_csv(csv, images)


def test_softmax_head_refuses_multilabel_data():
    spec = ModelSpec("resnet18", [HeadSpec("class", 2, "cross_entropy")])
    with pytest.raises(DatasetError, match="bce or focal"):
        check_heads_fit_data(spec, multilabel=True, experiment_name="softmax")
    check_heads_fit_data(ModelSpec("resnet18", [HeadSpec("class", 2, "bce")]), multilabel=True)


@pytest.mark.e2e
def test_multilabel_workflow_end_to_end(tmp_path):
    images, csv = make_multilabel_dataset(tmp_path)
    experiments = {"bce": tiny_experiment({"name": "class", "loss": "bce"})}
    config = write_tiny_config(tmp_path / "work", images, experiments=experiments, labels_csv=str(csv))
    result = run_snakemake(tmp_path / "work", configfile=config)
    assert result.returncode == 0, result.stderr[-4000:]
    results = tmp_path / "work/results"
    dataset = pd.read_csv(results / "data/dataset.csv")
    assert set(dataset["labels"]) == {"h", "v", "h;v"}
    summary = json.loads((results / "bce/summary.json").read_text())
    assert summary["multilabel"] is True
    valid = summary["valid"]
    for key in ("accuracy", "f1_micro", "f1_macro", "mAP", "auc"):
        assert 0 <= valid[key] <= 1, key
    assert set(valid["per_class_f1"]) == {"h", "v"}
    predictions = pd.read_csv(results / "bce/predictions/predictions.csv", keep_default_na=False)
    assert set(predictions["label"]) == {"h", "v", "h;v"}
    assert set(predictions["predicted"]) <= {"", "h", "v", "h;v"}
