"""Export a trained run for serving: TorchScript or ONNX, a model card and an example script.

``export_model`` writes a folder that needs nothing from labelflow:

    model.ts | model.onnx   input ``images`` (N, 3, S, S) float32, normalised, any batch size N;
                            outputs ``logits`` and ``probabilities`` (calibrated: activation of
                            logits / T) of the class head, and ``embedding``
    model_card.json         classes in output order, the preprocessing (size, mean/std, resize
                            rule), calibration, rejection threshold, the run's metrics, the
                            config digest, versions, and the measured export error
    example.py              classifies image files with the model and the card only
                            (onnxruntime + numpy + Pillow, or torch + numpy + Pillow)

Every export is checked before it is published: the exported model runs on a batch of another
size than the one it was traced with, and its outputs must equal the PyTorch model's within
``TOLERANCE`` (ONNX needs onnxruntime for that check; without it the card says it was not run).
The out-of-class rejection needs the run's index (``results/<run>/index/``), which is not part
of the export: the card carries the threshold and says so.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import labelflow
from labelflow.io import DatasetError, PathLike, atomic_directory, file_digest, write_json_atomic
from labelflow.trained import TrainedModel

log = logging.getLogger(__name__)

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
EXAMPLES = {"torchscript": "torchscript_example.py", "onnx": "onnx_example.py"}
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities", "embedding")
TOLERANCE = 1e-4  # max abs difference allowed between the exported model and PyTorch
TRACE_BATCH, CHECK_BATCH = 2, 3  # checked on another batch size than traced: the batch axis is dynamic


class ServingModel(nn.Module):
    """The class path of a :class:`MultiHeadNet` with calibration built in:
    images → (logits, calibrated probabilities, embedding). Rotation heads are left out.

    The head is held as an attribute, not looked up in the ``heads`` dict: the class head is
    named ``class``, a Python keyword, which ``torch.export`` cannot turn into code.
    """

    def __init__(self, network: nn.Module, temperature: float, activation: str):
        super().__init__()
        self.encoder = network.encoder
        self.embedding = network.embedding
        self.classifier = network.heads[network.spec.heads[0].name]
        self.temperature = float(temperature)
        self.softmax = activation == "softmax"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding = self.embedding(self.encoder(images))
        logits = self.classifier(embedding)  # dropout is the identity at inference
        scaled = logits / self.temperature
        probabilities = torch.softmax(scaled, dim=1) if self.softmax else torch.sigmoid(scaled)
        return logits, probabilities, embedding


def serving_model(trained: TrainedModel) -> ServingModel:
    return ServingModel(trained.network, trained.scale.temperature, trained.scale.activation).eval()


def example_batch(trained: TrainedModel, batch: int, seed: int = 0) -> torch.Tensor:
    size = int(trained.preprocessing["image_size"])
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _export_torchscript(model: ServingModel, example: torch.Tensor, path: Path) -> None:
    # torch.jit is deprecated in favour of torch.export, but TorchScript is still what
    # C++ (libtorch) and Java servers load; tracing a ResNet is exact.
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        traced.save(str(path))


def _export_onnx(model: ServingModel, example: torch.Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it; say so before torch does
    except ImportError as err:
        raise DatasetError(f"ONNX export needs the optional packages onnx and onnxscript: pip install '.[export]' ({err})") from None
    for chatty in ("onnxscript", "onnx_ir"):  # their INFO lines (one per rewrite pass) would fill a job's log
        logging.getLogger(chatty).setLevel(logging.WARNING)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model, (example,), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
        dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
    )
    program.save(str(path), external_data=False)  # one file: a ResNet-18 is 45 MB, far below protobuf's 2 GB


def run_exported(path: Path, fmt: str, images: torch.Tensor) -> list[np.ndarray] | None:
    """The exported model's outputs on ``images`` (None: ONNX without onnxruntime installed)."""
    if fmt == "torchscript":
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore", FutureWarning)
            return [t.numpy() for t in torch.jit.load(str(path))(images)]
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})


def check_export(model: ServingModel, path: Path, fmt: str, images: torch.Tensor) -> float | None:
    """Max abs difference between the exported model and PyTorch on ``images``; raises when
    it exceeds TOLERANCE (None: not checked, onnxruntime missing)."""
    outputs = run_exported(path, fmt, images)
    if outputs is None:
        log.warning("onnxruntime is not installed: %s was not checked against PyTorch", path.name)
        return None
    with torch.inference_mode():
        expected = [t.numpy() for t in model(images)]
    difference = max(float(np.abs(got - want).max()) for got, want in zip(outputs, expected))
    if not difference <= TOLERANCE:
        raise RuntimeError(f"exported {fmt} model differs from PyTorch by {difference:.3g} (> {TOLERANCE})")
    return difference


def model_card(trained: TrainedModel, fmt: str, difference: float | None, checkpoint_sha256: str) -> dict[str, Any]:
    """What a server needs to feed the model and read its outputs (see the module docstring)."""
    pre = trained.preprocessing
    digest, recipe = trained.config_digest()
    head = trained.head
    return {
        "format": fmt,
        "file": FORMATS[fmt],
        "classes": list(trained.classes),
        "input": {
            "name": INPUT_NAME, "shape": ["batch", 3, pre["image_size"], pre["image_size"]], "dtype": "float32",
            "layout": "NCHW, RGB", "image_size": pre["image_size"], "mean": pre["mean"], "std": pre["std"],
            "preprocessing": (
                "decode to 8-bit RGB (EXIF orientation applied, transparency composited on black, 16-bit "
                "divided by 257); if not already image_size x image_size, resize to that square ignoring the "
                "aspect ratio with OpenCV INTER_AREA when either side shrinks, else INTER_LINEAR (labelflow."
                "images.decode_resized); x = (pixel / 255 - mean) / std per channel"
            ),
        },
        "outputs": {
            "logits": "class head, (batch, classes)",
            "probabilities": f"calibrated: {trained.scale.activation}(logits / temperature), (batch, classes)",
            "embedding": f"(batch, {trained.network.spec.embedding_size}), what the run's similarity index holds",
        },
        "decision": _decision(trained),
        "calibration": {"temperature": trained.scale.temperature, "activation": trained.scale.activation},
        "multilabel": trained.multilabel,
        "decision_threshold": head.decision_threshold,
        "rejection": {
            "threshold": trained.threshold, "quantile": trained.rejection.get("quantile"),
            "distance": trained.rejection.get("distance"),
            "note": "needs the run's PCA transform and hnswlib index (results/<run>/index/), not part of this export",
        },
        "metrics": trained.summary,
        "config_digest": digest,
        "config_digest_of": "sha256 (first 16 hex) of the canonical JSON of `recipe`",
        "recipe": recipe,
        "checkpoint_sha256": checkpoint_sha256,
        "versions": {"labelflow": labelflow.__version__, "torch": torch.__version__},
        "check": {"max_abs_difference": difference, "tolerance": TOLERANCE, "batch": CHECK_BATCH},
    }


def _decision(trained: TrainedModel) -> str:
    if trained.multilabel:
        return f"every class whose sigmoid(logit) (uncalibrated) >= decision_threshold {trained.head.decision_threshold}"
    return "the class with the largest logit; its calibrated probability is the confidence"


def export_model(trained: TrainedModel, out_dir: PathLike, fmt: str) -> dict[str, Any]:
    """Write the export folder ``out_dir`` (replaced as a whole, atomically); returns the card."""
    if fmt not in FORMATS:
        raise DatasetError(f"export format {fmt!r} is not one of {sorted(FORMATS)}")
    model = serving_model(trained).cpu()
    with atomic_directory(out_dir) as tmp:
        path = tmp / FORMATS[fmt]
        (_export_torchscript if fmt == "torchscript" else _export_onnx)(model, example_batch(trained, TRACE_BATCH), path)
        difference = check_export(model, path, fmt, example_batch(trained, CHECK_BATCH, seed=1))
        card = model_card(trained, fmt, difference, file_digest(trained.checkpoint))
        write_json_atomic(card, tmp / "model_card.json")
        shutil.copyfile(Path(__file__).parent / "export_examples" / EXAMPLES[fmt], tmp / "example.py")
    log.info("exported %s to %s (max abs difference to PyTorch %s)", fmt, out_dir, difference)
    return card
