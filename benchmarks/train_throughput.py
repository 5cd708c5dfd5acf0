"""Images/s of labelflow's training and inference loops vs a bare PyTorch loop, same run.

Ours: the real code the rules run (ImageTableDataset with cached decoded images, the recipe's
albumentations augmentation, MultiHeadNet with its heads, losses, per-head metrics, LambdaLR
schedule: training.train_one_epoch; inference.predict). Reference: the same model, initial
weights, batch size, optimizer and threads over pre-decoded, pre-normalised tensors with no
augmentation and no metrics (benchmarks/digits_loops.py says exactly what each side does).

How the figures are made (benchmarks/spread.py): one untimed warm-up round, then --rounds
rounds; in each round ours and the reference run back to back (ours first in even rounds, the
reference first in odd ones), each measurement repeating the pass until it lasts at least
--min-seconds. Every round gives one ratio ours/reference; the script prints each round's
ratio and their min / median / max. The median is the figure, min-max its spread.

    python benchmarks/train_throughput.py                       # digits recipe, 7 rounds, ~3 min
    python benchmarks/train_throughput.py --json run1.json      # then compare_runs.py run1.json run2.json
    python benchmarks/train_throughput.py --images 64 --batch-size 16 --rounds 2 --min-seconds 0  # smoke test

Only a quiet machine gives figures worth keeping (README, "Measured figures"); the script
warns when the load average at the start says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from labelflow.device import set_job_threads

from digits_loops import DigitsImages, LoopSettings, build_bench, data_only_rate
from spread import Spread, load_warning, machine_info, ratio_lines, run_interleaved, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="softmax", help="recipe in config/experiments (default softmax)")
    p.add_argument("--images", type=int, default=1024, help="images per training epoch and inference pass (default 1024)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: the recipe's stage2 batch)")
    p.add_argument("--infer-batch-size", type=int, default=256, help="inference batch (default 256, as infer_batch_size)")
    p.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds after one warm-up round (default 7)")
    p.add_argument("--min-seconds", type=float, default=3.0,
                   help="repeat a pass until one measurement lasts this long (default 3.0)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all usable cores)")
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON (for compare_runs.py)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    set_job_threads(args.threads)  # torch threads, and the budget loading plans share
    device = torch.device("cpu")
    settings = LoopSettings(experiment=args.experiment, batch_size=args.batch_size, infer_batch_size=args.infer_batch_size)
    # the images stay on disk while the loops run: a dataset may read them lazily
    with tempfile.TemporaryDirectory() as tmp:
        bench = build_bench(DigitsImages.write(tmp, args.images), settings, device)
        print(f"machine: {machine['cpus_usable']} usable cpus, load average {machine.get('load_average_1min', float('nan')):.2f}, "
              f"torch threads {args.threads}, torch {torch.__version__}")
        print(f"recipe: {args.experiment}, {bench.data_cfg['image_size']} px, batch {bench.batch_size}, {args.images} images, "
              f"{args.rounds} interleaved rounds after a warm-up round")
        if warning := load_warning(machine):
            print(warning)
        comparisons = bench.comparisons()
        run_interleaved(comparisons, args.rounds, min_seconds=args.min_seconds)
        for comparison in comparisons:
            for line in ratio_lines(comparison):
                print(line)
        # where our extra time goes: data (decode cache, augmentation, collation) vs compute
        data_rate = data_only_rate(bench.ours.train_loader)
        ours_train = Spread(tuple(comparisons[0].ours_rates)).median
        print(f"data loading alone (augment + collate, no model): {data_rate:.1f} img/s, "
              f"{100 * ours_train / data_rate:.1f}% of an epoch of ours (train_phases.py breaks the epoch down)")
        if args.json:
            figures = {k: v for c in comparisons for k, v in c.figures().items()}
            figures["data_loading"] = Spread((data_rate,)).as_dict("img/s")
            write_json(args.json, "train_throughput", vars(args) | {"image_size": bench.data_cfg["image_size"],
                       "batch_size": bench.batch_size, "torch": torch.__version__}, figures, machine)
            print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
