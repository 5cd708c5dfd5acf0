"""Smoke tests: every benchmark runs at its smallest size and reports its figures with their
spread. No timing is asserted (these machines are shared); the shape of the figures is:
every round has a positive ratio, min <= median <= max, and the round count is the one asked.

The throughput smoke tests pass --threads 1: on a loaded 2-core machine two OpenMP threads
that wait for each other made a tiny epoch more than 10x slower than one thread.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from spread import Comparison, Spread, run_interleaved  # noqa: E402


def _run(script: str, *args: str, expect: int = 0, timeout: int = 600) -> str:
    """stdout of `python benchmarks/SCRIPT ARGS`, which must exit with `expect`."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _check_spread(figure: dict, rounds: int) -> None:
    values = figure["rounds"]
    assert len(values) == rounds
    assert all(v > 0 for v in values)
    assert figure["min"] <= figure["median"] <= figure["max"]
    assert figure["min"] == min(values) and figure["max"] == max(values)


# --------------------------------------------------------------------------- spread.py


def test_rounds_alternate_who_goes_first_and_measurements_reach_min_seconds():
    calls: list[str] = []

    def side(name: str):
        def run_pass() -> int:
            calls.append(name)
            return 10

        return run_pass

    comparison = Comparison("x", side("ours"), side("reference"))
    run_interleaved([comparison], rounds=3, min_seconds=0.0, progress=None)
    # warm-up (ours, reference), then round 0 ours first, round 1 reference first, round 2 ours first
    assert calls == ["ours", "reference", "ours", "reference", "reference", "ours", "ours", "reference"]
    assert len(comparison.ratios.rounds) == 3 and comparison.ours_repeats == comparison.reference_repeats == 1

    slow = Comparison("y", lambda: (__import__("time").sleep(0.02), 1)[1], lambda: 1)
    run_interleaved([slow], rounds=1, min_seconds=0.05, progress=None)
    # each side gets its own count: the 20 ms side about 3 passes, the instant reference many more
    assert slow.ours_repeats >= 2 and slow.reference_repeats > slow.ours_repeats


def test_before_round_runs_once_before_every_timed_round_and_not_in_the_warm_up():
    events: list[str] = []
    comparison = Comparison("x", lambda: (events.append("ours"), 1)[1], lambda: (events.append("ref"), 1)[1])
    run_interleaved([comparison], rounds=2, min_seconds=0.0, progress=None,
                    before_round=lambda r: events.append(f"reload {r}"))
    assert events == ["ours", "ref", "reload 0", "ours", "ref", "reload 1", "ref", "ours"]


def test_index_reloaded_for_a_round_answers_like_the_built_one(tmp_path):
    import index_scale

    args = index_scale.parse_args(["--sizes", "500", "--queries", "20", "--dim", "16", "--intrinsic-dim", "4"])
    synthetic = index_scale.Synthetic(args, np.random.default_rng(0))
    data, queries = synthetic(500), synthetic(20)
    index, _ = index_scale.build_index(data, args)
    before = index_scale.hnsw_query(index, queries, args.k, 1, single=False)
    fresh = index_scale.FreshCopies(index, data, args, tmp_path)
    old_data = fresh.data
    fresh.reload(0)
    assert fresh.index is not index and not np.shares_memory(fresh.data, old_data)
    np.testing.assert_array_equal(fresh.data, old_data)
    np.testing.assert_array_equal(index_scale.hnsw_query(fresh.index, queries, args.k, 1, single=False), before)


def test_autolabel_peers_judged_at_the_workflows_class_mix(tmp_path):
    """A peer whose most confident predictions are all of an easy class beats the workflow at
    equal coverage; at the workflow's class mix it must take its hard-class predictions too."""
    import autolabel_fashion as alf

    # classes 0 (easy: every prediction right, most confident) and 1 (hard: half right)
    predicted = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    confidence = np.array([0.99, 0.98, 0.97, 0.96, 0.90, 0.89, 0.88, 0.87])
    truth = np.array([0, 0, 0, 0, 1, 0, 1, 0])
    assert alf.precision_at(predicted, confidence, truth, 4) == 1.0
    # 2 of each class: the top two of class 0 and of class 1 (one right): 3 of 4
    assert alf.precision_at_class_mix(predicted, confidence, truth, {0: 2, 1: 2}) == (0.75, 4)
    # more asked of a class than predicted: all of them, and fewer images judged
    assert alf.precision_at_class_mix(predicted, confidence, truth, {1: 10}) == (0.5, 4)
    assert alf.precision_at_class_mix(predicted, confidence, truth, {}) == (None, 0)

    results = tmp_path / "results/autolabel"
    results.mkdir(parents=True)
    (results / "dataset.csv").write_text(
        "path,label,source,round,confidence\n"
        "clean/a/1.png,a,human,0,1.0\n"  # human labels are not coverage of the raw pile
        "raw/0/1.png,a,pseudo,0,0.95\nraw/0/2.png,b,pseudo,0,0.91\nraw/1/3.png,b,pseudo,1,0.93\n")
    # round 2 accepted nothing: it keeps round 1's mix
    mixes = alf.class_mix_per_round(tmp_path, ["a", "b"], [0, 1, 2])
    assert mixes == {0: {0: 1, 1: 1}, 1: {0: 1, 1: 2}, 2: {0: 1, 1: 2}}
    with pytest.raises(SystemExit, match=r"labels \['b'\] are not classes of clean/ \(a, c\)"):
        alf.class_mix_per_round(tmp_path, ["a", "c"], [0])

    rounds = [{"round": 0, "labelled": 3, "coverage": 0.375, "precision": 0.8, "precision_all": 0.8, "new": 3},
              {"round": 1, "labelled": 3, "coverage": 0.375, "precision": 0.8, "precision_all": 0.8, "new": 0}]
    peers = {"peer": (predicted, confidence)}
    rows = alf.compare({"rounds": rounds}, peers, truth, {0: {0: 1, 1: 2}, 1: {0: 1, 1: 2}})
    for row in rows:  # the round that accepted nothing is judged too
        assert row["peers"] == {"peer": 1.0} and row["above_all"] is False
        assert row["peers_class_mix"] == {"peer": pytest.approx(2 / 3)} and row["above_all_class_mix"] is True
        assert row["margin_class_mix"] == pytest.approx(0.8 - 2 / 3) and row["judged_class_mix"] == {"peer": 3}
    five = [{**rounds[0], "labelled": 5}]  # 5 of class 1; the peer predicted 4 of it: judged on 4
    (row,) = alf.compare({"rounds": five}, peers, truth, {0: {1: 5}})
    assert row["judged_class_mix"] == {"peer": 4} and row["peers_class_mix"] == {"peer": 0.5}
    with pytest.raises(SystemExit, match="round 0: .*dataset.csv holds 2 labelled raw images, evaluation.json 3"):
        alf.compare({"rounds": rounds[:1]}, peers, truth, {0: {0: 1, 1: 1}})


def test_autolabel_fashion_class_cap_option_reaches_the_config_and_gets_its_own_folder(tmp_path):
    import autolabel_fashion as alf

    def parsed(*argv):
        parser = argparse.ArgumentParser()
        parser.add_argument("--max-new-per-class", type=alf.class_cap, default=alf.DEFAULT)
        return argparse.Namespace(max_rounds=None, **vars(parser.parse_args(list(argv))))

    default, none, three = parsed(), parsed("--max-new-per-class", "none"), parsed("--max-new-per-class", "3")
    section = alf.autolabel_section(Path("c"), Path("r"), Path("t.csv"), "fashion", default)
    assert "max_new_per_class" not in section  # the config's default applies
    assert alf.autolabel_section(Path("c"), Path("r"), Path("t.csv"), "fashion", none)["max_new_per_class"] is None
    assert alf.autolabel_section(Path("c"), Path("r"), Path("t.csv"), "fashion", three)["max_new_per_class"] == 3.0
    folders = {alf.seed_folder(tmp_path, 103, a).name for a in (default, none, three)}
    assert folders == {"seed_103", "seed_103_capnone", "seed_103_cap3.0"}
    with pytest.raises(SystemExit):
        parsed("--max-new-per-class", "-1")


def test_autolabel_policies_redecide_round_zero_and_judge_each_policy_at_its_own_coverage():
    import autolabel_policies as ap

    # class a: 4 confident, right; class b: 2 confident, one wrong; c: below the threshold
    candidates = pd.DataFrame({
        "path": [f"raw/{i}.png" for i in range(8)],
        "tag": ["a", "a", "a", "a", "b", "b", "c", "c"],
        "confidence": [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.5, 0.4],
        "neighbours_agree": [True] * 8,
    })  # fmt: skip
    truth = dict(zip(candidates["path"], ["a", "a", "a", "a", "b", "a", "c", "c"]))
    peer_truth = np.zeros(8, dtype=int)  # a peer right on every image it ranks first
    peers = {"peer": (np.zeros(8, dtype=int), np.linspace(1, 0.3, 8))}
    base = {"neighbours": 10, "reference_per_class": 500, "min_confidence": 0.9}
    capped = ap.simulate(candidates, truth, {"a": 2, "b": 2, "c": 2}, {**base, "max_new_per_class": 1.0}, peers, peer_truth)
    assert capped["accepted"] == 4 and capped["precision"] == 0.75  # 2 of a, 2 of b (one wrong)
    assert capped["peers"] == {"peer": 1.0} and capped["margin"] == pytest.approx(-0.25)
    free = ap.simulate(candidates, truth, {"a": 2, "b": 2, "c": 2}, {**base, "max_new_per_class": None}, peers, peer_truth)
    assert free["accepted"] == 6 and free["precision"] == pytest.approx(5 / 6)
    none = ap.simulate(candidates, truth, {"a": 2, "b": 2, "c": 2}, {**base, "min_confidence": 0.999, "max_new_per_class": None},
                       peers, peer_truth)
    assert none["accepted"] == 0 and none["precision"] is None and none["margin"] is None


def test_spread_summary():
    spread = Spread((1.0, 3.0, 2.0))
    assert (spread.min, spread.median, spread.max) == (1.0, 2.0, 3.0)
    assert spread.as_dict("x") == {"unit": "x", "rounds": [1.0, 3.0, 2.0], "min": 1.0, "median": 2.0, "max": 3.0}


def test_fast_paths_off_reaches_every_module_and_observe_inputs_sees_it():
    import torch

    import labelflow.device
    import labelflow.inference
    import labelflow.training
    from gpu_check import fast_paths_off, observe_inputs

    cuda, images = torch.device("cuda"), torch.zeros(2, 3, 4, 4)
    modules = (labelflow.device, labelflow.training, labelflow.inference)
    originals = [(m.autocast, m.images_for) for m in modules]
    assert labelflow.training.images_for(images, cuda).is_contiguous(memory_format=torch.channels_last)
    with fast_paths_off():
        for module in modules:
            assert module.images_for(images, cuda) is images
            assert module.autocast.__name__ == "autocast_off"
        assert labelflow.training.place_model.__name__ == "place_only"
    assert [(m.autocast, m.images_for) for m in modules] == originals

    model, seen = torch.nn.Conv2d(3, 1, 1), set()
    with observe_inputs(model, torch.device("cpu"), seen):
        model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images.contiguous(memory_format=torch.channels_last))
    assert seen == {"no autocast, contiguous", "bfloat16 autocast, channels_last"}


# --------------------------------------------------------------------------- compare_runs.py


def _figures_file(path: Path, medians: dict[str, float]) -> Path:
    figures = {name: {"unit": "u", "rounds": [m], "min": m, "median": m, "max": m} for name, m in medians.items()}
    path.write_text(json.dumps({"benchmark": "t", "figures": figures}))
    return path


def test_compare_runs_agrees_differs_and_filters(tmp_path):
    a = _figures_file(tmp_path / "a.json", {"train_ratio": 1.00, "train_ours": 100.0})
    b = _figures_file(tmp_path / "b.json", {"train_ratio": 1.02, "train_ours": 90.0, "only_here": 1.0})
    out = _run("compare_runs.py", str(a), str(b), expect=1)
    assert re.search(r"\| train_ratio \|.*\| \+2\.0 % \| agree \|", out)
    assert re.search(r"\| train_ours \|.*\| -10\.0 % \| DIFFER \|", out)
    assert "only_here" not in out
    out = _run("compare_runs.py", str(a), str(b), "--figures", "*ratio", expect=0)
    assert "all 1 figures agree within 3 %" in out
    _run("compare_runs.py", str(a), str(b), "--figures", "nothing*", expect=2)


# --------------------------------------------------------------------------- the benchmarks


def test_train_throughput_smoke(tmp_path):
    out = _run("train_throughput.py", "--images", "64", "--batch-size", "16", "--rounds", "2", "--min-seconds", "0",
               "--threads", "1", "--json", str(tmp_path / "run.json"))
    assert re.search(r"train ratio per round: \d+\.\d+ \d+\.\d+\n", out)
    assert re.search(r"infer ratio: median \d+\.\d+ \(min \d+\.\d+, max \d+\.\d+, 2 rounds\)", out)
    assert "(reference first)" in out  # round 2 starts with the reference
    assert "data loading alone" in out
    payload = json.loads((tmp_path / "run.json").read_text())
    assert payload["benchmark"] == "train_throughput" and payload["settings"]["rounds"] == 2
    for loop in ("train", "infer"):
        for figure in ("ratio", "ours", "reference"):
            _check_spread(payload["figures"][f"{loop}_{figure}"], rounds=2)
    assert "load_average_1min" in payload["machine"]
    compared = _run("compare_runs.py", str(tmp_path / "run.json"), str(tmp_path / "run.json"))
    assert "train_ratio" in compared and "agree" in compared


def test_index_scale_smoke(tmp_path):
    import index_scale

    assert index_scale.rounds_per_process(15, 3) == [5, 5, 5] and index_scale.rounds_per_process(3, 2) == [2, 1]
    assert index_scale.rounds_per_process(2, 3) == [1, 1]
    out = _run("index_scale.py", "--sizes", "2000", "--queries", "50", "--rounds", "3", "--min-seconds", "0",
               "--processes", "2", "--json", str(tmp_path / "index.json"))
    # the rounds of both processes, merged
    assert "process 1/2: 2 rounds" in out and "process 2/2: 1 rounds" in out and "3 interleaved rounds in 2 process(es)" in out
    assert re.search(r"n=2000 single speed-up: median \d+\.\d+ \(min \d+\.\d+, max \d+\.\d+, 3 rounds\)", out)
    figures = json.loads((tmp_path / "index.json").read_text())["figures"]
    for mode in ("single", "batch"):
        _check_spread(figures[f"n2000_{mode}_speedup"], rounds=3)
        _check_spread(figures[f"n2000_{mode}_hnsw_qps"], rounds=3)
    assert figures["n2000_recall"]["median"] >= 0.9
    assert figures["n2000_exact_agreement"]["median"] == 1.0


def test_train_phases_smoke(tmp_path):
    out = _run("train_phases.py", "--images", "32", "--batch-size", "16", "--epochs", "1", "--stage-epochs", "1",
               "--threads", "1", "--json", str(tmp_path / "phases.json"))
    assert "| train phase | ours s/epoch" in out and "| infer phase | ours s/epoch" in out
    assert "| hook_state (per epoch) |" in out
    figures = json.loads((tmp_path / "phases.json").read_text())["figures"]
    for phase in ("data", "forward", "backward", "optimizer_step", "metrics_update", "scheduler_step"):
        assert figures[f"train_ours_{phase}"]["median"] > 0, phase
    # the phases and the unattributed rest add up to the epoch's wall time
    ours = {k.removeprefix("train_ours_"): v["median"] for k, v in figures.items() if k.startswith("train_ours_")}
    assert sum(v for k, v in ours.items() if k != "epoch") == pytest.approx(ours["epoch"], rel=1e-6)
    assert figures["stage_train_one_epoch"]["median"] > 0 and figures["stage_evaluate"]["median"] > 0
    _check_spread(figures["train_ratio"], rounds=1)


def test_gpu_check_without_cuda_says_so_and_exits_3(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check would measure")
    out = _run("gpu_check.py", "--out", str(tmp_path), expect=3)
    assert out.startswith("no CUDA")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["message"].startswith("no CUDA") and "throughput" not in report
    assert "no CUDA" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_pieces_on_cpu(tmp_path):
    from test_fashion import fake_split, write_idx

    # a tiny Fashion-MNIST source (50 train / 20 test random images), so the section always runs
    source = tmp_path / "idx"
    source.mkdir()
    for prefix, (images, labels) in (("train", fake_split(5, seed=1)), ("t10k", fake_split(2, seed=2))):
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", images, gzipped=True)
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels, gzipped=True)
    out = tmp_path / "out"
    _run("gpu_check.py", "--device", "cpu", "--out", str(out), "--sizes", "16", "40", "--images", "16",
         "--batch", "8", "--rounds", "2", "--min-seconds", "0", "--recipe", "short", "--recipe-images", "60",
         "--fashion-limit", "60", "--fashion-source", str(source), "--threads", "1", "--workers", "1")
    report = json.loads((out / "gpu_check.json").read_text())
    assert set(report["throughput"]) == {"16px bf16+channels_last", "16px fp32", "40px bf16+channels_last", "40px fp32"}
    for name, row in report["throughput"].items():
        assert row["seen"] == {"ours": ["no autocast, contiguous"], "reference": ["no autocast, contiguous"]}, name
        loops = {"train", "infer", "train_workers1"} if "bf16" in name else {"train", "infer"}
        assert set(row["loops"]) == loops
        for values in row["loops"].values():
            _check_spread(values["ratio"], rounds=2)
    assert report["throughput"]["40px bf16+channels_last"]["phases"]["train_ours"]["data"] > 0
    loader_only = report["throughput"]["16px bf16+channels_last"]["loader_only"]
    assert set(loader_only) == {"cache, no worker", "stream, 1 workers", "stream, 1 workers, float32 to cpu",
                                "stream, 1 workers, uint8 to cpu, normalised there", "stream, 1 workers, no augmentation"}
    for rate in loader_only.values():
        _check_spread(rate, rounds=3)
    _check_spread(report["figures"]["40px_fp32_train_ratio"], rounds=2)
    recipe = report["recipe"]
    # the same recipe twice on the CPU: bit-identical training, so no difference at all
    assert recipe["difference"] == 0.0 and recipe["passed"] and recipe["cpu_accuracy_source"] == "measured in this run"
    fashion = report["fashion"]
    assert fashion["source"] == str(source) and fashion["test_images"] == 20
    assert fashion["epochs"] == 2 and 0 <= fashion["test_accuracy"] <= 1
    markdown = (out / "gpu_check.md").read_text()
    assert "## Throughput" in markdown and "**PASS**" in markdown
    assert "Training loader alone (no model), 16px bf16+channels_last: cache, no worker" in markdown


def test_gpu_check_uint8_batches_normalised_on_the_device_equal_the_loaders_floats(tmp_path):
    """gpu_check's uint8 diagnostic hands over the same values as our float32 loader."""
    import albumentations as A
    import torch
    from albumentations.pytorch import ToTensorV2

    from conftest import make_tiny_dataset
    from gpu_check import DeviceHandOver
    from labelflow.loaders import ImageTableDataset, build_transform, make_loader

    root = make_tiny_dataset(tmp_path / "tiny", n_classes=2, per_class=5)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    data_cfg = {"mean": [0.2, 0.4, 0.6], "std": [0.3, 0.2, 0.1]}

    def loader(transform):
        return make_loader(ImageTableDataset(root, paths, [0] * len(paths), 16, transform), batch_size=4, shuffle=False, seed=0)

    floats = list(loader(build_transform(train=False, **data_cfg)))
    handed = list(DeviceHandOver(loader(A.Compose([ToTensorV2()])), torch.device("cpu"), data_cfg))
    assert len(floats) == len(handed) == 3
    for a, b in zip(floats, handed):
        assert b["image"].dtype == torch.float32 and b["image"].shape == a["image"].shape
        assert torch.allclose(a["image"], b["image"], atol=1e-5)


def test_workflow_scale_smoke():
    out = _run("workflow_scale.py", "--dry-only", "--folds", "3")
    jobs = int(re.search(r"dry run: (\d+) jobs", out).group(1))
    assert jobs > 100


def test_predict_throughput_smoke(tmp_path):
    out = _run("predict_throughput.py", "--images", "64", "--rounds", "2", "--min-seconds", "0", "--json", str(tmp_path / "p.json"))
    assert re.search(r"^predict ratio predict/bare per round: \d+\.\d+ \d+\.\d+$", out, re.M)
    assert re.search(r"predict ratio predict/bare: median \d+\.\d+ \(min .*2 rounds\)", out)
    figures = json.loads((tmp_path / "p.json").read_text())["figures"]
    assert len(figures["predict_ratio"]["rounds"]) == 2 and figures["predict_ours"]["median"] > 0
    assert figures["predict_ratio"]["median"] == pytest.approx(
        statistics.median(o / r for o, r in zip(figures["predict_ours"]["rounds"], figures["predict_reference"]["rounds"])))


def test_label_issues_benchmark_smoke(tmp_path):
    """The benchmark builds its noisy and clean digits folders and the workflow accepts them
    (dry run: the real one trains dozens of models)."""
    out = _run("label_issues.py", "--dry-only", "--out", str(tmp_path), "--noise", "0.2")
    assert re.search(r"600 images to the workflow, 360 held out for test", out)
    for rule in ("kfold_summary", "label_issues_find", "label_issues_dataset"):
        assert rule in out
    truth = sorted(p.name for p in (tmp_path / "noise20_seed0" / "data").iterdir())
    assert truth == [str(d) for d in range(10)]


def test_flip_class_conditional_keeps_its_digits_flips_and_spreads_over_several_partners():
    """Pairs-only flips are the ones the README's digits figures were measured with (recorded
    before classes could have several partners); a class with two partners sends its flips to both."""
    from label_issues_synthetic import flip_class_conditional

    true = np.repeat(np.arange(10), 12)
    flipped = flip_class_conditional(true, 0.2, np.random.default_rng(3))
    changed = np.flatnonzero(flipped != true)
    assert dict(zip(changed.tolist(), flipped[changed].tolist())) == {
        2: 3, 12: 6, 18: 4, 20: 5, 31: 5, 32: 1, 40: 6, 41: 5, 51: 9, 55: 8, 61: 3, 63: 3, 72: 2, 75: 0, 76: 3,
        89: 2, 94: 2, 95: 5, 98: 5, 103: 7, 107: 7, 110: 4, 117: 4, 118: 2}
    true = np.repeat(np.arange(10), 1000)
    flipped = flip_class_conditional(true, 0.2, np.random.default_rng(0), ((0, 6), (2, 6), (0, 2)))
    for cls, partners in ((0, {2, 6}), (2, {0, 6}), (6, {0, 2})):
        moved = flipped[(true == cls) & (flipped != true)]
        assert 0.1 * 1000 <= len(moved) <= 0.3 * 1000
        shares = {p: float(np.mean(moved == p)) for p in partners}
        assert all(0.3 <= share <= 0.5 for share in shares.values()), (cls, shares)  # 0.8 / 2 each, plus chance
    lone = flipped[(true == 4) & (flipped != true)]  # no partner: spread over the nine other classes
    assert len(np.unique(lone)) == 9 and np.bincount(lone).max() <= 0.25 * len(lone)


def test_label_issues_data_folder_is_rewritten_only_when_its_labels_change(tmp_path):
    """A second call with the same labels keeps the files (and their times), so Snakemake reuses
    what it built; other labels replace the folder."""
    import os

    import pandas as pd
    from label_issues import write_labelled

    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_bytes(name.encode())
    pool = pd.DataFrame({"file": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "label": ["1", "2"]})
    folder = tmp_path / "data"
    first = write_labelled(pool, np.array(["1", "2"]), folder)
    assert list(first["path"]) == ["1/a.png", "2/b.png"] and (folder / "2/b.png").read_bytes() == b"b"
    os.utime(folder / "1/a.png", (1_000_000, 1_000_000))
    again = write_labelled(pool, np.array(["1", "2"]), folder)
    assert again.equals(first) and (folder / "1/a.png").stat().st_mtime == 1_000_000
    (folder / "2/b.png").write_bytes(b"")  # a copy cut short
    write_labelled(pool, np.array(["1", "2"]), folder)
    assert (folder / "2/b.png").read_bytes() == b"b"
    flipped = write_labelled(pool, np.array(["2", "2"]), folder)
    assert list(flipped["given"]) == ["2", "2"] and list(flipped["true"]) == ["1", "2"]
    assert sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*")) == ["2/a.png", "2/b.png"]


def _label_issues_line(noise: float, seed: int, ours: float, noisy: float, relabel: float) -> str:
    flags = {m: {"precision": f, "recall": f, "f1": f} for m, f in
             (("ours", ours), ("ours-probs", 0.5), ("cleanlab", 0.6), ("argmax", 0.4))}
    accuracy = {"noisy": noisy, "drop": noisy, "relabel": relabel}
    return json.dumps({"noise": noise, "seed": seed, "flags": flags, "accuracy": accuracy, "minutes": 1.0, "flipped": 100})


def test_label_issues_report_merges_saved_outputs(tmp_path, capsys):
    """Seeds run in separate calls make one table: means and ranges over every saved output, the
    margin per seed, and the share of the loss relabel won back (clean 0.98)."""
    from label_issues import main

    first, second = tmp_path / "seed0.log", tmp_path / "seed1.log"
    first.write_text("digits: 1437 images ...\n" + json.dumps({"clean_test_accuracy": 0.98}) + "\n"
                     + _label_issues_line(0.1, 0, 0.9, 0.90, 0.96) + "\n" + _label_issues_line(0.2, 0, 0.8, 0.80, 0.90) + "\n")
    second.write_text(json.dumps({"clean_test_accuracy": 0.98}) + "\n" + _label_issues_line(0.1, 1, 0.7, 0.94, 0.96) + "\n")
    assert main(["--report", str(first), str(second)]) == 0
    out = capsys.readouterr().out
    ten = out.split("noise 10%")[1].split("noise 20%")[0]
    assert "2 seed(s)" in ten
    assert re.search(r"ours\s+0\.800 \[0\.700, 0\.900\]", ten)
    assert "per seed: +0.3000, +0.1000" in ten
    # relabel won back (0.96-0.90)/(0.98-0.90) = 0.75 and (0.96-0.94)/(0.98-0.94) = 0.5
    assert re.search(r"relabel\s+0\.960 \[0\.960, 0\.960\]\s+per seed 0\.9600, 0\.9600\s+share of the loss won back 0\.625 \[0\.500, 0\.750\]$", ten, re.M)
    assert "1 seed(s)" in out.split("noise 20%")[1]


def test_label_issues_report_when_the_noise_cost_nothing(tmp_path, capsys):
    """A seed whose noisy model is as good as the clean one has no share to win back: it is left
    out of the share (and said so), not divided by zero."""
    from label_issues import main

    log = tmp_path / "a.log"
    log.write_text(json.dumps({"clean_test_accuracy": 0.98}) + "\n" + _label_issues_line(0.1, 0, 0.9, 0.98, 0.97) + "\n"
                   + _label_issues_line(0.1, 1, 0.9, 0.90, 0.94) + "\n" + _label_issues_line(0.2, 0, 0.9, 0.99, 0.97) + "\n")
    main(["--report", str(log)])
    out = capsys.readouterr().out
    ten, twenty = out.split("noise 10%")[1].split("noise 20%")
    assert re.search(r"relabel .*per seed 0\.9700, 0\.9400\s+share of the loss won back 0\.500 \[0\.500, 0\.500\] "
                     r"\(1 of 2 seeds; in the others the noise cost nothing\)$", ten, re.M)
    assert "share of the loss won back: undefined (the noise cost nothing)" in twenty


def test_label_issues_report_refuses_outputs_that_do_not_belong_together(tmp_path):
    from label_issues import main

    log = tmp_path / "a.log"
    log.write_text(json.dumps({"clean_test_accuracy": 0.98}) + "\n" + _label_issues_line(0.1, 0, 0.9, 0.9, 0.96) + "\n")
    with pytest.raises(SystemExit, match=r"noise 0.1 seed 0 is in more than one"):
        main(["--report", str(log), str(log)])
    other = tmp_path / "b.log"
    other.write_text(json.dumps({"clean_test_accuracy": 0.5}) + "\n")
    with pytest.raises(SystemExit, match=r"clean accuracies \[0.5, 0.98\]"):
        main(["--report", str(log), str(other)])
    with pytest.raises(SystemExit, match=r"no_such.log does not exist"):
        main(["--report", str(tmp_path / "no_such.log")])
    # Lines from before --tie-break count as "first"; valid_loss lines are another recipe.
    loss = tmp_path / "c.log"
    loss.write_text(_label_issues_line(0.2, 0, 0.9, 0.9, 0.96).replace('{"noise"', '{"tie_break": "valid_loss", "noise"') + "\n")
    with pytest.raises(SystemExit, match=r"mix tie_break first and valid_loss"):
        main(["--report", str(log), str(loss)])


def test_label_issues_recipe_sets_the_tie_break_of_every_stage(tmp_path):
    """--tie-break valid_loss writes the softmax recipe with it on every stage (the rest as the
    repository has it); the default recipe needs no copy; a folder with another recipe is refused."""
    import yaml
    from label_issues import REPO, write_recipe

    assert write_recipe(tmp_path, quick=False, tie_break="first") is None
    folder = write_recipe(tmp_path, quick=False, tie_break="valid_loss")
    written = yaml.safe_load((folder / "softmax.yaml").read_text())
    original = yaml.safe_load((REPO / "config/experiments/softmax.yaml").read_text())
    assert [stage.pop("tie_break") for stage in written["stages"].values()] == ["valid_loss"] * len(original["stages"])
    assert written == original
    assert write_recipe(tmp_path, quick=False, tie_break="valid_loss") == folder  # the same recipe again: reused
    with pytest.raises(SystemExit, match=r"holds another recipe .*give another --out"):
        write_recipe(tmp_path, quick=True, tie_break="valid_loss")
    with pytest.raises(SystemExit, match=r"holds another recipe"):
        write_recipe(tmp_path, quick=False, tie_break="first")
    with pytest.raises(SystemExit, match=r"holds no run of this recipe"):
        write_recipe(tmp_path / "empty", quick=True, tie_break="first", write=False)
    assert not (tmp_path / "empty").exists()


def test_label_issues_inspect_reports_best_and_last_of_every_final_model(tmp_path, monkeypatch, capsys):
    """--inspect names the epoch best.pt holds, the epochs tied with it on valid accuracy and
    the test accuracy of best.pt and last.pt, for the noisy model and the last action's model."""
    import label_issues
    import yaml

    monkeypatch.setattr(label_issues, "split_digits", lambda *a: (None, None))
    scores = {"noise20_seed0/results/softmax": (0.917, 0.994), "noise20_seed0/results/cleaned/softmax": (0.981, 1.0),
              "clean/results/softmax": (0.997, 0.997)}

    def fake_accuracy(checkpoint, test, data_cfg, tag2cls):
        run = checkpoint.parent.parent.relative_to(tmp_path).as_posix()
        if checkpoint.parent.name == "checkpoints":  # top-k copies: 0.9 + epoch / 1000
            return 0.9 + int(checkpoint.name[6:9]) / 1000
        return scores[run][checkpoint.name == "last.pt"]

    monkeypatch.setattr(label_issues, "test_accuracy", fake_accuracy)
    valid = {6: 1.0, 7: 1.0, 8: 0.99, 12: 1.0, 13: 1.0, 14: 1.0, 18: 1.0}
    for run, action in (("noise20_seed0", "relabel"), ("clean", None)):
        work = tmp_path / run
        (work / "results/data").mkdir(parents=True)
        (work / "results/data/tag2cls.json").write_text("{}")
        (work / "benchmark.yaml").write_text(yaml.safe_dump({"label_issues": {"action": action}} if action else {}))
        for model in ("softmax", "cleaned/softmax") if action else ("softmax",):
            stage = work / "results" / model / "stage2"
            stage.mkdir(parents=True)
            (stage / "best.pt").write_bytes(b"")
            (stage / "last.pt").write_bytes(b"")
            (stage / "checkpoints").mkdir()
            for epoch in (6, 12):
                (stage / "checkpoints" / f"epoch={epoch:03d}-accuracy=1.0000.pt").write_bytes(b"")
            epochs = [{"epoch": e, "valid": {"accuracy": v}} for e, v in valid.items()]
            (stage / "metrics.json").write_text(json.dumps({"main_metric": "valid/accuracy", "spec": {"tie_break": "first"},
                                                            "best": {"epoch": 6, "value": 1.0}, "epochs": epochs}))
    (tmp_path / "noise20_seed1").mkdir()  # a run stopped before tag2label finished
    (tmp_path / "noise20_seed1" / "benchmark.yaml").write_text("{}")
    assert label_issues.main(["--out", str(tmp_path), "--inspect"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines.pop() == "noise20_seed1  no trained model yet"
    assert lines[0].split()[:2] == ["clean", "clean"]
    assert re.search(r"^\s+top-k kept: epoch 6 0.9060, epoch 12 0.9120$", lines[1])
    assert re.search(r"^noise20_seed0\s+noisy\s+best.pt epoch 6 of 18 \(tie_break first; epochs at valid accuracy 1.0000: "
                     r"6-7, 12-14, 18\)\s+test accuracy best.pt 0.9170\s+last.pt 0.9940$", lines[2])
    assert re.search(r"^noise20_seed0\s+relabel .* best.pt 0.9810\s+last.pt 1.0000$", lines[4])
    assert len(lines) == 6


def test_label_issues_report_skips_a_cut_json_line(tmp_path, capsys):
    from label_issues import main

    log = tmp_path / "a.log"
    whole = _label_issues_line(0.1, 0, 0.9, 0.9, 0.96)
    log.write_text(json.dumps({"clean_test_accuracy": 0.98}) + "\n" + whole + "\n" + whole.replace('"seed": 0', '"seed": 1')[:40] + "\n")
    assert main(["--report", str(log)]) == 0
    captured = capsys.readouterr()
    assert "a.log:3 is not a whole JSON line; skipped" in captured.err and "1 seed(s)" in captured.out


def test_cpu_precision_smoke(tmp_path):
    out = _run("cpu_precision.py", "--experiment", "softmax", "--batches", "2", "--batch-size", "4", "--rounds", "2",
               "--min-seconds", "0", "--threads", "1", "--json", str(tmp_path / "precision.json"))
    assert re.search(r"CPU bf16 units: ", out)
    assert re.search(r"bf16/fp32 speed-up: median \d+\.\d+ \(min \d+\.\d+, max \d+\.\d+, 2 rounds\)", out)
    _check_spread(json.loads((tmp_path / "precision.json").read_text())["figures"]["bf16_speedup"], rounds=2)


def test_fork_memory_path_column_stays_shared_with_a_forked_worker():
    """A forked child reading every path copies the list of str (reference counts) but not
    PathColumn's buffer: at 200,000 paths about 18 MiB against almost nothing."""
    out = _run("fork_memory.py", "--paths", "200000")
    copied = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(list of str|PathColumn): 200,000 paths; .* copies ([\d.]+) MiB", out, re.M)}
    assert set(copied) == {"list of str", "PathColumn"}
    assert copied["list of str"] > 10 and copied["PathColumn"] < 0.1 * copied["list of str"]
