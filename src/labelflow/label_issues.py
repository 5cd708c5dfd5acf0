"""Find likely label mistakes from out-of-fold probabilities (confident learning) and embedding neighbours.

Inputs, produced upstream by the workflow: ``probs`` (N x C softmax, each row from a model that
never trained on that image), ``labels`` (N given class indices) and, optionally,
``neighbour_labels`` (N x k given classes of each image's k nearest other images, nearest first;
-1 pads a row the index could not fill). :func:`find_label_issues` does, all vectorised:

1. **Fuse** the classifier with the neighbours: posterior ``q_j ~ p_j * (n_j + 1) ** neighbour_weight``
   where n_j counts neighbours of class j (:func:`fuse_neighbours`). Neighbours settle close calls;
   a unanimous neighbourhood moves the odds by at most (k + 1), so it cannot overturn a confident
   classifier. Without neighbours q = p, and everything below runs on p.
2. **Confident learning** on q (Northcutt et al., "Confident Learning: Estimating Uncertainty in
   Dataset Labels", JAIR 2021; :func:`confident_learning`): thresholds t_j = mean q_j over images
   labelled j; each image's confident class = the most probable class j with q_j >= t_j (none if no
   class clears its threshold); the confident joint C[i][j] counts images labelled i with confident
   class j; calibrated so that row i sums to the number of images labelled i (the paper's eq. 3),
   it gives the joint Q = C_calibrated / N and the noise rate of class i = 1 - Q[i][i] / P(label=i).
   Two flags come out: ``confident_joint`` (off the diagonal of C) and ``noise_rate_pruned``
   (prune by noise rate: for every i != j, the n * Q[i][j] images labelled i with the largest
   q_j - q_i, keeping one image per class).
3. **Flag** when argmax q != label AND (log(q_argmax / q_label) > ``min_log_odds`` (0.5, odds 1.65)
   OR prune-by-noise-rate flags it). The **suggested label** is argmax q: the classifier's choice,
   or the neighbours' majority where they tip a close call.
4. **Label quality** in [0, 1] (low = likely wrong), ranked 1 = worst: ``normalized_margin``
   (q_label - max_{j != label} q_j + 1) / 2 by default, or ``self_confidence`` q_label. Margin is the
   default because it ranked injected flips slightly better (average precision over the benchmark
   scenarios, seeds 0-4: margin 0.987 vs self-confidence 0.986 on q, worst case 0.951 vs 0.932;
   0.982 vs 0.978 on p alone), and because it is below 0.5 exactly when another class beats the
   label, so every flagged image has quality < 0.5. Note cleanlab's default is self-confidence.

Why this rule. ``argmax != label`` has the recall: its false positives are the classifier's own
mistakes on clean images, which are mostly close calls. cleanlab's ``find_label_issues`` (prune by
noise rate, then drop images whose argmax is the label) removes close calls by a count, which buys
precision when flips are random, but the count from the confident joint is low when flipped images
look like their new class, and its recall drops (0.67 on the "ambig-soft" case below). Our rule keeps
every disagreement with clear odds, lets confident learning's count decide the close calls, and
lets the neighbours (an independent view, when they come from another embedding) move close calls
either way. Variants tried on selection seeds 0-4 (these and similar scenarios) and dropped:
flags = argmax != label AND (CL OR neighbours disagree); confident learning on q alone; trimming
argmax flags to CL's estimated count; a threshold relative to the median margin; min_log_odds
0, 1, 2 (higher wins on random flips and loses up to 0.07 F1 on ambig-soft; 0 loses up to 0.03 on
random flips with a medium classifier).

Measured F1 (benchmarks/label_issues_synthetic.py, test seeds 10-14, mean of 5; flips are
class-conditional with 4<->9 and 3<->5 taking 80 % of those classes' flips; in parentheses the
classifier's accuracy against the true labels; "ambig": flips prefer images that look like their
new class; "soft": under-confident probabilities that learned most of the noise):

    scenario                       noise  argmax  cleanlab  ours (probs only)  ours (+neighbours)
    synthetic-weak (~89 %) *       10 %   0.643   0.720     0.693              0.683
                                   20 %   0.794   0.824     0.821              0.816
    synthetic-medium (~97 %)       10 %   0.878   0.918     0.901              0.899
                                   20 %   0.939   0.951     0.949              0.947
    synthetic-strong (~99 %)       10 %   0.948   0.965     0.958              0.959
                                   20 %   0.975   0.979     0.978              0.981
    synthetic-ambig (~99 %)        10 %   0.945   0.926     0.947              0.950
                                   20 %   0.974   0.971     0.974              0.975
    synthetic-ambig-soft (~99 %)   10 %   0.945   0.787     0.934              0.945
                                   20 %   0.973   0.932     0.963              0.962
    digits, RBF SVC (~97 %)        10 %   0.913   0.930     0.932              0.938
                                   20 %   0.939   0.943     0.956              0.961
    digits, logreg (~93 %)         10 %   0.805   0.883     0.870              0.926
                                   20 %   0.858   0.892     0.903              0.946

(* added after the rule was chosen.) The weaker the classifier, the more its own confident
mistakes on clean images pass ``min_log_odds``, and the better cleanlab's count does: on
synthetic-weak ours is 0.038 below cleanlab at 10 % (every seed) and 0.008 at 20 %, and the real
workflow on a Fashion-MNIST subset (benchmarks/label_issues.py --dataset fashion, a CNN ~80 %
right) shows the same at 10 % (README). The rule suits models far more accurate than the noise rate.

With neighbours we are above both peers on digits (where neighbours come from pixel space, an
independent view) and on average within 0.02 of the better peer on the synthetic cases (per seed
as low as -0.032), but not above both everywhere: random flips with a medium classifier favour
cleanlab's count (-0.019 at 10 %), and under-confident probabilities with look-alike flips favour
plain argmax (-0.011 at 20 %). Neighbours computed in the same fine-tuned embedding as the
classifier carry less independent evidence. Tune ``min_log_odds`` on a selection set with known
flips if the real k-fold probabilities allow it.

Own numpy implementation rather than cleanlab as a runtime dependency: on the same inputs our
prune-by-noise-rate gives cleanlab 2.9.0's flags (Jaccard 0.98-1.00 on the synthetic cases,
0.95-0.98 on digits; checked on digits: the raw confident joints are identical and, fed cleanlab's
calibrated joint, the flags are identical, so the differences come only from the order among tied
rounding remainders in the calibration). It runs as fast or faster in one process (median
cleanlab/ours time 1.3x and 1.6x in two runs, 200k images x 10 classes, shared 2-core machine).
Our rule needs per-image pieces cleanlab does not return together (the fused posterior, both CL
flags, the joint), and cleanlab's ``find_label_issues`` alone is the weaker rule in 9 of the 12
cells above. cleanlab stays a benchmark-only dependency (benchmarks/label_issues_synthetic.py).

:func:`make_synthetic_problem` and :func:`flag_metrics` serve the tests and the benchmark.

Scale: time is O(N C) plus one sort per class; memory is a few N x C float arrays (probs, posterior,
the threshold mask) and an N x C count array for the neighbour votes - fine for 10^6 images x 10^2
classes, too much for 10^6 x 10^4 without chunking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

SCORE_METHODS = ("self_confidence", "normalized_margin")
ROW_SUM_TOLERANCE = 1e-3  # float32 softmax over thousands of classes still sums well within this
THRESHOLD_SLACK = 1e-6  # p == t_j must count as confident despite float rounding (cleanlab uses the same)
NO_NEIGHBOUR = -1  # padding in neighbour_labels where an index returned fewer than k neighbours


# ----------------------------------------------------------------------------- validation


def validate_inputs(
    probs: Any, labels: Any, neighbour_labels: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return (probs float64 N x C, labels int64 N, neighbour_labels int64 N x k or None), or raise ValueError."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ValueError(
            f"probs must be a 2-D array (n_images, n_classes) with at least 1 image and 2 classes; got shape "
            f"{probs.shape}. Pass the softmax output, one row per image."
        )
    if not np.issubdtype(probs.dtype, np.number) or np.issubdtype(probs.dtype, np.complexfloating):
        raise ValueError(f"probs must be real numbers; got dtype {probs.dtype}")
    probs = probs.astype(np.float64)
    n_images, n_classes = probs.shape
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError("probs must be finite and within [0, 1]; pass softmax probabilities, not logits")
    row_error = np.abs(probs.sum(axis=1) - 1.0)
    if row_error.max() > ROW_SUM_TOLERANCE:
        bad = np.flatnonzero(row_error > ROW_SUM_TOLERANCE)
        raise ValueError(
            f"every row of probs must sum to 1 (within {ROW_SUM_TOLERANCE}); {len(bad)} rows do not, first row "
            f"{bad[0]} sums to {probs[bad[0]].sum():.6g}. Apply softmax to logits, or renormalise the rows."
        )
    labels = _as_class_indices(labels, "labels", n_classes)
    if labels.shape != (n_images,):
        raise ValueError(f"labels must have shape ({n_images},) to match probs {probs.shape}; got {labels.shape}")
    counts = np.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        raise ValueError(
            f"classes {np.flatnonzero(counts == 0).tolist()} have no labelled images, so their confidence "
            "thresholds are undefined; drop those columns from probs (and renormalise) or add labelled images."
        )
    if neighbour_labels is not None:
        neighbour_labels = _as_class_indices(neighbour_labels, "neighbour_labels", n_classes, allow_missing=True)
        if neighbour_labels.ndim != 2 or neighbour_labels.shape[0] != n_images or neighbour_labels.shape[1] < 1:
            raise ValueError(
                f"neighbour_labels must have shape ({n_images}, k) with k >= 1 (the classes of each image's k "
                f"nearest other images); got {neighbour_labels.shape}. Pass None to skip the neighbour signal."
            )
    return probs, labels, neighbour_labels


def _as_class_indices(values: Any, name: str, n_classes: int, allow_missing: bool = False) -> np.ndarray:
    array = np.asarray(values)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not (
            np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all() and (array == np.round(array)).all()
        ):
            raise ValueError(f"{name} must hold integer class indices; got dtype {array.dtype}")
    array = array.astype(np.int64)
    low = NO_NEIGHBOUR if allow_missing else 0
    if array.size and (array.min() < low or array.max() >= n_classes):
        outside = array[(array < low) | (array >= n_classes)]
        allowed = f"{NO_NEIGHBOUR} (no neighbour) or 0..{n_classes - 1}" if allow_missing else f"0..{n_classes - 1}"
        raise ValueError(
            f"{name} must be class indices in {allowed} (probs has {n_classes} columns); found "
            f"{np.unique(outside)[:10].tolist()}. Map class names to indices with the same order as the probs columns."
        )
    return array


# ----------------------------------------------------------------------------- confident learning


def confident_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class self-confidence threshold t_j: the mean of probs[:, j] over images labelled j."""
    n_classes = probs.shape[1]
    self_confidence = probs[np.arange(len(labels)), labels]
    return np.bincount(labels, weights=self_confidence, minlength=n_classes) / np.bincount(labels, minlength=n_classes)


def confident_class(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Each image's confidently predicted class: the most probable class j with p_j >= t_j, or -1 if none."""
    confident = probs >= thresholds - THRESHOLD_SLACK
    best = np.where(confident, probs, -np.inf).argmax(axis=1)
    return np.where(confident.any(axis=1), best, -1)


def count_joint(labels: np.ndarray, true_guess: np.ndarray, n_classes: int) -> np.ndarray:
    """Confident joint C[i][j]: images labelled i whose confident class is j (images without one are skipped)."""
    counted = true_guess >= 0
    flat = labels[counted] * n_classes + true_guess[counted]
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def calibrate_joint(confident_joint: np.ndarray, label_counts: np.ndarray) -> np.ndarray:
    """Rescale each row of the confident joint to its label count, rounded to integers that keep the row totals.

    Images with no confident class are not in C, so its rows undercount; calibration (the paper's eq. 3)
    spreads each class's total over the row in C's proportions. A class with no confident image on its
    diagonal gets 1 there first, so that an empty row does not look like 100 % noise.
    """
    joint = confident_joint.astype(np.float64)
    np.fill_diagonal(joint, np.maximum(np.diagonal(joint), 1.0))
    rescaled = joint / joint.sum(axis=1, keepdims=True) * label_counts[:, None]
    return round_preserving_row_totals(rescaled)


def round_preserving_row_totals(matrix: np.ndarray) -> np.ndarray:
    """Round a non-negative matrix to integers keeping each row's (rounded) total: largest remainders get the +1s.

    Same result as cleanlab's ``round_preserving_row_totals`` except for the order among tied remainders.
    """
    floor = np.floor(matrix)
    missing = (np.round(matrix.sum(axis=1)) - floor.sum(axis=1)).astype(np.int64)
    remainder_rank = np.argsort(np.argsort(-(matrix - floor), axis=1, kind="stable"), axis=1, kind="stable")
    return (floor + (remainder_rank < missing[:, None])).astype(np.int64)


def prune_by_noise_rate(probs: np.ndarray, labels: np.ndarray, calibrated_joint: np.ndarray) -> np.ndarray:
    """Flag, for every off-diagonal (i, j), the n*Q[i][j] images labelled i with the largest margin p_j - p_i.

    At least one image per class stays unflagged (cleanlab's min_examples_per_class=1). The loop runs over
    class pairs with a non-zero count, never over images; argpartition keeps each pair O(n_i).
    """
    n_classes = probs.shape[1]
    flagged = np.zeros(len(labels), dtype=bool)
    for i, members in enumerate(_indices_by_class(labels, n_classes)):
        to_prune = calibrated_joint[i].copy()
        to_prune[i] = 0
        # more than n_i - 1 to prune: scale down so that one image of the class survives
        excess = to_prune.sum() - (len(members) - 1)
        if excess > 0:
            to_prune = round_preserving_row_totals((to_prune * (len(members) - 1) / to_prune.sum())[None])[0]
        for j in np.flatnonzero(to_prune):
            margin = probs[members, j] - probs[members, i]
            count = int(to_prune[j])
            top = np.argpartition(-margin, count - 1)[:count] if count < len(members) else slice(None)
            flagged[members[top]] = True
    return flagged


def _indices_by_class(labels: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """Image indices of each class, from one stable sort (O(N log N) instead of one N-long mask per class)."""
    order = np.argsort(labels, kind="stable")
    bounds = np.cumsum(np.bincount(labels, minlength=n_classes))[:-1]
    return np.split(order, bounds)


@dataclass(frozen=True)
class ConfidentLearning:
    """Everything confident learning estimates from (probs, labels); matrices are indexed [given][true]."""

    thresholds: np.ndarray  # (C,) t_j
    confident_class: np.ndarray  # (N,) confident class of each image, -1 where none clears its threshold
    confident_joint: np.ndarray  # (C, C) raw counts C[i][j]
    calibrated_joint: np.ndarray  # (C, C) integer counts, row i sums to the number of images labelled i
    joint: np.ndarray  # (C, C) Q = calibrated_joint / N, the estimated joint P(given=i, true=j)
    noise_rates: np.ndarray  # (C,) estimated share of images labelled i whose true class is another one
    off_diagonal: np.ndarray  # (N,) bool: the confident joint puts the image off its diagonal
    noise_rate_pruned: np.ndarray  # (N,) bool: flagged by prune-by-noise-rate


def confident_learning(probs: np.ndarray, labels: np.ndarray) -> ConfidentLearning:
    """Confident learning (Northcutt et al., JAIR 2021) on validated inputs (see :func:`validate_inputs`)."""
    n_classes = probs.shape[1]
    label_counts = np.bincount(labels, minlength=n_classes)
    thresholds = confident_thresholds(probs, labels)
    true_guess = confident_class(probs, thresholds)
    raw_joint = count_joint(labels, true_guess, n_classes)
    calibrated = calibrate_joint(raw_joint, label_counts)
    return ConfidentLearning(
        thresholds=thresholds,
        confident_class=true_guess,
        confident_joint=raw_joint,
        calibrated_joint=calibrated,
        joint=calibrated / len(labels),
        noise_rates=1.0 - np.diagonal(calibrated) / label_counts,
        off_diagonal=(true_guess >= 0) & (true_guess != labels),
        noise_rate_pruned=prune_by_noise_rate(probs, labels, calibrated),
    )


# ----------------------------------------------------------------------------- per-image signals


def label_quality(probs: np.ndarray, labels: np.ndarray, method: str = "normalized_margin") -> np.ndarray:
    """Per-image label quality in [0, 1], low = likely mislabelled.

    ``self_confidence`` is p[label]. ``normalized_margin`` is (p[label] - max_{j != label} p_j + 1) / 2:
    below 0.5 exactly when some other class is more probable than the given label.
    """
    rows = np.arange(len(labels))
    given = probs[rows, labels]
    if method == "self_confidence":
        return given
    if method == "normalized_margin":
        others = probs.copy()
        others[rows, labels] = -np.inf
        return (given - others.max(axis=1) + 1.0) / 2.0
    raise ValueError(f"unknown label quality method {method!r}; choose one of {SCORE_METHODS}")


def neighbour_votes(neighbour_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, C) counts of each class among each image's neighbours (padding -1 is not counted)."""
    n_images = neighbour_labels.shape[0]
    rows = np.broadcast_to(np.arange(n_images)[:, None], neighbour_labels.shape)
    present = neighbour_labels >= 0
    flat = rows[present] * n_classes + neighbour_labels[present]
    return np.bincount(flat, minlength=n_images * n_classes).reshape(n_images, n_classes)


def neighbour_disagreement(votes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Share of each image's neighbours whose class differs from its given label (NaN for an image without any)."""
    total = votes.sum(axis=1)
    agreeing = votes[np.arange(len(labels)), labels]
    return np.where(total > 0, 1.0 - agreeing / np.maximum(total, 1), np.nan)


def fuse_neighbours(probs: np.ndarray, votes: np.ndarray | None, weight: float = 1.0) -> np.ndarray:
    """Posterior from the classifier and the neighbours: p_j * (n_j + 1) ** weight, renormalised.

    n_j is the number of neighbours of class j. The +1 (Laplace) keeps a class no neighbour has
    possible, and a unanimous neighbourhood of k can move the odds by at most (k + 1) ** weight, so
    neighbours settle close calls and cannot overturn a confident classifier. Without votes (or
    with weight 0) this returns probs unchanged.
    """
    if votes is None or weight == 0:
        return probs
    fused = probs * np.power(votes + 1.0, weight)
    return fused / fused.sum(axis=1, keepdims=True)


def flag_decision(
    posterior: np.ndarray, labels: np.ndarray, noise_rate_pruned: np.ndarray, min_log_odds: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(suggested class, log-odds of suggested over given, flagged) for every image.

    Flag when the posterior's argmax is not the given label AND either its log-odds over the label
    exceed ``min_log_odds`` or prune-by-noise-rate (on the same posterior) flags the image.
    """
    rows = np.arange(len(labels))
    suggested = posterior.argmax(axis=1)
    tiny = np.finfo(np.float64).tiny  # log(0) guard: a zero probability gives large, finite odds
    log_odds = np.log(np.maximum(posterior[rows, suggested], tiny)) - np.log(np.maximum(posterior[rows, labels], tiny))
    disagrees = suggested != labels
    flagged = disagrees & ((log_odds > min_log_odds) | noise_rate_pruned)
    return suggested, np.where(disagrees, log_odds, 0.0), flagged


# ----------------------------------------------------------------------------- the top-level function


@dataclass(frozen=True)
class LabelIssues:
    """Result of :func:`find_label_issues`.

    ``scores``: one row per image in input order. ``issues``: the flagged rows, worst first.
    ``summary``: JSON-ready dict (plain ints, floats, strings, lists and dicts).
    """

    scores: pd.DataFrame
    issues: pd.DataFrame
    summary: dict[str, Any]


def find_label_issues(
    probs: Any,
    labels: Any,
    neighbour_labels: Any = None,
    *,
    classes: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
    score_method: str = "normalized_margin",
    neighbour_weight: float = 1.0,
    min_log_odds: float = 0.5,
    top_pairs: int = 10,
) -> LabelIssues:
    """Score every image's given label and flag the likely mistakes (see the module docstring for the rule).

    probs: (N, C) out-of-fold softmax probabilities. labels: (N,) given class indices.
    neighbour_labels: optional (N, k) class indices of each image's nearest other images, -1 for none.
    classes: C class names in column order (default "0".."C-1"). paths: N image paths (default None).
    """
    probs, labels, neighbour_labels = validate_inputs(probs, labels, neighbour_labels)
    n_images, n_classes = probs.shape
    class_names = _class_names(classes, n_classes)
    path_list = _paths(paths, n_images)
    _check_options(score_method, neighbour_weight)
    votes = None if neighbour_labels is None else neighbour_votes(neighbour_labels, n_classes)
    posterior = fuse_neighbours(probs, votes, neighbour_weight)
    learning = confident_learning(posterior, labels)
    suggested, log_odds, flagged = flag_decision(posterior, labels, learning.noise_rate_pruned, min_log_odds)
    disagreement = np.full(n_images, np.nan) if votes is None else neighbour_disagreement(votes, labels)
    names = np.asarray(class_names, dtype=object)
    model_label = probs.argmax(axis=1)
    scores = pd.DataFrame(
        {
            "path": path_list,
            "given_label": names[labels],
            "suggested_label": names[suggested],
            "label_quality": label_quality(posterior, labels, score_method),
            "rank": 0,  # filled below
            "flagged": flagged,
            "self_confidence": probs[np.arange(n_images), labels],  # the classifier alone
            "model_label": names[model_label],
            "model_disagrees": model_label != labels,
            "neighbour_disagreement": disagreement,
            "neighbours_disagree": np.nan_to_num(disagreement, nan=0.0) >= 0.5,
            "confident_joint": learning.off_diagonal,
            "noise_rate_pruned": learning.noise_rate_pruned,
            "log_odds": log_odds,
            "given_index": labels,
            "suggested_index": suggested,
        }
    )
    # rank 1 = worst label; ties keep input order so that the ranking is reproducible
    order = np.argsort(scores["label_quality"].to_numpy(), kind="stable")
    scores.loc[order, "rank"] = np.arange(1, n_images + 1)
    issues = scores[scores["flagged"]].sort_values("rank").reset_index(drop=True)
    parameters = {
        "score_method": score_method,
        "neighbour_weight": float(neighbour_weight),
        "min_log_odds": float(min_log_odds),
        "neighbours": 0 if neighbour_labels is None else int(neighbour_labels.shape[1]),
        "rule": "argmax(posterior) != label and (log_odds > min_log_odds or prune_by_noise_rate)",
    }
    summary = summarize(learning, scores, class_names, parameters, top_pairs)
    return LabelIssues(scores=scores, issues=issues, summary=summary)


def _check_options(score_method: str, neighbour_weight: float) -> None:
    if score_method not in SCORE_METHODS:
        raise ValueError(f"unknown score_method {score_method!r}; choose one of {SCORE_METHODS}")
    if not (np.isfinite(neighbour_weight) and neighbour_weight >= 0):
        raise ValueError(f"neighbour_weight must be a finite number >= 0; got {neighbour_weight}")


def _class_names(classes: Sequence[str] | None, n_classes: int) -> list[str]:
    if classes is None:
        return [str(i) for i in range(n_classes)]
    names = [str(c) for c in classes]
    if len(names) != n_classes or len(set(names)) != n_classes:
        raise ValueError(
            f"classes must be {n_classes} distinct names, one per probs column in column order; got {len(names)} "
            f"({len(set(names))} distinct)"
        )
    return names


def _paths(paths: Sequence[str] | None, n_images: int) -> list[str | None]:
    if paths is None:
        return [None] * n_images
    path_list = [str(p) for p in paths]
    if len(path_list) != n_images:
        raise ValueError(f"paths must have one entry per probs row ({n_images}); got {len(path_list)}")
    return path_list


def summarize(
    learning: ConfidentLearning,
    scores: pd.DataFrame,
    class_names: Sequence[str],
    parameters: dict[str, Any],
    top_pairs: int = 10,
) -> dict[str, Any]:
    """JSON-ready summary: estimated noise per class, the most confused pairs, counts per signal.

    ``confused_pairs``: the largest off-diagonal cells of the calibrated confident joint (estimated
    images labelled ``given`` whose true class is ``true``), each with how many images were flagged
    with that given label and that suggestion.
    """
    n_images = len(scores)
    flagged = scores["flagged"].to_numpy()
    n_classes = len(class_names)
    flagged_pairs = np.bincount(
        scores["given_index"].to_numpy()[flagged] * n_classes + scores["suggested_index"].to_numpy()[flagged],
        minlength=n_classes * n_classes,
    ).reshape(n_classes, n_classes)
    off_diagonal = learning.calibrated_joint * (1 - np.eye(n_classes, dtype=np.int64))
    order = np.argsort(-off_diagonal, axis=None, kind="stable")[:top_pairs]
    pairs = [
        {
            "given": class_names[i],
            "true": class_names[j],
            "estimated_images": int(off_diagonal[i, j]),
            "flagged": int(flagged_pairs[i, j]),
        }
        for i, j in zip(*np.unravel_index(order, off_diagonal.shape))
        if off_diagonal[i, j] > 0
    ]
    signals = ("model_disagrees", "neighbours_disagree", "confident_joint", "noise_rate_pruned")
    return {
        "n_images": int(n_images),
        "n_classes": int(n_classes),
        "n_flagged": int(flagged.sum()),
        "flagged_share": float(flagged.mean()),
        "estimated_noise_rate": float(1.0 - np.trace(learning.joint)),
        "noise_rate_per_class": {name: float(r) for name, r in zip(class_names, learning.noise_rates)},
        "threshold_per_class": {name: float(t) for name, t in zip(class_names, learning.thresholds)},
        "confused_pairs": pairs,
        "images_per_signal": {name: int(scores[name].sum()) for name in signals},
        "parameters": parameters,
    }


# ----------------------------------------------------------------------------- synthetic problems (tests, benchmarks)


@dataclass(frozen=True)
class SyntheticProblem:
    """Out-of-fold-like probabilities, noisy labels and neighbour labels with the truth kept aside."""

    probs: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,) given labels, some flipped
    true_labels: np.ndarray  # (N,)
    neighbour_labels: np.ndarray  # (N, k) given labels of each image's k nearest other images

    @property
    def flipped(self) -> np.ndarray:
        return self.labels != self.true_labels


def make_synthetic_problem(
    n_images: int = 2000,
    n_classes: int = 10,
    noise_rate: float = 0.1,
    *,
    structured_pairs: Sequence[tuple[int, int]] = ((4, 9), (3, 5)),
    pair_share: float = 0.8,
    ambiguity: float = 0.0,
    separation: float = 1.5,
    temperature: float = 1.0,
    learned_noise: float = 0.5,
    n_neighbours: int = 10,
    seed: int = 0,
) -> SyntheticProblem:
    """A seeded label-noise problem whose classifier and neighbours see the same images.

    Images are points x = mu_class + N(0, I) in 16 dimensions (paired classes' centres are moved
    half-way together, so that 4/9 and 3/5 are confusable). Each class c gets a class-conditional
    flip rate noise_rate * U(0.5, 1.5); a flip of a paired class goes to its partner with probability
    ``pair_share``, otherwise to a uniformly drawn other class. ``ambiguity`` 0 picks the flipped
    images at random (the confident-learning assumption); larger values prefer images that look like
    their new class (as human mistakes do), drawn with weight exp(ambiguity * log-odds).
    The "out-of-fold classifier" is the Bayes posterior on a noisy view of x (noise sd 0.3), softened
    by ``temperature`` (> 1: under-confident, as after temperature scaling on noisy labels), then
    mixed with the flip matrix by ``learned_noise`` (a model trained on noisy labels learns part of
    the noise: 0 = none, 1 = all of it).
    Neighbours are the exact k nearest images on another noisy view (sd 0.3), with their given labels.
    """
    from sklearn.neighbors import NearestNeighbors  # only needed here

    rng = np.random.default_rng(seed)
    true_labels = rng.permutation(np.arange(n_images) % n_classes)
    centres = rng.normal(size=(n_classes, 16)) * separation
    for a, b in structured_pairs:
        centres[b] = centres[a] + 0.5 * (centres[b] - centres[a])
    points = centres[true_labels] + rng.normal(size=(n_images, 16))
    labels = _flip_labels(points, centres, true_labels, noise_rate, structured_pairs, pair_share, ambiguity, rng)

    flips = np.zeros((n_classes, n_classes))
    np.add.at(flips, (true_labels, labels), 1.0)
    flips /= flips.sum(axis=1, keepdims=True)
    model_view = points + rng.normal(size=points.shape) * 0.3
    logits = -0.5 * ((model_view[:, None, :] - centres[None]) ** 2).sum(axis=-1) / temperature
    posterior = np.exp(logits - logits.max(axis=1, keepdims=True))
    posterior /= posterior.sum(axis=1, keepdims=True)
    probs = posterior @ ((1.0 - learned_noise) * np.eye(n_classes) + learned_noise * flips)

    embedding = points + rng.normal(size=points.shape) * 0.3
    nearest = NearestNeighbors(n_neighbors=n_neighbours + 1).fit(embedding).kneighbors(embedding, return_distance=False)
    return SyntheticProblem(
        probs=probs, labels=labels, true_labels=true_labels, neighbour_labels=labels[nearest[:, 1:]]
    )


def _flip_labels(
    points: np.ndarray,
    centres: np.ndarray,
    true_labels: np.ndarray,
    noise_rate: float,
    structured_pairs: Sequence[tuple[int, int]],
    pair_share: float,
    ambiguity: float,
    rng: np.random.Generator,
) -> np.ndarray:
    n_classes = len(centres)
    partner = {a: b for a, b in structured_pairs} | {b: a for a, b in structured_pairs}
    squared_distance = ((points[:, None, :] - centres[None]) ** 2).sum(axis=-1)
    labels = true_labels.copy()
    for c, members in enumerate(_indices_by_class(true_labels, n_classes)):
        n_flips = int(round(min(noise_rate * rng.uniform(0.5, 1.5), 0.9) * len(members)))
        others = np.delete(np.arange(n_classes), c)
        destination = rng.choice(others, size=len(members))
        if c in partner:
            destination = np.where(rng.random(len(members)) < pair_share, partner[c], destination)
        log_odds = 0.5 * (squared_distance[members, c] - squared_distance[members, destination])
        # Gumbel top-k: sampling n_flips without replacement with weights exp(ambiguity * log_odds)
        key = ambiguity * log_odds + rng.gumbel(size=len(members))
        chosen = np.argsort(-key, kind="stable")[:n_flips]
        labels[members[chosen]] = destination[chosen]
    return labels


def flag_metrics(flagged: np.ndarray, truly_flipped: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of flagged images against the truly flipped ones."""
    flagged = np.asarray(flagged, dtype=bool)
    truly_flipped = np.asarray(truly_flipped, dtype=bool)
    hits = int((flagged & truly_flipped).sum())
    precision = hits / max(int(flagged.sum()), 1)
    recall = hits / max(int(truly_flipped.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
