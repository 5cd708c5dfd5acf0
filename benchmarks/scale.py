"""Time and peak memory of every job of the real workflow on Fashion-MNIST, from 1k to 70k images.

Runs the `snakemake` command on the repository's Snakefile (config/fashion.yaml with a short
1 + 1 epoch copy of the `fashion` recipe) once per case, targets `all embed_all predict_all`
(so `embed` and `predict_set` run too, each over every image of the case), and reads each
job's time (`s`) and peak RSS (`max_rss`, MB) from Snakemake's `benchmark:` files under
results/benchmarks/. The cases:

    1,000 / 10,000 / 70,000 images at 28 px (PNG)     the growth from 10k to 70k is the finding
    10,000 images written as 224 px JPEGs             the recipe then trains and infers at 224 px
                                                      (image_size 224, the ImageNet stem)

Each case is 6/7 train and 1/7 test images, the proportion of the full set (60,000 train +
10,000 test): `dataset` is the train split and `test_dataset` the official test split, both
written by labelflow.fashion.write_fashion_dataset(limit=<train count>); that writes `limit`
images of each split, and the test folder is then cut down to 1/7 of the case (a seeded,
class-stratified subset), so every job's input grows by the same factor from one case to the
next. 70,000 is the whole set (no limit).

Printed per case and job: wall time, peak RSS, images/s (the images of the job's input set —
the dataset for tag2label ... summary, the test set for test_table and test_evaluation, every
image of the case for embed and predict_set — per second of the job, so for train_stage it is
not an epoch rate), then the growth of each job's time and peak RSS between the two largest
28 px cases, and PASS/FAIL for the goals:

    * every job's time grows <= 1.3x the data's growth (10k -> 70k: 7x -> <= 9.1x);
    * the streaming jobs' peak RSS (infer, embed, test_evaluation, autolabel_round,
      predict_set) grows <= 1.2x;
    * no job above 4 GiB at the largest 28 px case (70k);
    * the 224 px `infer` job's peak RSS <= 3 GiB (10k images).

Jobs of a rule without a `benchmark:` directive are listed as "not measured" (the rules come
from `snakemake -n --forceall` on the same targets, which prints each job's benchmark file).
autolabel_round is not part of this workflow run, so its goal is reported as not measured
(benchmarks/autolabel_fashion.py runs it).

How the numbers are taken: jobs run one at a time (`--cores N`, every job holds the resource
`serial_job=1`, model jobs use N threads), so a job's time is its own. Snakemake samples a
job's RSS (summed over the job's processes, DataLoader workers included, so pages they share
count once per process) every 0.5 s for the first 30 s and every 30 s after that: for long
jobs the peak is a lower bound. The goals use RSS, as asked; the PSS column (shared pages
divided among the processes, Snakemake's max_pss) shows how much of it is double counting.
On a loaded machine only the memory figures mean anything.

    python benchmarks/scale.py                          # all four cases (~1 h on 2 quiet cores)
    python benchmarks/scale.py --skip-224               # the 28 px cases only (~22 min)
    python benchmarks/scale.py --sizes 1000 10000       # other sizes (28 px)
    python benchmarks/scale.py --sizes                  # the 224 px case only (~40 min)
    python benchmarks/scale.py --out /tmp/scale         # keep data and results; a rerun reuses them
    python benchmarks/scale.py --json scale.json        # the figures as JSON too
    python benchmarks/scale.py --quick                  # 200 and 400 images, 224 px at 100: the smoke test

A case whose results are complete in --out is not run again (Snakemake finds nothing to do),
so a table can be reprinted, or a case added, without paying for the others.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
TARGETS = ("all", "embed_all", "predict_all")
FULL_TRAIN, FULL_TEST = 60_000, 10_000
# Jobs that read every image once and must hold one batch at a time (DESIGN.md "At scale").
STREAMING_RULES = ("infer", "embed", "test_evaluation", "autolabel_round", "predict_set")
# Which images a job reads, for images/s: default the dataset (train split).
TEST_SET_RULES = ("test_table", "test_evaluation")
IMAGE_SET_RULES = ("embed", "predict_set", "evaluate_set")
TIME_GROWTH_LIMIT = 1.3  # x the data's growth
RSS_GROWTH_LIMIT = 1.2
MAX_RSS_MB = 4 * 1024  # Snakemake's max_rss is in MiB ("MB" in its header)
MAX_RSS_224_INFER_MB = 3 * 1024


@dataclass
class Case:
    """One workflow run: `images` Fashion-MNIST images at `size` px, 6/7 train and 1/7 test."""

    images: int
    size: int
    image_format: str

    @property
    def name(self) -> str:
        return f"{self.images}x{self.size}px"

    @property
    def n_test(self) -> int:
        return round(self.images * FULL_TEST / (FULL_TRAIN + FULL_TEST))

    @property
    def n_train(self) -> int:
        return self.images - self.n_test


@dataclass
class JobFigures:
    job: str  # rule and the wildcards that tell its jobs apart, e.g. "train_stage stage2"
    rule: str
    benchmark: str | None  # path relative to the working directory; None: the rule has no benchmark:
    seconds: float | None = None
    max_rss_mb: float | None = None
    max_pss_mb: float | None = None  # shared pages divided among the job's processes
    images: int | None = None

    @property
    def images_per_s(self) -> float | None:
        if self.seconds is None or not self.images or self.seconds <= 0:
            return None
        return self.images / self.seconds


@dataclass
class CaseResult:
    case: Case
    wall_s: float | None  # None: nothing ran (results reused)
    jobs: list[JobFigures] = field(default_factory=list)

    def measured(self) -> dict[str, JobFigures]:
        return {j.job: j for j in self.jobs if j.seconds is not None}

    def not_measured(self) -> list[str]:
        return sorted({j.job for j in self.jobs if j.seconds is None})


# --------------------------------------------------------------------------- data


def write_case_data(case: Case, folder: Path, seed: int) -> Path:
    """``folder/train`` (n_train images) and ``folder/test`` (n_test), written once."""
    from labelflow.fashion import CLASS_FOLDERS, stratified_subset, write_fashion_dataset

    done = folder.parent / f"{folder.name}.complete"  # outside: the folder is an image set
    if done.exists():
        return folder
    if folder.exists():  # interrupted while cutting the test split: start over
        import shutil

        shutil.rmtree(folder)
    limit = None if case.n_train >= FULL_TRAIN else case.n_train
    started = time.perf_counter()
    write_fashion_dataset(folder, size=case.size, image_format=case.image_format, limit=limit, seed=seed)
    tests = sorted((folder / "test").glob(f"*/*.{case.image_format}"))
    labels = np.array([CLASS_FOLDERS.index(p.parent.name) for p in tests])
    keep = set(stratified_subset(labels, case.n_test, seed=[seed, 2]).tolist())
    for i, path in enumerate(tests):
        if i not in keep:
            path.unlink()
    done.write_text(f"{case.n_train} train, {case.n_test} test\n")
    print(f"wrote {case.n_train} train + {case.n_test} test images at {case.size} px ({case.image_format}) "
          f"to {folder} in {time.perf_counter() - started:.1f} s", flush=True)
    return folder


def short_recipe(size: int, epochs: tuple[int, int]) -> dict:
    """config/experiments/fashion.yaml with `epochs` (stage1, stage2); at 224 px the model
    takes 224 px input with torchvision's ImageNet stem (small_input off)."""
    recipe = yaml.safe_load((REPO / "config/experiments/fashion.yaml").read_text())
    recipe["stages"]["stage1"]["epochs"], recipe["stages"]["stage2"]["epochs"] = epochs
    if size > 32:
        recipe["data"]["image_size"] = size
        recipe["model"]["small_input"] = False
    return recipe


def write_case_config(case: Case, data: Path, case_dir: Path, args: argparse.Namespace) -> Path:
    """Experiment file and config (merged over config/fashion.yaml) of one case."""
    experiments = case_dir / "experiments"
    experiments.mkdir(parents=True, exist_ok=True)
    (experiments / "fashion.yaml").write_text(yaml.safe_dump(short_recipe(case.size, tuple(args.epochs)), sort_keys=False))
    config = {
        "dataset": str(data / "train"),
        "test_dataset": str(data / "test"),
        "experiments": ["fashion"],
        "experiments_dir": str(experiments),
        "gpu": args.gpu,
        "threads": args.cores,
        "embed": {"experiment": "fashion", "sets": {"pile": str(data)}},
        "predict": {"experiment": "fashion", "sets": {"pile": str(data)}},
    }
    if args.n_folds:
        config["n_folds"] = args.n_folds
    path = case_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- workflow


def snakemake_command(case_dir: Path, config: Path, cores: int, *extra: str) -> list[str]:
    # Every job holds serial_job=1 of 1: one job at a time, so its time is its own.
    return [
        str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(case_dir / "work"), "--cores", str(cores),
        *TARGETS, *extra, "--resources", "gpu=1", "serial_job=1",
        "--default-resources", "gpu=0", "mem_mb=2000", "serial_job=1",
        "--configfile", str(REPO / "config/fashion.yaml"), str(config),  # last: it takes several values
    ]


def run_workflow(case_dir: Path, config: Path, cores: int) -> float | None:
    """Run the targets; the wall time, or None when Snakemake had nothing to do."""
    log = case_dir / "snakemake.log"
    cmd = snakemake_command(case_dir, config, cores)
    print(f"running: {' '.join(cmd)}\n  (log: {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    text = log.read_text(errors="replace")
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed (exit {result.returncode}); see {log}:\n{text[-3000:]}")
    return None if "Nothing to be done" in text else seconds


def planned_jobs(case_dir: Path, config: Path, cores: int) -> list[JobFigures]:
    """Every job of the targets with its benchmark file, from `snakemake -n --forceall`."""
    cmd = snakemake_command(case_dir, config, cores, "-n", "--forceall")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"dry run failed:\n{result.stderr[-3000:]}")
    return parse_dry_run(result.stdout + result.stderr)


def parse_dry_run(text: str) -> list[JobFigures]:
    """Jobs (with outputs) of a dry run's job blocks: rule, distinguishing wildcards, benchmark."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:)", text):
        head = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block)
        if not head or not re.search(r"^\s+output:", block, re.M):
            continue  # target rules (all, embed_all, ...) do no work
        rule = head.group(1)
        bench = re.search(r"^\s+benchmark: (\S+)", block, re.M)
        wildcards = re.search(r"^\s+wildcards: (.+)$", block, re.M)
        values = []
        if wildcards:
            values = [kv.split("=", 1)[1] for kv in wildcards.group(1).split(", ") if not kv.startswith("run=")]
        jobs.append(JobFigures(job=" ".join([rule, *values]), rule=rule, benchmark=bench.group(1) if bench else None))
    return jobs


def read_benchmark(path: Path) -> tuple[float | None, float | None, float | None]:
    """(seconds, max_rss MB, max_pss MB) of a Snakemake benchmark file (one row; None where
    the file is missing or memory was not sampled, NA)."""
    if not path.is_file():
        return None, None, None
    row = pd.read_csv(path, sep="\t", na_values=["NA", "-"]).iloc[0]
    memory = [row.get(column) for column in ("max_rss", "max_pss")]
    return float(row["s"]), *(None if value is None or pd.isna(value) else float(value) for value in memory)


def images_of(rule: str, case: Case) -> int:
    if rule in TEST_SET_RULES:
        return case.n_test
    if rule in IMAGE_SET_RULES:
        return case.images
    return case.n_train


def measure_case(case: Case, out: Path, args: argparse.Namespace) -> CaseResult:
    case_dir = out / case.name
    case_dir.mkdir(parents=True, exist_ok=True)
    data = write_case_data(case, out / "data" / f"fashion_{case.name}_seed{args.seed}", args.seed)
    config = write_case_config(case, data, case_dir, args)
    wall = run_workflow(case_dir, config, args.cores)
    jobs = planned_jobs(case_dir, config, args.cores)
    for job in jobs:
        if job.benchmark:
            job.seconds, job.max_rss_mb, job.max_pss_mb = read_benchmark(case_dir / "work" / job.benchmark)
        job.images = images_of(job.rule, case)
    result = CaseResult(case, wall, jobs)
    print_case(result)
    return result


# --------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_case(result: CaseResult) -> None:
    case = result.case
    wall = "results reused, nothing ran" if result.wall_s is None else f"wall {result.wall_s:.1f} s"
    print(f"\n{case.images:,} images at {case.size} px ({case.n_train:,} train + {case.n_test:,} test, "
          f"{case.image_format}): {wall}")
    print(f"{'job':<24} {'seconds':>9} {'peak RSS MB':>12} {'(PSS MB)':>9} {'images':>8} {'images/s':>9}")
    for job in result.jobs:
        if job.seconds is None:
            continue
        print(f"{job.job:<24} {job.seconds:>9.2f} {fmt(job.max_rss_mb, '.0f'):>12} {fmt(job.max_pss_mb, '.0f'):>9} "
              f"{job.images:>8} {fmt(job.images_per_s, '.1f'):>9}")
    missing = result.not_measured()
    print("not measured (no benchmark file): " + (", ".join(missing) if missing else "none"), flush=True)


def growth_rows(small: CaseResult, large: CaseResult) -> list[dict]:
    """Per job measured in both cases: time and peak RSS growth against the data's growth."""
    rows = []
    for name, big in large.measured().items():
        little = small.measured().get(name)
        if little is None:
            continue
        data_growth = big.images / little.images
        time_growth = big.seconds / little.seconds if little.seconds > 0 else None
        rss_growth = (big.max_rss_mb / little.max_rss_mb
                      if big.max_rss_mb is not None and little.max_rss_mb else None)
        streaming = big.rule in STREAMING_RULES
        rows.append({
            "job": name, "rule": big.rule, "streaming": streaming, "data_growth": data_growth,
            "seconds": [little.seconds, big.seconds], "time_growth": time_growth,
            "time_limit": TIME_GROWTH_LIMIT * data_growth,
            "time_ok": time_growth is not None and time_growth <= TIME_GROWTH_LIMIT * data_growth,
            "max_rss_mb": [little.max_rss_mb, big.max_rss_mb], "rss_growth": rss_growth,
            "rss_ok": (rss_growth is not None and rss_growth <= RSS_GROWTH_LIMIT) if streaming else None,
        })
    return rows


def print_growth(small: CaseResult, large: CaseResult, rows: list[dict]) -> None:
    a, b = small.case.images, large.case.images
    print(f"\ngrowth from {a:,} to {b:,} images at {large.case.size} px (data {b / a:.2f}x; goals: time <= "
          f"{TIME_GROWTH_LIMIT}x the data's growth, streaming jobs' peak RSS <= {RSS_GROWTH_LIMIT}x)")
    print(f"{'job':<24} {'s ' + str(a):>10} {'s ' + str(b):>10} {'growth':>7} {'time':>5} "
          f"{'MB ' + str(a):>9} {'MB ' + str(b):>9} {'growth':>7} {'RSS':>5}")
    for r in rows:
        rss = "-" if r["rss_ok"] is None else ("PASS" if r["rss_ok"] else "FAIL")
        print(f"{r['job']:<24} {r['seconds'][0]:>10.2f} {r['seconds'][1]:>10.2f} {fmt(r['time_growth'], '.2f'):>7} "
              f"{'PASS' if r['time_ok'] else 'FAIL':>5} {fmt(r['max_rss_mb'][0], '.0f'):>9} "
              f"{fmt(r['max_rss_mb'][1], '.0f'):>9} {fmt(r['rss_growth'], '.2f'):>7} {rss:>5}")


def goals(results: list[CaseResult], rows: list[dict] | None) -> list[dict]:
    """PASS/FAIL (or None: not measured) of the four goals, with what decided each."""
    found: list[dict] = []
    if rows is not None:
        slow = [f"{r['job']} {fmt(r['time_growth'], '.2f')}x" for r in rows if not r["time_ok"]]
        worst = max(rows, key=lambda r: r["time_growth"] or 0)
        found.append({"goal": f"every job's time grows <= {TIME_GROWTH_LIMIT}x the data's growth", "passed": not slow,
                      "detail": ("over: " + ", ".join(slow)) if slow else
                      f"largest growth {worst['job']} {fmt(worst['time_growth'], '.2f')}x of {worst['time_limit']:.2f}x allowed"})
        streaming = [r for r in rows if r["streaming"]]
        unmeasured = [f"{rule} ({why_not_measured(rule)})"
                      for rule in sorted(set(STREAMING_RULES) - {r["rule"] for r in streaming})]
        over = [f"{r['job']} {fmt(r['rss_growth'], '.2f')}x" for r in streaming if not r["rss_ok"]]
        detail = ("over: " + ", ".join(over)) if over else (
            ", ".join(f"{r['job']} {fmt(r['rss_growth'], '.2f')}x" for r in streaming) or "no streaming job measured")
        found.append({"goal": f"streaming jobs' peak RSS grows <= {RSS_GROWTH_LIMIT}x",
                      "passed": (not over) if streaming else None,
                      "detail": detail + "; not measured: " + ", ".join(unmeasured)})
    small_px = [r for r in results if r.case.size == 28]
    if small_px:
        largest = max(small_px, key=lambda r: r.case.images)
        rss = [(j.max_rss_mb, j.job) for j in largest.jobs if j.max_rss_mb is not None]
        peak, job = max(rss) if rss else (None, "-")
        found.append({"goal": f"no job above {MAX_RSS_MB} MB at {largest.case.images:,} x 28 px",
                      "passed": None if peak is None else peak <= MAX_RSS_MB, "detail": f"largest: {job} {fmt(peak, '.0f')} MB"})
    for result in results:
        if result.case.size > 28:
            infer = next((j for j in result.jobs if j.rule == "infer"), None)
            rss = infer.max_rss_mb if infer else None
            found.append({"goal": f"infer at {result.case.size} px, {result.case.images:,} images: peak RSS <= {MAX_RSS_224_INFER_MB} MB",
                          "passed": None if rss is None else rss <= MAX_RSS_224_INFER_MB, "detail": f"infer {fmt(rss, '.0f')} MB"})
    return found


def rules_with_benchmark() -> dict[str, bool]:
    """Every rule (and checkpoint) of workflow/rules/*.smk: does it declare `benchmark:`?"""
    found = {}
    for smk in sorted((REPO / "workflow/rules").glob("*.smk")):
        blocks = re.split(r"^(?=(?:rule|checkpoint) \w+:)", smk.read_text(), flags=re.M)
        for block in blocks:
            head = re.match(r"(?:rule|checkpoint) (\w+):", block)
            if head:
                found[head.group(1)] = bool(re.search(r"^\s+benchmark:", block, re.M))
    return found


def why_not_measured(rule: str) -> str:
    declared = rules_with_benchmark().get(rule)
    if declared is None:
        return "no such rule"
    return "not in this run" + ("" if declared else "; the rule has no benchmark: directive")


def print_goals(found: list[dict]) -> None:
    print("\ngoals")
    for g in found:
        verdict = "NOT MEASURED" if g["passed"] is None else ("PASS" if g["passed"] else "FAIL")
        print(f"{verdict:<12} {g['goal']}: {g['detail']}")


# --------------------------------------------------------------------------- main


def cases_of(args: argparse.Namespace) -> list[Case]:
    sizes = args.sizes if args.sizes is not None else [200, 400] if args.quick else [1_000, 10_000, 70_000]
    cases = [Case(n, 28, "png") for n in sizes]
    if not args.skip_224:
        cases.append(Case(args.images_224 or (100 if args.quick else 10_000), 224, "jpg"))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*",
                        help="images per 28 px case (default 1000 10000 70000; none: the 224 px case only)")
    parser.add_argument("--skip-224", action="store_true", help="leave out the 224 px JPEG case")
    parser.add_argument("--images-224", type=int, help="images of the 224 px case (default 10000)")
    parser.add_argument("--out", type=Path, help="data and results, kept for reuse (default: a new temporary folder)")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores and the model jobs' threads (default 2)")
    parser.add_argument("--gpu", type=int, default=0, help="config key gpu (default 0: CPU)")
    parser.add_argument("--epochs", type=int, nargs=2, default=[1, 1], metavar=("STAGE1", "STAGE2"))
    parser.add_argument("--n-folds", type=int, help="override n_folds (config/fashion.yaml: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image subsets")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="200 and 400 images, 224 px at 100, 5 folds: the smoke test (plumbing, not figures)")
    args = parser.parse_args(argv)
    if args.quick and not args.n_folds:
        args.n_folds = 5  # 86 training images at 224 px: 10 folds would leave classes short
    if not cases_of(args):
        parser.error("no case to run: --sizes without values runs the 224 px case, which --skip-224 leaves out")
    out = args.out or Path(tempfile.mkdtemp(prefix="scale_"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)

    results = [measure_case(case, out, args) for case in cases_of(args)]
    small_px = sorted((r for r in results if r.case.size == 28), key=lambda r: r.case.images)
    rows = None
    if len(small_px) >= 2:
        rows = growth_rows(small_px[-2], small_px[-1])
        print_growth(small_px[-2], small_px[-1], rows)
    found = goals(results, rows)
    print_goals(found)
    if args.json:
        report = {
            "cases": [{**asdict(r.case), "name": r.case.name, "n_train": r.case.n_train, "n_test": r.case.n_test,
                       "wall_s": r.wall_s, "not_measured": r.not_measured(),
                       "jobs": [{**asdict(j), "images_per_s": j.images_per_s} for j in r.jobs if j.seconds is not None]}
                      for r in results],
            "growth": rows, "goals": found, "epochs": args.epochs, "cores": args.cores,
        }
        args.json.write_text(json.dumps(report, indent=2))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
