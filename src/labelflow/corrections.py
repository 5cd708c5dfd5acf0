"""Human label corrections: a ``corrections.csv`` that a person writes after review, applied to
the workflow's label tables without ever editing the original labels.

The file (config key ``corrections``) has two columns, ``path,label``: ``label`` is a class name
(for multilabel data the ``;``-joined labels), or ``drop`` to take the image out of every
table. Paths are written the way the workflow's tables write them: relative to ``dataset`` for
the main dataset (as in ``results/data/dataset.csv``, ``results/label_issues/issues.csv``), and
relative to the autolabel root for the autolabel piles (``clean/<class>/x.png``,
``raw/a/x.png``, as in ``results/autolabel/review/queue.csv``). One file can hold both; each
table takes the rows whose paths it has, and :func:`apply_corrections` reports the others as
``not found`` (or ``in the test set`` for the held-out images, which the test table takes).
Paths are normalised as the tables write them (``./a/./b.png``, ``a//b.png``); a path found in
no table whose whitespace-stripped form is (a hand-written ``cat/a.png ,dog``) takes that form.

A corrected (or confirmed) row carries ``source`` = ``human-corrected``, so its provenance
stays visible downstream, and automatic cleaning never overrides it
(:mod:`labelflow.cleaning`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Collection, Mapping

import numpy as np
import pandas as pd

from labelflow.io import DatasetError, PathLike, normalise_paths, quote, read_table, require_columns

log = logging.getLogger(__name__)

DROP = "drop"  # the label that removes an image
HUMAN_CORRECTED = "human-corrected"
GIVEN = "given"  # source of a row nobody corrected (main dataset)
REPORT_COLUMNS = ["path", "given", "correction", "action"]
RELABELLED, CONFIRMED, DROPPED, NOT_FOUND = "relabelled", "confirmed", "dropped", "not found"
IN_TEST_SET = "in the test set"  # a held-out image: the test table applies it (labelflow.heldout)
LEFT_OUT = "left out"  # a raw answer whose clean copies sit in several folds or groups (apply_autolabel_corrections)


def read_corrections(path: PathLike) -> pd.DataFrame:
    """``path,label`` of a corrections file, checked: both columns filled, each path once,
    relative paths that stay inside their root. Paths are normalised as the tables write them
    (:func:`labelflow.io.normalise_paths`: ``./a/./b.png`` and ``a//b.png`` become ``a/b.png``)
    but not stripped: a file or class folder may start or end with a space (tag2label takes such
    names; :func:`match_paths` falls back to the stripped form). Labels are stripped; for
    multilabel data ``a; b`` becomes ``a;b`` (sorted)."""
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
    table["path"] = pd.Series(normalise_paths(table["path"].astype(str).tolist()), index=table.index, dtype=object)
    bad = table["path"][table["path"].str.startswith("/") | table["path"].str.split("/").apply(lambda p: ".." in p)]
    if len(bad):
        raise DatasetError(f"corrections table {path}: paths must be relative and stay inside their folder: {quote(bad[:5].tolist())}")
    twice = table["path"][table["path"].duplicated()].unique().tolist()
    if twice:
        raise DatasetError(f"corrections table {path} lists {quote(twice[:5])} more than once; keep one row per image")
    table["label"] = pd.Series([_normalise_label(label) for label in table["label"]], index=table.index, dtype=str)
    return table.reset_index(drop=True)


def applying_rows_digest(
    path: PathLike, dataset_root: PathLike | None = None, held_out: PathLike | None = None, *, test: bool = False
) -> str:
    """Digest of the corrections rows that apply to one table: with ``dataset_root`` the main
    dataset's (paths naming a file below it), else the autolabel piles' (``clean/...`` and
    ``raw/...`` paths). A rule passes it as a param, so a review answer for the autolabel pile
    does not retrain the main dataset's runs, nor the reverse. ``held_out`` (split's
    ``held_out.csv``, when it exists) parts the main dataset's rows: those of held-out images
    apply to the test table (``test``), the others to the training table, so a test-set
    correction reruns the test table and not the training."""
    rows = read_corrections(path)
    stripped = _stripped(rows["path"])
    if dataset_root is not None:
        # as match_paths resolves them: the path as written, else its stripped form
        exact = np.array([os.path.isfile(os.path.join(dataset_root, p)) for p in rows["path"]], dtype=bool)
        spaced = ~exact & (stripped != rows["path"]).to_numpy()
        alt = np.zeros(len(rows), dtype=bool)
        alt[spaced] = [os.path.isfile(os.path.join(dataset_root, p)) for p in stripped[spaced]]
        resolved = rows["path"].where(~alt, stripped)
        held = resolved.isin(held_out_paths(held_out)).to_numpy()
        keep = (exact | alt) & (held if test else ~held)
    else:
        pile = ("clean/", "raw/")
        keep = (rows["path"].str.startswith(pile) | stripped.str.startswith(pile)).to_numpy()
    return hashlib.sha256(rows[keep].to_csv(index=False).encode()).hexdigest()[:16]


def held_out_paths(held_out: PathLike | None) -> set[str]:
    """Paths of split's held-out (test) images; none when there is no such table yet."""
    if held_out is None or not os.path.isfile(held_out):
        return set()
    return set(read_table(held_out)["path"])


def _stripped(paths: pd.Series) -> pd.Series:
    """Each path without leading and trailing whitespace, normalised again (`` ./a.png`` -> ``a.png``)."""
    return pd.Series(normalise_paths([p.strip() for p in paths.astype(str)]), index=paths.index, dtype=object)


def match_paths(corrections: pd.DataFrame, known: Collection[str]) -> pd.DataFrame:
    """``corrections`` with each path spelled as ``known`` (the tables' paths) spells it: the path as
    written when ``known`` has it (a name may end in a space), else its whitespace-stripped form
    when ``known`` has that (a hand-written ``cat/a.png ,dog``); other paths stay as written.
    Two corrections that then name one image are an error, as in :func:`read_corrections`."""
    known = known if isinstance(known, (set, frozenset)) else set(known)
    exact = corrections["path"].isin(known)
    stripped = _stripped(corrections["path"][~exact])
    alt = stripped[stripped.isin(known)]
    if alt.empty:
        return corrections
    out = corrections.copy()
    out.loc[alt.index, "path"] = alt
    twice = out["path"][out["path"].duplicated()].unique().tolist()
    if twice:
        raise DatasetError(
            f"corrections name {quote(twice[:5])} twice (once with spaces around the path); keep one row per image"
        )
    log.warning(
        "%d correction paths match only without their leading or trailing spaces, and were taken so: %s",
        len(alt), quote(corrections.loc[alt.index, "path"].head(5).tolist()),
    )  # fmt: skip
    return out


def _normalise_label(label: str) -> str:
    parts = sorted({part.strip() for part in str(label).split(";") if part.strip()})
    return ";".join(parts)


def apply_corrections(
    table: pd.DataFrame,
    corrections: pd.DataFrame,
    tag2cls: Mapping[str, int],
    *,
    default_source: str = GIVEN,
    test_paths: Collection[str] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(corrected table, report) for a label table with ``path,tag`` (and optionally ``class``,
    ``labels``, ``source``; other columns such as ``fold`` are kept as they are).

    Corrected rows take the new label (``tag``, ``class`` and for multilabel tables ``labels``
    follow it) and ``source`` = ``human-corrected``; ``drop`` removes the row; other rows keep
    their ``source`` (``default_source`` when the table has none). Row order is kept, so folds
    and every other column stay put. A label that is not a class is an error naming it.
    The report has one row per correction: ``path,given,correction,action`` with action
    ``relabelled``, ``confirmed`` (the label was already right), ``dropped``, ``in the test
    set`` (not in the table but in ``test_paths``) or ``not found``. Only the rows found in the
    table are checked against ``tag2cls``: one file may hold another table's rows, of its classes.
    Paths match as :func:`match_paths` says (the report names the table's spelling).
    """
    require_columns(table, ["path", "tag"], "label table")
    test_paths = set(test_paths)
    corrections = match_paths(corrections, set(table["path"]) | test_paths)
    multilabel = "labels" in table.columns
    out = table.copy()
    if "source" not in out.columns:
        out["source"] = default_source
    given = out["labels"] if multilabel else out["tag"]
    current = pd.Series(given.to_numpy(), index=out["path"].to_numpy())
    row = pd.Index(out["path"]).get_indexer(corrections["path"])
    found = row >= 0
    _check_labels(corrections[found], tag2cls, multilabel)
    report = pd.DataFrame(
        {
            "path": corrections["path"],
            "given": np.where(found, current.reindex(corrections["path"]).to_numpy(dtype=object), ""),
            "correction": corrections["label"],
        }
    )
    in_test = ~found & corrections["path"].isin(test_paths).to_numpy()
    report["action"] = np.select(
        [in_test, ~found, report["correction"] == DROP, report["given"] == report["correction"]],
        [IN_TEST_SET, NOT_FOUND, DROPPED, CONFIRMED],
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
    :func:`apply_corrections`; untouched rows get source ``human``. A raw copy of clean images
    (``duplicate_of``) then follows their corrected labels: the clean images it names that are
    still there (``duplicate_of`` keeps only those) give its ``tag`` when they agree, else it
    is unlabelled. A raw image with an answer (the review queue's images) becomes a human row
    with fold -1: it trains from round 0 but never validates, since the queue picked it for
    being hard and would bias checkpoint selection and calibration. An answered copy of clean
    images takes their fold and group instead, so it never trains while its copy validates; if
    they sit in several folds, or in several duplicate groups (which checkpoint selection and
    calibration may part, :func:`labelflow.dataset.pick_groups`), it is ``left out`` (its raw
    row stays a copy; the fix is to settle its clean copies' labels). An answered raw row
    stays (the pile's size and the evaluation count it) with its ``tag`` cleared, so it is
    labelled once. A raw image answered ``drop`` leaves the pile. The report lists every
    correction once (``not found`` for paths in neither pile). Paths match as :func:`match_paths` says.
    """
    corrections = match_paths(corrections, set(human["path"]) | set(raw["path"]))
    human_out, human_report = apply_corrections(human, corrections, tag2cls, default_source="human")
    answered = corrections[corrections["path"].isin(set(raw["path"]))]
    raw_out = raw[~raw["path"].isin(set(answered.loc[answered["label"] == DROP, "path"]))].copy()
    copies = _clean_copies(raw_out, human_out)
    # a corrected or dropped clean image must not leave its old label on its raw copies
    if "duplicate_of" in raw_out.columns:
        listed = raw_out["duplicate_of"].fillna("").astype(str) != ""
        of_row = copies.reindex(raw_out.index[listed])
        raw_out.loc[listed, "duplicate_of"] = of_row["duplicate_of"].fillna("").to_numpy(dtype=object)
        raw_out.loc[listed, "tag"] = np.where(of_row["n_tags"].eq(1), of_row["tag"], "").astype(object)
    labelled = answered[answered["label"] != DROP]
    _check_labels(labelled, tag2cls, multilabel=False)
    # an answered copy of clean images validates and trains with them (else a leak); fold -1 otherwise
    of_answer = copies.set_axis(raw_out.loc[copies.index, "path"].to_numpy()).reindex(labelled["path"])
    has_copies = of_answer["n_folds"].notna().to_numpy()
    left_out = ((of_answer["n_folds"] > 1) | (of_answer["n_groups"] > 1)).to_numpy()
    left_out_paths = set(labelled["path"][left_out])
    labelled, of_answer, has_copies = labelled[~left_out], of_answer[~left_out], has_copies[~left_out]
    raw_out.loc[raw_out["path"].isin(set(labelled["path"])), "tag"] = ""
    new_rows = pd.DataFrame(
        {
            "path": labelled["path"],
            "tag": labelled["label"],
            "class": labelled["label"].map(tag2cls).astype(np.int64),
            "fold": np.where(has_copies, of_answer["fold"].fillna(-1), -1).astype(np.int64),
            "source": HUMAN_CORRECTED,
        }
    )
    if "sha1" in human_out.columns and "sha1" in raw.columns:  # provenance travels with the image
        new_rows["sha1"] = labelled["path"].map(raw.set_index("path")["sha1"]).to_numpy()
    if "group" in human_out.columns:  # a group of its own when no clean image is a copy of it
        first = int(human_out["group"].max()) + 1 if len(human_out) else 0
        fresh = np.full(len(new_rows), -1, dtype=np.int64)
        fresh[~has_copies] = np.arange(first, first + int((~has_copies).sum()), dtype=np.int64)
        new_rows["group"] = np.where(has_copies, of_answer["group"].fillna(-1), fresh).astype(np.int64)
    human_out = pd.concat([human_out, new_rows], ignore_index=True)
    in_raw = human_report["path"].isin(set(answered["path"]))
    given = raw.set_index("path")["tag"].fillna("").reindex(answered["path"]).to_numpy(dtype=object)
    is_left_out = answered["path"].isin(left_out_paths).to_numpy()
    raw_report = pd.DataFrame(
        {
            "path": answered["path"].to_numpy(),
            "given": given,
            "correction": answered["label"].to_numpy(),
            "action": np.select([answered["label"].to_numpy() == DROP, is_left_out], [DROPPED, LEFT_OUT], RELABELLED),
        }
    )
    report = pd.concat([human_report[~in_raw], raw_report], ignore_index=True).sort_values("path", kind="stable")
    return human_out, raw_out.reset_index(drop=True), report.reset_index(drop=True)[REPORT_COLUMNS]


def _clean_copies(raw: pd.DataFrame, human: pd.DataFrame) -> pd.DataFrame:
    """Per raw row (its index) that names clean images still in ``human`` in ``duplicate_of``:
    those (``;``-joined, in order), how many tags, folds and groups they have, the first tag and
    fold, the smallest group."""
    columns = ["duplicate_of", "n_tags", "tag", "n_folds", "fold", "n_groups", "group"]
    if "duplicate_of" not in raw.columns or human.empty:
        return pd.DataFrame(columns=columns, index=pd.Index([], dtype=raw.index.dtype))
    named = raw["duplicate_of"].fillna("").astype(str).str.split(";").explode()
    named = named[named.isin(set(human["path"]))]
    clean = human.drop_duplicates("path").set_index("path")
    pairs = pd.DataFrame(
        {
            "path": named.to_numpy(),
            "tag": named.map(clean["tag"]).to_numpy(),
            "fold": named.map(clean["fold"]).to_numpy() if "fold" in clean.columns else -1,
            "group": named.map(clean["group"]).to_numpy() if "group" in clean.columns else -1,
        },
        index=named.index,
    )
    return pairs.groupby(level=0, sort=False).agg(
        duplicate_of=("path", ";".join), n_tags=("tag", "nunique"), tag=("tag", "first"),
        n_folds=("fold", "nunique"), fold=("fold", "first"), n_groups=("group", "nunique"), group=("group", "min"),
    )[columns]  # fmt: skip
