"""Autolabel step 2, once per round: the round's training table, then (after the round's run
has trained on it) prediction of the still-unlabelled raw images, calibration and selection.

Round r's table holds the human rows (their folds) and the pseudo-labels accepted in rounds
< r with fold -1, so pseudo-labels never enter validation. The round's model is trained by
the same rules as any run (:mod:`labelflow.runs`, ``autolabel/round_<r>``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from labelflow.autolabel.policy import (
    ACCEPTED,
    REJECTIONS,
    RoundSettings,
    neighbour_recall,
    neighbours_agree,
    remaining_candidates,
    round_status,
    select_pseudo_labels,
)
from labelflow.calibration import CalibrationSettings
from labelflow.dataset import class_names, read_dataset_csv, read_tag2cls, split_names
from labelflow.io import DatasetError, PathLike, read_table, write_csv_atomic, write_json_atomic

log = logging.getLogger(__name__)

ACCEPTED_COLUMNS = ["path", "tag", "class", "confidence", "round"]
HUMAN, PSEUDO = "human", "pseudo"  # the round table's sources (plus human-corrected: labelflow.corrections)


def read_accepted(paths: Sequence[PathLike]) -> pd.DataFrame:
    """The pseudo-labels accepted by the given rounds, one table."""
    tables = [read_table(p) for p in paths]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=ACCEPTED_COLUMNS)


def round_dataset(
    *, human_csv: PathLike, raw_csv: PathLike, accepted_csvs: Sequence[PathLike], tag2cls_json: PathLike,
    out_csv: PathLike,
) -> pd.DataFrame:
    """Round r's training table ``path,tag,class,fold,sha1,group,source``: human rows (their
    folds, groups and source) and the pseudo-labels accepted in earlier rounds (fold -1: never
    validation; source ``pseudo``; sha1 from raw.csv, a group of their own each).

    ``group`` keeps copies of one picture on one side of the checkpoint-selection/calibration
    split (:func:`labelflow.dataset.pick_groups`), ``sha1`` makes the table change when an image
    is replaced under the same name (the training fingerprint hashes the table), ``source``
    tells human rows (answered raw images have fold -1 too) from pseudo-labels."""
    human = read_table(human_csv)
    raw = read_table(raw_csv)
    tag2cls = read_tag2cls(tag2cls_json)
    pseudo = read_accepted(accepted_csvs)
    clash = sorted(set(pseudo["path"]) & set(human["path"]))
    if clash:
        raise DatasetError(f"pseudo-labels would relabel human-labelled images {clash[:5]}; this is a bug")
    twice = pseudo["path"][pseudo["path"].duplicated()].tolist()
    if twice:
        raise DatasetError(f"images {twice[:5]} were accepted in two rounds; this is a bug")
    sha1 = pseudo["path"].map(raw.set_index("path")["sha1"])
    if sha1.isna().any():
        raise DatasetError(f"pseudo-labelled images {pseudo['path'][sha1.isna()].tolist()[:5]} are not in {raw_csv}; this is a bug")
    first = int(human["group"].max()) + 1 if len(human) else 0  # no clean image is a copy of a pseudo-label
    pseudo_rows = pd.DataFrame(
        {
            "path": pseudo["path"], "tag": pseudo["tag"], "class": pseudo["tag"].map(tag2cls).astype("Int64"), "fold": -1,
            "sha1": sha1, "group": np.arange(first, first + len(pseudo), dtype=np.int64), "source": PSEUDO,
        }
    )  # fmt: skip
    human_rows = human[["path", "tag", "class", "fold", "sha1", "group"]].assign(
        source=human["source"] if "source" in human.columns else HUMAN
    )
    table = pd.concat([human_rows, pseudo_rows], ignore_index=True)
    for column in ("class", "fold", "group"):
        table[column] = table[column].astype(np.int64)
    write_csv_atomic(table, out_csv)
    log.info("round table: %d human + %d pseudo-labelled images", len(human), len(pseudo_rows))
    return table


@dataclass(frozen=True)
class RoundInputs:
    checkpoint: PathLike  # the round's final model
    dataset_csv: PathLike  # the round's training table (round_dataset)
    raw_csv: PathLike
    tag2cls_json: PathLike
    root: PathLike  # the autolabel root (clean/ and raw/ links)


@dataclass(frozen=True)
class RoundOutputs:
    status_json: PathLike
    accepted_csv: PathLike
    predictions_csv: PathLike
    counts_csv: PathLike
    metrics_json: PathLike


@dataclass
class RoundTables:
    """What a round reads: its table with each row's role (as the round's run trained: see
    :func:`labelflow.dataset.split_names`), the human rows, the candidates."""

    dataset: pd.DataFrame
    roles: np.ndarray  # train, valid (chose the checkpoint) or calibration
    classes: list[str]
    tag2cls: dict[str, int]
    human: pd.DataFrame
    candidates: pd.DataFrame
    human_counts: dict[str, int]

    @classmethod
    def read(cls, inputs: RoundInputs, valid_folds: Sequence[int], seed: int, share: float) -> RoundTables:
        dataset = read_dataset_csv(inputs.dataset_csv, inputs.root)
        tag2cls = read_tag2cls(inputs.tag2cls_json)
        classes = class_names(tag2cls)
        # by source, not fold: an answered raw image is a human row with fold -1
        human = dataset[dataset["source"] != PSEUDO]
        candidates = remaining_candidates(read_table(inputs.raw_csv), dataset)
        return cls(
            dataset=dataset,
            roles=split_names(dataset, valid_folds, seed, share),
            classes=classes,
            tag2cls=tag2cls,
            human=human,
            candidates=candidates,
            human_counts=human.groupby("tag").size().reindex(classes, fill_value=0).to_dict(),
        )

    @property
    def calibration_rows(self) -> np.ndarray:
        """The human rows the temperature is fitted on: those held out from checkpoint selection,
        or (calibration.holdout 0) the whole validation fold."""
        held = self.roles == "calibration"
        return held if held.any() else self.roles != "train"

    @property
    def is_human(self) -> np.ndarray:
        """The rows of ``human`` in the table (human-labelled, whatever their fold)."""
        return self.dataset.index.isin(self.human.index)

    def reference_rows(self, per_class: int, seed: int) -> np.ndarray:
        """The neighbour guard's references: the human training rows and, per class, up to
        ``per_class`` earlier pseudo-labels (a seeded sample, so a round's work does not grow
        with everything labelled before); never validation rows, so validation labels do not
        decide which pseudo-labels train next."""
        train = self.roles == "train"
        pseudo = np.flatnonzero(train & ~self.is_human)
        rng = np.random.default_rng(seed)
        keep = np.zeros(len(self.dataset), dtype=bool)
        keep[train & self.is_human] = True
        tags = self.dataset["tag"].to_numpy()[pseudo]
        for tag in np.unique(tags):
            rows = pseudo[tags == tag]
            keep[rng.permutation(rows)[:per_class]] = True
        return keep


def score_candidates(
    tables: RoundTables, inputs: RoundInputs, experiment: dict[str, Any], settings: RoundSettings,
    calibration_settings: CalibrationSettings, *, seed: int, batch_size: int, want_gpu: bool,
):
    """Predict the still-unlabelled candidates, the held-out human rows (calibration) and the
    neighbour guard's references, nothing else; calibrate on the held-out rows. Returns
    (scored candidates, calibration, guard report)."""
    from labelflow.calibration import calibrate, top_confidence
    from labelflow.device import select_device
    from labelflow.inference import predict
    from labelflow.loaders import eval_loader
    from labelflow.losses import get_loss
    from labelflow.models import load_model

    dataset, candidates = tables.dataset, tables.candidates
    held = tables.calibration_rows
    references = tables.reference_rows(settings.reference_per_class, seed) if settings.neighbours > 0 else held & False
    labelled = held | references  # the labelled rows this round needs predicted, in table order
    device = select_device(want_gpu)
    model = load_model(inputs.checkpoint)
    activation = get_loss(model.spec.heads[0].loss).activation
    paths = np.concatenate([dataset["path"].to_numpy()[labelled], candidates["path"].to_numpy()]).astype(str)
    outputs = predict(model, eval_loader(inputs.root, paths, experiment["data"], batch_size=batch_size, device=device), device)
    n = int(labelled.sum())
    logits = outputs["logits"].astype(np.float64)
    calibration = calibrate(
        logits[:n][held[labelled]], dataset["class"].to_numpy()[held], activation,
        min_temperature=calibration_settings.min_temperature, seed=seed,
        sharpen_min_errors=calibration_settings.sharpen_min_errors,
    )
    cand_logits = logits[n:]
    _, raw_conf = top_confidence(cand_logits, 1.0, activation)
    predicted, conf = top_confidence(cand_logits, calibration.temperature, activation)
    scored = pd.DataFrame(
        {"path": candidates["path"], "tag": [tables.classes[i] for i in predicted], "confidence": conf, "uncalibrated": raw_conf}
    )
    guard = {"references": int(references.sum())}
    if settings.neighbours > 0:
        embeddings = outputs["embeddings"]
        reference_embeddings = embeddings[:n][references[labelled]]
        scored["neighbours_agree"] = neighbours_agree(
            reference_embeddings, dataset["tag"].astype(str).to_numpy()[references],
            embeddings[n:], scored["tag"], settings.neighbours,
        )
        guard["index_recall"] = neighbour_recall(reference_embeddings, embeddings[n:], settings.neighbours, seed=seed)
    return scored, calibration, guard


def class_counts(tables: RoundTables, decided: pd.DataFrame) -> pd.DataFrame:
    """counts.csv: per class the human count, earlier pseudo-labels, and this round's decisions."""
    dataset = tables.dataset
    pseudo_before = dataset[~tables.is_human].groupby("tag").size()
    counts = pd.DataFrame({"tag": tables.classes})
    counts["human"] = counts["tag"].map(tables.human_counts).astype(int)
    counts["pseudo_before"] = counts["tag"].map(pseudo_before).fillna(0).astype(int)
    counts["predicted"] = counts["tag"].map(decided.groupby("tag").size()).fillna(0).astype(int)
    for decision, column in {ACCEPTED: "accepted", **REJECTIONS}.items():
        rows = decided[decided["decision"] == decision]
        counts[column] = counts["tag"].map(rows.groupby("tag").size()).fillna(0).astype(int)
    counts["rejected"] = counts[list(REJECTIONS.values())].sum(axis=1)
    return counts


def run_round(
    inputs: RoundInputs,
    outputs: RoundOutputs,
    settings: RoundSettings,
    calibration_settings: CalibrationSettings,
    *,
    experiment: dict[str, Any],
    valid_folds: Sequence[int],
    seed: int,
    round_: int,
    last_round: bool,
    batch_size: int = 256,
    want_gpu: bool = False,
) -> dict[str, Any]:
    """Predict the unlabelled raw images with the round's model, calibrate, select, report.

    The temperature is fitted on the human validation rows held out from the round model's
    checkpoint selection, not below ``calibration_settings.min_temperature`` unless those rows
    hold ``calibration_settings.sharpen_min_errors`` errors. With
    ``settings.neighbours`` > 0 a prediction also needs its nearest labelled training images
    (human training rows and earlier pseudo-labels, in the round model's embedding) to agree
    (:func:`~labelflow.autolabel.policy.neighbours_agree`).
    """
    tables = RoundTables.read(inputs, valid_folds, seed, calibration_settings.holdout)
    scored, calibration, guard = score_candidates(
        tables, inputs, experiment, settings, calibration_settings, seed=seed, batch_size=batch_size, want_gpu=want_gpu
    )
    decided = select_pseudo_labels(scored, tables.human_counts, settings, labelled=tables.dataset["path"])
    accepted = decided[decided["decision"] == ACCEPTED].sort_values("path")
    accepted_table = pd.DataFrame(
        {
            "path": accepted["path"],
            "tag": accepted["tag"],
            "class": accepted["tag"].map(tables.tag2cls),
            "confidence": accepted["confidence"],
            "round": round_,
        },
        columns=ACCEPTED_COLUMNS,
    )
    counts = class_counts(tables, decided)
    n_candidates = len(tables.candidates)
    status = round_status(round_, len(accepted_table), n_candidates - len(accepted_table), last_round)
    metrics = {**round_metrics(round_, tables, calibration, counts, accepted_table, settings), "neighbour_guard": guard}
    write_csv_atomic(decided.sort_values("path"), outputs.predictions_csv)
    write_csv_atomic(accepted_table, outputs.accepted_csv)
    write_csv_atomic(counts, outputs.counts_csv)
    write_json_atomic(metrics, outputs.metrics_json)
    write_json_atomic(status, outputs.status_json)
    log.info(
        "round %d: valid accuracy %.4f, T=%.3f, ECE %.4f -> %.4f; %d candidates, %d accepted, "
        "%d below min_confidence, %d with disagreeing neighbours, %d over the class cap",
        round_, calibration.accuracy, calibration.temperature, calibration.ece_before, calibration.ece_after,
        n_candidates, len(accepted_table), metrics["below_min_confidence"], metrics["neighbours_disagree"],
        metrics["over_cap"],
    )
    log.info("round %d: %s", round_, f"stop ({status['reason']})" if status["stop"] else "go on")
    return status


def round_metrics(round_, tables: RoundTables, calibration, counts, accepted_table, settings: RoundSettings) -> dict[str, Any]:
    """metrics.json of a round: data sizes, calibration, and how many of each decision."""
    dataset = tables.dataset
    return {
        "round": round_,
        "train_images": int((tables.roles == "train").sum()),
        "human": int(len(tables.human)),
        "pseudo_before": int(len(dataset) - len(tables.human)),
        "valid_images": int((tables.roles == "valid").sum()),
        "calibration_images": int(tables.calibration_rows.sum()),
        "valid_accuracy": calibration.accuracy,
        "calibration": calibration.to_dict(),
        "ece_bins": 15,
        "candidates": int(len(tables.candidates)),
        "accepted": int(len(accepted_table)),
        "rejected": int(counts["rejected"].sum()),
        **{column: int(counts[column].sum()) for column in REJECTIONS.values()},
        "min_confidence": settings.min_confidence,
        "class_min_confidence": dict(settings.class_min_confidence),
        "max_new_per_class": settings.max_new_per_class,
        "neighbours": settings.neighbours,
        "mean_accepted_confidence": float(accepted_table["confidence"].mean()) if len(accepted_table) else None,
    }
