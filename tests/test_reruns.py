"""Content-aware reruns: an image added, replaced or removed anywhere below the dataset reruns
tag2label and what follows; an unchanged folder reruns nothing; a package change reruns the
rules whose code changed (labelflow.manifest)."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest

import labelflow.manifest as manifest
from conftest import make_tiny_dataset
from workflow_helpers import REPO, TINY_EXPERIMENT, job_counts, run_snakemake, write_tiny_config

SCRIPTS = REPO / "workflow" / "scripts"


def test_folder_digest_sees_nested_changes_and_ignores_hidden_files(tmp_path):
    root = make_tiny_dataset(tmp_path / "images", per_class=2)
    nested = root / "class_00" / "more" / "deeper"
    nested.mkdir(parents=True)
    first = manifest.folder_digest(root)
    assert manifest.folder_digest(root) == first  # stable
    (root / ".DS_Store").write_bytes(b"x")
    assert manifest.folder_digest(root) == first  # hidden files are not data
    shutil.copy(root / "class_01" / "img_000.png", nested / "new.png")
    added = manifest.folder_digest(root)
    assert added != first
    replacement = (root / "class_02" / "img_001.png").read_bytes()
    (nested / "new.png").write_bytes(replacement + b"\0")  # same name, other content and size
    assert manifest.folder_digest(root) not in (first, added)
    (nested / "new.png").unlink()
    assert manifest.folder_digest(root) == first
    # a symlinked class folder is followed
    linked = make_tiny_dataset(tmp_path / "elsewhere", n_classes=1, per_class=1)
    os.symlink(linked / "class_00", root / "linked")
    assert manifest.folder_digest(root) != first


def test_csv_source_digest_covers_the_files_it_names(tmp_path):
    root = make_tiny_dataset(tmp_path / "images", per_class=1)
    csv = tmp_path / "set.csv"
    pd.DataFrame({"path": ["images/class_00/img_000.png"]}).to_csv(csv, index=False)
    first = manifest.source_digest(csv)
    (root / "class_00" / "img_000.png").write_bytes((root / "class_01" / "img_000.png").read_bytes() + b"\0\0")
    assert manifest.source_digest(csv) != first


def test_code_digest_changes_only_for_scripts_that_import_the_changed_code(tmp_path, monkeypatch):
    package = tmp_path / "labelflow"
    shutil.copytree(REPO / "src" / "labelflow", package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(manifest, "PACKAGE", package)
    digest = lambda script: manifest.code_digest.__wrapped__(SCRIPTS / script)  # noqa: E731 - uncached
    manifest._parsed.cache_clear()
    before = {name: digest(name) for name in ("train_stage.py", "pca_index.py", "split.py")}
    # a docstring or comment is not code
    training = package / "training.py"
    training.write_text(training.read_text().replace('"""The one training loop', '"""Our one training loop') + "\n# note\n")
    manifest._parsed.cache_clear()
    assert {name: digest(name) for name in before} == before
    # a code change reruns the rules whose scripts reach it, and only those
    training.write_text(training.read_text().replace("return epoch_seed", "return epoch_seed  # same") + "\nX = 1\n")
    manifest._parsed.cache_clear()
    after = {name: digest(name) for name in before}
    assert after["train_stage.py"] != before["train_stage.py"]  # train_stage -> experiment -> training
    assert after["pca_index.py"] == before["pca_index.py"] and after["split.py"] == before["split.py"]
    manifest._parsed.cache_clear()


@pytest.mark.e2e
def test_new_nested_image_reruns_tag2label_and_training(tmp_path):
    dataset = make_tiny_dataset(tmp_path / "images")
    workdir = tmp_path / "work"
    config = write_tiny_config(workdir, dataset, experiments={"softmax": TINY_EXPERIMENT})
    target = "results/softmax/stage1/metrics.json"  # one epoch of training is enough to show it
    first = run_snakemake(workdir, target, configfile=config)
    assert first.returncode == 0, first.stderr[-3000:]
    unchanged = run_snakemake(workdir, target, "-n", configfile=config)
    assert unchanged.returncode == 0 and "Nothing to be done" in unchanged.stdout + unchanged.stderr

    nested = dataset / "class_02" / "batch_2" / "deeper"
    nested.mkdir(parents=True)
    shutil.copy(dataset / "class_02" / "img_000.png", nested / "late.png")
    (nested / "late.png").write_bytes((nested / "late.png").read_bytes() + b"\0")  # not a byte copy
    planned = run_snakemake(workdir, target, "-n", configfile=config)
    out = planned.stdout + planned.stderr
    assert planned.returncode == 0, out[-3000:]
    jobs = job_counts(out)
    assert jobs == {"tag2label": 1, "split": 1, "train_stage": 1}, jobs
    assert "Params have changed" in out

    second = run_snakemake(workdir, target, configfile=config)
    assert second.returncode == 0, second.stderr[-3000:]
    table = pd.read_csv(workdir / "results/data/dataset.csv")
    assert "class_02/batch_2/deeper/late.png" in set(table["path"]) and len(table) == 37
    log = (workdir / "results/logs/softmax/stage1.log").read_text()
    trained = [line for line in log.splitlines() if "train /" in line][-1]
    assert f"{int((table['fold'] != 2).sum())} train" in trained  # the new image is in the training run
    again = run_snakemake(workdir, target, "-n", configfile=config)
    assert "Nothing to be done" in again.stdout + again.stderr
