"""Autolabel: grow a labelled set from a few human labels and a pile of unlabelled images.

The loop (driven by Snakemake checkpoints, see workflow/rules/autolabel.smk):

* :func:`prepare` scans the human-labelled ``clean`` folder (class sub-folders) and the
  unlabelled ``raw`` folder (any nesting) and builds one *autolabel root* holding two
  symlinks, ``clean -> <clean>`` and ``raw -> <raw>``. Every table names an image by its
  path relative to that root (``clean/<class>/x.png``, ``raw/a/b/x.png``): identity is the
  path, never the basename, and inputs are only read. Human rows get stratified folds;
  raw images byte-identical to a clean image take its label (source ``human-duplicate``).
* :func:`round_dataset` writes round r's training table: human rows plus the pseudo-labels
  accepted in rounds < r, the latter with fold -1 so they never enter validation.
* The round's model is trained with :func:`labelflow.pipeline.train_stage` (unchanged).
* :func:`run_round` predicts every still-unlabelled raw image, calibrates confidences by a
  temperature fitted on the (human) validation fold, applies :func:`select_pseudo_labels`
  and writes the round's status (stop or go on, and why).
* :func:`assemble` writes the final ``dataset.csv``/``unlabelled.csv``/``rounds.csv``;
  :func:`plot_progress`, :func:`evaluate` (with a truth table) and :func:`materialize`
  (a class-folder tree of symlinks or copies) report on it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labelflow.data import (
    DatasetError,
    atomic_directory,
    PathLike,
    file_sha1,
    inspect_image,
    walk_images,
    read_dataset_csv,
    read_json,
    read_tag2cls,
    split,
    tag2label,
    valid_mask,
    write_csv_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)

CLEAN, RAW = "clean", "raw"  # the two entries of the autolabel root
SOURCES = ("human", "human-duplicate", "pseudo")
STOP_REASONS = ("nothing left", "nothing accepted", "max_rounds reached")
ACCEPTED, BELOW_THRESHOLD, NEIGHBOURS_DISAGREE, OVER_CAP, ALREADY_LABELLED = (
    "accepted",
    "below threshold",
    "neighbours disagree",
    "over class cap",
    "already labelled",
)

RAW_COLUMNS = ["path", "sha1", "duplicate_of", "tag"]
ACCEPTED_COLUMNS = ["path", "tag", "class", "confidence", "round"]
DATASET_COLUMNS = ["path", "label", "source", "round", "confidence"]


# --------------------------------------------------------------------------- tables


def read_table(path: PathLike, text_columns: Sequence[str] = ("path", "tag", "label")) -> pd.DataFrame:
    """Read one of our CSVs: text columns stay text ("0", "NA" are real tags), empty = missing."""
    header = pd.read_csv(path, nrows=0).columns
    dtype = {c: str for c in header if c in set(text_columns) | {"sha1", "duplicate_of", "source", "predicted", "decision", "reason"}}
    return pd.read_csv(path, dtype=dtype, keep_default_na=False, na_values=[""])


def scan_raw(raw_dir: PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every readable image below ``raw_dir`` (recursively, symlinks followed once).

    Returns ``(images, skipped)``: ``path,sha1`` and ``path,reason`` with POSIX paths
    relative to ``raw_dir``. Hidden entries, non-images and unreadable files are skipped.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DatasetError(f"config key `autolabel.raw`: folder {raw_dir} does not exist")
    rel = lambda p: Path(os.path.relpath(p, raw_dir)).as_posix()  # noqa: E731
    skipped: list[tuple[str, str]] = []
    candidates = list(walk_images(str(raw_dir), rel, skipped))
    with ThreadPoolExecutor() as pool:  # decoding releases the GIL; order is kept
        checked = list(pool.map(inspect_image, candidates))
    rows = []
    for path, (reason, digest) in zip(candidates, checked, strict=True):
        if reason is None:
            rows.append((rel(path), digest))
        else:
            skipped.append((rel(path), reason))
    images = pd.DataFrame(sorted(rows), columns=["path", "sha1"])
    return images, pd.DataFrame(sorted(skipped), columns=["path", "reason"])


def _prefixed(paths: Iterable[str], prefix: str) -> list[str]:
    return [f"{prefix}/{p}" for p in paths]


def make_root(root_dir: PathLike, clean: PathLike, raw: PathLike) -> Path:
    """``root_dir/clean -> abs(clean)`` and ``root_dir/raw -> abs(raw)``; nothing is copied."""
    root = Path(root_dir)
    root.mkdir(parents=True, exist_ok=True)
    for name, target in ((CLEAN, clean), (RAW, raw)):
        link = root / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.abspath(target), link, target_is_directory=True)
    return root


def check_class_thresholds(class_thresholds: Mapping[str, float], classes: Iterable[str]) -> None:
    unknown = sorted(set(class_thresholds) - set(classes))
    if unknown:
        raise DatasetError(
            f"config key `autolabel.class_thresholds` names unknown class(es) {unknown}; "
            f"classes (clean sub-folders) are {sorted(classes)}"
        )


def prepare(
    *,
    clean: PathLike,
    raw: PathLike,
    root_dir: PathLike,
    human_csv: PathLike,
    labeling_json: PathLike,
    raw_csv: PathLike,
    skipped_csv: PathLike,
    n_folds: int,
    seed: int,
    class_thresholds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Scan clean and raw, build the autolabel root and the human/raw tables.

    * human.csv ``path,tag,class,fold``: clean images with stratified folds 0..n_folds-1;
    * raw.csv ``path,sha1,duplicate_of,tag``: readable raw images; ``tag`` is set (and
      ``duplicate_of`` names the clean image) when the bytes equal a clean image's. When
      identical clean images carry different tags the raw image stays unlabelled (tag
      empty) and ``duplicate_of`` lists them all;
    * skipped.csv ``path,reason`` for clean and raw files that are not usable images.
    """
    for key, folder in (("clean", clean), ("raw", raw)):
        if not Path(folder).is_dir():
            raise DatasetError(f"config key `autolabel.{key}`: folder {folder} does not exist")
    try:
        labelled = tag2label(clean)
    except DatasetError as err:
        raise DatasetError(f"config key `autolabel.clean`: {err}") from None
    check_class_thresholds(class_thresholds or {}, labelled.tag2cls)
    human = labelled.dataset.copy()
    clean_digests = [file_sha1(Path(clean) / p) for p in human["path"]]
    human["path"] = human_paths = _prefixed(human["path"], CLEAN)
    human = split(human, labelled.tag2cls, n_folds, seed)

    images, raw_skipped = scan_raw(raw)
    by_digest: dict[str, list[tuple[str, str]]] = {}
    digest_of = dict(zip(human_paths, clean_digests))  # split() re-sorts the rows
    for path, tag in zip(human["path"], human["tag"]):
        by_digest.setdefault(digest_of[path], []).append((path, tag))
    duplicate_of, tags = [], []
    for digest in images["sha1"]:
        matches = by_digest.get(digest, [])
        duplicate_of.append(";".join(p for p, _ in matches))
        match_tags = {t for _, t in matches}
        tags.append(match_tags.pop() if len(match_tags) == 1 else "")
    raw_table = pd.DataFrame(
        {"path": _prefixed(images["path"], RAW), "sha1": images["sha1"], "duplicate_of": duplicate_of, "tag": tags},
        columns=RAW_COLUMNS,
    )
    skipped = pd.concat(
        [
            labelled.skipped.assign(path=_prefixed(labelled.skipped["path"], CLEAN)),
            raw_skipped.assign(path=_prefixed(raw_skipped["path"], RAW)),
        ],
        ignore_index=True,
    )

    make_root(root_dir, clean, raw)
    write_csv_atomic(human, human_csv)
    write_json_atomic(labelled.tag2cls, labeling_json)
    write_csv_atomic(raw_table, raw_csv)
    write_csv_atomic(skipped, skipped_csv)
    n_dup = int((raw_table["tag"].fillna("") != "").sum())
    summary = {
        "human": len(human),
        "classes": len(labelled.tag2cls),
        "raw": len(raw_table),
        "human_duplicates": n_dup,
        "skipped": len(skipped),
    }
    log.info(
        "%d human-labelled images in %d classes; %d raw images (%d byte-identical to a clean image); %d skipped",
        summary["human"], summary["classes"], summary["raw"], n_dup, summary["skipped"],
    )
    for row in skipped.itertuples():
        log.warning("skipped %s: %s", row.path, row.reason)
    return summary


# --------------------------------------------------------------------------- rounds


def round_recipe(experiment: Mapping[str, Any]) -> dict[str, Any]:
    """The experiment as it trains an autolabel round: no top-k checkpoint copies. A round's
    model is used once, through best.pt; the copies would add ~230 MB per round of a 10-round
    digits run and nothing reads them. The experiment itself is not changed."""
    stages = {stage: {**spec, "top_k": 0} for stage, spec in experiment["stages"].items()}
    return {**experiment, "stages": stages}


def round_dataset(
    *, human_csv: PathLike, accepted_csvs: Sequence[PathLike], labeling_json: PathLike, out_csv: PathLike
) -> pd.DataFrame:
    """Round r's training table ``path,tag,class,fold``: human rows (their folds) and the
    pseudo-labels accepted in earlier rounds (fold -1: never validation)."""
    human = read_table(human_csv)
    tag2cls = read_tag2cls(labeling_json)
    pseudo = [read_table(p) for p in accepted_csvs]
    pseudo = pd.concat(pseudo, ignore_index=True) if pseudo else pd.DataFrame(columns=ACCEPTED_COLUMNS)
    clash = sorted(set(pseudo["path"]) & set(human["path"]))
    if clash:
        raise DatasetError(f"pseudo-labels would relabel human-labelled images {clash[:5]}; this is a bug")
    twice = pseudo["path"][pseudo["path"].duplicated()].tolist()
    if twice:
        raise DatasetError(f"images {twice[:5]} were accepted in two rounds; this is a bug")
    pseudo_rows = pd.DataFrame(
        {
            "path": pseudo["path"],
            "tag": pseudo["tag"],
            "class": pseudo["tag"].map(tag2cls).astype("Int64"),
            "fold": -1,
        }
    )
    table = pd.concat([human[["path", "tag", "class", "fold"]], pseudo_rows], ignore_index=True)
    table["class"] = table["class"].astype(np.int64)
    table["fold"] = table["fold"].astype(np.int64)
    write_csv_atomic(table, out_csv)
    log.info("round table: %d human + %d pseudo-labelled images", len(human), len(pseudo_rows))
    return table


def remaining_candidates(raw: pd.DataFrame, dataset: pd.DataFrame) -> pd.DataFrame:
    """Raw images still to label: not a human duplicate and not in the round's table."""
    has_human_label = raw["tag"].fillna("").astype(str) != ""
    taken = raw["path"].isin(set(dataset["path"]))
    return raw.loc[~has_human_label & ~taken, ["path"]].reset_index(drop=True)


def neighbours_agree(
    labelled_embeddings: np.ndarray,
    labelled_tags: Sequence[str],
    candidate_embeddings: np.ndarray,
    predicted_tags: Sequence[str],
    k: int,
) -> np.ndarray:
    """Whether each candidate's nearest labelled images (cosine, in the round model's embedding
    space) all carry its predicted class: the ``min(k, n_c)`` nearest, where ``n_c`` is the
    number of labelled images of the predicted class, so a small class is not asked for more
    neighbours than it has. A second, non-parametric opinion next to the classifier head:
    a confident head whose neighbourhood says otherwise is extrapolating."""
    from sklearn.neighbors import NearestNeighbors

    labelled_tags = np.asarray(labelled_tags, dtype=object)
    predicted_tags = np.asarray(predicted_tags, dtype=object)
    if len(candidate_embeddings) == 0:
        return np.zeros(0, dtype=bool)
    if k < 1 or len(labelled_tags) == 0:
        raise ValueError(f"neighbours_agree needs k >= 1 and labelled images (k={k}, {len(labelled_tags)} labelled)")
    tags, class_counts = np.unique(labelled_tags, return_counts=True)
    per_class = dict(zip(tags, class_counts))
    needed = np.array([min(k, per_class.get(t, 0)) for t in predicted_tags])
    # exact search: a round has a few thousand labelled images at most, and a guard should not
    # depend on an approximate index's recall (labelflow.index's HNSW serves the big search index)
    index = NearestNeighbors(n_neighbors=min(k, len(labelled_tags)), metric="cosine", algorithm="brute")
    _, nearest = index.fit(labelled_embeddings).kneighbors(candidate_embeddings)
    same = labelled_tags[nearest] == predicted_tags[:, None]
    # all of the first `needed` neighbours share the class (a class nobody labelled: never)
    leading = np.cumprod(same, axis=1).sum(axis=1)
    return (needed > 0) & (leading >= needed)


def select_pseudo_labels(
    candidates: pd.DataFrame,
    human_counts: Mapping[str, int],
    threshold: float = 0.9,
    class_thresholds: Mapping[str, float] | None = None,
    max_new_per_class: float | None = 1.0,
    labelled: Iterable[str] = (),
) -> pd.DataFrame:
    """Decide which predictions become pseudo-labels.

    ``candidates`` has ``path,tag,confidence`` (tag = predicted class, confidence =
    calibrated) and optionally ``neighbours_agree`` (see :func:`neighbours_agree`). A row is
    accepted when its confidence reaches its class's threshold (``class_thresholds[tag]`` or
    ``threshold``), its neighbours agree (when given), and its class has not yet gained
    ``floor(max_new_per_class * human_counts[tag])`` pseudo-labels in this round (the most
    confident win; ties go to the smaller path). Paths in ``labelled`` (human rows, human
    duplicates, earlier pseudo-labels) are never accepted: a label is never replaced.

    Returns the candidates with ``threshold`` and ``decision`` (accepted, below threshold,
    neighbours disagree, over class cap, already labelled) columns, in the input order.
    """
    class_thresholds = dict(class_thresholds or {})
    check_class_thresholds(class_thresholds, human_counts)
    unknown = sorted(set(candidates["tag"]) - set(human_counts))
    if unknown:
        raise DatasetError(f"predicted classes {unknown} have no human count; this is a bug")
    twice = candidates["path"][candidates["path"].duplicated()].tolist()
    if twice:
        raise DatasetError(f"candidate images {twice[:5]} are listed twice; this is a bug")
    out = candidates.copy().reset_index(drop=True)
    out["threshold"] = [float(class_thresholds.get(t, threshold)) for t in out["tag"]]
    confidence = out["confidence"].to_numpy(dtype=np.float64)
    decision = np.where(confidence >= out["threshold"].to_numpy(), ACCEPTED, BELOW_THRESHOLD).astype(object)
    if "neighbours_agree" in out:
        disagree = ~out["neighbours_agree"].to_numpy(dtype=bool)
        decision[(decision == ACCEPTED) & disagree] = NEIGHBOURS_DISAGREE
    decision[out["path"].isin(set(labelled)).to_numpy()] = ALREADY_LABELLED
    if max_new_per_class is not None:
        accepted = out[decision == ACCEPTED]
        for tag, group in accepted.groupby("tag", sort=True):
            cap = math.floor(max_new_per_class * human_counts[tag] + 1e-9)
            ranked = group.sort_values(["confidence", "path"], ascending=[False, True], kind="stable")
            decision[ranked.index[cap:].to_numpy()] = OVER_CAP
    out["decision"] = decision
    return out


def round_status(round_: int, accepted: int, remaining: int, last_round: bool) -> dict[str, Any]:
    """Whether the loop stops after this round, and why (the first reason that holds)."""
    reason = None
    if remaining == 0:
        reason = "nothing left"
    elif accepted == 0:
        reason = "nothing accepted"
    elif last_round:
        reason = "max_rounds reached"
    return {"round": round_, "accepted": accepted, "remaining": remaining, "stop": reason is not None, "reason": reason}


def run_round(
    *,
    checkpoint: PathLike,
    dataset_csv: PathLike,
    raw_csv: PathLike,
    labeling_json: PathLike,
    root: PathLike,
    experiment: dict[str, Any],
    valid_folds: Sequence[int],
    round_: int,
    threshold: float,
    class_thresholds: Mapping[str, float],
    max_new_per_class: float | None,
    last_round: bool,
    status_json: PathLike,
    accepted_csv: PathLike,
    predictions_csv: PathLike,
    counts_csv: PathLike,
    metrics_json: PathLike,
    batch_size: int = 256,
    want_gpu: bool = False,
    min_temperature: float = 1.0,
    neighbours: int = 10,
) -> dict[str, Any]:
    """Predict the unlabelled raw images with the round's model, calibrate, select, report.

    The temperature is fitted on the round's human validation fold, not below ``min_temperature``.
    With ``neighbours`` > 0 a prediction also needs its nearest labelled images (human and
    earlier pseudo-labels, in the round model's embedding) to agree (:func:`neighbours_agree`).
    """
    # heavy imports (torch) only where a model runs
    from labelflow.calibration import calibrate, top_confidence
    from labelflow.inference import predict
    from labelflow.loaders import eval_loader
    from labelflow.losses import get_loss
    from labelflow.models import load_model
    from labelflow.training import select_device

    dataset = read_dataset_csv(dataset_csv, root)
    raw = read_table(raw_csv)
    tag2cls = read_tag2cls(labeling_json)
    classes = sorted(tag2cls, key=tag2cls.get)
    human = dataset[dataset["fold"] >= 0]
    valid = human[valid_mask(human, list(valid_folds))]
    candidates = remaining_candidates(raw, dataset)
    human_counts = human.groupby("tag").size().reindex(classes, fill_value=0).to_dict()

    device = select_device(want_gpu)
    model = load_model(checkpoint)
    activation = get_loss(model.spec.heads[0].loss).activation
    data_cfg = experiment["data"]
    # every labelled image (for the neighbours; valid rows among them) and every candidate
    paths = np.concatenate([dataset["path"].to_numpy(), candidates["path"].to_numpy()]).astype(str)
    loader = eval_loader(root, paths, data_cfg, batch_size=batch_size, device=device)
    outputs = predict(model, loader, device)
    logits = outputs["logits"].astype(np.float64)
    valid_logits, cand_logits = logits[dataset.index.get_indexer(valid.index)], logits[len(dataset):]

    calibration = calibrate(valid_logits, valid["class"].to_numpy(), activation, min_temperature=min_temperature)
    _, raw_conf = top_confidence(cand_logits, 1.0, activation)
    predicted, conf = top_confidence(cand_logits, calibration.temperature, activation)
    scored = pd.DataFrame(
        {"path": candidates["path"], "tag": [classes[i] for i in predicted], "confidence": conf, "uncalibrated": raw_conf}
    )
    if neighbours > 0:
        embeddings = outputs["embeddings"]
        scored["neighbours_agree"] = neighbours_agree(
            embeddings[: len(dataset)], dataset["tag"].astype(str).to_numpy(), embeddings[len(dataset):], scored["tag"], neighbours
        )
    decided = select_pseudo_labels(
        scored, human_counts, threshold, class_thresholds, max_new_per_class, labelled=dataset["path"]
    )
    accepted = decided[decided["decision"] == ACCEPTED].sort_values("path")
    accepted_table = pd.DataFrame(
        {
            "path": accepted["path"],
            "tag": accepted["tag"],
            "class": accepted["tag"].map(tag2cls),
            "confidence": accepted["confidence"],
            "round": round_,
        },
        columns=ACCEPTED_COLUMNS,
    )
    pseudo_before = dataset[dataset["fold"] < 0].groupby("tag").size()
    counts = pd.DataFrame({"tag": classes})
    counts["human"] = counts["tag"].map(human_counts).astype(int)
    counts["pseudo_before"] = counts["tag"].map(pseudo_before).fillna(0).astype(int)
    for name, decision in (
        ("predicted", None),
        ("accepted", ACCEPTED),
        ("below_threshold", BELOW_THRESHOLD),
        ("neighbours_disagree", NEIGHBOURS_DISAGREE),
        ("over_cap", OVER_CAP),
    ):
        rows = decided if decision is None else decided[decided["decision"] == decision]
        counts[name] = counts["tag"].map(rows.groupby("tag").size()).fillna(0).astype(int)
    counts["rejected"] = counts["below_threshold"] + counts["neighbours_disagree"] + counts["over_cap"]

    status = round_status(round_, len(accepted_table), len(candidates) - len(accepted_table), last_round)
    metrics = {
        "round": round_,
        "train_images": int((~dataset.index.isin(valid.index)).sum()),
        "human": int(len(human)),
        "pseudo_before": int(len(dataset) - len(human)),
        "valid_images": int(len(valid)),
        "valid_accuracy": calibration.accuracy,
        "calibration": calibration.to_dict(),
        "ece_bins": 15,
        "candidates": int(len(candidates)),
        "accepted": int(len(accepted_table)),
        "rejected": int(counts["rejected"].sum()),
        "below_threshold": int(counts["below_threshold"].sum()),
        "neighbours_disagree": int(counts["neighbours_disagree"].sum()),
        "over_cap": int(counts["over_cap"].sum()),
        "threshold": threshold,
        "class_thresholds": dict(class_thresholds),
        "max_new_per_class": max_new_per_class,
        "neighbours": neighbours,
        "mean_accepted_confidence": float(accepted_table["confidence"].mean()) if len(accepted_table) else None,
    }
    write_csv_atomic(decided.sort_values("path"), predictions_csv)
    write_csv_atomic(accepted_table, accepted_csv)
    write_csv_atomic(counts, counts_csv)
    write_json_atomic(metrics, metrics_json)
    write_json_atomic(status, status_json)
    log.info(
        "round %d: valid accuracy %.4f, T=%.3f, ECE %.4f -> %.4f; %d candidates, %d accepted, "
        "%d below threshold, %d with disagreeing neighbours, %d over the class cap",
        round_, calibration.accuracy, calibration.temperature, calibration.ece_before, calibration.ece_after,
        len(candidates), len(accepted_table), metrics["below_threshold"], metrics["neighbours_disagree"],
        metrics["over_cap"],
    )
    log.info("round %d: %s", round_, f"stop ({status['reason']})" if status["stop"] else "go on")
    return status


# --------------------------------------------------------------------------- final outputs


def assemble(
    *,
    human_csv: PathLike,
    raw_csv: PathLike,
    accepted_csvs: Sequence[PathLike],
    status_jsons: Sequence[PathLike],
    metrics_jsons: Sequence[PathLike],
    predictions_csv: PathLike,
    dataset_csv: PathLike,
    unlabelled_csv: PathLike,
    rounds_csv: PathLike,
) -> pd.DataFrame:
    """The labelled set after the last round.

    dataset.csv ``path,label,source,round,confidence`` (one row per usable clean and raw
    image; human rows have round 0 and confidence 1); unlabelled.csv lists the raw images
    never accepted (empty label, with the last round's prediction and calibrated
    confidence for review); rounds.csv has one row per round.
    """
    human = read_table(human_csv)
    raw = read_table(raw_csv)
    raw["tag"] = raw["tag"].fillna("")
    pseudo = [read_table(p) for p in accepted_csvs]
    pseudo = pd.concat(pseudo, ignore_index=True) if pseudo else pd.DataFrame(columns=ACCEPTED_COLUMNS)
    dup = raw[raw["tag"] != ""]
    parts = [
        pd.DataFrame({"path": human["path"], "label": human["tag"], "source": "human", "round": 0, "confidence": 1.0}),
        pd.DataFrame({"path": dup["path"], "label": dup["tag"], "source": "human-duplicate", "round": 0, "confidence": 1.0}),
        pd.DataFrame(
            {"path": pseudo["path"], "label": pseudo["tag"], "source": "pseudo", "round": pseudo["round"], "confidence": pseudo["confidence"]}
        ),
    ]
    table = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else pd.DataFrame(columns=DATASET_COLUMNS)
    table = table[DATASET_COLUMNS].sort_values("path", kind="stable").reset_index(drop=True)
    table["round"] = table["round"].astype(np.int64)
    if table["path"].duplicated().any():
        raise DatasetError(f"images labelled twice: {table['path'][table['path'].duplicated()].tolist()[:5]}; this is a bug")

    last = read_table(predictions_csv)
    left = raw[~raw["path"].isin(set(table["path"]))][["path"]]
    unlabelled = left.merge(
        last[["path", "tag", "confidence"]].rename(columns={"tag": "predicted"}), on="path", how="left"
    )
    unlabelled.insert(1, "label", "")

    statuses = [read_json(p) for p in status_jsons]
    metrics = [read_json(p) for p in metrics_jsons]
    n_raw = len(raw)
    n_dup = len(dup)
    cumulative = n_dup
    rows = []
    for status, m in zip(statuses, metrics, strict=True):
        cumulative += status["accepted"]
        cal = m["calibration"]
        rows.append(
            {
                "round": status["round"],
                "candidates": m["candidates"],
                "accepted": status["accepted"],
                "below_threshold": m["below_threshold"],
                "neighbours_disagree": m["neighbours_disagree"],
                "over_cap": m["over_cap"],
                "remaining": status["remaining"],
                "labelled_raw": cumulative,
                "coverage": cumulative / n_raw if n_raw else float("nan"),
                "valid_accuracy": m["valid_accuracy"],
                "temperature": cal["temperature"],
                "ece_before": cal["ece_before"],
                "ece_after": cal["ece_after"],
                "stop": status["stop"],
                "reason": status["reason"] or "",
            }
        )
    rounds = pd.DataFrame(rows)
    write_csv_atomic(table, dataset_csv)
    write_csv_atomic(unlabelled, unlabelled_csv)
    write_csv_atomic(rounds, rounds_csv)
    if statuses:
        log.info(
            "%d rounds, stopped: %s; %d labelled images (%d pseudo), %d raw images left unlabelled",
            len(statuses), statuses[-1]["reason"], len(table), len(pseudo), len(unlabelled),
        )
    return table


def plot_progress(*, rounds_csv: PathLike, out_png: PathLike) -> None:
    """Accepted per round, cumulative coverage of the raw pile, validation accuracy per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labelflow.reports import save_figure

    rounds = pd.read_csv(rounds_csv)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = rounds["round"]
    axes[0].bar(x, rounds["accepted"], color="tab:blue")
    axes[0].set(title="pseudo-labels accepted", xlabel="round", ylabel="images")
    axes[1].plot(x, 100 * rounds["coverage"], marker="o", color="tab:green")
    axes[1].set(title="raw pile labelled (cumulative)", xlabel="round", ylabel="coverage %", ylim=(0, 105))
    axes[2].plot(x, 100 * rounds["valid_accuracy"], marker="o", color="tab:red", label="valid accuracy")
    axes[2].set(title="validation (human labels only)", xlabel="round", ylabel="%")
    ece = axes[2].twinx()
    ece.plot(x, rounds["ece_after"], marker="x", ls="--", color="tab:gray", label="ECE (calibrated)")
    ece.set_ylabel("ECE")
    for ax in axes:
        ax.set_xticks(list(x))
    last = rounds.iloc[-1] if len(rounds) else None
    if last is not None:
        fig.suptitle(f"autolabel: {len(rounds)} round(s), stopped because {last['reason'] or '-'}")
    fig.tight_layout()
    save_figure(fig, out_png)


def read_truth(truth_csv: PathLike) -> pd.DataFrame:
    """``path,label`` with paths relative to the raw folder → paths under the autolabel root."""
    try:
        truth = read_table(truth_csv)
    except FileNotFoundError:
        raise DatasetError(f"config key `autolabel.truth_csv`: file {truth_csv} does not exist") from None
    missing = [c for c in ("path", "label") if c not in truth.columns]
    if missing:
        raise DatasetError(
            f"config key `autolabel.truth_csv`: {truth_csv} lacks column(s) {missing}; "
            "give path,label with paths relative to the raw folder"
        )
    truth = truth[["path", "label"]].dropna()
    truth["path"] = [f"{RAW}/{Path(p).as_posix().removeprefix('./')}" for p in truth["path"]]
    if truth["path"].duplicated().any():
        raise DatasetError(f"config key `autolabel.truth_csv`: {truth_csv} lists an image twice")
    return truth


def evaluate(
    *, dataset_csv: PathLike, raw_csv: PathLike, rounds_csv: PathLike, truth_csv: PathLike, out_json: PathLike
) -> dict[str, Any]:
    """Precision and coverage of the labels given to the raw pile, after every round.

    Only raw images that the truth table knows are counted. ``precision`` is the share of
    pseudo-labels (accepted up to that round) that match the truth, ``coverage`` the share
    of raw images that have a label (pseudo-labels and human duplicates);
    ``new_precision`` is the precision of that round's pseudo-labels alone.
    """
    labelled = read_table(dataset_csv)
    raw = read_table(raw_csv)
    rounds = pd.read_csv(rounds_csv)
    truth = read_truth(truth_csv)
    known = truth[truth["path"].isin(set(raw["path"]))]
    table = known.merge(labelled[["path", "label", "source", "round"]], on="path", how="left", suffixes=("_true", ""))
    table["correct"] = table["label"] == table["label_true"]
    per_round = []
    for r in rounds["round"]:
        upto = table[table["label"].notna() & (table["round"] <= r)]
        pseudo = upto[upto["source"] == "pseudo"]
        new = pseudo[pseudo["round"] == r]
        per_round.append(
            {
                "round": int(r),
                "labelled": int(len(upto)),
                "pseudo": int(len(pseudo)),
                "precision": float(pseudo["correct"].mean()) if len(pseudo) else None,
                "precision_all": float(upto["correct"].mean()) if len(upto) else None,
                "coverage": float(len(upto) / len(known)) if len(known) else None,
                "new": int(len(new)),
                "new_precision": float(new["correct"].mean()) if len(new) else None,
            }
        )
    result = {
        "raw_images": int(len(raw)),
        "with_truth": int(len(known)),
        "truth_not_in_raw": int(len(truth) - len(known)),
        "rounds": per_round,
        "final": per_round[-1] if per_round else None,
    }
    write_json_atomic(result, out_json)
    for row in per_round:
        log.info(
            "round %d: precision %s, coverage %s (%d pseudo-labels)",
            row["round"], _pct(row["precision"]), _pct(row["coverage"]), row["pseudo"],
        )
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def materialize(*, dataset_csv: PathLike, root: PathLike, out_dir: PathLike, mode: str = "symlink") -> int:
    """Write the labelled set as ``out_dir/<label>/<path>`` (symlinks to the inputs, or copies).

    ``<path>`` keeps the image's path under the autolabel root (``clean/...`` or
    ``raw/...``), so two files with the same basename never collide. Built in a temporary
    sibling folder and renamed into place. Returns the number of files.
    """
    if mode not in ("symlink", "copy"):
        raise DatasetError(f"config key `autolabel.materialize` must be symlink or copy, got {mode!r}")
    table = read_table(dataset_csv)
    with atomic_directory(out_dir) as tmp:
        for path, label in zip(table["path"], table["label"]):
            source = os.path.realpath(Path(root) / path)
            target = tmp / label / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if mode == "symlink":
                os.symlink(source, target)
            else:
                shutil.copy2(source, target)
    log.info("materialised %d labelled images as %ss under %s", len(table), mode, out_dir)
    return len(table)
