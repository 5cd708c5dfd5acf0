"""Human label corrections: a ``corrections.csv`` that a person writes after review, applied to
the workflow's label tables without ever editing the original labels.

The file (config key ``corrections``) has two columns, ``path,label``: ``label`` is a class name
(for multilabel data the ``;``-joined labels), or ``drop`` to take the image out of every
table. Paths are written the way the workflow's tables write them: relative to ``dataset`` for
the main dataset (as in ``results/data/dataset.csv``, ``results/label_issues/issues.csv``), and
relative to the autolabel root for the autolabel piles (``clean/<class>/x.png``,
``raw/a/x.png``, as in ``results/autolabel/review/queue.csv``). One file can hold both; each
table takes the rows whose paths it has, and :func:`apply_corrections` reports the others as
``not found``.

A corrected (or confirmed) row carries ``source`` = ``human-corrected``, so its provenance
stays visible downstream, and automatic cleaning never overrides it
(:mod:`labelflow.cleaning`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import numpy as np
import pandas as pd

from labelflow.io import DatasetError, PathLike, quote, read_table, require_columns

DROP = "drop"  # the label that removes an image
HUMAN_CORRECTED = "human-corrected"
GIVEN = "given"  # source of a row nobody corrected (main dataset)
REPORT_COLUMNS = ["path", "given", "correction", "action"]
RELABELLED, CONFIRMED, DROPPED, NOT_FOUND = "relabelled", "confirmed", "dropped", "not found"


def read_corrections(path: PathLike) -> pd.DataFrame:
    """``path,label`` of a corrections file, checked: both columns filled, each path once,
    relative paths that stay inside their root. Labels are stripped; for multilabel data
    ``a; b`` becomes ``a;b`` (sorted)."""
    try:
        table = read_table(path)
    except FileNotFoundError:
        raise DatasetError(f"config key `corrections`: file {path} does not exist") from None
    require_columns(table, ["path", "label"], f"corrections table {path}")
    table = table[["path", "label"]].copy()
    empty = table["path"].isna() | table["label"].isna()
    if empty.any():
        lines = (np.flatnonzero(empty.to_numpy()) + 2).tolist()
        raise DatasetError(f"corrections table {path}: line(s) {lines[:5]} lack a path or a label (use `{DROP}` to drop)")
    table["path"] = table["path"].str.strip().str.removeprefix("./")
    bad = table["path"][table["path"].str.startswith("/") | table["path"].str.split("/").apply(lambda p: ".." in p)]
    if len(bad):
        raise DatasetError(f"corrections table {path}: paths must be relative and stay inside their folder: {quote(bad[:5].tolist())}")
    twice = table["path"][table["path"].duplicated()].unique().tolist()
    if twice:
        raise DatasetError(f"corrections table {path} lists {quote(twice[:5])} more than once; keep one row per image")
    table["label"] = pd.Series([_normalise_label(label) for label in table["label"]], index=table.index, dtype=str)
    return table.reset_index(drop=True)


def applying_rows_digest(path: PathLike, dataset_root: PathLike | None = None) -> str:
    """Digest of the corrections rows that apply to one table: with ``dataset_root`` the main
    dataset's (paths naming a file below it), else the autolabel piles' (``clean/...`` and
    ``raw/...`` paths). A rule passes it as a param, so a review answer for the autolabel pile
    does not retrain the main dataset's runs, nor the reverse."""
    rows = read_corrections(path)
    if dataset_root is not None:
        keep = [os.path.isfile(os.path.join(dataset_root, p)) for p in rows["path"]]
    else:
        keep = rows["path"].str.startswith(("clean/", "raw/")).tolist()
    return hashlib.sha256(rows[keep].to_csv(index=False).encode()).hexdigest()[:16]


def _normalise_label(label: str) -> str:
    parts = sorted({part.strip() for part in str(label).split(";") if part.strip()})
    return ";".join(parts)


def apply_corrections(
    table: pd.DataFrame,
    corrections: pd.DataFrame,
    tag2cls: Mapping[str, int],
    *,
    default_source: str = GIVEN,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(corrected table, report) for a label table with ``path,tag`` (and optionally ``class``,
    ``labels``, ``source``; other columns such as ``fold`` are kept as they are).

    Corrected rows take the new label (``tag``, ``class`` and for multilabel tables ``labels``
    follow it) and ``source`` = ``human-corrected``; ``drop`` removes the row; other rows keep
    their ``source`` (``default_source`` when the table has none). Row order is kept, so folds
    and every other column stay put. A label that is not a class is an error naming it.
    The report has one row per correction: ``path,given,correction,action`` with action
    ``relabelled``, ``confirmed`` (the label was already right), ``dropped`` or ``not found``.
    """
    require_columns(table, ["path", "tag"], "label table")
    multilabel = "labels" in table.columns
    _check_labels(corrections, tag2cls, multilabel)
    out = table.copy()
    if "source" not in out.columns:
        out["source"] = default_source
    given = out["labels"] if multilabel else out["tag"]
    current = pd.Series(given.to_numpy(), index=out["path"].to_numpy())
    row = pd.Index(out["path"]).get_indexer(corrections["path"])
    found = row >= 0
    report = pd.DataFrame(
        {
            "path": corrections["path"],
            "given": np.where(found, current.reindex(corrections["path"]).to_numpy(dtype=object), ""),
            "correction": corrections["label"],
        }
    )
    report["action"] = np.select(
        [~found, report["correction"] == DROP, report["given"] == report["correction"]],
        [NOT_FOUND, DROPPED, CONFIRMED],
        RELABELLED,
    )
    relabel = row[found & (corrections["label"] != DROP).to_numpy()]
    labels = corrections["label"].to_numpy()[found & (corrections["label"] != DROP).to_numpy()]
    _set_labels(out, relabel, labels, tag2cls, multilabel)
    out.iloc[relabel, out.columns.get_loc("source")] = HUMAN_CORRECTED
    dropped = row[found & (corrections["label"] == DROP).to_numpy()]
    out = out.drop(index=out.index[dropped]).reset_index(drop=True)
    return out, report[REPORT_COLUMNS]


def _check_labels(corrections: pd.DataFrame, tag2cls: Mapping[str, int], multilabel: bool) -> None:
    """Every correction's label is ``drop`` or a known class (each part, for multilabel data)."""
    labels = corrections["label"][corrections["label"] != DROP]
    if not multilabel and labels.str.contains(";").any():
        raise DatasetError("corrections give several labels (a;b) for a single-label dataset; give one class per image")
    parts = labels.str.split(";")
    unknown = sorted({p for ps in parts for p in ps if p not in tag2cls})
    if unknown:
        raise DatasetError(
            f"corrections name unknown class(es) {quote(unknown[:10])}; classes are {quote(sorted(tag2cls)[:20])} "
            f"(a correction cannot add a class; write `{DROP}` to take an image out)"
        )


def _set_labels(out: pd.DataFrame, rows: np.ndarray, labels: np.ndarray, tag2cls: Mapping[str, int], multilabel: bool) -> None:
    """Write ``labels`` into rows ``rows`` of ``out``: tag (the first label), class, labels."""
    tags = np.array([label.split(";")[0] for label in labels], dtype=object)
    out.iloc[rows, out.columns.get_loc("tag")] = tags
    if multilabel:
        out.iloc[rows, out.columns.get_loc("labels")] = labels
    if "class" in out.columns:
        out.iloc[rows, out.columns.get_loc("class")] = np.array([tag2cls[t] for t in tags], dtype=np.int64)


def apply_autolabel_corrections(
    human: pd.DataFrame, raw: pd.DataFrame, corrections: pd.DataFrame, tag2cls: Mapping[str, int]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(human, raw, report) of the autolabel piles after a person's corrections.

    ``clean/`` rows of ``human`` (``path,tag,class,fold``) are corrected or dropped as in
    :func:`apply_corrections`; untouched rows get source ``human``. A raw image with an
    answer (the review queue's images) becomes a human row with fold -1: it trains from round 0
    but never validates, since the queue picked it for being hard and would bias checkpoint
    selection and calibration; its raw row stays (the pile's size and the evaluation count it)
    with its ``tag`` cleared, so it is labelled once. A raw image answered ``drop`` leaves the
    pile. The report lists every correction once (``not found`` for paths in neither pile).
    """
    human_out, human_report = apply_corrections(human, corrections, tag2cls, default_source="human")
    answered = corrections[corrections["path"].isin(set(raw["path"]))]
    raw_out = raw[~raw["path"].isin(set(answered.loc[answered["label"] == DROP, "path"]))].copy()
    labelled = answered[answered["label"] != DROP]
    raw_out.loc[raw_out["path"].isin(set(labelled["path"])), "tag"] = ""
    _check_labels(labelled, tag2cls, multilabel=False)
    new_rows = pd.DataFrame(
        {
            "path": labelled["path"],
            "tag": labelled["label"],
            "class": labelled["label"].map(tag2cls).astype(np.int64),
            "fold": np.int64(-1),
            "source": HUMAN_CORRECTED,
        }
    )
    if "sha1" in human_out.columns and "sha1" in raw.columns:  # provenance travels with the image
        new_rows["sha1"] = labelled["path"].map(raw.set_index("path")["sha1"]).to_numpy()
    if "group" in human_out.columns:  # a group of its own: no clean image is a copy of it
        first = int(human_out["group"].max()) + 1 if len(human_out) else 0
        new_rows["group"] = np.arange(first, first + len(new_rows), dtype=np.int64)
    human_out = pd.concat([human_out, new_rows], ignore_index=True)
    in_raw = human_report["path"].isin(set(answered["path"]))
    given = raw.set_index("path")["tag"].fillna("").reindex(answered["path"]).to_numpy(dtype=object)
    raw_report = pd.DataFrame(
        {
            "path": answered["path"].to_numpy(),
            "given": given,
            "correction": answered["label"].to_numpy(),
            "action": np.where(answered["label"].to_numpy() == DROP, DROPPED, RELABELLED),
        }
    )
    report = pd.concat([human_report[~in_raw], raw_report], ignore_index=True).sort_values("path", kind="stable")
    return human_out, raw_out.reset_index(drop=True), report.reset_index(drop=True)[REPORT_COLUMNS]
