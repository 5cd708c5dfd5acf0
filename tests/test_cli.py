"""Tests for the labelflow command line: digits -> tag2label -> split, and errors."""

from __future__ import annotations

import json
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
    assert list(raw.columns) == ["path", "tag", "sha1"] and len(raw) == 1797
    assert raw["path"].iloc[0] == "0/0000.png" and raw["tag"].iloc[0] == "0"
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped.values.tolist() == [["notes.txt", "not inside a class folder"]]

    assert main([
        "split", "--in-csv", str(out / "dataset_raw.csv"), "--tag2cls", str(out / "tag2cls.json"),
        "--out-csv", str(out / "dataset.csv"), "--n-folds", "4", "--seed", "1",
        "--root", str(digits),
    ]) == 0  # fmt: skip
    dataset = pd.read_csv(out / "dataset.csv", dtype={"path": str, "tag": str})
    assert list(dataset.columns) == ["path", "tag", "class", "fold"]
    assert len(dataset) == 1797
    assert sorted(dataset["fold"].unique()) == [0, 1, 2, 3]
    assert (dataset["class"] == dataset["tag"].astype(int)).all()
    assert dataset.groupby("fold").size().between(449, 450).all()
    assert "fold 0: 450 images" in capsys.readouterr().out


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
    assert "'class_00' (12 images)" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
