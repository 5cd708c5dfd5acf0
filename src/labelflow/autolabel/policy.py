"""Autolabel's acceptance policy: which predictions of a round become pseudo-labels.

Pure functions of tables and arrays (no model, no files), so the decision can be tested on its
own. :class:`RoundSettings` holds every knob of config section ``autolabel`` that decides a
round; a knob is added in the schema and here, and read where it is used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from labelflow.io import DatasetError

ACCEPTED = "accepted"
BELOW_MIN_CONFIDENCE = "below min_confidence"
NEIGHBOURS_DISAGREE = "neighbours disagree"
OVER_CAP = "over class cap"
ALREADY_LABELLED = "already labelled"
REJECTIONS = {  # decision -> column of counts.csv / rounds.csv
    BELOW_MIN_CONFIDENCE: "below_min_confidence",
    NEIGHBOURS_DISAGREE: "neighbours_disagree",
    OVER_CAP: "over_cap",
}

NOTHING_LEFT, NOTHING_ACCEPTED, MAX_ROUNDS = "nothing left", "nothing accepted", "max_rounds reached"


@dataclass(frozen=True)
class RoundSettings:
    """Config section ``autolabel`` as a round uses it (defaults: config/schemas/config.schema.yaml)."""

    min_confidence: float  # calibrated confidence a pseudo-label needs
    max_new_per_class: float | None  # class-balance cap per round, times the class's human count
    neighbours: int  # nearest labelled images that must share the class (0: off)
    reference_per_class: int  # earlier pseudo-labels per class the guard compares with (sampled)
    class_min_confidence: Mapping[str, float] = field(default_factory=dict)  # per-class overrides

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> RoundSettings:
        return cls(**cls.keys_of(section))

    @classmethod
    def keys_of(cls, section: Mapping[str, Any]) -> dict[str, Any]:
        """The keys of config section ``autolabel`` that decide a round: a rule passes only these,
        so that changing another key (``max_rounds``, ``truth_csv``) does not redo the rounds."""
        return {name: section[name] for name in cls.__dataclass_fields__}


def check_class_min_confidence(class_min_confidence: Mapping[str, float], classes: Iterable[str]) -> None:
    classes = list(classes)
    unknown = sorted(set(class_min_confidence) - set(classes))
    if unknown:
        raise DatasetError(
            f"config key `autolabel.class_min_confidence` names unknown class(es) {unknown}; "
            f"classes (clean sub-folders) are {sorted(classes)}"
        )


def remaining_candidates(raw: pd.DataFrame, dataset: pd.DataFrame) -> pd.DataFrame:
    """Raw images still to label: not a human duplicate, not a copy of clean images at all, and
    not in the round's table.

    A raw image whose clean copies disagree (empty ``tag``, non-empty ``duplicate_of``) stays
    unlabelled (unlabelled.csv, the review queue): as a pseudo-label it would train while its
    clean copies validate."""
    has_human_label = raw["tag"].fillna("").astype(str) != ""
    copies_clean = raw["duplicate_of"].fillna("").astype(str) != ""
    taken = raw["path"].isin(set(dataset["path"]))
    return raw.loc[~has_human_label & ~copies_clean & ~taken, ["path"]].reset_index(drop=True)


def nearest_references(references: np.ndarray, queries: np.ndarray, k: int, exact: bool = False) -> np.ndarray:
    """Row numbers (n_queries, min(k, n_refs)) of each query's nearest references by cosine,
    nearest first: an HNSW index (labelflow.index, built and queried in about n log n, so a
    round's guard stays near-linear as the pile grows), or with ``exact`` brute force."""
    from labelflow.index import build_index, query_index

    k = min(k, len(references))
    if exact:
        from sklearn.neighbors import NearestNeighbors

        return NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(references).kneighbors(queries)[1]
    index = build_index(references, space="cosine", ef=max(64, 2 * k))
    return query_index(index, queries, k)[0]


def neighbour_recall(references: np.ndarray, queries: np.ndarray, k: int, sample: int = 1000, seed: int = 0) -> float:
    """recall@k of :func:`nearest_references` against exact search on up to ``sample`` queries."""
    if len(queries) == 0 or len(references) == 0:
        return float("nan")
    rows = np.random.default_rng(seed).permutation(len(queries))[:sample]
    approximate = nearest_references(references, queries[rows], k)
    exact = nearest_references(references, queries[rows], k, exact=True)
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approximate, exact)]))


def neighbours_agree(
    labelled_embeddings: np.ndarray,
    labelled_tags: Sequence[str],
    candidate_embeddings: np.ndarray,
    predicted_tags: Sequence[str],
    k: int,
    exact: bool = False,
) -> np.ndarray:
    """Whether each candidate's nearest labelled images (cosine, in the round model's embedding
    space) all carry its predicted class: the ``min(k, n_c)`` nearest, where ``n_c`` is the
    number of labelled images of the predicted class, so a small class is not asked for more
    neighbours than it has. A second, non-parametric opinion next to the classifier head:
    a confident head whose neighbourhood says otherwise is extrapolating. Approximate (HNSW) by
    default; :func:`neighbour_recall` measures how close to exact search it is."""
    labelled_tags = np.asarray(labelled_tags, dtype=object)
    predicted_tags = np.asarray(predicted_tags, dtype=object)
    if len(candidate_embeddings) == 0:
        return np.zeros(0, dtype=bool)
    if k < 1 or len(labelled_tags) == 0:
        raise ValueError(f"neighbours_agree needs k >= 1 and labelled images (k={k}, {len(labelled_tags)} labelled)")
    tags, class_counts = np.unique(labelled_tags, return_counts=True)
    per_class = dict(zip(tags, class_counts))
    needed = np.array([min(k, per_class.get(t, 0)) for t in predicted_tags])
    nearest = nearest_references(labelled_embeddings, candidate_embeddings, k, exact)
    same = labelled_tags[nearest] == predicted_tags[:, None]
    # all of the first `needed` neighbours share the class (a class nobody labelled: never)
    leading = np.cumprod(same, axis=1).sum(axis=1)
    return (needed > 0) & (leading >= needed)


def select_pseudo_labels(
    candidates: pd.DataFrame,
    human_counts: Mapping[str, int],
    settings: RoundSettings,
    labelled: Iterable[str] = (),
) -> pd.DataFrame:
    """Decide which predictions become pseudo-labels.

    ``candidates`` has ``path,tag,confidence`` (tag = predicted class, confidence =
    calibrated) and optionally ``neighbours_agree`` (see :func:`neighbours_agree`). A row is
    accepted when its confidence reaches its class's minimum (``class_min_confidence[tag]`` or
    ``min_confidence``), its neighbours agree (when given), and its class has not yet gained
    ``floor(max_new_per_class * human_counts[tag])`` pseudo-labels in this round (the most
    confident win; ties go to the smaller path). Paths in ``labelled`` (human rows, human
    duplicates, earlier pseudo-labels) are never accepted: a label is never replaced.

    Returns the candidates with ``min_confidence`` and ``decision`` (accepted, below
    min_confidence, neighbours disagree, over class cap, already labelled) columns, in the
    input order.
    """
    per_class = dict(settings.class_min_confidence)
    check_class_min_confidence(per_class, human_counts)
    unknown = sorted(set(candidates["tag"]) - set(human_counts))
    if unknown:
        raise DatasetError(f"predicted classes {unknown} have no human count; this is a bug")
    twice = candidates["path"][candidates["path"].duplicated()].tolist()
    if twice:
        raise DatasetError(f"candidate images {twice[:5]} are listed twice; this is a bug")
    out = candidates.copy().reset_index(drop=True)
    out["min_confidence"] = [float(per_class.get(t, settings.min_confidence)) for t in out["tag"]]
    confidence = out["confidence"].to_numpy(dtype=np.float64)
    decision = np.where(confidence >= out["min_confidence"].to_numpy(), ACCEPTED, BELOW_MIN_CONFIDENCE).astype(object)
    if "neighbours_agree" in out:
        disagree = ~out["neighbours_agree"].to_numpy(dtype=bool)
        decision[(decision == ACCEPTED) & disagree] = NEIGHBOURS_DISAGREE
    decision[out["path"].isin(set(labelled)).to_numpy()] = ALREADY_LABELLED
    if settings.max_new_per_class is not None:
        accepted = out[decision == ACCEPTED]
        for tag, group in accepted.groupby("tag", sort=True):
            cap = math.floor(settings.max_new_per_class * human_counts[tag] + 1e-9)
            ranked = group.sort_values(["confidence", "path"], ascending=[False, True], kind="stable")
            decision[ranked.index[cap:].to_numpy()] = OVER_CAP
    out["decision"] = decision
    return out


def round_status(round_: int, accepted: int, remaining: int, last_round: bool) -> dict[str, Any]:
    """Whether the loop stops after this round, and why (the first reason that holds)."""
    reason = None
    if remaining == 0:
        reason = NOTHING_LEFT
    elif accepted == 0:
        reason = NOTHING_ACCEPTED
    elif last_round:
        reason = MAX_ROUNDS
    return {"round": round_, "accepted": accepted, "remaining": remaining, "stop": reason is not None, "reason": reason}
