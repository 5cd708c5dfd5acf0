"""Using a trained run: predict new images, evaluate on a labelled folder, export for serving.

The run is built with the package functions directly (an untrained tiny model, infer,
pca_index, the rejection card, and a calibration.json written here as rule calibrate would),
so these tests take seconds; tests/test_use_workflow.py runs the targets through snakemake.
"""

from __future__ import annotations

import ast
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny_dataset
from labelflow import search as sim
from labelflow.cli import main
from labelflow.dataset import split, tag2label
from labelflow.evaluate import evaluate_images, evaluation_metrics, labelled_images
from labelflow.experiment import infer
from labelflow.index import IndexSettings, pca_index
from labelflow.io import DatasetError, read_json, write_csv_atomic, write_json_atomic
from labelflow.models import HeadSpec, ModelSpec, create_model, save_checkpoint
from labelflow.predict import BatchPredictions, Predictor, collect_inputs, head_answers, predict_to_csv
from labelflow.progress import Progress
from labelflow.trained import ModelFiles, load_trained

DATA_CFG = {"image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "augmentations": [], "cache": True, "num_workers": 0}
TEMPERATURE = 1.7


def build_run(base: Path, images: Path, loss: str = "cross_entropy") -> Path:
    """results/<run>-like folder: stage2/best.pt, predictions/, index/ (+ rejection.json),
    calibration.json and summary.json."""
    found = tag2label(images)
    write_csv_atomic(split(found.dataset, found.tag2cls, n_folds=3, seed=0), base / "dataset.csv")
    write_json_atomic(found.tag2cls, base / "tag2cls.json")
    run = base / "run"
    torch.manual_seed(0)
    spec = ModelSpec("resnet18", [HeadSpec("class", 3, loss=loss)], embedding_size=16, small_input=True)
    checkpoint = run / "stage2" / "best.pt"
    save_checkpoint(checkpoint, create_model(spec))
    infer(
        checkpoint=checkpoint, dataset_csv=base / "dataset.csv", tag2cls_json=base / "tag2cls.json", root=images,
        experiment={"data": DATA_CFG}, valid_folds=[2], seed=0, out_dir=run / "predictions",
    )
    index = {"transform_npz": run / "index/transform.npz", "index_bin": run / "index/knn.hnsw.bin", "index_json": run / "index/index.json"}
    predictions = {"predictions_csv": run / "predictions/predictions.csv", "embeddings_npy": run / "predictions/embeddings.npy"}
    settings = IndexSettings(n_components=8, space="cosine", M=16, ef_construction=100, ef=32, ks=(1,), vote_k=3)
    pca_index(**predictions, settings=settings, seed=0, **index)
    sim.calibrate_rejection(
        index_files={"transform": index["transform_npz"], "index": index["index_bin"], "info": index["index_json"],
                     "predictions": predictions["predictions_csv"]},  # fmt: skip
        embeddings_npy=predictions["embeddings_npy"], tag2cls_json=base / "tag2cls.json", checkpoint=checkpoint,
        data_cfg=DATA_CFG, out_json=run / "index/rejection.json", settings=sim.RejectionSettings(0.99, 4, 3),
    )
    activation = "softmax" if loss == "cross_entropy" else "sigmoid"
    write_json_atomic({"temperature": TEMPERATURE, "activation": activation}, run / "calibration.json")
    write_json_atomic({"experiment": "run", "multilabel": False, "valid": {"accuracy": 0.5}}, run / "summary.json")
    return run


@pytest.fixture(scope="module")
def made(tmp_path_factory, single_torch_thread):
    base = tmp_path_factory.mktemp("use")
    images = make_tiny_dataset(base / "images")
    run = build_run(base, images)
    # new images: a copy of a known one, a nested one, a corrupt PNG and a text file
    new = base / "new"
    (new / "deeper").mkdir(parents=True)
    shutil.copy(images / "class_00/img_000.png", new / "a.png")
    shutil.copy(images / "class_02/img_001.png", new / "deeper/b.png")
    (new / "broken.png").write_bytes((images / "class_01/img_002.png").read_bytes()[:90])
    (new / "notes.txt").write_text("not an image")
    return {"base": base, "images": images, "run": run, "new": new}


@pytest.fixture(scope="module")
def trained(made):
    return load_trained(ModelFiles.in_run_dir(made["run"]))


# --------------------------------------------------------------------------- predict


def test_collect_inputs_walks_folders_and_reads_csvs(made, tmp_path):
    (tmp_path / "list.csv").write_text(f"path\nrel.png\n{made['new'] / 'a.png'}\n")
    table = collect_inputs([made["new"], tmp_path / "list.csv", "missing.png"])
    new = made["new"].as_posix()
    assert table["path"].tolist() == [
        f"{new}/a.png", f"{new}/broken.png", f"{new}/deeper/b.png", f"{new}/notes.txt",  # sorted, non-images too
        f"{tmp_path.as_posix()}/rel.png", f"{new}/a.png", "missing.png",
    ]


def test_predict_rows_calibrated_topk_and_errors(made, trained, tmp_path):
    table = collect_inputs([made["new"], tmp_path / "gone.png"])
    counts = predict_to_csv(trained, table, tmp_path / "out.csv", top_k=2, batch_size=2)
    out = pd.read_csv(tmp_path / "out.csv")
    out["error"] = out["error"].fillna("")
    assert list(out.columns) == ["path", "predicted", "confidence", "rejected", "nearest_distance",
                                 "top1", "top1_probability", "top2", "top2_probability", "error"]  # fmt: skip
    assert out["path"].tolist() == table["path"].tolist()  # input order, error rows in place
    errors = dict(zip(out["path"], out["error"]))
    assert errors[f"{made['new'].as_posix()}/notes.txt"].startswith("not an image file")
    assert errors[f"{made['new'].as_posix()}/broken.png"].startswith("corrupt or truncated")
    assert errors[f"{tmp_path.as_posix()}/gone.png"].startswith("unreadable")
    assert counts["images"] == 5 and counts["unreadable"] == 3 and sum(counts["predicted"].values()) + counts["unknown"] == 2
    # the calibrated softmax of the same logits rule infer wrote for the same image
    predictions = pd.read_csv(made["run"] / "predictions/predictions.csv")
    logits = np.load(made["run"] / "predictions/logits.npy")[predictions["path"].tolist().index("class_00/img_000.png")]
    expected = torch.softmax(torch.from_numpy(logits).double() / TEMPERATURE, 0).numpy()
    row = out.iloc[0]
    assert row["top1"] == trained.classes[int(expected.argmax())] and row["error"] == ""
    assert row["confidence"] == pytest.approx(expected.max(), abs=1e-5) == row["top1_probability"]
    assert row["top2_probability"] == pytest.approx(np.sort(expected)[-2], abs=1e-5)
    # a train image is its own nearest neighbour: distance 0, never rejected
    assert row["nearest_distance"] == pytest.approx(0, abs=1e-5) and row["rejected"] == False  # noqa: E712
    assert row["predicted"] == row["top1"]


def test_rejection_threshold_makes_unknown(made, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made["run"], run)
    card = read_json(run / "index/rejection.json")
    write_json_atomic({**card, "threshold": -1.0}, run / "index/rejection.json")
    strict = load_trained(ModelFiles.in_run_dir(run))
    predict_to_csv(strict, collect_inputs([made["images"] / "class_01"]), tmp_path / "out.csv")
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert (out["predicted"] == "unknown").all() and out["rejected"].all()
    assert out["top1"].isin(trained.classes).all()  # the head's answer stays visible


def test_predictor_streams_batch_by_batch(made, trained):
    predictor = Predictor(trained, torch.device("cpu"), batch_size=4)
    paths = collect_inputs([made["images"]])["path"].tolist()
    assert predictor.loader(paths).dataset.images.images is None  # decoded per batch, never cached
    batches = predictor.batches(paths)
    first = next(batches)
    assert first.rows.tolist() == [0, 1, 2, 3] and first.probabilities.shape == (4, 3)
    assert sum(len(b.rows) for b in batches) == len(paths) - 4


def test_predictor_searches_with_one_blas_thread(made, trained, monkeypatch):
    """numpy's BLAS threads spin after a call and slow the next forward pass: the per-batch
    search runs with one, and the caller's limit is back afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    if not blas_threads():
        pytest.skip("numpy has no BLAS that threadpoolctl can see")
    with threadpool_limits(limits=2, user_api="blas"):
        if blas_threads() != [2] * len(blas_threads()):
            pytest.skip("numpy's BLAS cannot run 2 threads on this machine (one core)")
    seen: list[list[int]] = []
    search = trained.search.search
    monkeypatch.setattr(trained.search, "search", lambda *a, **k: (seen.append(blas_threads()), search(*a, **k))[1])
    paths = collect_inputs([made["images"]])["path"].tolist()
    with threadpool_limits(limits=2, user_api="blas"):
        batches = list(Predictor(trained, torch.device("cpu"), batch_size=4).batches(paths))
        assert blas_threads() == [2] * len(blas_threads())
    assert len(seen) == len(batches) > 1 and all(threads == [1] * len(threads) for threads in seen)


def test_multilabel_answer_uses_the_decision_threshold(trained):
    batch = BatchPredictions(
        rows=np.arange(2), logits=np.array([[2.0, 0.5, -3.0], [-2.0, -1.0, -4.0]], dtype=np.float32),
        probabilities=np.zeros((2, 3)), nearest_distance=np.zeros(2), rejected=np.zeros(2, dtype=bool), errors=[],
    )
    multilabel = load_trained(trained.files)
    multilabel.multilabel = True
    multilabel.network.spec.heads[0].decision_threshold = 0.6  # sigmoid(0.5) = 0.62, sigmoid(-1) = 0.27
    assert head_answers(multilabel, batch).tolist() == ["class_00;class_01", ""]
    multilabel.network.spec.heads[0].decision_threshold = 0.7
    assert head_answers(multilabel, batch).tolist() == ["class_00", ""]


def test_missing_calibration_names_the_target(made, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(made["run"], run)
    (run / "calibration.json").unlink()
    code = main(["predict", "--experiment-dir", str(run), str(made["new"]), "--out", str(tmp_path / "o.csv")])
    assert code == 2 and f"snakemake {run.as_posix()}/calibration.json" in capsys.readouterr().err


def test_cli_predict_prints_counts(made, tmp_path, capsys):
    code = main(["predict", "--experiment-dir", str(made["run"]), str(made["new"]), "--out", str(tmp_path / "p.csv")])
    out = capsys.readouterr()
    assert code == 0 and "4 files:" in out.out and "unreadable 2" in out.out
    assert "4/4 images (100%)" in out.err  # the final progress line (stderr is not a terminal here)


def test_progress_redraws_on_a_terminal_and_logs_lines_elsewhere():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        progress = Progress(10, stream=stream, every_s=0.0)
        progress.update(4)
        progress.update(6)
        progress.close()
    assert terminal.getvalue().count("\r") == 3 and terminal.getvalue().endswith("\n")
    assert log.getvalue().splitlines()[0].startswith("4/10 images (40%)") and "\r" not in log.getvalue()


# --------------------------------------------------------------------------- evaluate


def test_evaluation_metrics_macro_f1_over_present_classes():
    truth, predicted = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2])
    found = {"confidence": np.array([0.9, 0.8, 0.7, 0.6]), "raw_confidence": np.full(4, 0.5),
             "rejected": np.array([False, False, False, True])}  # fmt: skip
    m = evaluation_metrics(truth, predicted, found, ["a", "b", "c"], loss=0.3)
    assert m["accuracy"] == 0.5 and m["classes_present"] == ["a", "b"] and set(m["per_class"]) == {"a", "b"}
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # class c (never true) does not count
    assert m["rejected_fraction"] == 0.25 and m["accuracy_accepted"] == pytest.approx(2 / 3)
    # ECE: confidences 0.9, 0.8 (bins 14, 12: right / wrong), 0.7 (right), 0.6 (wrong), one per bin
    assert m["ece"] == pytest.approx((0.1 + 0.8 + 0.3 + 0.6) / 4)


def test_evaluate_folder_writes_metrics_errors_and_contact_sheet(made, trained, tmp_path):
    held = tmp_path / "held"
    for name in ("class_00", "class_02"):
        shutil.copytree(made["images"] / name, held / name)
    (held / "class_02/broken.png").write_bytes(b"\x89PNG not really")
    (held / "class_00/notes.txt").write_text("not an image")  # not an input: only image files are
    (held / "class_02/Thumbs.db").write_bytes(b"\0" * 16)
    metrics = evaluate_images(held, trained, tmp_path / "eval", batch_size=5)
    assert metrics["n_images"] == 24 and metrics["n_unreadable"] == 1
    assert metrics["classes_present"] == ["class_00", "class_02"] and set(metrics["per_class"]) == {"class_00", "class_02"}
    for key in ("accuracy", "loss", "macro_f1", "ece"):
        assert np.isfinite(metrics[key]), key
    assert metrics["calibration"] == {"temperature": TEMPERATURE, "activation": "softmax"}
    assert read_json(tmp_path / "eval/metrics.json")["n_misclassified"] == metrics["n_misclassified"]
    errors = pd.read_csv(tmp_path / "eval/errors.csv", keep_default_na=False)
    assert len(errors) == metrics["n_misclassified"] == round(24 * (1 - metrics["accuracy"]))
    assert (errors["label"] != errors["predicted"]).all() and errors["confidence"].is_monotonic_decreasing
    page = (tmp_path / "eval/errors/index.html").read_text()
    assert f"{len(errors)} rows." in page or len(errors) == 0
    assert (tmp_path / "eval/confusion.png").read_bytes()[:4] == b"\x89PNG"
    rows = pd.read_csv(tmp_path / "eval/predictions.csv", keep_default_na=False)
    assert len(rows) == 25 and rows.loc[rows["path"].str.endswith("broken.png"), "error"].item() != ""
    assert not rows["path"].str.endswith((".txt", ".db")).any()


def test_evaluate_rejects_unknown_class_names(made, trained, tmp_path):
    (tmp_path / "set/cat").mkdir(parents=True)
    (tmp_path / "set/dog").mkdir()
    shutil.copy(made["images"] / "class_00/img_000.png", tmp_path / "set/cat/x.png")
    shutil.copy(made["images"] / "class_00/img_000.png", tmp_path / "set/dog/x.png")
    with pytest.raises(DatasetError, match=r"\['cat', 'dog'\] are not classes of the model.*class_00"):
        evaluate_images(tmp_path / "set", trained, tmp_path / "eval")


def test_labels_csv_paths_start_at_the_csv(made, tmp_path):
    (tmp_path / "labels.csv").write_text(f"path,label\nx/a.png,class_00\n{made['images']}/class_01/img_000.png,class_01\n")
    table = labelled_images(tmp_path / "labels.csv")
    assert table.values.tolist() == [[f"{tmp_path.as_posix()}/x/a.png", "class_00"],
                                     [f"{made['images'].as_posix()}/class_01/img_000.png", "class_01"]]  # fmt: skip


# --------------------------------------------------------------------------- export


def _blocked_env(tmp_path: Path, *blocked: str) -> dict[str, str]:
    """An environment in which importing ``blocked`` packages fails: the example must run
    from the export folder alone."""
    blocker = tmp_path / "blocker"
    for name in blocked:
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('the example must not import {name}')\n")
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not (Path(p) / "labelflow").is_dir()]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), *kept])}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_pytorch_and_example_matches_predict(fmt, made, trained, tmp_path):
    from labelflow.export import CHECK_BATCH, export_model, run_exported, serving_model

    if fmt == "onnx":
        pytest.importorskip("onnxscript", reason="ONNX export needs the 'export' extra: pip install -r requirements-export.txt")
        pytest.importorskip("onnxruntime", reason="checking the ONNX model needs onnxruntime (requirements-export.txt)")
    card = export_model(trained, tmp_path / "export", fmt)
    assert card["check"]["max_abs_difference"] <= 1e-4 and card["classes"] == trained.classes
    # outputs equal PyTorch's on a batch of yet another size (the batch axis is dynamic)
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = [t.numpy() for t in serving_model(trained)(images)]
    got = run_exported(tmp_path / "export" / card["file"], fmt, images)
    assert max(float(np.abs(g - e).max()) for g, e in zip(got, expected)) <= 1e-4 and CHECK_BATCH != 5
    saved = read_json(tmp_path / "export/model_card.json")
    assert saved["calibration"] == {"temperature": TEMPERATURE, "activation": "softmax"}
    assert saved["rejection"]["threshold"] == trained.threshold and saved["metrics"]["valid"]["accuracy"] == 0.5
    assert saved["input"]["image_size"] == 16 and saved["input"]["mean"] == [0.5] * 3 and len(saved["config_digest"]) == 16
    # the example script, from a copy of the export folder alone, answers as labelflow predict does
    runtime = {"onnx": {"onnxruntime", "numpy", "PIL"}, "torchscript": {"torch", "numpy", "PIL"}}[fmt]
    source = (tmp_path / "export/example.py").read_text()
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import)}
    imported |= {n.module.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert imported - {"json", "sys", "pathlib", "warnings"} == runtime and len(source.splitlines()) <= 40
    served = shutil.copytree(tmp_path / "export", tmp_path / "elsewhere" / "export")
    inputs = [str(made["new"] / "a.png"), str(made["new"] / "deeper/b.png"), str(_enlarged(made, tmp_path))]
    blocked = ("labelflow",) if fmt == "torchscript" else ("labelflow", "torch")
    result = subprocess.run([sys.executable, "example.py", *inputs], cwd=served, capture_output=True, text=True,
                            env=_blocked_env(tmp_path, *blocked), timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [line.split("\t") for line in result.stdout.splitlines()]
    predict_to_csv(trained, pd.DataFrame({"path": inputs}), tmp_path / "p.csv")
    ours = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert [a[1] for a in answers] == ours["top1"].tolist()
    np.testing.assert_allclose([float(a[2]) for a in answers], ours["confidence"], atol=2e-3)


def _enlarged(made, tmp_path: Path) -> Path:
    """A 24 px copy of a 16 px image: the example's Pillow resize stands in for OpenCV's."""
    from PIL import Image

    path = tmp_path / "big.png"
    with Image.open(made["images"] / "class_02/img_003.png") as image:
        image.resize((24, 24), Image.Resampling.NEAREST).save(path)
    return path


def test_cli_export_torchscript(made, tmp_path, capsys):
    code = main(["export", "--experiment-dir", str(made["run"]), "--format", "torchscript", "--out-dir", str(tmp_path / "e")])
    assert code == 0 and "model.ts" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["example.py", "model.ts", "model_card.json"]
