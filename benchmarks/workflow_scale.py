"""Snakemake's own cost: DAG building for a big grid x k-fold config, and overhead per job.

1. `snakemake -n` wall time for a configuration with about 500 jobs (a grid over stage2 lr,
   embedding size and pooling-free knobs, plus k-fold of every experiment): target ≤ 10 s.
2. A real tiny run (generated 3x12 images, 16 px, 1 epoch per stage): wall time of the whole
   `snakemake` call vs the time spent inside the rules (sum of the `benchmark:` files), i.e.
   Snakemake's overhead per job.

    python benchmarks/workflow_scale.py            # both
    python benchmarks/workflow_scale.py --dry-only # only the DAG timing
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import make_tiny_dataset  # noqa: E402
from workflow_helpers import SNAKEMAKE, TINY_EXPERIMENTS, write_tiny_config  # noqa: E402


def snakemake(workdir: Path, config: Path, *args: str) -> tuple[float, str]:
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args,
           "--configfile", str(config)]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return seconds, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--dry-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = make_tiny_dataset(tmp / "images", per_class=2 * args.folds)
        grid = {"params": {"stages.stage2.lr": [1e-3, 5e-4, 2e-4, 1e-4], "model.embedding_size": [32, 64, 128, 256],
                           "model.dropout": [0.0, 0.1, 0.2, 0.3], "stages.stage2.weight_decay": [0.0, 1e-4]}}
        config = write_tiny_config(tmp / "dry", dataset, experiments=TINY_EXPERIMENTS, n_folds=args.folds, grid=grid,
                                   kfold={"experiments": list(TINY_EXPERIMENTS)})
        seconds, out = snakemake(tmp / "dry", config, "-n", "all", "grid", "kfold")
        jobs = int(re.search(r"^total\s+(\d+)", out, re.M).group(1))
        print(f"dry run: {jobs} jobs, `snakemake -n` {seconds:.2f} s ({1000 * seconds / jobs:.1f} ms per job)")
        if args.dry_only:
            return

        config = write_tiny_config(tmp / "run", dataset, experiments={"softmax": TINY_EXPERIMENTS["softmax"]})
        seconds, out = snakemake(tmp / "run", config)
        bench = [pd.read_csv(p, sep="\t") for p in (tmp / "run/results/benchmarks").rglob("*.tsv")]
        in_rules = sum(float(b["s"].iloc[0]) for b in bench)
        jobs = len(bench)
        print(f"tiny real run: {jobs} jobs, wall {seconds:.1f} s, inside rules {in_rules:.1f} s, "
              f"snakemake overhead {seconds - in_rules:.1f} s ({(seconds - in_rules) / jobs:.2f} s per job)")


if __name__ == "__main__":
    main()
