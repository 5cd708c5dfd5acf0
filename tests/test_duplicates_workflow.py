"""End to end, data rules only: the real snakemake runs tag2label and split on images with exact
and near copies (some across classes) and a file named with non-UTF-8 bytes."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from conftest import DUPLICATE_GROUPS, make_duplicates_dataset, write_badly_named_image
from labelflow.dataset import read_dataset_csv, read_duplicates
from labelflow.io import read_table
from workflow_helpers import run_snakemake, write_tiny_config

pytestmark = pytest.mark.e2e

TARGET = "results/data/dataset.csv"


def test_data_rules_keep_duplicate_groups_in_one_fold(tmp_path):
    dataset = make_duplicates_dataset(tmp_path / "images")
    shown = write_badly_named_image(dataset / "dog")
    workdir = tmp_path / "work"
    config = write_tiny_config(workdir, dataset)  # n_folds 3, default duplicates settings
    result = run_snakemake(workdir, TARGET, configfile=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    data = workdir / "results/data"

    groups = read_duplicates(data / "duplicates.csv")
    assert [tuple(r) for r in groups[["members", "classes", "label_conflict", "kind"]].values] == DUPLICATE_GROUPS
    folds = read_dataset_csv(data / "dataset.csv", root=dataset)
    assert list(folds.columns) == ["path", "tag", "class", "fold", "sha1", "group"]
    assert len(folds) == 26  # 32 readable images, the members of 3 cross-class groups left out
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    assert folds.groupby("fold").size().between(7, 11).all()

    with_folds = read_table(data / "duplicate_folds.csv", text_columns=("members", "classes", "kind", "fold"))
    fold_of = folds.set_index("path")["fold"].astype(str)
    for members, conflict, fold in with_folds[["members", "label_conflict", "fold"]].fillna("").values:
        assert fold == ("" if conflict else fold_of[members.split(";")[0]])
        assert conflict or {fold_of[m] for m in members.split(";")} == {fold}

    skipped = pd.read_csv(data / "skipped.csv", keep_default_na=False).set_index("path")["reason"]
    assert skipped[f"dog/{shown}"] == "file name is not valid UTF-8"
    assert skipped["owl/from_cat_05.png"] == "label conflict: duplicate of cat/cat_05.png in class cat"
    assert skipped.str.startswith("label conflict: ").sum() == 6
    log = (workdir / "results/logs/tag2label.log").read_text(encoding="utf-8")
    assert "7 duplicate groups (max_distance 4, min_correlation 0.99): 15 images" in log and "3 label conflicts (drop)" in log
    assert "label conflict: duplicate group" in log
    assert "4 duplicate groups kept, each inside one fold" in (workdir / "results/logs/split.log").read_text()

    # the settings reach the rule as params: changing them reruns tag2label and split
    settings = yaml.safe_load(config.read_text())
    settings["duplicates"] = {"label_conflicts": "keep", "max_distance": -1}
    config.write_text(yaml.safe_dump(settings))
    result = run_snakemake(workdir, TARGET, configfile=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    folds = read_dataset_csv(data / "dataset.csv", root=dataset)
    assert len(folds) == 32 and (folds.groupby("group")["fold"].nunique() == 1).all()
    assert read_duplicates(data / "duplicates.csv")["kind"].tolist() == ["exact"] * 3
