"""Images/s of `labelflow predict` vs a bare PyTorch loop over the same image files, and
ONNX Runtime's CPU rate beside PyTorch's, in the same run.

    python benchmarks/predict_throughput.py                      # digits, 32 px, softmax recipe
    python benchmarks/predict_throughput.py --images 256 --rounds 1 --min-seconds 0   # smoke test
    python benchmarks/predict_throughput.py --json a.json      # then again to b.json; compare_runs.py a.json b.json

predict:  labelflow.predict.predict_to_csv, what the command runs: decode each file in the
          loader, the network, calibrated probabilities, top-3, a search of the run's index
          per batch (rejection), rows written to a CSV.
bare:     the same files decoded with the same function (labelflow.images.decode_resized),
          normalised with numpy, stacked and run through the same network: the least any
          prediction over image files must do. The goal is predict >= 0.95 of bare.
torch / onnxruntime: the class path alone (labelflow.export.ServingModel, calibrated outputs)
          on pre-decoded tensors, in PyTorch and in ONNX Runtime (CPU, same thread count).

The model is the default recipe's network, untrained (speed does not depend on the weights),
with a run folder made around it (infer, index, rejection threshold, calibration.json).
Measured as every throughput benchmark here (benchmarks/spread.py): a warm-up round, then
--rounds rounds in which predict and bare run back to back (then onnxruntime and torch),
alternating which goes first, each measurement repeating passes for at least --min-seconds;
per-round ratios and their min/median/max; --json OUT for compare_runs.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from labelflow import search as sim  # noqa: E402
from labelflow.dataset import split, tag2label  # noqa: E402
from labelflow.demo import write_digits_dataset  # noqa: E402
from labelflow.device import set_job_threads  # noqa: E402
from labelflow.experiment import infer, model_spec  # noqa: E402
from labelflow.images import decode_resized  # noqa: E402
from labelflow.index import IndexSettings, pca_index  # noqa: E402
from labelflow.io import write_csv_atomic, write_json_atomic  # noqa: E402
from labelflow.models import create_model, save_checkpoint  # noqa: E402
from labelflow.predict import predict_to_csv  # noqa: E402
from labelflow.trained import ModelFiles, TrainedModel, load_trained  # noqa: E402
from spread import Comparison, load_warning, machine_info, ratio_lines, run_interleaved, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_recipe(name: str) -> dict:
    """The experiment file, validated against the schema (which fills the defaults)."""
    from snakemake.utils import validate

    experiment = yaml.safe_load((REPO / "config/experiments" / f"{name}.yaml").read_text())
    validate(experiment, str(REPO / "config/schemas/experiment.schema.yaml"))
    return experiment


def make_run(base: Path, experiment: dict, n_images: int) -> tuple[TrainedModel, list[str]]:
    """Digits in base/digits, a run folder in base/run; returns the run and the image paths."""
    images = base / "digits"
    write_digits_dataset(images, image_size=32)
    found = tag2label(images)
    table = split(found.dataset, found.tag2cls, n_folds=5, seed=0)
    write_csv_atomic(table, base / "dataset.csv")
    write_json_atomic(found.tag2cls, base / "tag2cls.json")
    run = base / "run"
    torch.manual_seed(0)
    checkpoint = run / "stage2/best.pt"
    save_checkpoint(checkpoint, create_model(model_spec(experiment, len(found.tag2cls))))
    infer(checkpoint=checkpoint, dataset_csv=base / "dataset.csv", tag2cls_json=base / "tag2cls.json", root=images,
          experiment=experiment, valid_folds=[4], seed=0, out_dir=run / "predictions")  # fmt: skip
    index = {"transform_npz": run / "index/transform.npz", "index_bin": run / "index/knn.hnsw.bin", "index_json": run / "index/index.json"}
    predictions = {"predictions_csv": run / "predictions/predictions.csv", "embeddings_npy": run / "predictions/embeddings.npy"}
    settings = IndexSettings(n_components=128, space="cosine", M=16, ef_construction=200, ef=64, ks=(1,), vote_k=5)  # config defaults
    pca_index(**predictions, settings=settings, seed=0, **index)
    sim.calibrate_rejection(
        index_files={"transform": index["transform_npz"], "index": index["index_bin"], "info": index["index_json"],
                     "predictions": predictions["predictions_csv"]},  # fmt: skip
        embeddings_npy=predictions["embeddings_npy"], tag2cls_json=base / "tag2cls.json", checkpoint=checkpoint,
        data_cfg=experiment["data"], out_json=run / "index/rejection.json", settings=sim.RejectionSettings(0.99, 10, 5),
    )
    write_json_atomic({"temperature": 1.0, "activation": "softmax"}, run / "calibration.json")
    paths = [(images / p).as_posix() for p in table["path"]][:n_images]
    return load_trained(ModelFiles.in_run_dir(run)), paths


@torch.inference_mode()
def bare_files(network: torch.nn.Module, paths: list[str], data_cfg: dict, batch_size: int) -> None:
    mean, std = np.asarray(data_cfg["mean"], np.float32), np.asarray(data_cfg["std"], np.float32)
    for start in range(0, len(paths), batch_size):
        pixels = np.stack([decode_resized(p, data_cfg["image_size"]) for p in paths[start : start + batch_size]])
        images = torch.from_numpy(((pixels.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2).copy())
        network(images)


@torch.inference_mode()
def torch_tensors(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> None:
    for start in range(0, len(images), batch_size):
        model(images[start : start + batch_size])


def onnx_session(trained: TrainedModel, folder: Path, threads: int):
    """An ONNX Runtime session on the exported model, or None without the 'export' extra."""
    try:
        import onnxruntime

        from labelflow.export import export_model

        export_model(trained, folder, "onnx")
    except Exception as err:  # noqa: BLE001 - the extra is optional; say why and go on
        print(f"onnxruntime: not measured ({type(err).__name__}: {err})")
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def onnx_tensors(session, images: np.ndarray, batch_size: int) -> None:
    for start in range(0, len(images), batch_size):
        session.run(None, {"images": images[start : start + batch_size]})


def measure(trained: TrainedModel, paths: list[str], base: Path, args: argparse.Namespace) -> list[Comparison]:
    """predict vs bare, and onnxruntime vs torch (when the export extra is installed), in
    interleaved rounds (benchmarks/spread.py)."""
    from labelflow.export import serving_model

    data_cfg = trained.preprocessing
    inputs = pd.DataFrame({"path": paths})
    serving = serving_model(trained)
    tensors = torch.stack([torch.from_numpy(((decode_resized(p, data_cfg["image_size"]) / 255.0 - data_cfg["mean"]) / data_cfg["std"])
                                            .astype(np.float32).transpose(2, 0, 1).copy()) for p in paths])  # fmt: skip
    session = onnx_session(trained, base / "export", args.threads)
    n = len(paths)

    def counted(run):
        """A pass for spread.run_interleaved: run the loop over the n images, return n."""

        def run_pass() -> int:
            run()
            return n

        return run_pass

    comparisons = [
        Comparison("predict", counted(lambda: predict_to_csv(trained, inputs, base / "out.csv", batch_size=args.batch_size)),
                   counted(lambda: bare_files(trained.network, paths, data_cfg, args.batch_size)),
                   ours_label="predict", reference_label="bare"),
    ]
    if session is not None:
        comparisons.append(Comparison("onnxruntime", counted(lambda: onnx_tensors(session, tensors.numpy(), args.batch_size)),
                                      counted(lambda: torch_tensors(serving, tensors, args.batch_size)),
                                      ours_label="onnxruntime", reference_label="torch"))  # fmt: skip
    run_interleaved(comparisons, args.rounds, min_seconds=args.min_seconds, progress=None)
    return comparisons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="softmax")
    parser.add_argument("--images", type=int, default=1797, help="digits images per pass (all: 1797)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds after the warm-up (default 7)")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="a measurement repeats passes until it lasts this long (default 3)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", help="write the figures here (for compare_runs.py)")
    args = parser.parse_args(argv)
    machine = machine_info()
    set_job_threads(args.threads)  # torch threads, and the budget loading plans share
    experiment = load_recipe(args.experiment)
    with tempfile.TemporaryDirectory() as tmp:
        trained, paths = make_run(Path(tmp), experiment, args.images)
        sys.stderr = open(os.devnull, "w")  # predict's progress lines; the figures go to stdout
        comparisons = measure(trained, paths, Path(tmp), args)
        sys.stderr = sys.__stderr__
    print(f"machine: {machine['cpus_usable']} usable cpus, load average {machine.get('load_average_1min', float('nan')):.2f}, "
          f"torch threads {args.threads}, torch {torch.__version__}")
    print(f"recipe: {args.experiment}, {experiment['data']['image_size']} px, batch {args.batch_size}, "
          f"{len(paths)} digits PNGs, {args.rounds} interleaved rounds (after a warm-up round)")  # fmt: skip
    if warning := load_warning(machine):
        print(warning)
    for comparison in comparisons:
        for line in ratio_lines(comparison, ratio_name=f"ratio {comparison.ours_label}/{comparison.reference_label}"):
            print(line)
    if args.json:
        figures = {k: v for c in comparisons for k, v in c.figures().items()}
        write_json(args.json, "predict_throughput", vars(args) | {"torch": torch.__version__}, figures, machine)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
