"""A trained run as a user meets it after training: its files, read once, ready to apply.

``results/<run>/`` holds everything needed to use a trained model on new images:

    index/rejection.json   the checkpoint, its preprocessing, the classes and the index files
                           (rule rejection; see :meth:`labelflow.search.SimilaritySearch.load`)
    calibration.json       {"temperature", "activation"} fitted on validation images (rule calibrate)
    summary.json           the run's validation metrics (rule summary); optional

:class:`ModelFiles` names those files (the workflow passes its declared inputs, the command
line finds them in ``--experiment-dir``); :func:`load_trained` reads them into a
:class:`TrainedModel`, which predict, evaluate and export all start from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labelflow.io import DatasetError, PathLike, read_json
from labelflow.losses import ACTIVATIONS, get_loss

if TYPE_CHECKING:
    from labelflow.models import HeadSpec, MultiHeadNet
    from labelflow.search import SimilaritySearch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFiles:
    """The files that make a trained run usable (see the module docstring)."""

    rejection_json: Path
    calibration_json: Path
    summary_json: Path | None = None

    @classmethod
    def in_run_dir(cls, run_dir: PathLike) -> ModelFiles:
        """The files of ``results/<run>`` (summary.json only when it is there)."""
        run_dir = Path(run_dir)
        summary = run_dir / "summary.json"
        return cls(run_dir / "index" / "rejection.json", run_dir / "calibration.json", summary if summary.is_file() else None)


@dataclass(frozen=True)
class ConfidenceScale:
    """Calibrated confidence: ``activation(logits / temperature)``."""

    temperature: float
    activation: str

    @classmethod
    def read(cls, path: PathLike) -> ConfidenceScale:
        path = Path(path)
        if not path.is_file():
            raise DatasetError(
                f"{path} does not exist: the calibrated confidence needs the temperature fitted on the "
                f"validation images; build it first with `snakemake {path.as_posix()}`"
            )
        card = read_json(path)
        try:
            scale = cls(float(card["temperature"]), str(card["activation"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{path} needs a number `temperature` and an `activation` ({err!r})") from None
        if scale.activation not in ACTIVATIONS or not scale.temperature > 0:
            raise DatasetError(f"{path}: activation must be one of {ACTIVATIONS} and temperature > 0, got {card}")
        return scale


@dataclass
class TrainedModel:
    """A run's network with what it takes to read its outputs (see :func:`load_trained`)."""

    files: ModelFiles
    network: MultiHeadNet
    checkpoint: Path
    classes: list[str]
    preprocessing: dict[str, Any]  # image_size, mean, std, num_workers (rejection.json "model")
    scale: ConfidenceScale
    rejection: dict[str, Any]  # rejection.json: threshold, quantile, space, ...
    multilabel: bool
    summary: dict[str, Any] | None = None

    @property
    def head(self) -> HeadSpec:
        """The class head (the first head of every experiment)."""
        return self.network.spec.heads[0]

    @property
    def threshold(self) -> float:
        return float(self.rejection["threshold"])

    @cached_property
    def search(self) -> SimilaritySearch:
        """The run's index with its rejection threshold (loaded on first use)."""
        from labelflow.search import SimilaritySearch

        return SimilaritySearch.load(self.files.rejection_json)

    def config_digest(self) -> tuple[str, dict[str, Any]]:
        """(digest, recipe): the recipe recorded with the trained model — its network spec, its
        preprocessing and the spec of every stage as trained (``<run>/<stage>/metrics.json``) —
        and the first 16 hex digits of the sha256 of its canonical JSON. The command line and
        the workflow see the same files, so they give the same digest."""
        stages = {}
        for metrics_json in sorted(self.checkpoint.parent.parent.glob("*/metrics.json")):
            if (metrics_json.parent / "best.pt").is_file():
                stages[metrics_json.parent.name] = read_json(metrics_json).get("spec")
        recipe = {"model": self.network.spec.to_dict(), "preprocessing": self.preprocessing, "stages": stages}
        blob = json.dumps(recipe, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16], recipe


def load_trained(files: ModelFiles) -> TrainedModel:
    """Read the run's files and its network (CPU, eval mode). Errors name the missing file
    and the Snakemake target that makes it."""
    from labelflow.embeddings import read_model
    from labelflow.models import load_model

    rejection_json = Path(files.rejection_json)
    preprocessing, checkpoint, classes = read_model(rejection_json.parent.parent)
    checkpoint = Path(os.path.normpath(checkpoint))  # rejection.json names it as ../stage2/best.pt
    scale = ConfidenceScale.read(files.calibration_json)
    network = load_model(checkpoint).eval()
    head = network.spec.heads[0]
    if head.num_outputs != len(classes):
        raise DatasetError(f"{checkpoint} has {head.num_outputs} class outputs but {rejection_json} names {len(classes)} classes")
    activation = get_loss(head.loss).activation
    if activation != scale.activation:
        raise DatasetError(
            f"{files.calibration_json} was fitted for {scale.activation} but the model's class head "
            f"({head.loss}) uses {activation}; rebuild it"
        )
    summary = read_json(files.summary_json) if files.summary_json else None
    rejection = read_json(rejection_json)
    return TrainedModel(
        files=files, network=network, checkpoint=checkpoint, classes=list(classes), preprocessing=preprocessing,
        scale=scale, rejection=rejection, multilabel=_is_multilabel(summary, rejection_json, rejection), summary=summary,
    )


def _is_multilabel(summary: dict[str, Any] | None, rejection_json: Path, rejection: dict[str, Any]) -> bool:
    """From summary.json when there is one, else from the run's predictions table: a label
    with ';' means several labels per image."""
    if summary is not None and "multilabel" in summary:
        return bool(summary["multilabel"])
    from labelflow.dataset import read_predictions

    labels = read_predictions(rejection_json.parent / rejection["files"]["predictions"])["label"]
    return bool(labels.str.contains(";").any())
