"""End to end: targets embed_all, query_all, projector and ood through the real snakemake on
3 classes x 12 images (16 px, one epoch per stage), with class_02 held out for the OOD evaluation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny_dataset
from workflow_helpers import REPO, TINY_EXPERIMENT, run_snakemake, write_tiny_config

pytestmark = pytest.mark.e2e

# one epoch per stage: the test checks the wiring, not the accuracy
ONE_EPOCH = {
    **TINY_EXPERIMENT,
    "stages": {name: {**stage, "epochs": 1} for name, stage in TINY_EXPERIMENT["stages"].items()},
}
TARGETS = ("embed_all", "query_all", "projector", "ood")


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("embed_e2e")
    dataset = make_tiny_dataset(base / "images")
    # a folder set: loose images (no labels) and a class folder (labels), plus a stray text file
    loose = base / "new"
    (loose / "class_01").mkdir(parents=True)
    shutil.copy(dataset / "class_00/img_000.png", loose / "a.png")
    shutil.copy(dataset / "class_01/img_001.png", loose / "class_01/b.png")
    (loose / "notes.txt").write_text("not an image")
    workdir = base / "work"
    config = write_tiny_config(
        workdir,
        dataset,
        experiments={"softmax": ONE_EPOCH},
        embed={"sets": {"new": str(loose)}, "batch_size": 4},
        projector={"max_images": 20, "thumbnail_size": 8},
        query={"k": 5, "rejection_quantile": 0.95},
        ood={"classes": ["class_02"], "experiment": "softmax"},
    )
    # a flag before the targets keeps them apart from --configfile (which takes several values)
    result = run_snakemake(workdir, "--printshellcmds", *TARGETS, configfile=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return workdir, result


def test_embeddings_of_configured_sets(embed_run):
    workdir, _ = embed_run
    out = workdir / "results/softmax/embeddings"
    new = pd.read_csv(out / "new/index.csv", keep_default_na=False)
    assert new.values.tolist() == [["a.png", ""], ["class_01/b.png", "class_01"]]
    assert np.load(out / "new/embeddings.npy").shape == (2, 16)
    log = (workdir / "results/logs/softmax/embed_new.log").read_text()
    assert "embedding 2 images" in log and "device: cpu" in log


def test_rejection_and_queries(embed_run):
    workdir, _ = embed_run
    card = json.loads((workdir / "results/softmax/index/rejection.json").read_text())
    assert card["quantile"] == 0.95 and card["threshold"] >= 0 and card["k"] == 5
    assert card["classes"] == ["class_00", "class_01", "class_02"]
    assert card["model"]["checkpoint"] == "../stage2/best.pt" and card["model"]["image_size"] == 16
    assert card["calibration"]["n_valid"] == 12
    answers = pd.read_csv(workdir / "results/softmax/queries/new.csv", keep_default_na=False)
    assert answers["path"].tolist() == ["a.png", "class_01/b.png"] and answers["label"].tolist() == ["", "class_01"]
    assert set(answers["predicted"]) <= set(card["classes"]) | {"unknown"}
    assert all(len(n.split(";")) == 5 for n in answers["neighbours"])
    distances = answers["nearest_distance"].to_numpy()
    assert ((distances > card["threshold"] + 1e-6) == answers["rejected"].astype(str).eq("True")).all()


def test_projector_and_plot(embed_run):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    workdir, _ = embed_run
    folder = workdir / "results/softmax/projector"
    config = text_format.Parse((folder / "projector_config.pbtxt").read_text(), ProjectorConfig())
    (embedding,) = config.embeddings
    tensors = np.loadtxt(folder / embedding.tensor_path, delimiter="\t")
    assert tensors.shape == (20, 16)
    metadata = pd.read_csv(folder / embedding.metadata_path, sep="\t")
    assert list(metadata.columns) == ["path", "split", "label", "predicted", "correct"] and len(metadata) == 20
    assert (folder / embedding.sprite.image_path).read_bytes()[:4] == b"\x89PNG"
    assert (workdir / "results/softmax/embeddings_2d.png").read_bytes()[:4] == b"\x89PNG"


def test_ood_evaluation(embed_run):
    workdir, _ = embed_run
    ood = json.loads((workdir / "results/softmax/ood.json").read_text())
    assert ood["held_out"] == ["class_02"] and ood["known_classes"] == ["class_00", "class_01"]
    # valid fold (1 of 3) of the 24 known images; every image of the held-out class
    assert ood["n_known"] == 8 and ood["n_unknown"] == 12
    for key in ("auroc", "unknown_rejected", "known_rejected", "known_knn_accuracy"):
        assert 0.0 <= ood[key] <= 1.0, key
    assert ood["threshold"] == json.loads((workdir / "results/ood/softmax/index/rejection.json").read_text())["threshold"]
    # trained and indexed without the held-out class: 2 outputs, 16 train images in the index
    assert torch.load(workdir / "results/ood/softmax/stage2/best.pt", weights_only=True)["spec"]["heads"][0]["num_outputs"] == 2
    assert json.loads((workdir / "results/ood/softmax/index/index.json").read_text())["n_items"] == 16
    assert json.loads((workdir / "results/ood/data/tag2cls.json").read_text()) == {"class_00": 0, "class_01": 1}
    # the main run still has all three classes
    assert torch.load(workdir / "results/softmax/stage2/best.pt", weights_only=True)["spec"]["heads"][0]["num_outputs"] == 3


def test_targets_rerun_nothing(embed_run):
    workdir, _ = embed_run
    result = run_snakemake(workdir, "-n", *TARGETS, configfile=workdir / "config.yaml")
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "Nothing to be done" in out, out[-3000:]


def test_targets_dry_run_on_default_config(tmp_path):
    sets = f"embed={{sets: {{x: {REPO / 'config'}}}}}"
    result = run_snakemake(tmp_path, "-n", "projector", "ood", "query_all", "--config", sets)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for rule in ("tensorboard_projector", "embedding_plot", "ood_dataset", "train_stage", "infer", "pca_index",
                 "ood_evaluate", "embed", "rejection", "query_set"):  # fmt: skip
        assert f"rule {rule}:" in out or f"{rule} " in out, rule
    # the OOD check is the run ood/softmax, served by the same rules as every run
    for path in ("results/ood/softmax/stage2/best.pt", "results/ood/softmax/index/rejection.json",
                 "results/ood/softmax/embeddings/heldout/embeddings.npy"):  # fmt: skip
        assert path in out, path
    empty = run_snakemake(tmp_path, "-n", "embed_all")
    assert empty.returncode != 0 and "embed.sets" in empty.stdout + empty.stderr
