"""Unit tests for label corrections (labelflow.corrections), the label-issue step of the workflow
(labelflow.cleaning) and the k-fold probabilities it reads."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from labelflow.cleaning import (
    ISSUE_COLUMNS,
    RELABELLED,
    LabelIssueSettings,
    cleaned_dataset,
    fold_neighbours,
    oof_neighbours,
    score_oof,
    signals_fired,
)
from labelflow.corrections import (
    HUMAN_CORRECTED,
    apply_autolabel_corrections,
    apply_corrections,
    applying_rows_digest,
    read_corrections,
)
from labelflow.index import IndexSettings, pca_index
from labelflow.io import DatasetError
from labelflow.label_issues import flag_metrics, make_synthetic_problem
from labelflow.reports import kfold_summary

TAG2CLS = {"cat": 0, "dog": 1, "fox": 2}


def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": ["cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png", "fox/e.png"],
            "tag": ["cat", "cat", "dog", "dog", "fox"],
            "class": [0, 0, 1, 1, 2],
            "fold": [0, 1, 0, 1, 2],
        }
    )


def corrections(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["path", "label"])


# --------------------------------------------------------------------------- corrections


def test_read_corrections_checks_the_file(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("path,label\n./cat/a.png, dog \ncat/b.png,drop\n")
    read = read_corrections(path)
    assert read.to_dict("list") == {"path": ["cat/a.png", "cat/b.png"], "label": ["dog", "drop"]}
    for text, message in [
        ("path,label\ncat/a.png,dog\ncat/a.png,fox\n", "more than once"),
        ("path,label\ncat/a.png,\n", "lack a path or a label"),
        ("path,label\n/abs/a.png,dog\n", "relative"),
        ("path,label\n../a.png,dog\n", "relative"),
        ("path,tag\ncat/a.png,dog\n", "label"),
    ]:
        path.write_text(text)
        with pytest.raises(DatasetError, match=message):
            read_corrections(path)
    with pytest.raises(DatasetError, match="does not exist"):
        read_corrections(tmp_path / "missing.csv")
    path.write_text("path,label\n")  # nothing reviewed yet
    empty, report = apply_corrections(table(), read_corrections(path), TAG2CLS)
    assert empty.drop(columns="source").equals(table()) and len(report) == 0


def test_corrections_digest_per_table_changes_only_with_its_own_rows(tmp_path):
    (tmp_path / "data/cat").mkdir(parents=True)
    (tmp_path / "data/cat/a.png").write_bytes(b"x")
    csv = tmp_path / "corrections.csv"
    csv.write_text("path,label\ncat/a.png,dog\nraw/p/1.png,cat\n")
    main, pile = applying_rows_digest(csv, tmp_path / "data"), applying_rows_digest(csv)
    csv.write_text("path,label\ncat/a.png,dog\nraw/p/1.png,dog\n")  # a review answer changes
    assert applying_rows_digest(csv, tmp_path / "data") == main and applying_rows_digest(csv) != pile
    csv.write_text("path,label\ncat/a.png,drop\nraw/p/1.png,dog\n")  # a main-dataset row changes
    assert applying_rows_digest(csv, tmp_path / "data") != main


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"path,label\nb/1.png,a,x\nb/2.png,b,y\n", "line 2 has 3 fields"),  # pandas read path=a, label=x
        (b'path,label\n"b/1.png,a\n', "not a readable CSV"),
        (b"", "not a readable CSV"),
        (b"path,label\nb/caf\xe9.png,a\n", "not a readable CSV"),
    ],
)
def test_a_malformed_corrections_file_is_a_dataset_error_naming_it(tmp_path, content, message):
    # the digest runs while Snakemake builds the DAG, which reports a DatasetError but no other error
    csv = tmp_path / "corrections.csv"
    csv.write_bytes(content)
    with pytest.raises(DatasetError, match=rf"corrections\.csv.*{message}"):
        applying_rows_digest(csv, tmp_path)


def test_corrections_relabel_drop_and_report_without_moving_other_rows():
    fixes = corrections([("cat/b.png", "dog"), ("dog/c.png", "dog"), ("dog/d.png", "drop"), ("raw/x.png", "fox")])
    out, report = apply_corrections(table(), fixes, TAG2CLS)
    assert out["path"].tolist() == ["cat/a.png", "cat/b.png", "dog/c.png", "fox/e.png"]
    b = out.set_index("path").loc["cat/b.png"]
    assert (b["tag"], b["class"], b["fold"], b["source"]) == ("dog", 1, 1, HUMAN_CORRECTED)
    # a confirmed label is a human decision too; an untouched row keeps "given"
    assert out.set_index("path")["source"].to_dict() == {
        "cat/a.png": "given", "cat/b.png": HUMAN_CORRECTED, "dog/c.png": HUMAN_CORRECTED, "fox/e.png": "given",
    }  # fmt: skip
    assert report.set_index("path")["action"].to_dict() == {
        "cat/b.png": "relabelled", "dog/c.png": "confirmed", "dog/d.png": "dropped", "raw/x.png": "not found",
    }  # fmt: skip
    assert report.set_index("path").loc["cat/b.png", "given"] == "cat"
    assert out["class"].dtype == np.int64 and out["fold"].tolist() == [0, 1, 0, 2]


def test_corrections_reject_unknown_classes_and_several_labels_for_single_label_data():
    with pytest.raises(DatasetError, match="unknown class.*'wolf'"):
        apply_corrections(table(), corrections([("cat/a.png", "wolf")]), TAG2CLS)
    with pytest.raises(DatasetError, match="single-label"):
        apply_corrections(table(), corrections([("cat/a.png", "cat;dog")]), TAG2CLS)


def test_corrections_of_multilabel_rows_set_labels_and_the_first_label_as_tag():
    multi = table().assign(labels=["cat", "cat;dog", "dog", "dog", "fox"])
    out, _ = apply_corrections(multi, corrections([("cat/a.png", "dog;fox")]), TAG2CLS)
    row = out.set_index("path").loc["cat/a.png"]
    assert (row["labels"], row["tag"], row["class"]) == ("dog;fox", "dog", 1)


def test_autolabel_corrections_clean_rows_and_review_answers():
    human = pd.DataFrame(
        {"path": ["clean/cat/a.png", "clean/dog/b.png"], "tag": ["cat", "dog"], "class": [0, 1], "fold": [0, 1]}
    )
    raw = pd.DataFrame(
        {
            "path": ["raw/1.png", "raw/2.png", "raw/3.png", "raw/dup.png"],
            "sha1": ["1", "2", "3", "4"],
            "duplicate_of": ["", "", "", "clean/cat/a.png"],
            "tag": ["", "", "", "cat"],
        }
    )
    fixes = corrections(
        [("clean/cat/a.png", "fox"), ("raw/1.png", "dog"), ("raw/2.png", "drop"), ("raw/dup.png", "fox"), ("x.png", "cat")]
    )
    human_out, raw_out, report = apply_autolabel_corrections(human, raw, fixes, TAG2CLS)
    rows = human_out.set_index("path")
    assert rows.loc["clean/cat/a.png", "tag"] == "fox" and rows.loc["clean/dog/b.png", "source"] == "human"
    # a review answer trains from round 0 but never validates
    assert rows.loc["raw/1.png"].to_dict() == {"tag": "dog", "class": 1, "fold": -1, "source": HUMAN_CORRECTED}
    assert rows.loc["raw/dup.png", "tag"] == "fox"
    # answered raw rows stay in the pile (evaluation counts them) without a second label
    assert raw_out["path"].tolist() == ["raw/1.png", "raw/3.png", "raw/dup.png"]
    assert raw_out.set_index("path")["tag"].fillna("").to_dict() == {"raw/1.png": "", "raw/3.png": "", "raw/dup.png": ""}
    assert report.set_index("path")["action"].to_dict() == {
        "clean/cat/a.png": "relabelled", "raw/1.png": "relabelled", "raw/2.png": "dropped",
        "raw/dup.png": "relabelled", "x.png": "not found",
    }  # fmt: skip


# --------------------------------------------------------------------------- k-fold inputs


def _fold_files(tmp_path, name, paths, split, classes, embeddings):
    folder = tmp_path / name
    folder.mkdir()
    predictions = pd.DataFrame(
        {"path": paths, "split": split, "class": classes, "label": [str(c) for c in classes], "predicted": "0", "confidence": 0.5}
    )
    files = {
        "predictions_csv": folder / "predictions.csv",
        "embeddings_npy": folder / "embeddings.npy",
        "transform_npz": folder / "transform.npz",
        "index_bin": folder / "knn.hnsw.bin",
        "index_json": folder / "index.json",
    }
    predictions.to_csv(files["predictions_csv"], index=False)
    np.save(files["embeddings_npy"], embeddings.astype(np.float32))
    settings = IndexSettings(n_components=4, space="cosine", M=8, ef_construction=50, ef=50, ks=(1,), vote_k=1)
    pca_index(
        predictions_csv=files["predictions_csv"], embeddings_npy=files["embeddings_npy"], transform_npz=files["transform_npz"],
        index_bin=files["index_bin"], index_json=files["index_json"], settings=settings, seed=0,
    )
    return files


def test_neighbours_come_from_the_fold_index_of_training_images(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 10
    classes = np.repeat([0, 1, 2], 10)
    embeddings = centres[classes] + rng.normal(size=(30, 8))
    split = np.where(np.arange(30) % 5 == 0, "valid", "train")
    paths = [f"img_{i:02d}.png" for i in range(30)]
    files = _fold_files(tmp_path, "fold", paths, split, classes, embeddings)
    held_paths, labels = fold_neighbours(**files, k=3)
    assert held_paths.tolist() == [p for p, s in zip(paths, split) if s == "valid"]
    # each held-out image's 3 nearest training images share its cluster, and it is not its own neighbour
    np.testing.assert_array_equal(labels, np.repeat(classes[split == "valid"][:, None], 3, axis=1))
    # more neighbours than the index holds: padded with -1
    _, padded = fold_neighbours(**files, k=30)
    assert padded.shape == (6, 30) and (padded[:, 24:] == -1).all() and (padded[:, :24] >= 0).all()


def test_oof_neighbours_align_with_the_oof_table_across_folds(tmp_path):
    rng = np.random.default_rng(1)
    paths = [f"img_{i:02d}.png" for i in range(20)]
    classes = (np.arange(20) // 2) % 2  # both classes in each fold's training images
    embeddings = rng.normal(size=(20, 6)) + classes[:, None] * 5
    folds = [
        _fold_files(tmp_path, f"f{k}", paths, np.where(np.arange(20) % 2 == k, "valid", "train"), classes, embeddings)
        for k in range(2)
    ]
    order = list(reversed(paths))
    labels = oof_neighbours(order, folds, k=2)
    assert labels.shape == (20, 2)
    np.testing.assert_array_equal(labels[:, 0], classes[::-1])  # the nearest neighbour is of its cluster
    with pytest.raises(ValueError, match="held out by no fold"):
        oof_neighbours(order + ["stranger.png"], folds, k=2)


def test_kfold_summary_writes_probabilities_aligned_with_the_oof_table(tmp_path):
    folds = {}
    for k in range(2):
        paths = [f"b{k}.png", f"a{k}.png", f"c{k}.png"]
        split = ["train", "valid", "calibration"] if k == 0 else ["valid", "train", "valid"]
        predictions = pd.DataFrame({"path": paths, "split": split, "class": [0, 1, 1], "label": ["x", "y", "y"], "predicted": "x", "confidence": 0.6})
        probabilities = np.array([[0.1 + 0.1 * i + k * 0.01, 0.0] for i in range(3)], dtype=np.float32)
        probabilities[:, 1] = 1 - probabilities[:, 0]
        files = {name: tmp_path / f"{name}{k}.{ext}" for name, ext in (("metrics", "json"), ("summary", "json"), ("predictions", "csv"), ("probabilities", "npy"))}
        epoch = {"epoch": 1, "seconds": 1.0, "valid": {"accuracy": 0.5}}
        files["metrics"].write_text(json.dumps({"epochs": [epoch], "best": {"epoch": 1, "value": 0.5}}))
        files["summary"].write_text(json.dumps({"valid": {"accuracy": 0.5, "loss": 1.0}, "index": {"recall@1": 0.5}}))
        predictions.to_csv(files["predictions"], index=False)
        np.save(files["probabilities"], probabilities)
        folds[k] = files
    out = {name: tmp_path / name for name in ("t.csv", "s.json", "p.png", "oof.csv", "oof.npy")}
    kfold_summary(
        experiment="e", folds=folds, out_csv=out["t.csv"], out_json=out["s.json"], out_png=out["p.png"],
        out_oof=out["oof.csv"], out_oof_probabilities=out["oof.npy"],
    )
    oof = pd.read_csv(out["oof.csv"])
    assert oof["path"].tolist() == ["a0.png", "b1.png", "c0.png", "c1.png"]
    expected = {"a0.png": 0.2, "c0.png": 0.3, "b1.png": 0.11, "c1.png": 0.31}
    np.testing.assert_allclose(np.load(out["oof.npy"])[:, 0], [expected[p] for p in oof["path"]], rtol=1e-6)


# --------------------------------------------------------------------------- scoring and acting


def oof_problem(noise_rate=0.1, seed=0):
    problem = make_synthetic_problem(600, noise_rate=noise_rate, separation=1.7, seed=seed)
    classes = [str(c) for c in range(10)]
    oof = pd.DataFrame(
        {
            "path": [f"{i:04d}.png" for i in range(600)],
            "split": "valid",
            "class": problem.labels,
            "label": np.asarray(classes)[problem.labels],
            "predicted": "",
            "confidence": problem.probs.max(axis=1),
            "fold": np.arange(600) % 3,
        }
    )
    return problem, oof, classes


def test_score_oof_flags_the_injected_flips_and_says_which_signals_fired():
    problem, oof, classes = oof_problem()
    scores, issues, summary = score_oof(oof, problem.probs, classes, problem.neighbour_labels)
    assert len(scores) == 600 and scores["fold"].tolist() == oof["fold"].tolist()
    assert list(issues.columns) == ISSUE_COLUMNS
    assert issues["rank"].is_monotonic_increasing and (issues["label_quality"] < 0.5).all()
    assert (issues["signals"].str.len() > 0).all() and issues["signals"].str.contains("model_disagrees|neighbours").all()
    assert flag_metrics(scores["flagged"], problem.flipped)["f1"] > 0.85
    assert summary["n_flagged"] == len(issues) and 0.03 < summary["estimated_noise_rate"] < 0.2
    with pytest.raises(ValueError, match="do not match"):
        score_oof(oof, problem.probs[:, :9], classes, None)
    with pytest.raises(DatasetError, match="single-label"):
        score_oof(oof.assign(label="1;2"), problem.probs, classes, None)


def test_score_oof_refuses_one_image_with_several_labels():
    # `;` always joins labels: tag2label refuses it in a class folder name
    problem, oof, classes = oof_problem()
    oof.loc[5, "label"] = "1;2"
    with pytest.raises(DatasetError, match="single-label"):
        score_oof(oof, problem.probs, classes, None)


def test_signals_fired_joins_the_names():
    frame = pd.DataFrame(
        {"model_disagrees": [True, False], "neighbours_disagree": [True, False], "confident_joint": [False, False], "noise_rate_pruned": [True, False]}
    )
    assert signals_fired(frame).tolist() == ["model_disagrees;neighbours_disagree;noise_rate_pruned", ""]


def settings(action, threshold=0.25):
    return {"action": action, "relabel_threshold": threshold}


def test_cleaned_dataset_drops_or_relabels_flagged_images_but_never_a_human_correction():
    data = table().assign(source=["given", "given", "given", HUMAN_CORRECTED, "given"])
    scores = pd.DataFrame(
        {
            "path": ["cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png", "fox/e.png"],
            "flagged": [False, True, True, True, False],
            "suggested_label": ["cat", "dog", "fox", "cat", "fox"],
            "label_quality": [0.9, 0.1, 0.4, 0.05, 0.8],
        }
    )
    dropped = cleaned_dataset(data, scores, TAG2CLS, **settings("drop"))
    assert dropped["path"].tolist() == ["cat/a.png", "dog/d.png", "fox/e.png"]
    relabelled = cleaned_dataset(data, scores, TAG2CLS, **settings("relabel")).set_index("path")
    # b passes the threshold and is relabelled; c is flagged but unsure: it leaves; d is a human's
    assert relabelled.index.tolist() == ["cat/a.png", "cat/b.png", "dog/d.png", "fox/e.png"]
    assert relabelled.loc["cat/b.png", ["tag", "class", "fold", "source"]].tolist() == ["dog", 1, 1, RELABELLED]
    assert relabelled.loc["dog/d.png", "tag"] == "dog"
    assert cleaned_dataset(data, scores, TAG2CLS, **settings("relabel", 0.45)).set_index("path").loc["dog/c.png", "tag"] == "fox"
    assert data["tag"].tolist() == ["cat", "cat", "dog", "dog", "fox"]  # the input is not edited
    # a labels-CSV dataset (one label per row) keeps `labels` in step with `tag`
    with_labels = cleaned_dataset(data.assign(labels=data["tag"]), scores, TAG2CLS, **settings("relabel"))
    assert with_labels["labels"].tolist() == with_labels["tag"].tolist() == ["cat", "dog", "dog", "fox"]
    with pytest.raises(DatasetError, match="report"):
        cleaned_dataset(data, scores, TAG2CLS, **settings("report"))
    with pytest.raises(DatasetError, match="action"):
        cleaned_dataset(data, scores, TAG2CLS, **settings("fix"))
    with pytest.raises(DatasetError, match="action"):
        LabelIssueSettings(experiment=None, neighbours=10, action="fix", relabel_threshold=0.25, max_sheet_rows=10)
