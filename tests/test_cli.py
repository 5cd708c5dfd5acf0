"""Tests for the labelflow command line: digits -> tag2label -> split, and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from labelflow.cli import main


def test_digits_tag2label_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    digits = tmp_path / "digits"
    assert main(["digits", str(digits), "--image-size", "16"]) == 0
    (digits / "notes.txt").write_text("a stray file")

    out = tmp_path / "out"
    assert main([
        "tag2label", "--in-dir", str(digits),
        "--out-dataset", str(out / "dataset_raw.csv"),
        "--out-tag2cls", str(out / "tag2cls.json"),
        "--out-skipped", str(out / "skipped.csv"),
    ]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "1797 images in 10 classes" in printed
    assert "notes.txt: not inside a class folder" in printed

    tag2cls = json.loads((out / "tag2cls.json").read_text(encoding="utf-8"))
    assert tag2cls == {str(d): d for d in range(10)}
    raw = pd.read_csv(out / "dataset_raw.csv", dtype=str)
    assert list(raw.columns) == ["path", "tag", "sha1", "phash", "group"] and len(raw) == 1797
    assert raw["path"].iloc[0] == "0/0000.png" and raw["tag"].iloc[0] == "0"
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped.values.tolist() == [["notes.txt", "not inside a class folder"]]

    assert main([
        "split", "--in-csv", str(out / "dataset_raw.csv"), "--tag2cls", str(out / "tag2cls.json"),
        "--out-csv", str(out / "dataset.csv"), "--n-folds", "4", "--seed", "1",
        "--root", str(digits),
    ]) == 0  # fmt: skip
    dataset = pd.read_csv(out / "dataset.csv", dtype={"path": str, "tag": str})
    assert list(dataset.columns) == ["path", "tag", "class", "fold", "sha1", "group"]
    assert len(dataset) == 1797
    assert sorted(dataset["fold"].unique()) == [0, 1, 2, 3]
    assert (dataset["class"] == dataset["tag"].astype(int)).all()
    assert dataset.groupby("fold").size().between(447, 452).all()
    assert (dataset.groupby("group")["fold"].nunique() == 1).all()
    assert "fold 0: " in capsys.readouterr().out


def test_bad_dataset_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([
        "tag2label", "--in-dir", str(tmp_path / "missing"),
        "--out-dataset", str(tmp_path / "d.csv"),
        "--out-tag2cls", str(tmp_path / "t.json"), "--out-skipped", str(tmp_path / "s.csv"),
    ])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset folder ") and "missing does not exist" in err
    assert not (tmp_path / "d.csv").exists()


def test_digits_refuses_existing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["digits", str(tmp_path)]) == 2
    assert "already exists; refusing to overwrite" in capsys.readouterr().err


def test_split_error_names_small_class(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    main([
        "tag2label", "--in-dir", str(tiny_dataset), "--out-dataset", str(out / "raw.csv"),
        "--out-tag2cls", str(out / "t.json"), "--out-skipped", str(out / "s.csv"),
    ])  # fmt: skip
    rc = main(["split", "--in-csv", str(out / "raw.csv"), "--tag2cls", str(out / "t.json"),
               "--out-csv", str(out / "d.csv"), "--n-folds", "13"])  # fmt: skip
    assert rc == 2
    assert "'class_00' (12 groups, 12 images)" in capsys.readouterr().err


def test_tag2label_and_split_write_the_duplicate_tables(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(tiny_dataset / "class_00" / "img_000.png", tiny_dataset / "class_01" / "copy.png")
    shutil.copy(tiny_dataset / "class_02" / "img_005.png", tiny_dataset / "class_02" / "again.png")
    out = tmp_path / "out"
    args = [
        "tag2label", "--in-dir", str(tiny_dataset), "--out-dataset", str(out / "raw.csv"),
        "--out-tag2cls", str(out / "t.json"), "--out-skipped", str(out / "s.csv"),
        "--out-duplicates", str(out / "duplicates.csv"),
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "36 images in 3 classes" in printed
    assert "2 duplicate group(s) of 4 images, 1 label conflict(s)" in printed
    assert "(exact, classes class_00;class_01, label conflict): class_00/img_000.png;class_01/copy.png" in printed
    groups = pd.read_csv(out / "duplicates.csv")
    assert list(groups.columns) == ["group", "size", "members", "classes", "label_conflict", "kind"]
    assert groups["members"].tolist() == [
        "class_00/img_000.png;class_01/copy.png",
        "class_02/again.png;class_02/img_005.png",
    ]
    assert groups["label_conflict"].tolist() == [True, False]
    skipped = pd.read_csv(out / "s.csv")
    assert skipped["reason"].tolist() == [
        "label conflict: duplicate of class_01/copy.png in class class_01",
        "label conflict: duplicate of class_00/img_000.png in class class_00",
    ]

    assert main(args[:-2] + ["--label-conflicts", "keep", "--max-distance", "-1"]) == 0
    assert "38 images in 3 classes" in capsys.readouterr().out

    assert main(args) == 0
    assert main([
        "split", "--in-csv", str(out / "raw.csv"), "--tag2cls", str(out / "t.json"),
        "--out-csv", str(out / "d.csv"), "--n-folds", "3",
        "--duplicates", str(out / "duplicates.csv"), "--out-duplicate-folds", str(out / "folds.csv"),
    ]) == 0  # fmt: skip
    folds = pd.read_csv(out / "folds.csv", dtype={"fold": str}, keep_default_na=False)
    dataset = pd.read_csv(out / "d.csv").set_index("path")["fold"]
    assert folds["fold"].tolist() == ["", str(dataset["class_02/again.png"])]
    assert dataset["class_02/again.png"] == dataset["class_02/img_005.png"]
    rc = main(["split", "--in-csv", str(out / "raw.csv"), "--tag2cls", str(out / "t.json"),
               "--out-csv", str(out / "d.csv"), "--duplicates", str(out / "duplicates.csv")])  # fmt: skip
    assert rc == 2 and "--duplicates and --out-duplicate-folds go together" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_tag2label_min_correlation_option(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    base = [
        "tag2label", "--in-dir", str(tiny_dataset), "--out-dataset", str(out / "raw.csv"),
        "--out-tag2cls", str(out / "t.json"), "--out-skipped", str(out / "s.csv"),
    ]  # fmt: skip
    for bad in ("1.5", "high"):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--min-correlation", bad])
        assert exit_info.value.code == 2
        assert f"--min-correlation: must be a number in 0..1 or 'none', got '{bad}'" in capsys.readouterr().err
    assert main([*base, "--min-correlation", "none"]) == 0
    assert len(pd.read_csv(out / "raw.csv")) == 36
