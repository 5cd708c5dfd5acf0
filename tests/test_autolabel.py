"""Autolabel unit tests: calibration, the selection policy, the tables (no training here)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_duplicates_dataset, make_tiny_dataset, write_badly_named_image
from labelflow import io
from labelflow.autolabel import policy, results
from labelflow.autolabel import prepare as prep
from labelflow.autolabel import round as rnd
from labelflow.autolabel.policy import BELOW_MIN_CONFIDENCE, RoundSettings, select_pseudo_labels
from labelflow.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    nll,
    top_confidence,
)
from labelflow.dataset import DuplicateSettings, valid_mask
from labelflow.io import DatasetError
from labelflow.runs import round_recipe
from labelflow.losses import probabilities


# --------------------------------------------------------------------------- calibration


def _calibrated_softmax_sample(n: int, classes: int, seed: int):
    """Logits whose softmax is the true label distribution (calibrated by construction)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, (n, classes))
    logits[np.arange(n), rng.integers(classes, size=n)] += 2.0
    probs = probabilities(logits, "softmax")
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 2.0, 3.0])
def test_temperature_recovers_known_value_softmax(true_temperature):
    logits, labels = _calibrated_softmax_sample(20000, 5, seed=1)
    # dividing calibrated logits by T0 gives a model that needs temperature T0 back
    fitted = fit_temperature(logits / true_temperature, labels, "softmax")
    assert fitted == pytest.approx(1.0 / true_temperature, rel=0.08)


def test_temperature_recovers_known_value_sigmoid():
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 2.0, (8000, 4))
    targets = (rng.random(logits.shape) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float64)
    fitted = fit_temperature(logits * 2.5, targets, "sigmoid")
    assert fitted == pytest.approx(2.5, rel=0.08)


def test_scaling_lowers_ece_of_overconfident_logits():
    logits, labels = _calibrated_softmax_sample(5000, 4, seed=2)
    overconfident = logits * 4.0
    cal = calibrate(overconfident, labels, "softmax")
    assert cal.temperature == pytest.approx(4.0, rel=0.1)
    assert cal.ece_before > 0.1
    assert cal.ece_after < 0.03 and cal.ece_after < cal.ece_before / 4
    assert cal.nll_after < cal.nll_before
    # scaling never changes the predicted class, only the confidence
    pred_before, _ = top_confidence(overconfident, 1.0, "softmax")
    pred_after, conf = top_confidence(overconfident, cal.temperature, "softmax")
    assert (pred_before == pred_after).all() and ((conf > 0) & (conf <= 1)).all()
    assert cal.accuracy == pytest.approx((pred_before == labels).mean())


def test_sigmoid_calibration_lowers_ece():
    logits, labels = _calibrated_softmax_sample(4000, 4, seed=5)
    cal = calibrate(logits * 4.0, labels, "sigmoid")
    assert cal.activation == "sigmoid" and cal.temperature > 4.0
    assert cal.nll_after < cal.nll_before
    assert cal.ece_before > 0.2 and cal.ece_after < 0.06


def test_ece_values():
    # all confidence 0.8, 80 % correct → perfectly calibrated
    assert expected_calibration_error(np.full(10, 0.8), np.array([1] * 8 + [0] * 2)) == pytest.approx(0.0)
    # two bins: conf 0.95 all wrong (half the rows) and conf 0.55 all right
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    assert expected_calibration_error(conf, np.array([0, 0, 1, 1])) == pytest.approx(0.5 * 0.95 + 0.5 * 0.45)
    assert np.isnan(expected_calibration_error(np.array([]), np.array([])))


def test_temperature_edge_cases():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    # all correct with big margins: T shrinks (sharper), but stays within its bounds
    logits = np.array([[5.0, 0.0], [0.0, 5.0]] * 10)
    labels = np.array([0, 1] * 10)
    assert MIN_TEMPERATURE <= fit_temperature(logits, labels) < 0.5
    # mostly wrong: T grows (flatter) up to its bound, never to infinity
    assert 1.0 < fit_temperature(logits, 1 - labels) <= MAX_TEMPERATURE
    assert nll(logits, labels, "softmax", MIN_TEMPERATURE) < nll(logits, labels, "softmax")
    with pytest.raises(ValueError, match="activation"):
        fit_temperature(logits, labels, "tanh")


def test_min_temperature_keeps_an_all_correct_validation_fold_from_sharpening():
    # a small validation fold the model gets all right: a free fit sharpens to the bound,
    # and a wrong prediction elsewhere with a 0.8 softmax would then claim ~1.0
    logits = np.array([[2.0, 0.0], [0.0, 2.0]] * 15)
    labels = np.array([0, 1] * 15)
    free = calibrate(logits, labels, "softmax")
    assert free.temperature < 0.2 and free.accuracy == 1.0
    _, conf = top_confidence(np.array([[1.4, 0.0]]), free.temperature, "softmax")
    assert conf[0] > 0.999
    floored = calibrate(logits, labels, "softmax", min_temperature=1.0)
    assert floored.temperature == 1.0 and floored.min_temperature == 1.0
    _, conf = top_confidence(np.array([[1.4, 0.0]]), floored.temperature, "softmax")
    assert conf[0] == pytest.approx(1 / (1 + np.exp(-1.4)))
    # softening an overconfident model is still allowed above the floor
    overconfident, y = _calibrated_softmax_sample(5000, 4, seed=2)
    assert calibrate(overconfident * 4.0, y, "softmax", min_temperature=1.0).temperature == pytest.approx(4.0, rel=0.1)
    # a floor above 1 is honoured even when no scaling would fit better
    assert calibrate(overconfident, y, "softmax", min_temperature=1.5).temperature >= 1.5
    with pytest.raises(ValueError, match="min_temperature"):
        calibrate(logits, labels, "softmax", min_temperature=0.0)


# --------------------------------------------------------------------------- selection policy


def _candidates(rows):
    return pd.DataFrame(rows, columns=["path", "tag", "confidence"])


HUMAN = {"cat": 4, "dog": 2, "eel": 10}


def _settings(min_confidence=0.9, *, max_new_per_class=1.0, class_min_confidence=None) -> RoundSettings:
    return RoundSettings(
        min_confidence=min_confidence, max_new_per_class=max_new_per_class,
        neighbours=0, reference_per_class=500, class_min_confidence=class_min_confidence or {},
    )


def test_min_confidence_and_class_min_confidence():
    cands = _candidates(
        [
            ("raw/a.png", "cat", 0.95),
            ("raw/b.png", "cat", 0.85),
            ("raw/c.png", "dog", 0.80),
            ("raw/d.png", "dog", 0.70),
            ("raw/e.png", "eel", 0.90),  # exactly at the threshold: accepted
        ]
    )
    out = select_pseudo_labels(cands, HUMAN, _settings(0.9, max_new_per_class=None, class_min_confidence={"dog": 0.75}))
    assert list(out["path"]) == list(cands["path"])  # input order kept
    assert dict(zip(out["path"], out["decision"])) == {
        "raw/a.png": policy.ACCEPTED,
        "raw/b.png": BELOW_MIN_CONFIDENCE,
        "raw/c.png": policy.ACCEPTED,
        "raw/d.png": BELOW_MIN_CONFIDENCE,
        "raw/e.png": policy.ACCEPTED,
    }
    assert list(out["min_confidence"]) == [0.9, 0.9, 0.75, 0.75, 0.9]


def test_class_cap_keeps_the_most_confident():
    cands = _candidates(
        [(f"raw/dog{i}.png", "dog", c) for i, c in enumerate([0.91, 0.99, 0.95, 0.97])]
        + [(f"raw/cat{i}.png", "cat", 0.99) for i in range(3)]
        + [("raw/tie_b.png", "eel", 0.93), ("raw/tie_a.png", "eel", 0.93)]
    )
    out = select_pseudo_labels(cands, HUMAN, _settings(0.9, max_new_per_class=0.5)).set_index("path")
    accepted = set(out.index[out["decision"] == policy.ACCEPTED])
    # dog: 0.5 x 2 human = 1 → only the most confident; cat: 0.5 x 4 = 2 of 3 (ties by path)
    assert accepted == {"raw/dog1.png", "raw/cat0.png", "raw/cat1.png", "raw/tie_a.png", "raw/tie_b.png"}
    assert (out["decision"] == policy.OVER_CAP).sum() == 4
    # no cap at all
    out = select_pseudo_labels(cands, HUMAN, _settings(0.9, max_new_per_class=None))
    assert (out["decision"] == policy.ACCEPTED).all()
    # a zero cap accepts nothing
    out = select_pseudo_labels(cands, HUMAN, _settings(0.9, max_new_per_class=0))
    assert not (out["decision"] == policy.ACCEPTED).any()
    # tie-break with one slot: the smaller path wins
    out = select_pseudo_labels(cands, {"cat": 4, "dog": 2, "eel": 1}, _settings(0.9, max_new_per_class=1.0))
    assert out.set_index("path").loc["raw/tie_a.png", "decision"] == policy.ACCEPTED
    assert out.set_index("path").loc["raw/tie_b.png", "decision"] == policy.OVER_CAP


def test_labelled_images_are_never_relabelled():
    cands = _candidates([("clean/cat/x.png", "dog", 0.999), ("raw/y.png", "dog", 0.999), ("raw/z.png", "dog", 0.99)])
    out = select_pseudo_labels(
        cands, HUMAN, _settings(0.5, max_new_per_class=None), labelled=["clean/cat/x.png", "raw/z.png"]
    ).set_index("path")
    assert out.loc["clean/cat/x.png", "decision"] == policy.ALREADY_LABELLED
    assert out.loc["raw/z.png", "decision"] == policy.ALREADY_LABELLED
    assert out.loc["raw/y.png", "decision"] == policy.ACCEPTED
    # already-labelled rows do not use up a class's cap
    out = select_pseudo_labels(cands, {"dog": 1}, _settings(0.5, max_new_per_class=1.0), labelled=["clean/cat/x.png"]).set_index("path")
    assert out.loc["raw/y.png", "decision"] == policy.ACCEPTED


def test_neighbours_agree_needs_the_nearest_labelled_images_of_the_predicted_class():
    # labelled: three cats around (1, 0), two dogs around (0, 1), by direction (cosine)
    labelled = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.1, 1.0], [0.0, 1.0]])
    tags = ["cat", "cat", "cat", "dog", "dog"]
    candidates = np.array(
        [
            [5.0, 0.1],  # deep among the cats; the scale does not matter
            [0.6, 0.4],  # nearest: cat (0.8, 0.2), then cats, then dog
            [0.3, 0.7],  # nearest: dog (0.1, 1.0) ... then cat (0.8, 0.2)
            [0.05, 1.0],  # among the dogs
        ]
    )
    predicted = ["cat", "cat", "dog", "cat"]
    # k=1: only the nearest neighbour must agree
    assert list(policy.neighbours_agree(labelled, tags, candidates, predicted, k=1)) == [True, True, True, False]
    # k=3: a cat needs its 3 nearest to be cats; a dog only its 2 nearest (there are 2 dogs)
    assert list(policy.neighbours_agree(labelled, tags, candidates, predicted, k=3)) == [True, True, True, False]
    # the head says cat where the neighbourhood says dog: rejected
    assert not policy.neighbours_agree(labelled, tags, candidates[2:3], ["cat"], k=1)[0]
    # a class with no labelled image is never agreed with
    assert not policy.neighbours_agree(labelled, tags, candidates[:1], ["eel"], k=3)[0]
    assert policy.neighbours_agree(labelled, tags, np.zeros((0, 2)), [], k=3).shape == (0,)
    with pytest.raises(ValueError, match="k >= 1"):
        policy.neighbours_agree(labelled, tags, candidates, predicted, k=0)


def test_disagreeing_neighbours_reject_before_the_class_cap():
    cands = _candidates([("raw/a.png", "dog", 0.99), ("raw/b.png", "dog", 0.95), ("raw/c.png", "dog", 0.5)])
    cands["neighbours_agree"] = [False, True, True]
    out = select_pseudo_labels(cands, {"dog": 1}, _settings(0.9, max_new_per_class=1.0)).set_index("path")
    assert out.loc["raw/a.png", "decision"] == policy.NEIGHBOURS_DISAGREE
    assert out.loc["raw/b.png", "decision"] == policy.ACCEPTED  # the cap's one slot goes to an agreed row
    assert out.loc["raw/c.png", "decision"] == BELOW_MIN_CONFIDENCE


def test_round_recipe_keeps_no_top_k_copies_and_leaves_the_experiment_alone():
    experiment = {"model": {"arch": "resnet18"}, "stages": {"stage1": {"epochs": 2, "top_k": 3}, "stage2": {"epochs": 5}}}
    recipe = round_recipe(experiment)
    assert recipe["stages"] == {"stage1": {"epochs": 2, "top_k": 0}, "stage2": {"epochs": 5, "top_k": 0}}
    assert recipe["model"] == experiment["model"] and list(recipe["stages"]) == ["stage1", "stage2"]
    assert experiment["stages"]["stage1"]["top_k"] == 3 and "top_k" not in experiment["stages"]["stage2"]


def test_selection_errors():
    cands = _candidates([("raw/a.png", "cat", 0.9)])
    with pytest.raises(DatasetError, match="autolabel.class_min_confidence"):
        select_pseudo_labels(cands, HUMAN, _settings(class_min_confidence={"cow": 0.5}))
    with pytest.raises(DatasetError, match="twice"):
        select_pseudo_labels(pd.concat([cands, cands]), HUMAN, _settings())


@pytest.mark.parametrize(
    ("accepted", "remaining", "last", "reason"),
    [
        (5, 10, False, None),
        (5, 10, True, "max_rounds reached"),
        (0, 10, False, "nothing accepted"),
        (0, 10, True, "nothing accepted"),
        (5, 0, False, "nothing left"),
        (0, 0, True, "nothing left"),
    ],
)
def test_round_status(accepted, remaining, last, reason):
    status = policy.round_status(3, accepted, remaining, last)
    assert status == {"round": 3, "accepted": accepted, "remaining": remaining, "stop": reason is not None, "reason": reason}


# --------------------------------------------------------------------------- tables


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def piles(tmp_path):
    """clean: 3 classes x 6; raw: same basenames in nested folders, a duplicate, junk."""
    clean = make_tiny_dataset(tmp_path / "clean", per_class=6, seed=0)
    source = make_tiny_dataset(tmp_path / "source", per_class=4, seed=1)
    raw = tmp_path / "raw"
    for c, class_dir in enumerate(sorted(source.iterdir())):
        target = raw / f"box{c}" / "deeper" if c == 2 else raw / f"box{c}"
        target.mkdir(parents=True)
        for image in class_dir.iterdir():
            shutil.copy(image, target / image.name)  # img_000.png ... as in clean
    shutil.copy(clean / "class_01" / "img_002.png", raw / "copy_of_clean.png")
    (raw / "broken.png").write_bytes(b"\x89PNG not really")
    (raw / "notes.txt").write_text("hello")
    (raw / ".hidden.png").write_bytes(b"")
    return clean, raw


def _prepare(tmp_path, clean, raw, n_folds=3, duplicates=DuplicateSettings()):
    out = tmp_path / "results"
    paths = {
        "root_dir": out / "root",
        "human_csv": out / "human.csv",
        "tag2cls_json": out / "tag2cls.json",
        "raw_csv": out / "raw.csv",
        "skipped_csv": out / "skipped.csv",
    }
    summary = prep.prepare(clean=clean, raw=raw, n_folds=n_folds, seed=0, duplicates=duplicates, **paths)
    return summary, paths


def test_prepare_tables_and_root(tmp_path, piles):
    clean, raw = piles
    before = (_tree(clean), _tree(raw))
    summary, paths = _prepare(tmp_path, clean, raw)
    assert (_tree(clean), _tree(raw)) == before  # inputs untouched: nothing added, moved or changed
    root = paths["root_dir"]
    assert os.readlink(root / "clean") == str(clean.resolve()) and os.readlink(root / "raw") == str(raw.resolve())

    human = io.read_table(paths["human_csv"])
    assert list(human.columns) == ["path", "tag", "class", "fold", "sha1", "group"] and len(human) == 18
    assert human["path"].str.startswith("clean/").all()
    assert sorted(human["fold"].unique()) == [0, 1, 2]
    assert (human.groupby(["fold", "tag"]).size() == 2).all()  # stratified

    table = io.read_table(paths["raw_csv"]).fillna("")
    assert list(table.columns) == prep.RAW_COLUMNS and len(table) == 13
    # same basenames as clean files, but distinct identities (path relative to its root)
    assert "raw/box0/img_000.png" in set(table["path"]) and "raw/box2/deeper/img_000.png" in set(table["path"])
    assert "clean/class_00/img_000.png" in set(human["path"])
    assert not table["path"].duplicated().any()
    dup = table.set_index("path").loc["raw/copy_of_clean.png"]
    assert dup["tag"] == "class_01" and dup["duplicate_of"] == "clean/class_01/img_002.png"
    assert (table["tag"] != "").sum() == 1  # same basename is not a duplicate: bytes differ

    skipped = io.read_table(paths["skipped_csv"]).set_index("path")["reason"]
    assert set(skipped.index) == {"raw/broken.png", "raw/notes.txt", "raw/.hidden.png"}
    assert summary == {"human": 18, "classes": 3, "raw": 13, "human_duplicates": 1, "skipped": 3}
    # every path in the tables resolves through the root
    for path in list(human["path"]) + list(table["path"]):
        assert (root / path).is_file()


def test_prepare_near_copies_take_the_human_label_and_stay_out_of_other_folds(tmp_path):
    """clean: cat/dog/owl with exact and near copies (conftest.DUPLICATE_GROUPS); raw: near
    copies of clean images, one of a clean label conflict, and a file named with non-UTF-8 bytes."""
    from PIL import Image

    clean = make_duplicates_dataset(tmp_path / "clean")
    raw = tmp_path / "raw"
    (raw / "pile").mkdir(parents=True)
    with Image.open(clean / "dog" / "dog_03.png") as image:
        image.convert("RGB").save(raw / "pile" / "dog_resaved.jpg", quality=75)  # near copy of a dog
        image.resize((40, 40), Image.Resampling.BICUBIC).save(raw / "pile" / "dog_small.png")
    with Image.open(clean / "owl" / "owl_03.png") as image:
        image.convert("RGB").save(raw / "owl_q50.jpg", quality=50)  # near copy of an exact pair
    shutil.copy(clean / "cat" / "cat_05.png", raw / "cat_or_owl.png")  # its clean copies disagree
    with Image.open(clean / "cat" / "cat_02.png") as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(raw / "mirrored.png")  # not a near copy
    shown = write_badly_named_image(raw / "pile")

    summary, paths = _prepare(tmp_path, clean, raw, duplicates=DuplicateSettings(label_conflicts="keep"))
    table = io.read_table(paths["raw_csv"]).fillna("").set_index("path")
    assert table.loc["raw/pile/dog_resaved.jpg", ["tag", "duplicate_of"]].tolist() == ["dog", "clean/dog/dog_03.png"]
    assert table.loc["raw/pile/dog_small.png", ["tag", "duplicate_of"]].tolist() == ["dog", "clean/dog/dog_03.png"]
    assert table.loc["raw/owl_q50.jpg", ["tag", "duplicate_of"]].tolist() == [
        "owl", "clean/owl/owl_03.png;clean/owl/owl_03_copy.png"
    ]
    assert table.loc["raw/cat_or_owl.png", ["tag", "duplicate_of"]].tolist() == [
        "", "clean/cat/cat_05.png;clean/owl/from_cat_05.png"
    ]
    assert table.loc["raw/mirrored.png", ["tag", "duplicate_of"]].tolist() == ["", ""]
    assert summary["human_duplicates"] == 3 and summary["human"] == 32
    skipped = io.read_table(paths["skipped_csv"])
    assert skipped.values.tolist() == [[f"raw/pile/{shown}", "file name is not valid UTF-8"]]

    human = io.read_table(paths["human_csv"])  # copies of one picture share a fold
    assert (human.groupby("group")["fold"].nunique() == 1).all()
    assert human["group"].nunique() == 32 - 8

    _, dropped = _prepare(tmp_path / "drop", clean, raw)  # default: clean label conflicts left out
    human = io.read_table(dropped["human_csv"])
    assert len(human) == 26 and "clean/cat/cat_05.png" not in set(human["path"])
    reasons = io.read_table(dropped["skipped_csv"]).set_index("path")["reason"]
    assert reasons["clean/cat/cat_05.png"] == "label conflict: duplicate of clean/owl/from_cat_05.png in class owl"
    # with its clean copies left out, the raw copy has no human label to take
    assert io.read_table(dropped["raw_csv"]).fillna("").set_index("path").loc["raw/cat_or_owl.png", "tag"] == ""


def test_prepare_errors(tmp_path, piles):
    clean, raw = piles
    with pytest.raises(DatasetError, match="autolabel.raw"):
        _prepare(tmp_path, clean, tmp_path / "missing")
    with pytest.raises(DatasetError, match="autolabel.clean"):
        _prepare(tmp_path, tmp_path / "missing", raw)
    with pytest.raises(DatasetError, match="n_folds"):
        _prepare(tmp_path, clean, raw, n_folds=7)


def _write_accepted(path: Path, rows, round_: int, tag2cls):
    table = pd.DataFrame(rows, columns=["path", "tag", "confidence"])
    table["class"] = table["tag"].map(tag2cls)
    table["round"] = round_
    table[rnd.ACCEPTED_COLUMNS].to_csv(path, index=False)
    return path


def test_round_dataset_pseudo_rows_never_validate(tmp_path, piles):
    clean, raw = piles
    _, paths = _prepare(tmp_path, clean, raw)
    tag2cls = json.loads(paths["tag2cls_json"].read_text())
    acc0 = _write_accepted(tmp_path / "acc0.csv", [("raw/box0/img_000.png", "class_00", 0.99)], 0, tag2cls)
    acc1 = _write_accepted(tmp_path / "acc1.csv", [("raw/box1/img_001.png", "class_01", 0.97)], 1, tag2cls)
    table = rnd.round_dataset(
        human_csv=paths["human_csv"], raw_csv=paths["raw_csv"], accepted_csvs=[acc0, acc1],
        tag2cls_json=paths["tag2cls_json"], out_csv=tmp_path / "round.csv",
    )
    assert list(table.columns) == ["path", "tag", "class", "fold", "sha1", "group", "source"] and len(table) == 20
    pseudo = table[table["path"].str.startswith("raw/")]
    assert (pseudo["fold"] == -1).all() and list(pseudo["class"]) == [0, 1] and (pseudo["source"] == "pseudo").all()
    raw_sha1 = io.read_table(paths["raw_csv"]).set_index("path")["sha1"]
    assert list(pseudo["sha1"]) == list(raw_sha1[pseudo["path"]])
    human = io.read_table(paths["human_csv"])
    assert table.iloc[:18][["path", "sha1", "group"]].equals(human[["path", "sha1", "group"]])
    assert (table.iloc[:18]["source"] == "human").all()
    assert not set(pseudo["group"]) & set(human["group"]) and pseudo["group"].is_unique  # a group of their own
    for folds in ([0], [2], [0, 1]):
        assert table[valid_mask(table, folds)]["path"].str.startswith("clean/").all()
    assert io.read_table(tmp_path / "round.csv").equals(table)

    candidates = policy.remaining_candidates(io.read_table(paths["raw_csv"]), table)
    # neither the accepted rows nor the human duplicate are candidates
    assert len(candidates) == 13 - 2 - 1
    assert not {"raw/box0/img_000.png", "raw/box1/img_001.png", "raw/copy_of_clean.png"} & set(candidates["path"])

    clash = _write_accepted(tmp_path / "clash.csv", [("clean/class_00/img_000.png", "class_01", 0.99)], 0, tag2cls)
    with pytest.raises(DatasetError, match="relabel human"):
        rnd.round_dataset(
            human_csv=paths["human_csv"], raw_csv=paths["raw_csv"], accepted_csvs=[clash],
            tag2cls_json=paths["tag2cls_json"], out_csv=tmp_path / "bad.csv",
        )


def test_round_dataset_keeps_duplicate_groups_whole_between_selection_and_calibration(tmp_path):
    """Copies of one picture (clean/: conftest.DUPLICATE_GROUPS) all choose the checkpoint or all
    calibrate, in every round's table, as in the main runs."""
    from labelflow.dataset import split_names

    clean = make_duplicates_dataset(tmp_path / "clean")
    raw = make_tiny_dataset(tmp_path / "raw", per_class=1, seed=3)
    _, paths = _prepare(tmp_path, clean, raw)
    table = rnd.round_dataset(
        human_csv=paths["human_csv"], raw_csv=paths["raw_csv"], accepted_csvs=[], tag2cls_json=paths["tag2cls_json"],
        out_csv=tmp_path / "round.csv",
    )
    table = io.read_table(tmp_path / "round.csv")  # as the round's run reads it
    groups = table["path"].map(io.read_table(paths["human_csv"]).set_index("path")["group"])
    split_somewhere = False
    for fold in range(3):
        for seed in range(5):
            roles = pd.Series(split_names(table, [fold], seed, 0.5))
            valid = roles != "train"
            assert (roles[valid].groupby(groups[valid]).nunique() == 1).all()
            # a table without groups would split a copy group (so the data can catch the bug)
            alone = pd.Series(split_names(table[["path", "tag", "class", "fold"]], [fold], seed, 0.5))
            split_somewhere |= bool((alone[valid].groupby(groups[valid]).nunique() > 1).any())
    assert split_somewhere


def test_round_dataset_changes_when_an_image_is_replaced_under_its_name(tmp_path, piles):
    """The round's run resumes by a fingerprint of the table's bytes: a new sha1 of a human or a
    pseudo-labelled image must change them."""
    clean, raw = piles
    _, paths = _prepare(tmp_path, clean, raw)
    tag2cls = json.loads(paths["tag2cls_json"].read_text())
    acc = _write_accepted(tmp_path / "acc0.csv", [("raw/box0/img_000.png", "class_00", 0.99)], 0, tag2cls)

    def table_bytes(human_csv, raw_csv, name):
        out = tmp_path / name
        rnd.round_dataset(human_csv=human_csv, raw_csv=raw_csv, accepted_csvs=[acc], tag2cls_json=paths["tag2cls_json"], out_csv=out)
        return out.read_bytes()

    before = table_bytes(paths["human_csv"], paths["raw_csv"], "before.csv")
    human = io.read_table(paths["human_csv"])
    human.loc[0, "sha1"] = "0" * 40
    human.to_csv(tmp_path / "human_new.csv", index=False)
    raw_table = io.read_table(paths["raw_csv"])
    raw_table.loc[raw_table["path"] == "raw/box0/img_000.png", "sha1"] = "f" * 40
    raw_table.to_csv(tmp_path / "raw_new.csv", index=False)
    assert table_bytes(tmp_path / "human_new.csv", paths["raw_csv"], "human_changed.csv") != before
    assert table_bytes(paths["human_csv"], tmp_path / "raw_new.csv", "raw_changed.csv") != before
    assert table_bytes(paths["human_csv"], paths["raw_csv"], "again.csv") == before


def test_raw_copies_of_disagreeing_clean_images_are_never_candidates(tmp_path, piles):
    """A raw image whose duplicate group holds clean images of different labels has no tag but a
    duplicate_of: pseudo-labelled it would train while its clean copies validate. It stays
    unlabelled (unlabelled.csv), but out of the review pool: never predicted, it would come first,
    and the fix is the clean labels, not an answer."""
    clean, raw = piles
    _, paths = _prepare(tmp_path, clean, raw)
    raw_table = io.read_table(paths["raw_csv"])
    conflict = "raw/box0/img_003.png"
    raw_table.loc[raw_table["path"] == conflict, "duplicate_of"] = "clean/class_00/img_000.png;clean/class_01/img_000.png"
    raw_table.to_csv(paths["raw_csv"], index=False)
    raw_table = io.read_table(paths["raw_csv"])  # empty duplicate_of reads as NaN
    assert raw_table["duplicate_of"].isna().sum() == 11
    candidates = policy.remaining_candidates(raw_table, pd.DataFrame({"path": []}))
    assert conflict not in set(candidates["path"]) and "raw/copy_of_clean.png" not in set(candidates["path"])
    assert len(candidates) == 13 - 2
    as_text = raw_table.fillna("")  # empty strings instead of NaN: the same
    assert policy.remaining_candidates(as_text, pd.DataFrame({"path": []})).equals(candidates)

    status, metrics = tmp_path / "s0.json", tmp_path / "m0.json"
    status.write_text(json.dumps(policy.round_status(0, 0, len(candidates), True)))
    calibration = {"temperature": 1.0, "ece_before": 0.1, "ece_after": 0.1}
    metrics.write_text(json.dumps({"candidates": len(candidates), "valid_accuracy": 0.9, "calibration": calibration,
                                   "below_min_confidence": len(candidates), "neighbours_disagree": 0, "over_cap": 0}))  # fmt: skip
    predictions = tmp_path / "pred.csv"
    pd.DataFrame({"path": candidates["path"], "tag": "class_00", "confidence": 0.5}).to_csv(predictions, index=False)
    out = tmp_path / "final"
    results.assemble(
        human_csv=paths["human_csv"], raw_csv=paths["raw_csv"], accepted_csvs=[], status_jsons=[status],
        metrics_jsons=[metrics], predictions_csv=predictions, dataset_csv=out / "dataset.csv",
        unlabelled_csv=out / "unlabelled.csv", rounds_csv=out / "rounds.csv",
    )
    unlabelled = io.read_table(out / "unlabelled.csv").set_index("path")
    assert conflict in unlabelled.index and pd.isna(unlabelled.loc[conflict, "confidence"])
    from labelflow.autolabel.review import review_pool

    dataset = io.read_table(out / "dataset.csv")
    blind = review_pool(dataset, unlabelled.reset_index(), pool=3)
    assert blind["path"].iloc[0] == conflict  # never predicted: without raw.csv it would come first
    pool = review_pool(dataset, unlabelled.reset_index(), pool=3, raw=io.read_table(paths["raw_csv"]))
    assert conflict not in set(pool["path"]) and len(pool) == 3 and pool["confidence"].notna().all()


def test_answered_raw_images_count_as_human_not_as_pseudo_labels(tmp_path, piles):
    """A review answer makes a raw image a human row with fold -1 (labelflow.corrections): the
    round tells it from a pseudo-label by its source, not its fold (class counts, the class cap,
    the guard's references), and rounds.csv counts it as labelled raw, as evaluation.json does."""
    from labelflow.corrections import apply_autolabel_corrections

    clean, raw = piles
    _, paths = _prepare(tmp_path, clean, raw)
    tag2cls = json.loads(paths["tag2cls_json"].read_text())
    answered = "raw/box1/img_001.png"
    human, raw_table, _ = apply_autolabel_corrections(
        io.read_table(paths["human_csv"]), io.read_table(paths["raw_csv"]),
        pd.DataFrame({"path": [answered], "label": ["class_02"]}), tag2cls,
    )
    human.to_csv(paths["human_csv"], index=False)
    raw_table.to_csv(paths["raw_csv"], index=False)
    acc0 = _write_accepted(tmp_path / "acc0.csv", [("raw/box0/img_000.png", "class_00", 0.99)], 0, tag2cls)
    rnd.round_dataset(
        human_csv=paths["human_csv"], raw_csv=paths["raw_csv"], accepted_csvs=[acc0],
        tag2cls_json=paths["tag2cls_json"], out_csv=tmp_path / "round.csv",
    )
    inputs = rnd.RoundInputs("unused.pt", tmp_path / "round.csv", paths["raw_csv"], paths["tag2cls_json"], paths["root_dir"])
    tables = rnd.RoundTables.read(inputs, [0], seed=0, share=0.5)
    row = tables.dataset.index[tables.dataset["path"] == answered][0]
    assert tables.dataset.loc[row, "fold"] == -1 and row in tables.human.index and len(tables.human) == 19
    assert tables.human_counts == {"class_00": 6, "class_01": 6, "class_02": 7}  # the class cap counts it
    assert tables.reference_rows(per_class=0, seed=0)[row]  # a human training row, never sampled away
    decided = pd.DataFrame({"path": [], "tag": [], "decision": []})
    counts = rnd.class_counts(tables, decided).set_index("tag")
    assert counts["human"].to_dict() == {"class_00": 6, "class_01": 6, "class_02": 7}
    assert counts["pseudo_before"].to_dict() == {"class_00": 1, "class_01": 0, "class_02": 0}
    assert answered not in set(tables.candidates["path"])

    status, metrics = tmp_path / "s0.json", tmp_path / "m0.json"
    status.write_text(json.dumps(policy.round_status(0, 1, 9, True)))
    calibration = {"temperature": 1.0, "ece_before": 0.1, "ece_after": 0.1}
    metrics.write_text(json.dumps({"candidates": 10, "valid_accuracy": 0.9, "calibration": calibration,
                                   "below_min_confidence": 9, "neighbours_disagree": 0, "over_cap": 0}))  # fmt: skip
    predictions = tmp_path / "pred.csv"
    pd.DataFrame({"path": raw_table["path"], "tag": "class_00", "confidence": 0.5}).to_csv(predictions, index=False)
    out = tmp_path / "final"
    table = results.assemble(
        human_csv=paths["human_csv"], raw_csv=paths["raw_csv"], accepted_csvs=[acc0], status_jsons=[status],
        metrics_jsons=[metrics], predictions_csv=predictions, dataset_csv=out / "dataset.csv",
        unlabelled_csv=out / "unlabelled.csv", rounds_csv=out / "rounds.csv",
    )
    assert table.set_index("path").loc[answered, "source"] == "human-corrected"
    rounds = pd.read_csv(out / "rounds.csv")
    # the human duplicate, the answer and the pseudo-label
    assert list(rounds["labelled_raw"]) == [3] and rounds["coverage"].iloc[0] == pytest.approx(3 / 13)
    truth = tmp_path / "truth.csv"  # every raw image: evaluation's coverage is rounds.csv's
    pd.DataFrame({"path": [p.removeprefix("raw/") for p in raw_table["path"]], "label": "class_00"}).to_csv(truth, index=False)
    result = results.evaluate(
        dataset_csv=out / "dataset.csv", raw_csv=paths["raw_csv"], rounds_csv=out / "rounds.csv", truth_csv=truth,
        out_json=out / "evaluation.json",
    )
    assert result["final"]["coverage"] == pytest.approx(rounds["coverage"].iloc[0])


def test_assemble_evaluate_materialize(tmp_path, piles):
    clean, raw = piles
    _, paths = _prepare(tmp_path, clean, raw)
    tag2cls = json.loads(paths["tag2cls_json"].read_text())
    raw_table = io.read_table(paths["raw_csv"]).fillna("")
    accepted = [
        _write_accepted(tmp_path / "a0.csv", [("raw/box0/img_000.png", "class_00", 0.99), ("raw/box1/img_000.png", "class_00", 0.95)], 0, tag2cls),
        _write_accepted(tmp_path / "a1.csv", [("raw/box2/deeper/img_000.png", "class_02", 0.93)], 1, tag2cls),
    ]
    statuses, metrics = [], []
    for r, (n, left) in enumerate([(2, 10), (1, 9)]):
        statuses.append(tmp_path / f"s{r}.json")
        statuses[-1].write_text(json.dumps(policy.round_status(r, n, left, r == 1)))
        metrics.append(tmp_path / f"m{r}.json")
        calibration = {"temperature": 1.5, "ece_before": 0.2, "ece_after": 0.05}
        rejected = {"below_min_confidence": left - r, "neighbours_disagree": r, "over_cap": 0}
        metrics[-1].write_text(
            json.dumps({"candidates": n + left, "valid_accuracy": 0.8 + r / 10, "calibration": calibration, **rejected})
        )
    predictions = tmp_path / "pred.csv"
    pd.DataFrame({"path": raw_table["path"], "tag": "class_02", "confidence": 0.5}).to_csv(predictions, index=False)
    out = tmp_path / "final"
    table = results.assemble(
        human_csv=paths["human_csv"], raw_csv=paths["raw_csv"], accepted_csvs=accepted, status_jsons=statuses,
        metrics_jsons=metrics, predictions_csv=predictions, dataset_csv=out / "dataset.csv",
        unlabelled_csv=out / "unlabelled.csv", rounds_csv=out / "rounds.csv",
    )
    assert list(table.columns) == results.DATASET_COLUMNS
    assert table["source"].value_counts().to_dict() == {"human": 18, "pseudo": 3, "human-duplicate": 1}
    assert (table.loc[table["source"] != "pseudo", "round"] == 0).all()
    assert table.set_index("path").loc["raw/box2/deeper/img_000.png", "round"] == 1
    # clean/class_00/img_000.png and raw/box0/img_000.png: same basename, two rows
    assert {"clean/class_00/img_000.png", "raw/box0/img_000.png"} <= set(table["path"])
    unlabelled = io.read_table(out / "unlabelled.csv")
    assert len(unlabelled) == 13 - 3 - 1 and unlabelled["label"].isna().all()
    assert set(unlabelled["path"]) | set(table["path"]) >= set(raw_table["path"])
    assert not set(unlabelled["path"]) & set(table["path"])
    rounds = pd.read_csv(out / "rounds.csv")
    assert list(rounds["accepted"]) == [2, 1] and list(rounds["labelled_raw"]) == [3, 4]
    assert list(rounds["below_min_confidence"]) == [10, 8] and list(rounds["neighbours_disagree"]) == [0, 1]
    assert rounds["coverage"].iloc[-1] == pytest.approx(4 / 13)

    results.plot_progress(rounds_csv=out / "rounds.csv", out_png=out / "progress.png")
    assert (out / "progress.png").read_bytes()[:4] == b"\x89PNG"

    truth = tmp_path / "truth.csv"
    pd.DataFrame(
        {"path": ["box0/img_000.png", "box1/img_000.png", "box2/deeper/img_000.png", "copy_of_clean.png", "box0/img_001.png", "gone.png"],
         "label": ["class_00", "class_01", "class_02", "class_01", "class_00", "class_00"]}
    ).to_csv(truth, index=False)
    result = results.evaluate(
        dataset_csv=out / "dataset.csv", raw_csv=paths["raw_csv"], rounds_csv=out / "rounds.csv", truth_csv=truth,
        out_json=out / "evaluation.json",
    )
    assert result["with_truth"] == 5 and result["truth_not_in_raw"] == 1
    r0, r1 = result["rounds"]
    assert r0["precision"] == pytest.approx(0.5) and r0["coverage"] == pytest.approx(3 / 5)
    assert r1["precision"] == pytest.approx(2 / 3) and r1["new_precision"] == 1.0 and r1["coverage"] == pytest.approx(4 / 5)
    assert json.loads((out / "evaluation.json").read_text())["final"] == r1

    for mode in ("symlink", "copy"):
        tree = tmp_path / f"tree_{mode}"
        assert results.materialize(dataset_csv=out / "dataset.csv", root=paths["root_dir"], out_dir=tree, mode=mode) == 22
        a = tree / "class_00" / "clean" / "class_00" / "img_000.png"
        b = tree / "class_00" / "raw" / "box0" / "img_000.png"
        assert a.read_bytes() == (clean / "class_00" / "img_000.png").read_bytes()
        assert b.read_bytes() == (raw / "box0" / "img_000.png").read_bytes()
        assert a.is_symlink() == (mode == "symlink")
        assert len([p for p in tree.rglob("*") if p.is_file()]) == 22
