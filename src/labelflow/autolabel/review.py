"""Autolabel step 4, after the loop: a review queue for a person, and the way back.

The queue ranks what the loop left uncertain, the raw images still unlabelled and the least
certain pseudo-labels, by **uncertainty x diversity**:

* uncertainty = 1 - calibrated margin: the gap between the two most probable classes under the
  last round's model and temperature (a margin near 0 is a coin toss between two classes);
* diversity = farthest-first in the last round's embedding (cosine): each pick maximises
  uncertainty x distance to the images already in the queue, so the queue does not show fifty
  copies of one hard case.

The work is bounded: only a ``pool`` of candidates (the least confident by the confidence the
loop recorded) is embedded, and farthest-first costs O(pool x size) distances. The pool leaves
out raw copies of clean images whose labels disagree (their fix is the clean labels, not an
answer) and images answered already.

Outputs: ``queue.csv`` (:data:`QUEUE_COLUMNS`), a Label Studio import file (tasks with the image,
our path, and the prediction as a pre-annotation) with its labelling config, and a contact sheet.
Answers come back as ``corrections.csv`` (:mod:`labelflow.corrections`); a Label Studio export
converts with :func:`corrections_from_label_studio`.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from labelflow.io import (
    PathLike,
    atomic_directory,
    atomic_output,
    read_json,
    read_table,
    write_csv_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)

QUEUE_COLUMNS = [
    "rank", "path", "status", "label", "predicted", "confidence", "margin", "uncertainty", "distance", "round",
]  # fmt: skip
UNLABELLED, PSEUDO = "unlabelled", "pseudo"
FROM_NAME, TO_NAME = "label", "image"  # the control and object tag names of the labelling config


@dataclass(frozen=True)
class ReviewSettings:
    """Config section ``autolabel.review`` (defaults in config/schemas/config.schema.yaml)."""

    size: int  # images in the queue
    pool: int  # candidates embedded and ranked (the least confident first)
    image_url_prefix: str  # Label Studio: the image URL is this + the path under the autolabel root

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> ReviewSettings:
        return cls(**{name: section[name] for name in cls.__dataclass_fields__})


def review_pool(
    dataset: pd.DataFrame, unlabelled: pd.DataFrame, pool: int, raw: pd.DataFrame | None = None,
    answered: Collection[str] = (),
) -> pd.DataFrame:
    """``path,status,label,confidence,round``: the ``pool`` least confident of the unlabelled raw
    images (confidence: the last round's calibrated top-1) and the pseudo-labels (the
    confidence of the round that accepted them); ties by path. A missing confidence counts as 0.

    Left out: the unlabelled raw images that copy clean images whose labels disagree (``raw``,
    the round's raw.csv: a ``duplicate_of`` but no ``tag``). The loop never predicts them, so
    they would come first, and could fill the pool; yet an answer rarely settles them: their
    clean copies usually sit in different folds or duplicate groups, and then
    :func:`labelflow.corrections.apply_autolabel_corrections` leaves the answer out. The fix is
    to correct the clean labels. Also left out: the paths in ``answered`` (the corrections
    file's; once applied, an answer is a human row anyway)."""
    unlabelled = unlabelled[["path", "confidence"]]
    if raw is not None and "duplicate_of" in raw.columns:
        conflicts = _conflict_copies(raw)
        of_conflict = unlabelled["path"].isin(conflicts.index)
        if of_conflict.any():
            shown = [f"{p} (copies {conflicts[p]})" for p in unlabelled["path"][of_conflict].head(5)]
            log.warning(
                "review pool: left out %d unlabelled raw images that copy clean images whose labels disagree "
                "(an answer would not be used; correct those clean labels instead), e.g. %s",
                int(of_conflict.sum()), "; ".join(shown),
            )  # fmt: skip
        unlabelled = unlabelled[~of_conflict]
    candidates = pd.concat(
        [
            pd.DataFrame(
                {"path": unlabelled["path"], "status": UNLABELLED, "label": "", "confidence": unlabelled["confidence"], "round": -1}
            ),
            pseudo_rows(dataset),
        ],
        ignore_index=True,
    )
    candidates["confidence"] = candidates["confidence"].astype(float).fillna(0.0)
    done = candidates["path"].isin(set(answered))
    if done.any():
        log.info("review pool: left out %d images answered in the corrections file already, e.g. %s",
                 int(done.sum()), candidates["path"][done].head(5).tolist())  # fmt: skip
    candidates = candidates[~done]
    ranked = candidates.sort_values(["confidence", "path"], kind="stable")
    return ranked.head(pool).reset_index(drop=True)


def _conflict_copies(raw: pd.DataFrame) -> pd.Series:
    """``duplicate_of`` by path of the raw images that copy clean images but have no tag (their
    clean copies disagree: labelflow.autolabel.prepare, labelflow.corrections)."""
    copies = raw["duplicate_of"].fillna("").astype(str)
    untagged = raw["tag"].fillna("").astype(str) == "" if "tag" in raw.columns else True
    conflict = (copies != "") & untagged
    return pd.Series(copies[conflict].to_numpy(), index=raw["path"][conflict].to_numpy())


def pseudo_rows(dataset: pd.DataFrame) -> pd.DataFrame:
    """The pseudo-labelled rows of the autolabel dataset.csv as pool rows."""
    pseudo = dataset[dataset["source"] == "pseudo"]
    return pd.DataFrame(
        {"path": pseudo["path"], "status": PSEUDO, "label": pseudo["label"], "confidence": pseudo["confidence"], "round": pseudo["round"]}
    )


def top_two_margin(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted class, its probability, margin = top-1 minus top-2 probability) per row."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] < 2:
        raise ValueError(f"a margin needs at least 2 classes; probabilities have shape {probs.shape}")
    top2 = -np.partition(-probs, 1, axis=1)[:, :2]
    return probs.argmax(axis=1), top2[:, 0], top2[:, 0] - top2[:, 1]


def farthest_first(embeddings: np.ndarray, uncertainty: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(picked row numbers in pick order, each pick's cosine distance to the earlier picks).

    The first pick is the most uncertain row (distance NaN); each next one maximises
    uncertainty x (distance to the nearest earlier pick), so a near copy of a picked image
    scores about 0 and waits until the distinct hard cases are in. Ties go to the lower row.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    u = np.clip(np.asarray(uncertainty, dtype=np.float64), 0.0, None)
    n = min(int(n), len(x))
    picked, distances = np.zeros(n, dtype=np.int64), np.full(n, np.nan)
    if n == 0:
        return picked, distances
    nearest = np.full(len(x), np.inf)
    available = np.ones(len(x), dtype=bool)
    for step in range(n):
        # 1e-9: among exact copies (distance 0) the more uncertain still comes first
        score = u * (np.minimum(nearest, 2.0) + 1e-9) if step else u.copy()
        score[~available] = -np.inf
        pick = int(np.argmax(score))
        picked[step], available[pick] = pick, False
        if step:
            distances[step] = nearest[pick]
        nearest = np.minimum(nearest, np.clip(1.0 - x @ x[pick], 0.0, 2.0))
    return picked, distances


def rank_queue(pool: pd.DataFrame, probs: np.ndarray, embeddings: np.ndarray, classes: Sequence[str], size: int) -> pd.DataFrame:
    """The queue (:data:`QUEUE_COLUMNS`) of ``size`` pool rows by uncertainty x diversity, given
    the last round's calibrated probabilities and embeddings of the pool rows."""
    predicted, confidence, margin = top_two_margin(probs)
    uncertainty = 1.0 - margin
    order, distances = farthest_first(embeddings, uncertainty, size)
    queue = pool.iloc[order].reset_index(drop=True)
    queue["predicted"] = np.asarray(classes, dtype=object)[predicted[order]]
    queue["confidence"] = confidence[order]
    queue["margin"] = margin[order]
    queue["uncertainty"] = uncertainty[order]
    queue["distance"] = distances
    queue["rank"] = np.arange(1, len(queue) + 1)
    return queue[QUEUE_COLUMNS]


# --------------------------------------------------------------------------- Label Studio


def label_studio_tasks(queue: pd.DataFrame, image_url_prefix: str, model_version: str) -> list[dict[str, Any]]:
    """Label Studio tasks (its "Basic Label Studio JSON" import format), one per queue row in
    queue order: ``data.image`` (the URL Label Studio loads), ``data.path`` (our path, how an
    answer finds its way back to corrections.csv) and one prediction whose result is a
    ``choices`` pre-annotation of the predicted class with the calibrated confidence as score."""
    tasks = []
    for row in queue.itertuples(index=False):
        tasks.append(
            {
                "data": {"image": f"{image_url_prefix}{row.path}", "path": row.path, "rank": int(row.rank), "status": row.status},
                "predictions": [
                    {
                        "model_version": model_version,
                        "score": float(row.confidence),
                        "result": [
                            {
                                "from_name": FROM_NAME,
                                "to_name": TO_NAME,
                                "type": "choices",
                                "value": {"choices": [str(row.predicted)]},
                            }
                        ],
                    }
                ],
            }
        )
    return tasks


def label_studio_config(classes: Sequence[str]) -> str:
    """The labelling config the tasks fit: an image and one single choice among the classes."""
    choices = "\n".join(f'    <Choice value="{html.escape(str(c))}"/>' for c in classes)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def corrections_from_label_studio(export: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """``path,label`` rows (a corrections.csv) from a Label Studio JSON export of our tasks: the
    chosen class of each task's latest annotation that was not cancelled; tasks without one
    are left out."""
    rows = []
    for task in export:
        annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        if not annotations:
            continue
        choices = [
            choice
            for result in annotations[-1].get("result", [])
            if result.get("type") == "choices" and result.get("from_name") == FROM_NAME
            for choice in result["value"]["choices"]
        ]
        if choices:
            rows.append((task["data"]["path"], ";".join(choices)))
    return pd.DataFrame(rows, columns=["path", "label"])


# --------------------------------------------------------------------------- the workflow step


def pool_outputs(
    checkpoint: PathLike, root: PathLike, paths: Sequence[str], data_cfg: dict[str, Any], temperature: float,
    batch_size: int, want_gpu: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated probabilities, embeddings) of ``paths`` under the given model; one batch at a time."""
    from labelflow.device import select_device
    from labelflow.inference import predict
    from labelflow.loaders import eval_loader
    from labelflow.losses import get_loss, probabilities
    from labelflow.models import load_model

    device = select_device(want_gpu)
    model = load_model(checkpoint)
    loader = eval_loader(root, np.asarray(paths, dtype=str), data_cfg, batch_size=batch_size, device=device)
    outputs = predict(model, loader, device)
    activation = get_loss(model.spec.heads[0].loss).activation
    return probabilities(outputs["logits"], activation, temperature), outputs["embeddings"]


def review_queue(
    *,
    inputs: Mapping[str, PathLike],
    outputs: Mapping[str, PathLike],
    data_cfg: dict[str, Any],
    settings: ReviewSettings,
    batch_size: int = 256,
    want_gpu: bool = False,
) -> pd.DataFrame:
    """queue.csv, the Label Studio tasks and labelling config, after the autolabel loop.

    ``inputs``: dataset (the autolabel dataset.csv), unlabelled, checkpoint (the last round's
    model), metrics (its metrics.json, for the temperature), tag2cls, root (the autolabel root),
    and optionally raw (the rounds' raw.csv) and corrections (the corrections file), which
    :func:`review_pool` leaves out.
    ``outputs``: queue, tasks, label_config.
    """
    from labelflow.corrections import match_paths, read_corrections
    from labelflow.dataset import class_names, read_tag2cls

    classes = class_names(read_tag2cls(inputs["tag2cls"]))
    dataset, unlabelled = read_table(inputs["dataset"]), read_table(inputs["unlabelled"])
    raw = read_table(inputs["raw"]) if inputs.get("raw") else None
    answered: set[str] = set()
    if inputs.get("corrections"):
        known = set(unlabelled["path"]) | set(dataset["path"])
        answered = set(match_paths(read_corrections(inputs["corrections"]), known)["path"])
    pool = review_pool(dataset, unlabelled, settings.pool, raw=raw, answered=answered)
    metrics = read_json(inputs["metrics"])
    temperature = float(metrics["calibration"]["temperature"])
    if len(pool):
        probs, embeddings = pool_outputs(
            inputs["checkpoint"], inputs["root"], pool["path"].tolist(), data_cfg, temperature, batch_size, want_gpu
        )
    else:
        probs, embeddings = np.zeros((0, len(classes))), np.zeros((0, 1))
    queue = rank_queue(pool, probs, embeddings, classes, settings.size)
    version = f"autolabel round {metrics['round']} (T={temperature:.3f})"
    write_csv_atomic(queue, outputs["queue"])
    write_json_atomic(label_studio_tasks(queue, settings.image_url_prefix, version), outputs["tasks"])
    with atomic_output(outputs["label_config"]) as tmp:
        tmp.write_text(label_studio_config(classes), encoding="utf-8")
    log.info(
        "review queue: %d of a pool of %d (%d unlabelled, %d pseudo-labels); median margin %.3f",
        len(queue), len(pool), int((queue["status"] == UNLABELLED).sum()), int((queue["status"] == PSEUDO).sum()),
        float(queue["margin"].median()) if len(queue) else float("nan"),
    )
    return queue


def write_queue_sheet(*, queue_csv: PathLike, root: PathLike, out_dir: PathLike) -> dict[str, int]:
    """The review queue as a static HTML contact sheet, in queue order (``out_dir/index.html``)."""
    from labelflow.contact_sheet import write_contact_sheet

    queue = read_table(queue_csv, text_columns=("status", "label", "predicted"))
    with atomic_directory(out_dir) as tmp:
        shown = write_contact_sheet(
            queue, image_root=root, out_dir=tmp, title="Autolabel review queue",
            columns=["status", "label", "predicted", "confidence", "margin", "distance"], max_rows=len(queue),
            caption="Uncertain (small calibrated margin between the two likeliest classes) and diverse (far from the "
            "images above it in the model's embedding). label: the pseudo-label, if any. Answer as corrections.csv "
            "(path,label or path,drop), or import label_studio_tasks.json into Label Studio.",
        )
    return shown
