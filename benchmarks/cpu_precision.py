"""Training speed on the CPU with bf16 autocast (a stage's `precision: bf16`) vs float32, same run.

Both sides run the real `training.train_one_epoch` (forward under device.autocast, losses,
backward, the recipe's optimizer and schedule, per-head metrics) on the recipe's network, from
the same initial weights, over the same batches of random images already in memory, so the
ratio is the network step's and not decoding's. Ours: `precision="bf16"`; the reference:
`precision="fp32"` (what `auto` is on the CPU). Rounds interleave as in the other benchmarks
(benchmarks/spread.py: one untimed warm-up round, then --rounds rounds, the order alternating,
each measurement at least --min-seconds); the median ratio is the figure, min-max its spread.

    python benchmarks/cpu_precision.py                         # fashion recipe (ResNet-18, 32 px, batch 128)
    python benchmarks/cpu_precision.py --experiment softmax    # the digits default recipe
    python benchmarks/cpu_precision.py --batches 2 --batch-size 8 --rounds 1 --min-seconds 0   # smoke test

The speed-up needs bf16 arithmetic in the CPU (AVX512-BF16 or AMX; `lscpu` flags avx512_bf16 /
amx_bf16): elsewhere oneDNN emulates it and bf16 can be slower. What it does to accuracy is not
measured here: a recipe that trains in bf16 has to be chosen on its validation fold like any
other (benchmarks/fashion.py --recipe NAME --precision bf16).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from labelflow.device import cpu_bf16_units, set_job_threads
from labelflow.experiment import model_spec
from labelflow.models import create_model
from labelflow.training import StageSpec, build_criteria, build_optimizer, build_scheduler, train_one_epoch

from digits_loops import load_recipe
from spread import Comparison, load_warning, machine_info, ratio_lines, run_interleaved, write_json

NUM_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="fashion", help="recipe in config/experiments (default fashion)")
    p.add_argument("--stage", default=None, help="the stage whose optimizer and batch size are used (default: the last)")
    p.add_argument("--batch-size", type=int, help="images per step (default: the stage's batch_size)")
    p.add_argument("--batches", type=int, default=8, help="steps per pass (default 8)")
    p.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds after one warm-up round (default 7)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="repeat a pass until a measurement lasts this long")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all usable cores)")
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON (for compare_runs.py)")
    return p.parse_args(argv)


class TrainingPass:
    """train_one_epoch over fixed in-memory batches at one precision; returns the images trained."""

    def __init__(self, experiment: dict, stage: StageSpec, batches: list[dict], precision: str, seed: int = 0):
        torch.manual_seed(seed)  # both sides start from the same weights
        self.model = create_model(model_spec(experiment, NUM_CLASSES))
        self.model.freeze_encoder(stage.freeze_encoder)
        self.criteria = build_criteria(self.model)
        self.optimizer = build_optimizer(self.model, stage)
        self.scheduler = build_scheduler(self.optimizer, stage, len(batches))
        self.batches, self.precision, self.device = batches, precision, torch.device("cpu")

    def __call__(self) -> int:
        train_one_epoch(self.model, self.batches, self.criteria, self.optimizer, self.scheduler, self.device,
                        epoch=1, precision=self.precision)
        return sum(len(batch["image"]) for batch in self.batches)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    set_job_threads(args.threads)
    experiment = load_recipe(args.experiment)
    stage_name = args.stage or list(experiment["stages"])[-1]
    if stage_name not in experiment["stages"]:
        raise SystemExit(f"--stage {stage_name}: recipe {args.experiment} has stages {list(experiment['stages'])}")
    stage = StageSpec.from_dict(stage_name, experiment["stages"][stage_name])
    batch_size = args.batch_size or stage.batch_size
    size = experiment["data"]["image_size"]
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"image": torch.randn(batch_size, 3, size, size, generator=generator),
         "class": torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator),
         "index": torch.arange(batch_size)}
        for _ in range(args.batches)
    ]
    bf16_units = cpu_bf16_units() or ["none (emulated)"]
    print(f"recipe {args.experiment}, stage {stage_name}: {size} px, batch {batch_size}, {args.batches} steps per pass, "
          f"{args.threads} threads; CPU bf16 units: {', '.join(bf16_units)}; "
          f"{args.rounds} interleaved rounds, >= {args.min_seconds:g} s per measurement", flush=True)
    if warning := load_warning(machine):
        print(warning)
    comparison = Comparison("train step", TrainingPass(experiment, stage, batches, "bf16"),
                            TrainingPass(experiment, stage, batches, "fp32"), ours_label="bf16", reference_label="fp32")
    run_interleaved([comparison], args.rounds, min_seconds=args.min_seconds)
    for line in ratio_lines(comparison, ratio_name="bf16/fp32 speed-up"):
        print(line)
    if args.json:
        figures = {"bf16_speedup": comparison.ratios.as_dict("bf16/fp32 images/s")}
        write_json(args.json, "cpu_precision", vars(args), figures, machine)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
