"""The validation fold's calibration part: held out from checkpoint selection, fitted on, and
the temperature and ECE it gives (labelflow.dataset.calibration_mask, labelflow.calibration)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from labelflow.calibration import CalibrationSettings, calibrate, calibrate_run
from labelflow.dataset import calibration_mask, split_names
from labelflow.io import DatasetError, save_npy_atomic, write_csv_atomic, write_json_atomic


def _table(n_per_class=10, classes=("a", "b", "c"), folds=5, groups=None):
    rows = [(f"{c}/{i}.png", c, k, i % folds) for k, c in enumerate(classes) for i in range(n_per_class)]
    table = pd.DataFrame(rows, columns=["path", "tag", "class", "fold"])
    if groups is not None:
        table["group"] = groups
    return table


def test_calibration_rows_are_half_of_each_class_in_the_validation_fold():
    table = _table(n_per_class=20)
    held = calibration_mask(table, [4], seed=0, share=0.5)
    assert not held[table["fold"] != 4].any()  # only validation rows
    per_class = table[held].groupby("tag").size().to_dict()
    assert per_class == {"a": 2, "b": 2, "c": 2}  # floor(0.5 * 4) of each class's 4 valid images
    np.testing.assert_array_equal(held, calibration_mask(table, [4], seed=0, share=0.5))  # seeded
    assert not np.array_equal(held, calibration_mask(table, [4], seed=1, share=0.5))
    assert not calibration_mask(table, [4], seed=0, share=0.0).any()
    names = split_names(table, [4], 0, 0.5)
    assert set(names[table["fold"] == 4]) == {"valid", "calibration"} and set(names[table["fold"] != 4]) == {"train"}
    with pytest.raises(DatasetError, match="calibration.holdout"):
        calibration_mask(table, [4], seed=0, share=1.0)


def test_duplicate_groups_stay_on_one_side():
    table = _table(n_per_class=40, folds=1)  # every row validates
    table["group"] = np.arange(len(table)) // 4  # groups of 4 images, one class each
    for seed in range(5):
        held = calibration_mask(table, [0], seed=seed, share=0.5)
        sides = pd.Series(held).groupby(table["group"]).nunique()
        assert (sides == 1).all()
        assert held.sum() == 3 * 5 * 4  # floor(0.5 * 10 groups) of each class's groups


def test_calibrate_scores_ece_on_images_that_did_not_fit_the_temperature():
    from labelflow.losses import probabilities

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (2000, 3))
    logits[np.arange(2000), rng.integers(3, size=2000)] += 2.0
    # labels drawn from the softmax: calibrated at T = 1, so the logits x 4 want T = 4
    labels = np.array([rng.choice(3, p=p) for p in probabilities(logits, "softmax")])
    cal = calibrate(logits * 4.0, labels, "softmax", min_temperature=0.05, seed=0)
    assert cal.ece_after_method == "cross-fitted (2 halves)"
    assert cal.temperature == pytest.approx(4.0, rel=0.2)
    assert cal.ece_after < cal.ece_before / 3
    # in-sample ECE at the fitted temperature is lower than the honest cross-fitted figure
    from labelflow.calibration import confidence_and_correct, expected_calibration_error

    in_sample = expected_calibration_error(*confidence_and_correct(logits * 4.0, labels, "softmax", cal.temperature))
    assert in_sample <= cal.ece_after + 1e-9


def test_calibrate_run_fits_on_the_calibration_rows_only(tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    split = np.array(["train"] * 100 + ["valid"] * 100 + ["calibration"] * 100)
    classes = rng.integers(2, size=n)
    logits = rng.normal(0, 1, (n, 2))
    logits[np.arange(n), classes] += 1.0
    logits[split == "calibration"] *= 5.0  # overconfident where it is fitted: T near 5
    predictions = pd.DataFrame(
        {"path": [f"{i}.png" for i in range(n)], "split": split, "class": classes,
         "label": np.where(classes == 1, "y", "x"), "predicted": "x", "confidence": 0.5}
    )  # fmt: skip
    write_csv_atomic(predictions, tmp_path / "predictions.csv")
    save_npy_atomic(tmp_path / "logits.npy", logits.astype(np.float32))
    write_json_atomic({"x": 0, "y": 1}, tmp_path / "tag2cls.json")
    experiment = {"heads": [{"name": "class", "loss": "cross_entropy", "decision_threshold": 0.5}]}
    kwargs = dict(predictions_csv=tmp_path / "predictions.csv", logits_npy=tmp_path / "logits.npy",
                  tag2cls_json=tmp_path / "tag2cls.json", experiment=experiment, seed=0)  # fmt: skip
    result = calibrate_run(**kwargs, settings=CalibrationSettings(holdout=0.5, min_temperature=0.05, sharpen_min_errors=None), out_json=tmp_path / "c.json")
    assert result["n"] == 100 and result["temperature"] > 3.0 and result["fitted_on"].startswith("calibration rows")
    assert json.loads((tmp_path / "c.json").read_text())["temperature"] == result["temperature"]
    # without calibration rows it falls back to the whole validation fold, and says so
    write_csv_atomic(predictions.assign(split=np.where(split == "calibration", "valid", split)), tmp_path / "predictions.csv")
    fallback = calibrate_run(**kwargs, settings=CalibrationSettings(holdout=0.0, min_temperature=0.05, sharpen_min_errors=None), out_json=tmp_path / "d.json")
    assert fallback["n"] == 200 and "also selected the checkpoint" in fallback["fitted_on"]


def test_enough_errors_lift_the_floor_so_an_underconfident_model_is_sharpened(tmp_path):
    from labelflow.losses import probabilities

    rng = np.random.default_rng(4)
    logits = rng.normal(0, 1.5, (3000, 10))
    logits[np.arange(3000), rng.integers(10, size=3000)] += 4.0
    labels = np.array([rng.choice(10, p=p) for p in probabilities(logits, "softmax")])
    underconfident = logits * 0.5  # as label smoothing leaves a model: wants T = 0.5
    floored = calibrate(underconfident, labels, "softmax", min_temperature=1.0, sharpen_min_errors=None)
    assert floored.temperature == 1.0 and floored.temperature_floor == 1.0
    assert floored.errors == int((underconfident.argmax(1) != labels).sum()) and floored.errors > 100
    lifted = calibrate(underconfident, labels, "softmax", min_temperature=1.0, sharpen_min_errors=30)
    assert lifted.temperature_floor == 0.05 and lifted.temperature == pytest.approx(0.5, rel=0.15)
    assert lifted.ece_after < floored.ece_after / 3 and lifted.nll_after < floored.nll_after
    # too few errors to fit T: the floor stays (the all-correct fold that would drive T to 0)
    few = (underconfident.argmax(1) == labels)
    few[np.flatnonzero(~few)[:29]] = True
    kept = calibrate(underconfident[few], labels[few], "softmax", min_temperature=1.0, sharpen_min_errors=30)
    assert kept.errors == 29 and kept.temperature_floor == 1.0 and kept.temperature == 1.0
    few[np.flatnonzero(~(underconfident.argmax(1) == labels))[29]] = True  # one more error: 30 lifts it
    lifted = calibrate(underconfident[few], labels[few], "softmax", min_temperature=1.0, sharpen_min_errors=30)
    assert lifted.errors == 30 and lifted.temperature_floor == 0.05 and lifted.temperature < 1.0
    with pytest.raises(ValueError, match="sharpen_min_errors"):
        calibrate(underconfident, labels, "softmax", sharpen_min_errors=0)


def test_calibrate_run_reports_the_floor_it_applied(tmp_path):
    rng = np.random.default_rng(2)
    n = 400
    classes = rng.integers(2, size=n)
    logits = rng.normal(0, 1, (n, 2))
    logits[np.arange(n), classes] += 1.0
    predictions = pd.DataFrame(
        {"path": [f"{i}.png" for i in range(n)], "split": "calibration", "class": classes,
         "label": np.where(classes == 1, "y", "x"), "predicted": "x", "confidence": 0.5}
    )  # fmt: skip
    write_csv_atomic(predictions, tmp_path / "predictions.csv")
    save_npy_atomic(tmp_path / "logits.npy", (logits * 0.3).astype(np.float32))  # under-confident
    write_json_atomic({"x": 0, "y": 1}, tmp_path / "tag2cls.json")
    kwargs = dict(predictions_csv=tmp_path / "predictions.csv", logits_npy=tmp_path / "logits.npy",
                  tag2cls_json=tmp_path / "tag2cls.json", experiment={"heads": [{"name": "class", "loss": "cross_entropy", "decision_threshold": 0.5}]},
                  seed=0)  # fmt: skip
    result = calibrate_run(**kwargs, settings=CalibrationSettings(0.5, 1.0, 30), out_json=tmp_path / "c.json")
    written = json.loads((tmp_path / "c.json").read_text())
    assert written["errors"] > 30 and written["temperature_floor"] == 0.05 and written["min_temperature"] == 1.0
    assert result["temperature"] < 0.6
    never = calibrate_run(**kwargs, settings=CalibrationSettings(0.5, 1.0, None), out_json=tmp_path / "d.json")
    assert never["temperature"] == 1.0 and never["temperature_floor"] == 1.0


def test_multilabel_calibration_decides_at_the_heads_decision_threshold(tmp_path):
    """right, errors and accuracy of multi-hot rows are the model's answers: every class whose
    uncalibrated sigmoid reaches the class head's decision_threshold (as rule infer, predict and
    summary.json decide), not a fixed 0.5."""
    from labelflow.calibration import confidence_and_correct
    from labelflow.losses import probabilities
    from labelflow.metrics import head_metrics

    rng = np.random.default_rng(3)
    n = 200
    targets = (rng.random((n, 3)) < 0.4).astype(np.float32)
    targets[targets.sum(axis=1) == 0, 0] = 1.0  # every image has a label
    # true classes at sigmoid 0.31..0.5: right at threshold 0.25, wrong at 0.5
    logits = np.where(targets > 0, rng.uniform(-0.8, 0.0, (n, 3)), rng.uniform(-4.0, -1.5, (n, 3))).astype(np.float32)
    predictions = pd.DataFrame(
        {"path": [f"{i}.png" for i in range(n)], "split": "calibration", "class": targets.argmax(1),
         "label": [";".join("xyz"[c] for c in np.flatnonzero(row)) for row in targets], "predicted": "", "confidence": 0.5}
    )  # fmt: skip
    assert predictions["label"].str.contains(";").any()
    write_csv_atomic(predictions, tmp_path / "predictions.csv")
    save_npy_atomic(tmp_path / "logits.npy", logits)
    write_json_atomic({"x": 0, "y": 1, "z": 2}, tmp_path / "tag2cls.json")
    for threshold in (0.25, 0.5):
        result = calibrate_run(
            predictions_csv=tmp_path / "predictions.csv", logits_npy=tmp_path / "logits.npy",
            tag2cls_json=tmp_path / "tag2cls.json", experiment={"heads": [{"name": "class", "loss": "bce", "decision_threshold": threshold}]},
            settings=CalibrationSettings(0.5, 1.0, 10), seed=0, out_json=tmp_path / "c.json",
        )  # fmt: skip
        wrong = ((probabilities(logits, "sigmoid") >= threshold) != (targets > 0.5)).any(axis=1)
        assert result["errors"] == int(wrong.sum())
        assert result["accuracy"] == pytest.approx(head_metrics(logits, targets, "sigmoid", threshold)["accuracy"])
        if threshold == 0.25:
            assert result["accuracy"] == 1.0 and result["errors"] == 0 and result["temperature_floor"] == 1.0
        else:
            assert result["accuracy"] < 0.5 and result["errors"] >= 10 and result["temperature_floor"] == 0.05
    # ECE bins the same decisions: at 0.25 every (image, class) decision is right
    assert confidence_and_correct(logits, targets, "sigmoid", 2.0, 0.25)[1].all()
