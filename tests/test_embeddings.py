"""Embeddings of image sets, projector files, rejection threshold, OOD metrics, CLI and benchmark.

The "experiment" here is built with the package functions directly (an untrained tiny model,
pipeline.infer and pipeline.pca_index), so these tests take seconds; tests/test_embed_workflow.py
runs the same steps through snakemake.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny_dataset, write_badly_named_image
from labelflow import embeddings as emb
from labelflow import search as sim
from labelflow.cli import main
from labelflow.dataset import split, tag2label
from labelflow.index import IndexSettings, pca_index
from labelflow.io import DatasetError, save_npy_atomic, write_csv_atomic, write_json_atomic
from labelflow.models import HeadSpec, ModelSpec, create_model, save_checkpoint
from labelflow.experiment import infer

REPO = Path(__file__).resolve().parents[1]
DATA_CFG = {
    "image_size": 16,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "augmentations": [],
    "cache": True,
    "num_workers": 0,
}
EXPERIMENT = {"data": DATA_CFG}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """results/<exp>-like folder: stage2/best.pt, predictions/, index/ with rejection.json."""
    base = tmp_path_factory.mktemp("embeddings")
    images = make_tiny_dataset(base / "images")
    found = tag2label(images)
    dataset = split(found.dataset, found.tag2cls, n_folds=3, seed=0)
    write_csv_atomic(dataset, base / "dataset.csv")
    write_json_atomic(found.tag2cls, base / "tag2cls.json")

    exp = base / "exp"
    torch.manual_seed(0)
    spec = ModelSpec("resnet18", [HeadSpec("class", 3)], embedding_size=16, small_input=True)
    checkpoint = exp / "stage2" / "best.pt"
    save_checkpoint(checkpoint, create_model(spec))
    infer(
        checkpoint=checkpoint, dataset_csv=base / "dataset.csv", tag2cls_json=base / "tag2cls.json",
        root=images, experiment=EXPERIMENT, valid_folds=[2], seed=0, out_dir=exp / "predictions",
    )
    _index_with_rejection(exp, base / "tag2cls.json", checkpoint, k=4)
    return {"base": base, "images": images, "exp": exp, "checkpoint": checkpoint, "tag2cls": base / "tag2cls.json"}


def _index_with_rejection(folder: Path, tag2cls_json: Path, checkpoint: Path, k: int) -> None:
    """index/ (PCA + hnswlib) and index/rejection.json from folder/predictions/."""
    files = _index_files(folder)
    predictions = {
        "predictions_csv": folder / "predictions/predictions.csv",
        "embeddings_npy": folder / "predictions/embeddings.npy",
    }
    settings = IndexSettings(n_components=8, space="cosine", M=16, ef_construction=100, ef=32, ks=(1,), vote_k=3)
    pca_index(**predictions, settings=settings, seed=0, **files)
    index_files = {
        "transform": files["transform_npz"], "index": files["index_bin"], "info": files["index_json"],
        "predictions": predictions["predictions_csv"],
    }
    sim.calibrate_rejection(
        index_files=index_files, embeddings_npy=predictions["embeddings_npy"], tag2cls_json=tag2cls_json,
        checkpoint=checkpoint, data_cfg=DATA_CFG, out_json=folder / "index/rejection.json",
        settings=sim.RejectionSettings(quantile=0.99, k=k, vote_k=3),
    )


def _index_files(folder: Path) -> dict[str, Path]:
    return {
        "transform_npz": folder / "index/transform.npz",
        "index_bin": folder / "index/knn.hnsw.bin",
        "index_json": folder / "index/index.json",
    }


# --------------------------------------------------------------------------- embedding


def test_same_images_embedded_twice_give_identical_vectors(experiment, tmp_path):
    runs = []
    for name in ("first", "second"):
        emb.embed_images(
            checkpoint=experiment["checkpoint"], source=experiment["images"], out_dir=tmp_path / name,
            data_cfg=DATA_CFG, tag2cls_json=experiment["tag2cls"], batch_size=5,
        )
        runs.append((np.load(tmp_path / name / "embeddings.npy"), pd.read_csv(tmp_path / name / "index.csv")))
    (first, table), (second, _) = runs
    assert first.shape == (36, 16) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    # class sub-folders named like the model's classes give the labels
    assert table["label"].tolist() == [p.split("/")[0] for p in table["path"]]
    # the same vectors as rule infer's (same deterministic eval transform), batch size aside
    predictions = pd.read_csv(experiment["exp"] / "predictions/predictions.csv")
    by_path = dict(zip(predictions["path"], np.load(experiment["exp"] / "predictions/embeddings.npy")))
    np.testing.assert_allclose(first, np.stack([by_path[p] for p in table["path"]]), atol=1e-4)


def test_csv_set_keeps_labels_and_skips_unreadable(experiment, tmp_path):
    images = experiment["images"]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy/img_003.png").write_bytes((images / "class_01/img_003.png").read_bytes())
    csv = tmp_path / "set.csv"
    pd.DataFrame(
        {
            # absolute, or relative to the CSV's folder
            "path": [str(images / "class_00/img_000.png"), "broken.png", "missing.png", "copy/img_003.png"],
            "label": ["class_00", "", "x", ""],
        }
    ).to_csv(csv, index=False)
    table = emb.embed_images(
        checkpoint=experiment["checkpoint"], source=csv, out_dir=tmp_path / "out", data_cfg=DATA_CFG
    )
    assert table["label"].tolist() == ["class_00", ""]
    assert np.load(tmp_path / "out/embeddings.npy").shape == (2, 16)
    with pytest.raises(DatasetError, match="does not exist"):
        emb.read_image_set(tmp_path / "nowhere")


def test_folder_set_skips_names_that_are_not_utf8(tmp_path):
    folder = make_tiny_dataset(tmp_path / "set", n_classes=2, per_class=2)
    shown = write_badly_named_image(folder / "class_00")
    (folder / "class_01" / ".DS_Store").write_bytes(b"hidden: left out silently")
    images = emb.read_image_set(folder, classes=["class_00", "class_01"])
    assert images.table.values.tolist() == [
        ["class_00/img_000.png", "class_00"], ["class_00/img_001.png", "class_00"],
        ["class_01/img_000.png", "class_01"], ["class_01/img_001.png", "class_01"],
    ]  # fmt: skip
    assert shown == "\\xff\\xfe.png"
    assert images.skipped.values.tolist() == [["class_00/\\xff\\xfe.png", "file name is not valid UTF-8"]]
    write_csv_atomic(images.skipped, tmp_path / "skipped.csv")  # writable as UTF-8
    with pytest.raises(DatasetError, match="cannot read .*" + re.escape(f"class_00/{shown}: file name is not valid UTF-8")):
        emb.image_arguments([folder])


# --------------------------------------------------------------------------- projector + plot


class _NoRuns:
    """The data provider the projector plugin asks for runs; the logdir itself is run '.'."""

    def list_runs(self, ctx, experiment_id):
        return []


def test_projector_files_load_with_tensorboard(experiment, tmp_path):
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
    from werkzeug.test import Client

    out = tmp_path / "projector"
    info = emb.write_projector(
        predictions_csv=experiment["exp"] / "predictions/predictions.csv",
        embeddings_npy=experiment["exp"] / "predictions/embeddings.npy",
        root=experiment["images"], out_dir=out, max_images=20, thumbnail_size=8, seed=0,
    )
    assert info["n_images"] == 20 and info["n_total"] == 36
    assert (out / "projector_config.pbtxt").is_file() and list(out.glob("events.out.tfevents.*"))
    assert not list(tmp_path.glob(".projector*"))  # the temporary folder was renamed into place

    plugin = ProjectorPlugin(base_plugin.TBContext(logdir=str(out), data_provider=_NoRuns()))
    plugin._update_configs()
    (embedding,) = plugin._configs["."].embeddings
    assert list(embedding.tensor_shape) == [20, 16]
    assert list(embedding.sprite.single_image_dim) == [8, 8]
    apps = plugin.get_plugin_apps()
    query = {"run": ".", "name": embedding.tensor_name}

    tensor = Client(apps["/tensor"]).get("/tensor", query_string=query)
    assert tensor.status_code == 200
    vectors = np.frombuffer(tensor.data, dtype=np.float32).reshape(20, 16)
    rows = emb.subsample(36, 20, 0)
    np.testing.assert_allclose(vectors, np.load(experiment["exp"] / "predictions/embeddings.npy")[rows], rtol=1e-5)

    metadata = Client(apps["/metadata"]).get("/metadata", query_string=query)
    lines = metadata.data.decode().splitlines()
    assert lines[0].split("\t") == ["path", "split", "label", "predicted", "correct"]
    assert len(lines) == 21
    predictions = pd.read_csv(experiment["exp"] / "predictions/predictions.csv")
    first = predictions.iloc[rows[0]]
    path, split_, label, predicted, correct = lines[1].split("\t")
    assert (path, split_, label) == (first["path"], first["split"], f"class_{first['class']:02d}")
    assert predicted == first["predicted"] and correct == str(first["label"] == first["predicted"])

    sprite = Client(apps["/sprite_image"]).get("/sprite_image", query_string=query)
    assert sprite.status_code == 200 and sprite.data[:8] == b"\x89PNG\r\n\x1a\n"


def test_embedding_plot_is_a_png(experiment, tmp_path):
    out = emb.plot_embeddings_2d(
        predictions_csv=experiment["exp"] / "predictions/predictions.csv",
        embeddings_npy=experiment["exp"] / "predictions/embeddings.npy",
        tag2cls_json=experiment["tag2cls"], out_png=tmp_path / "plot.png",
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- rejection + query


def _synthetic_run(folder: Path, n_classes: int = 3, per_class: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    """Tight blobs as 'model embeddings': predictions.csv, embeddings.npy, index, rejection.json."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes + 1, 32)) * 3
    labels = np.repeat(np.arange(n_classes), per_class)
    x = (centres[labels] + 0.1 * rng.normal(size=(labels.size, 32))).astype(np.float32)
    # the extra blob is a class the index never saw
    unknown = (centres[n_classes] + 0.1 * rng.normal(size=(per_class, 32))).astype(np.float32)
    split_ = np.where(np.arange(labels.size) % 3 == 0, "valid", "train")
    predictions = pd.DataFrame(
        {"path": [f"c{c}/{i}.png" for i, c in enumerate(labels)], "split": split_, "class": labels,
         "label": [f"c{c}" for c in labels], "predicted": [f"c{c}" for c in labels], "confidence": 1.0}
    )
    (folder / "predictions").mkdir(parents=True, exist_ok=True)
    write_csv_atomic(predictions, folder / "predictions/predictions.csv")
    save_npy_atomic(folder / "predictions/embeddings.npy", x)
    write_json_atomic({f"c{c}": c for c in range(n_classes)}, folder / "tag2cls.json")
    _index_with_rejection(folder, folder / "tag2cls.json", folder / "stage2/best.pt", k=5)
    save_npy_atomic(folder / "unknown.npy", unknown)
    return {"train": x[split_ == "train"], "labels": labels[split_ == "train"], "unknown": unknown}


def test_rejection_threshold_rejects_far_query_and_accepts_training_image(tmp_path):
    data = _synthetic_run(tmp_path)
    card = json.loads((tmp_path / "index/rejection.json").read_text())
    assert card["calibration"]["n_valid"] == 30 and card["calibration"]["n_correct"] == 30
    assert 0 < card["threshold"] < 0.5 and card["model"]["checkpoint"] == "../stage2/best.pt"
    search = sim.SimilaritySearch.load(tmp_path / "index/rejection.json")

    train = search.search(data["train"][:5])
    assert not train.rejected.any() and np.all(train.nearest < 1e-4)
    assert search.predicted_names(train) == [f"c{c}" for c in data["labels"][:5]]

    # far away: a raw embedding that the transform maps onto the weakest principal axis,
    # a direction no indexed vector points to
    t = search.transform
    far = t.scaler_mean + t.scaler_scale * (t.pca_mean + 100.0 * t.components[-1])
    result = search.search(far[None].astype(np.float32))
    assert result.rejected.tolist() == [True] and result.nearest[0] > card["threshold"]
    assert search.predicted_names(result) == [sim.UNKNOWN]
    (record,) = search.as_records(result, ["far.png"])
    assert record["predicted"] == "unknown" and record["rejected"] and len(record["neighbours"]) == 5


def test_query_set_table(tmp_path):
    data = _synthetic_run(tmp_path)
    queries = np.concatenate([data["train"][:3], data["unknown"][:3]])
    (tmp_path / "set").mkdir()
    save_npy_atomic(tmp_path / "set/embeddings.npy", queries)
    pd.DataFrame({"path": [f"q{i}.png" for i in range(6)], "label": ["c0", "c0", "c0", "", "", ""]}).to_csv(
        tmp_path / "set/index.csv", index=False
    )
    answers = sim.query_set(
        rejection_json=tmp_path / "index/rejection.json", embeddings_npy=tmp_path / "set/embeddings.npy",
        index_csv=tmp_path / "set/index.csv", out_csv=tmp_path / "answers.csv",
    )
    assert answers["predicted"].tolist() == ["c0"] * 3 + ["unknown"] * 3
    written = pd.read_csv(tmp_path / "answers.csv", keep_default_na=False)
    assert list(written.columns[:6]) == ["path", "label", "predicted", "vote", "rejected", "nearest_distance"]
    assert all(len(n.split(";")) == 5 for n in written["neighbours"])


def test_cli_query_and_embed(experiment, tmp_path, capsys):
    predictions = pd.read_csv(experiment["exp"] / "predictions/predictions.csv")
    train_path = predictions.loc[predictions["split"] == "train", "path"].iloc[5]
    image = experiment["images"] / train_path
    out = tmp_path / "answers.json"
    assert main(["query", "--experiment-dir", str(experiment["exp"]), "-k", "3", "--out", str(out), str(image)]) == 0
    printed = capsys.readouterr().out
    assert train_path in printed and "threshold" in printed
    (answer,) = json.loads(out.read_text())
    # a training image: its own entry is the nearest neighbour, so it is never rejected
    assert not answer["rejected"] and answer["predicted"] != "unknown"
    assert answer["neighbours"][0]["path"] == train_path and answer["neighbours"][0]["distance"] < 1e-4
    assert len(answer["neighbours"]) == 3

    assert main(["embed", "--experiment-dir", str(experiment["exp"]), "--out-dir", str(tmp_path / "e"),
                 str(experiment["images"] / "class_02")]) == 0  # fmt: skip
    assert np.load(tmp_path / "e/embeddings.npy").shape == (12, 16)

    assert main(["query", "--experiment-dir", str(tmp_path / "none"), str(image)]) == 2
    assert "rejection.json does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- out-of-class


def test_holdout_classes(experiment, tmp_path):
    base = experiment["base"]
    outputs = {
        "out_dataset_csv": tmp_path / "dataset.csv",
        "out_tag2cls_json": tmp_path / "tag2cls.json",
        "out_heldout_csv": tmp_path / "heldout.csv",
    }
    sim.holdout_classes(dataset_csv=base / "dataset.csv", tag2cls_json=base / "tag2cls.json", held_out=["class_01"], **outputs)
    known = pd.read_csv(tmp_path / "dataset.csv")
    full = pd.read_csv(base / "dataset.csv").set_index("path")
    assert len(known) == 24 and "class_01" not in set(known["tag"])
    assert json.loads((tmp_path / "tag2cls.json").read_text()) == {"class_00": 0, "class_02": 1}
    assert known.set_index("path")["fold"].equals(full.loc[known["path"], "fold"])  # same folds
    assert known.loc[known["tag"] == "class_02", "class"].eq(1).all()
    heldout = pd.read_csv(tmp_path / "heldout.csv")
    assert len(heldout) == 12 and set(heldout["label"]) == {"class_01"}
    with pytest.raises(DatasetError, match="ood.classes"):
        sim.holdout_classes(dataset_csv=base / "dataset.csv", tag2cls_json=base / "tag2cls.json", held_out=["7"], **outputs)


def test_evaluate_ood_metrics(tmp_path):
    data = _synthetic_run(tmp_path)
    pd.DataFrame({"path": [f"u{i}.png" for i in range(30)], "label": "c3"}).to_csv(tmp_path / "heldout.csv", index=False)
    result = sim.evaluate_ood(
        rejection_json=tmp_path / "index/rejection.json",
        predictions_csv=tmp_path / "predictions/predictions.csv",
        embeddings_npy=tmp_path / "predictions/embeddings.npy",
        heldout_embeddings_npy=tmp_path / "unknown.npy", heldout_index_csv=tmp_path / "heldout.csv",
        out_json=tmp_path / "ood.json", experiment="synthetic",
    )
    assert json.loads((tmp_path / "ood.json").read_text()) == json.loads(json.dumps(result))
    assert result["n_known"] == 30 and result["n_unknown"] == len(data["unknown"])
    assert result["auroc"] == 1.0 and result["unknown_rejected"] == 1.0
    assert result["known_rejected"] <= 0.05 and result["held_out"] == ["c3"]


# --------------------------------------------------------------------------- benchmark


def test_index_benchmark_smoke():
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/index_scale.py"), "--sizes", "300", "600", "--queries", "20",
         "--ef-construction", "40", "--rounds", "3", "--min-seconds", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    recalls = [float(v) for v in re.findall(r"recall@10=([0-9.]+)", run.stdout)]
    assert len(recalls) == 2 and all(0.0 <= r <= 1.0 for r in recalls)
    assert "speed-up" in run.stdout and "| 600 |" in run.stdout
