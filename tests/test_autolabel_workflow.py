"""End to end: `snakemake autolabel` on a tiny clean + raw pile, rounds driven by the checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_tiny_dataset
from workflow_helpers import TINY_EXPERIMENT, job_counts, run_snakemake, write_tiny_config

pytestmark = pytest.mark.e2e

# 1 epoch per stage: the test checks the loop's plumbing and policy, not accuracy.
ONE_EPOCH = {
    **TINY_EXPERIMENT,
    "stages": {
        "stage1": {"epochs": 1, "lr": 0.01, "batch_size": 8, "freeze_encoder": True},
        "stage2": {"epochs": 1, "lr": 0.003, "batch_size": 8},
    },
}


def run_autolabel(workdir: Path, config: Path, *args: str, timeout: int = 600):
    """`snakemake autolabel ARGS --configfile CONFIG` (targets must come before --configfile,
    which takes several values)."""
    return run_snakemake(workdir, "autolabel", *args, "--configfile", str(config), timeout=timeout)


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def make_piles(base: Path) -> tuple[Path, Path, Path]:
    """clean: 3 classes x 8. raw: 3 x 12 in folders not named after the class, with the
    same basenames as clean files (img_000.png ...), one byte-copy of a clean image and a
    broken file; truth.csv gives the raw labels (for evaluation only)."""
    clean = make_tiny_dataset(base / "clean", per_class=8, seed=0)
    source = make_tiny_dataset(base / "source", per_class=12, seed=1)
    raw = base / "raw"
    truth = []
    for c, class_dir in enumerate(sorted(source.iterdir())):
        folder = raw / "pile" / f"box{(c + 1) % 3}"
        folder.mkdir(parents=True)
        for image in sorted(class_dir.iterdir()):
            shutil.copy(image, folder / image.name)
            truth.append((f"pile/box{(c + 1) % 3}/{image.name}", class_dir.name))
    (raw / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(clean / "class_01" / "img_003.png", raw / "nested" / "deeper" / "copy.png")
    truth.append(("nested/deeper/copy.png", "class_01"))
    good = (clean / "class_00" / "img_000.png").read_bytes()
    (raw / "broken.png").write_bytes(good[: len(good) // 2])
    truth_csv = base / "truth.csv"
    pd.DataFrame(truth, columns=["path", "label"]).to_csv(truth_csv, index=False)
    shutil.rmtree(source)
    return clean, raw, truth_csv


@pytest.fixture(scope="module")
def autolabel_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("autolabel")
    clean, raw, truth = make_piles(base)
    inputs_before = (_tree(clean), _tree(raw))
    workdir = base / "work"
    # min_confidence 0.3 < 1/3 accepts any prediction; the cap (0.25 x 8 human = 2 per class and
    # round) keeps the pile from running out, so the loop must stop at max_rounds=2.
    config = write_tiny_config(
        workdir,
        clean,
        experiments={"softmax": ONE_EPOCH},
        autolabel={
            "clean": str(clean),
            "raw": str(raw),
            "experiment": "softmax",
            "min_confidence": 0.3,
            "max_new_per_class": 0.25,
            "max_rounds": 2,
            "warm_start": True,
            "truth_csv": str(truth),
            "materialize": "symlink",
        },
    )
    result = run_autolabel(workdir, config, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (_tree(clean), _tree(raw)) == inputs_before  # inputs are read-only
    return workdir, config, clean, raw


def test_rounds_stop_for_the_right_reason(autolabel_run):
    workdir, *_ = autolabel_run
    out = workdir / "results/autolabel"
    s0 = json.loads((out / "round_0/status.json").read_text())
    s1 = json.loads((out / "round_1/status.json").read_text())
    assert s0 == {"round": 0, "accepted": s0["accepted"], "remaining": 36 - s0["accepted"], "stop": False, "reason": None}
    assert s1["stop"] is True and s1["reason"] == "max_rounds reached"
    assert 1 <= s0["accepted"] <= 6 and 1 <= s1["accepted"] <= 6
    assert s1["remaining"] == 36 - s0["accepted"] - s1["accepted"]
    assert not (out / "round_2").exists()
    rounds = pd.read_csv(out / "rounds.csv")
    assert list(rounds["round"]) == [0, 1] and list(rounds["reason"].fillna("")) == ["", "max_rounds reached"]
    for r in (0, 1):
        decisions = rounds.loc[r, ["accepted", "below_min_confidence", "neighbours_disagree", "over_cap"]]
        assert decisions.sum() == rounds.loc[r, "candidates"]
        metrics = json.loads((out / f"round_{r}/metrics.json").read_text())
        assert rounds.loc[r, "neighbours_disagree"] == metrics["neighbours_disagree"]


def test_round_outputs_and_policy(autolabel_run):
    workdir, *_ = autolabel_run
    out = workdir / "results/autolabel"
    for r in (0, 1):
        accepted = pd.read_csv(out / f"round_{r}/accepted.csv", dtype={"tag": str})
        assert list(accepted.columns) == ["path", "tag", "class", "confidence", "round"]
        assert accepted["path"].str.startswith("raw/pile/").all() and (accepted["round"] == r).all()
        assert (accepted.groupby("tag").size() <= 2).all()  # the class-balance cap
        assert (accepted["confidence"] >= 0.3).all()
        counts = pd.read_csv(out / f"round_{r}/counts.csv")
        assert counts["accepted"].sum() == len(accepted)
        assert (counts["predicted"] == counts["accepted"] + counts["rejected"]).all()
        assert (counts["rejected"] == counts[["below_min_confidence", "neighbours_disagree", "over_cap"]].sum(axis=1)).all()
        # the neighbour guard is on by default: every accepted row had agreeing neighbours
        predictions = pd.read_csv(out / f"round_{r}/predictions.csv")
        decided = predictions.set_index("path").loc[accepted["path"]]
        assert decided["neighbours_agree"].all() and (decided["decision"] == "accepted").all()
        assert ((predictions["decision"] == "neighbours disagree") == (
            ~predictions["neighbours_agree"] & (predictions["confidence"] >= predictions["min_confidence"])
        )).all()
        metrics = json.loads((out / f"round_{r}/metrics.json").read_text())
        cal = metrics["calibration"]
        # the 8 validation rows: some chose the checkpoint, the rest (calibration.holdout 0.5) calibrate
        assert metrics["valid_images"] + metrics["calibration_images"] == 8 and 0 <= metrics["valid_accuracy"] <= 1
        assert 3 <= metrics["calibration_images"] <= 5
        assert 0 <= cal["ece_before"] <= 1 and 0 <= cal["ece_after"] <= 1
        # the default floor: calibration may soften the model, never sharpen it
        assert cal["min_temperature"] == 1.0 and cal["temperature"] >= 1.0
        assert metrics["ece_bins"] == 15 and metrics["neighbours"] == 10
        assert metrics["neighbours_disagree"] == counts["neighbours_disagree"].sum()
        for stage in ("stage1", "stage2"):  # a round keeps best and last, no top-k copies
            assert (out / f"round_{r}/{stage}/best.pt").is_file() and (out / f"round_{r}/{stage}/last.pt").is_file()
            assert list((out / f"round_{r}/{stage}/checkpoints").glob("*.pt")) == []
            assert json.loads((out / f"round_{r}/{stage}/metrics.json").read_text())["spec"]["top_k"] == 0
    # round 1 trains on round 0's pseudo-labels, never validates on them
    round1 = pd.read_csv(out / "round_1/dataset.csv")
    acc0 = pd.read_csv(out / "round_0/accepted.csv")
    pseudo = round1[round1["path"].str.startswith("raw/")]
    assert sorted(pseudo["path"]) == sorted(acc0["path"]) and (pseudo["fold"] == -1).all()
    # sha1 (the resume fingerprint sees a replaced image) and group (copies stay on one side) as in human.csv
    assert list(round1.columns) == ["path", "tag", "class", "fold", "sha1", "group", "source"]
    assert (pseudo["source"] == "pseudo").all() and round1["group"].is_unique and round1["sha1"].notna().all()
    assert round1.loc[round1["fold"] == 2, "path"].str.startswith("clean/").all()
    # warm start: round 1's first stage starts from round 0's final model
    log = (workdir / "results/logs/autolabel/round_1/stage1.log").read_text()
    assert "initialised from results/autolabel/round_0/stage2/best.pt" in log
    selecting = json.loads((out / "round_1/metrics.json").read_text())["valid_images"]
    assert f"/ {selecting} valid images" in log  # the rows that choose the checkpoint, not the calibration rows


def test_final_dataset(autolabel_run):
    workdir, _, clean, raw = autolabel_run
    out = workdir / "results/autolabel"
    table = pd.read_csv(out / "dataset.csv", dtype={"label": str})
    assert list(table.columns) == ["path", "label", "source", "round", "confidence"]
    by_source = table["source"].value_counts().to_dict()
    assert by_source["human"] == 24 and by_source["human-duplicate"] == 1
    accepted = sum(len(pd.read_csv(out / f"round_{r}/accepted.csv")) for r in (0, 1))
    assert by_source["pseudo"] == accepted
    assert (table.loc[table["source"] != "pseudo", "round"] == 0).all()
    assert set(table.loc[table["source"] == "pseudo", "round"]) <= {0, 1}
    dup = table.set_index("path").loc["raw/nested/deeper/copy.png"]
    assert dup["label"] == "class_01" and dup["source"] == "human-duplicate"
    # same basename, different roots: two identities
    assert "clean/class_00/img_000.png" in set(table["path"])
    assert not table["path"].duplicated().any()
    unlabelled = pd.read_csv(out / "unlabelled.csv")
    assert unlabelled["label"].isna().all() and len(unlabelled) == 36 - accepted
    raw_paths = {"raw/" + p.relative_to(raw).as_posix() for p in raw.rglob("*.png")} - {"raw/broken.png"}
    assert raw_paths == set(unlabelled["path"]) | set(table.loc[table["path"].str.startswith("raw/"), "path"])
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped["path"]) == ["raw/broken.png"]
    assert (out / "progress.png").read_bytes()[:4] == b"\x89PNG"

    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["with_truth"] == 37 and [r["round"] for r in evaluation["rounds"]] == [0, 1]
    coverage = [r["coverage"] for r in evaluation["rounds"]]
    assert coverage[0] < coverage[1] <= 1 and coverage[1] == pytest.approx((accepted + 1) / 37)
    assert all(0 <= r["precision"] <= 1 for r in evaluation["rounds"])

    tree = out / "dataset"
    link = tree / "class_00" / "clean" / "class_00" / "img_000.png"
    assert link.is_symlink() and Path(os.path.realpath(link)) == (clean / "class_00" / "img_000.png").resolve()
    assert len([p for p in tree.rglob("*.png")]) == len(table)


def test_rerun_does_nothing(autolabel_run):
    workdir, config, *_ = autolabel_run
    result = run_autolabel(workdir, config, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_more_rounds_continue_without_retraining(autolabel_run):
    workdir, config, *_ = autolabel_run
    more = workdir / "config_more_rounds.yaml"
    more.write_text(config.read_text().replace("max_rounds: 2", "max_rounds: 3"))
    result = run_autolabel(workdir, more, "-n")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    # round 1 is no longer the last: only its (cheap) selection step is redone, no training
    counts = job_counts(out)
    assert counts["autolabel_round"] == 1 and "train_stage" not in counts, counts
    assert "round=1" in out


def test_dry_run_lists_round_zero(tmp_path):
    clean, raw, _ = make_piles(tmp_path / "data")
    config = write_tiny_config(
        tmp_path / "work", clean, experiments={"softmax": ONE_EPOCH}, autolabel={"clean": str(clean), "raw": str(raw)}
    )
    result = run_autolabel(tmp_path / "work", config, "-n")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for rule in ("autolabel_prepare", "autolabel_round_dataset", "train_stage", "autolabel_round"):
        assert rule in out
    assert "results/autolabel/round_0/status.json" in out and "round_1" not in out
    assert not (tmp_path / "work" / "results").exists()


@pytest.mark.parametrize(
    ("autolabel", "expected"),
    [
        ({}, "autolabel.clean"),
        ({"clean": "CLEAN", "raw": None}, "autolabel.raw"),
        ({"clean": "CLEAN", "raw": "/no/such/folder"}, "autolabel.raw"),
        ({"clean": "CLEAN", "raw": "RAW", "class_min_confidence": {"cow": 0.5}}, "autolabel.class_min_confidence"),
        ({"clean": "CLEAN", "raw": "RAW", "experiment": "nonexistent"}, "autolabel.experiment"),
        ({"clean": "CLEAN", "raw": "RAW", "truth_csv": "/no/truth.csv"}, "autolabel.truth_csv"),
    ],
)
def test_bad_autolabel_config_names_the_key(tmp_path, autolabel, expected):
    clean = make_tiny_dataset(tmp_path / "clean", per_class=3)
    raw = make_tiny_dataset(tmp_path / "raw", per_class=2, seed=5)
    autolabel = {k: {"CLEAN": str(clean), "RAW": str(raw)}.get(v, v) if isinstance(v, str) else v for k, v in autolabel.items()}
    config = write_tiny_config(tmp_path / "work", clean, autolabel=autolabel)
    result = run_autolabel(tmp_path / "work", config, "-n")
    out = result.stdout + result.stderr
    assert result.returncode != 0 and expected in out
    assert not (tmp_path / "work" / "results").exists()
    # the default target does not care about the autolabel section
    assert run_snakemake(tmp_path / "work", "-n", configfile=config).returncode == 0


def test_out_of_range_min_temperature_fails_validation(tmp_path):
    clean = make_tiny_dataset(tmp_path / "clean", per_class=3)
    config = write_tiny_config(
        tmp_path / "work", clean, autolabel={"clean": str(clean), "raw": str(clean)}, calibration={"min_temperature": 0.0}
    )
    # the config is validated once, for every target: a bad value stops the default run too
    for target in ("autolabel", "all"):
        result = run_snakemake(tmp_path / "work", target, "-n", configfile=config)
        out = result.stdout + result.stderr
        assert result.returncode != 0 and "min_temperature" in out and "0.05" in out
    assert not (tmp_path / "work" / "results").exists()


def _with(config: Path, name: str, **autolabel_and_top) -> Path:
    """A copy of the fixture's config file with some keys changed (autolabel.review, corrections)."""
    import yaml

    data = yaml.safe_load(config.read_text())
    review = autolabel_and_top.pop("review", None)
    if review is not None:
        data["autolabel"]["review"] = review
    data.update(autolabel_and_top)
    path = config.parent / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_review_queue_after_the_loop(autolabel_run):
    """Uncertain x diverse images for a person, as a table, a Label Studio import and a sheet;
    only the review jobs run (the loop is done)."""
    workdir, config, *_ = autolabel_run
    review = _with(config, "config_review.yaml", review={"size": 5, "pool": 20})
    result = run_snakemake(workdir, "autolabel_review", "--configfile", str(review))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train_stage" not in result.stdout + result.stderr
    out = workdir / "results/autolabel"
    queue = pd.read_csv(out / "review/queue.csv", dtype={"label": str, "predicted": str}, keep_default_na=False)
    assert queue["rank"].tolist() == [1, 2, 3, 4, 5] and queue["path"].str.startswith("raw/").all()
    assert set(queue["status"]) <= {"unlabelled", "pseudo"} and queue["path"].is_unique
    assert queue["margin"].between(0, 1).all() and (queue["uncertainty"] == 1 - queue["margin"]).all()
    unlabelled = set(pd.read_csv(out / "unlabelled.csv")["path"])
    assert set(queue.loc[queue["status"] == "unlabelled", "path"]) <= unlabelled
    tasks = json.loads((out / "review/label_studio_tasks.json").read_text())
    assert [t["data"]["path"] for t in tasks] == queue["path"].tolist()
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=" + queue["path"][0]
    result_ = tasks[0]["predictions"][0]["result"][0]
    assert result_["type"] == "choices" and result_["value"]["choices"] == [queue["predicted"][0]]
    assert "<Choices name=\"label\" toName=\"image\"" in (out / "review/label_studio_config.xml").read_text()
    page = (out / "review/sheet/index.html").read_text()
    assert page.count("<tr>") == 6 and len(list((out / "review/sheet/thumbs").glob("*.png"))) == 5


def test_review_answers_and_clean_corrections_redo_the_rounds(autolabel_run, tmp_path):
    """corrections.csv answers a queued raw image and relabels a clean one: a correction step
    between prepare and the rounds; every round reruns, the scan of the piles does not."""
    workdir, config, *_ = autolabel_run
    corrections = tmp_path / "corrections.csv"
    corrections.write_text("path,label\nraw/pile/box1/img_000.png,class_00\nclean/class_01/img_000.png,drop\n")
    corrected = _with(config, "config_corrected.yaml", corrections=str(corrections))
    result = run_autolabel(workdir, corrected, "-n")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    counts = job_counts(out)
    assert counts["autolabel_corrections"] == 1 and counts["autolabel_round"] == 1 and counts["train_stage"] == 2
    assert "autolabel_prepare" not in counts
    done = run_snakemake(workdir, "results/autolabel/data/corrected/human.csv", "--configfile", str(corrected))
    assert done.returncode == 0, done.stderr[-3000:]
    human = pd.read_csv(workdir / "results/autolabel/data/corrected/human.csv").set_index("path")
    answered = human.loc["raw/pile/box1/img_000.png"]
    assert answered[["tag", "class", "fold", "source"]].tolist() == ["class_00", 0, -1, "human-corrected"]
    raw = pd.read_csv(workdir / "results/autolabel/data/raw.csv").set_index("path")
    assert answered["sha1"] == raw.loc["raw/pile/box1/img_000.png", "sha1"]  # provenance kept
    assert answered["group"] not in set(human["group"].drop(index="raw/pile/box1/img_000.png"))
    assert "clean/class_01/img_000.png" not in human.index and len(human) == 24
