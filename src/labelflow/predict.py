"""Apply a trained run to new images: class, calibrated confidence, top-k, out-of-class rejection.

One pass, one batch at a time: each image file is decoded once, inside the loader, and
forgotten after its batch; the class head's logits are turned into calibrated probabilities
(``calibration.json``) and the embeddings are searched in the run's index per batch, so memory
does not grow with the number of images. An image that cannot be read becomes a row with an
``error`` and never stops the pass.

* :func:`collect_inputs`: image files, folders (searched recursively) and CSVs of paths → a table.
* :class:`Predictor`: the batched pass; yields :class:`BatchPredictions`.
* :func:`prediction_rows`: a batch as output rows; :func:`predict_to_csv` streams them to a CSV.

A row's ``predicted`` is the class head's answer (argmax; for multilabel models every class
whose sigmoid probability reaches the head's ``decision_threshold``, as in rule infer), or
``unknown`` when the image is farther from every indexed training image than the rejection
threshold (``rejected``, ``nearest_distance``). ``confidence`` is the calibrated probability of
the top class; ``top1..topK`` list the most probable classes with their calibrated probabilities.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from threadpoolctl import ThreadpoolController
from torch.utils.data import DataLoader, Dataset

from labelflow.dataset import read_image_list
from labelflow.device import autocast, images_for, place_model
from labelflow.images import check_image, walk_images
from labelflow.io import DatasetError, PathLike, atomic_output
from labelflow.loaders import ImageTableDataset, eval_dataset, streaming_loader
from labelflow.losses import probabilities
from labelflow.progress import Progress
from labelflow.search import UNKNOWN
from labelflow.trained import TrainedModel

log = logging.getLogger(__name__)

ERROR = "error"


# --------------------------------------------------------------------------- inputs


def collect_inputs(items: Sequence[PathLike]) -> pd.DataFrame:
    """Command-line inputs → table ``path``: a file as given, every non-hidden file below a
    folder (sorted; non-images too, so that they show up as error rows), and the ``path``
    column of a ``.csv`` (relative paths start at the CSV's folder)."""
    paths: list[str] = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            paths += sorted(Path(p).as_posix() for p in walk_images(str(item), str, skipped=[]))
        elif item.suffix.lower() == ".csv" and item.is_file():
            paths += [p if Path(p).is_absolute() else (item.parent / p).as_posix() for p in read_image_list(item)["path"]]
        else:
            paths.append(item.as_posix())
    if not paths:
        raise DatasetError(f"no files in {', '.join(map(str, items)) or 'the inputs'}; give image files, folders or a CSV with a `path` column")
    return pd.DataFrame({"path": paths})


# --------------------------------------------------------------------------- the batched pass


class _ImagesOrErrors(Dataset):
    """Batches of an un-cached, un-augmented :class:`ImageTableDataset`, with ``(index, reason)``
    for each file that cannot be read (the reason in the words tag2label uses)."""

    def __init__(self, images: ImageTableDataset):
        if not images.per_pixel or images.images is not None:
            raise ValueError("prediction batches need an un-cached, un-augmented, un-rotated dataset")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def _decoded(self, index: int) -> np.ndarray | str:
        """The decoded image, or why it cannot be read."""
        path = self.images.file(index)
        try:
            # a FIFO or device would block the decoder forever; a folder is a common mistake
            if not stat.S_ISREG(os.stat(path).st_mode):
                return "not a regular file"
            return self.images.decode_file(path)  # never cached (see __init__)
        except Exception as err:  # noqa: BLE001 - decoders raise many types on garbage
            return check_image(path) or f"{type(err).__name__}: {err}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])  # a batch of one (DataLoader asks for whole batches)

    def reseed(self, seed: int) -> None:  # called in each DataLoader worker
        self.images.reseed(seed)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        """A collated batch: the readable images normalised at once, and the errors."""
        decoded = [(index, self._decoded(index)) for index in indices]
        readable = [(index, pixels) for index, pixels in decoded if not isinstance(pixels, str)]
        return {
            "image": self.images.transform_batch(np.stack([pixels for _, pixels in readable])) if readable else None,
            "index": np.array([index for index, _ in readable], dtype=np.int64),
            "errors": [(index, reason) for index, reason in decoded if isinstance(reason, str)],
        }


@dataclass
class BatchPredictions:
    """One batch's answers; ``rows`` are the input row numbers of its readable images."""

    rows: np.ndarray  # (n,)
    logits: np.ndarray  # (n, classes) float32, the class head
    probabilities: np.ndarray  # (n, classes) float64, calibrated
    nearest_distance: np.ndarray  # (n,)
    rejected: np.ndarray  # (n,) bool
    errors: list[tuple[int, str]]  # (row, reason) of the unreadable files


class Predictor:
    """A trained run applied batch by batch (see the module docstring)."""

    def __init__(self, trained: TrainedModel, device: torch.device, batch_size: int = 64, reject: bool = True):
        self.trained = trained
        self.device = device
        self.batch_size = batch_size
        self.search = trained.search if reject else None
        # numpy's BLAS (OpenBLAS) projects each batch's embeddings for the search; its threads
        # keep spinning after a call and take the cores from the next batch's forward pass
        # (measured: predict 10-14 % slower on 2 cores). One thread is plenty for one batch.
        self._numpy_blas = ThreadpoolController().select(user_api="blas")
        place_model(trained.network.eval(), device)

    def loader(self, paths: Sequence[str], root: PathLike = ".") -> DataLoader:
        pre = self.trained.preprocessing
        images = _ImagesOrErrors(eval_dataset(root, paths, pre))
        return streaming_loader(images, pre, batch_size=self.batch_size, device=self.device)

    @torch.inference_mode()
    def batches(self, paths: Sequence[str], root: PathLike = ".", progress: Progress | None = None) -> Iterator[BatchPredictions]:
        """Answers for ``paths`` (relative to ``root``), in input order, one batch at a time."""
        network, head = self.trained.network, self.trained.head.name
        for batch in self.loader(paths, root):
            if batch["image"] is None:
                logits = np.empty((0, self.trained.head.num_outputs), dtype=np.float32)
                embeddings = np.empty((0, network.spec.embedding_size), dtype=np.float32)
            else:
                images = images_for(batch["image"].to(self.device, non_blocking=self.device.type == "cuda"), self.device)
                with autocast(self.device):
                    outputs = network(images)
                logits = outputs[head].float().cpu().numpy()
                embeddings = outputs["embedding"].float().cpu().numpy()
            yield self._answer(batch, logits, embeddings)
            if progress is not None:
                progress.update(len(batch["index"]) + len(batch["errors"]))

    def _answer(self, batch: dict[str, Any], logits: np.ndarray, embeddings: np.ndarray) -> BatchPredictions:
        scale = self.trained.scale
        if self.search is not None and len(embeddings):
            with self._numpy_blas.limit(limits=1):
                found = self.search.search(embeddings, 1)
            # a train image queried again is at ~-1e-7 (float rounding): show it as 0
            nearest, rejected = np.maximum(found.nearest, 0.0), found.rejected
        else:
            nearest, rejected = np.full(len(logits), np.nan), np.zeros(len(logits), dtype=bool)
        return BatchPredictions(
            rows=batch["index"], logits=logits, probabilities=probabilities(logits, scale.activation, scale.temperature),
            nearest_distance=nearest, rejected=rejected, errors=batch["errors"],
        )


# --------------------------------------------------------------------------- output rows


def output_columns(top_k: int) -> list[str]:
    top = [name for k in range(1, top_k + 1) for name in (f"top{k}", f"top{k}_probability")]
    return ["path", "predicted", "confidence", "rejected", "nearest_distance", *top, ERROR]


def head_answers(trained: TrainedModel, batch: BatchPredictions) -> np.ndarray:
    """The class head's answer per readable image, before rejection (object array of names)."""
    names = np.asarray(trained.classes, dtype=object)
    if not trained.multilabel:
        return names[batch.logits.argmax(axis=1)] if len(batch.logits) else np.empty(0, dtype=object)
    # the decision threshold applies to the model's own sigmoid, as in rule infer and summary.json
    chosen = probabilities(batch.logits, "sigmoid") >= trained.head.decision_threshold
    return np.array([";".join(names[row]) for row in chosen], dtype=object)


def prediction_rows(trained: TrainedModel, batch: BatchPredictions, paths: Sequence[str], top_k: int) -> pd.DataFrame:
    """Output rows of one batch (readable images and error rows), in input order."""
    names = np.asarray(trained.classes, dtype=object)
    k = min(top_k, len(names))
    order = np.argsort(-batch.probabilities, axis=1, kind="stable")[:, :k]
    answer = head_answers(trained, batch)
    table = pd.DataFrame(
        {
            "row": batch.rows,
            "predicted": np.where(batch.rejected, UNKNOWN, answer),
            "confidence": batch.probabilities.max(axis=1) if len(batch.rows) else np.empty(0),
            "rejected": batch.rejected.astype(object),
            "nearest_distance": batch.nearest_distance,
        }
    )
    for rank in range(k):
        table[f"top{rank + 1}"] = names[order[:, rank]]
        table[f"top{rank + 1}_probability"] = np.take_along_axis(batch.probabilities, order[:, rank : rank + 1], 1)[:, 0]
    table[ERROR] = ""
    errors = pd.DataFrame({"row": [r for r, _ in batch.errors], ERROR: [e for _, e in batch.errors]})
    table = pd.concat([table, errors], ignore_index=True).sort_values("row", kind="stable")
    table.insert(0, "path", np.asarray(paths, dtype=object)[table["row"].to_numpy(dtype=np.int64)])
    return table.drop(columns="row").reindex(columns=output_columns(k))


def predict_to_csv(
    trained: TrainedModel,
    inputs: pd.DataFrame,
    out_csv: PathLike,
    *,
    top_k: int = 3,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Predict every ``inputs["path"]`` into ``out_csv`` (written batch by batch, moved into
    place at the end); returns counts: images, predicted per class, unknown, unreadable."""
    device = device or torch.device("cpu")
    paths = inputs["path"].tolist()
    predictor = Predictor(trained, device, batch_size)
    progress = Progress(len(paths))
    counts: dict[str, int] = {}
    with atomic_output(out_csv) as tmp, open(tmp, "x", encoding="utf-8", newline="") as out:
        for number, batch in enumerate(predictor.batches(paths, progress=progress)):
            rows = prediction_rows(trained, batch, paths, top_k)
            rows.to_csv(out, index=False, header=number == 0, float_format="%.6g")
            for name, n in rows.loc[rows[ERROR] == "", "predicted"].value_counts().items():
                counts[name] = counts.get(name, 0) + int(n)
            for row, reason in batch.errors:
                log.warning("unreadable: %s: %s", paths[row], reason)
        if not paths:
            out.write(",".join(output_columns(min(top_k, len(trained.classes)))) + "\n")
    progress.close()
    n_errors = len(paths) - sum(counts.values())
    return {"images": len(paths), "unreadable": n_errors, "unknown": counts.pop(UNKNOWN, 0), "predicted": dict(sorted(counts.items()))}
