"""Where an epoch of our loop spends its time, phase by phase, next to the bare reference loop.

Ours is the package's real code, called as the rules call it and timed from outside with
time.perf_counter: nothing of the loop is copied. The wrappers (installed for the measured
epochs only, removed afterwards):

  data             the DataLoader iterator's next() (cached decode, augmentation, collation), timed
                   by handing train_one_epoch / predict a loader wrapper
  to_device        labelflow.training.to_device (monkeypatched name)
  forward          the model's forward, between a forward pre-hook and a forward hook
  loss             labelflow.training.compute_losses
  zero_grad, optimizer_step, scheduler_step   the optimizer's / scheduler's methods (instance patch)
  backward         torch.Tensor.backward (class patch)
  metrics_update, metrics_result              labelflow.metrics.HeadMetrics.update / .result
  layout           labelflow.inference.images_for (inference only; the .to() copy is in "other")
  probabilities    labelflow.inference.probabilities (inference only)
  other            the epoch's wall time minus the phases above: the loop's own glue (enumerate,
                   detach, dicts, the outputs' .cpu() copies in predict) and the timers themselves

The reference (benchmarks/digits_loops.ReferenceLoop) is our own few lines, so its phases are
timed by an instrumented copy here (kept line for line with ReferenceLoop). Every phase is also
counted; a wrapped function that is never called (the package changed shape) is an error, so a
"0 s" never hides a wrapper that missed.

A third table times run_stage itself for --stage-epochs epochs, as a training job runs it:
train_one_epoch, evaluate on the valid images, and the epoch-end hooks (TensorBoard scalars,
best/top-k checkpoints, the resume state) per epoch, plus what runs once per stage (publish).

On CUDA, kernels run asynchronously: a phase's time is the CPU time spent in it, and the first
call that needs a result (HeadMetrics.update's float(), predict's .cpu()) absorbs the wait for
the GPU. That is where the loop blocks, which is what matters for overlap.

    python benchmarks/train_phases.py                        # digits recipe, 1024 images, 3 epochs each
    python benchmarks/train_phases.py --json phases.json
    python benchmarks/train_phases.py --images 64 --batch-size 16 --epochs 1 --stage-epochs 1   # smoke test
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils.data import DataLoader, Subset

import labelflow.inference as inference
import labelflow.training as training
from digits_loops import Bench, DigitsImages, LoopSettings, ReferenceLoop, build_bench, reference_autocast, reference_layout
from labelflow.device import set_job_threads
from labelflow.loaders import make_loader
from labelflow.metrics import HeadMetrics
from spread import Spread, load_warning, machine_info, write_json

TRAIN_PHASES = ("data", "to_device", "forward", "loss", "zero_grad", "backward", "optimizer_step",
                "scheduler_step", "metrics_update", "metrics_result")
INFER_PHASES = ("data", "layout", "forward", "probabilities")
STAGE_PHASES = ("seed_epoch", "train_one_epoch", "evaluate", "hook_tensorboard", "hook_checkpoints",
                "hook_state", "log_epoch", "publish")
PER_STAGE = ("publish",)  # once per stage, not per epoch


class PhaseClock:
    """Seconds and calls per phase name, accumulated over one measured epoch."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.calls[name] += 1

    def wrap(self, name: str, function: Callable) -> Callable:
        """``function`` with its time added to ``name`` (works for plain functions and methods).
        functools.wraps keeps the wrapped function's attributes, e.g. the marker the LR scheduler
        sets on optimizer.step (without it torch warns that step was overridden)."""

        @functools.wraps(function)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - started)

        return timed

    def check_called(self, names: tuple[str, ...]) -> None:
        missing = [name for name in names if not self.calls.get(name)]
        if missing:
            raise RuntimeError(
                f"phases {missing} were never called: the package no longer calls what train_phases.py "
                "wraps there (see its docstring); update the wrappers before trusting the table"
            )


class TimedLoader:
    """A DataLoader whose iteration time (iterator creation and every next()) goes to 'data'."""

    def __init__(self, loader: DataLoader, clock: PhaseClock):
        self.loader, self.clock = loader, clock

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # dataset, batch_size, generator, ...
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        started = time.perf_counter()
        iterator = iter(self.loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                self.clock.add("data", time.perf_counter() - started)
                return
            self.clock.add("data", time.perf_counter() - started)
            yield batch
            started = time.perf_counter()


@contextmanager
def forward_timer(model: torch.nn.Module, clock: PhaseClock) -> Iterator[None]:
    """Time the model's forward between a pre-hook and a hook."""
    started: list[float] = []
    handles = [
        model.register_forward_pre_hook(lambda module, args: started.append(time.perf_counter())),
        model.register_forward_hook(lambda module, args, output: clock.add("forward", time.perf_counter() - started.pop())),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def instrument_training(bench: Bench, clock: PhaseClock) -> Iterator[None]:
    """Wrap the phases of training.train_one_epoch (the real function) for one epoch."""
    ours = bench.ours
    with ExitStack() as stack:
        stack.enter_context(forward_timer(ours.model, clock))
        stack.enter_context(mock.patch.object(training, "to_device", clock.wrap("to_device", training.to_device)))
        stack.enter_context(mock.patch.object(training, "compute_losses", clock.wrap("loss", training.compute_losses)))
        stack.enter_context(mock.patch.object(torch.Tensor, "backward", clock.wrap("backward", torch.Tensor.backward)))
        for target, method, name in ((ours.optimizer, "zero_grad", "zero_grad"), (ours.optimizer, "step", "optimizer_step"),
                                     (ours.scheduler, "step", "scheduler_step")):
            stack.enter_context(mock.patch.object(target, method, clock.wrap(name, getattr(target, method))))
        for method in ("update", "result"):
            timed = clock.wrap(f"metrics_{method}", getattr(HeadMetrics, method))
            stack.enter_context(mock.patch.object(HeadMetrics, method, timed))
        yield


@contextmanager
def instrument_inference(bench: Bench, clock: PhaseClock) -> Iterator[None]:
    """Wrap the phases of inference.predict (the real function) for one pass."""
    with ExitStack() as stack:
        stack.enter_context(forward_timer(bench.ours.model, clock))
        stack.enter_context(mock.patch.object(inference, "images_for", clock.wrap("layout", inference.images_for)))
        stack.enter_context(mock.patch.object(inference, "probabilities", clock.wrap("probabilities", inference.probabilities)))
        yield


def our_train_epoch(bench: Bench, sync: Callable[[], None]) -> dict[str, float]:
    ours, clock = bench.ours, PhaseClock()
    with instrument_training(bench, clock):
        sync()
        started = time.perf_counter()
        training.train_one_epoch(ours.model, TimedLoader(ours.train_loader, clock), ours.criteria, ours.optimizer,
                                 ours.scheduler, ours.device, epoch=1)
        sync()
        total = time.perf_counter() - started
    clock.check_called(TRAIN_PHASES)
    return with_other(clock, total)


def our_infer_pass(bench: Bench, sync: Callable[[], None]) -> dict[str, float]:
    ours, clock = bench.ours, PhaseClock()
    with instrument_inference(bench, clock):
        sync()
        started = time.perf_counter()
        inference.predict(ours.model, TimedLoader(ours.eval_loader, clock), ours.device)
        sync()
        total = time.perf_counter() - started
    clock.check_called(INFER_PHASES)
    return with_other(clock, total)


def with_other(clock: PhaseClock, total: float) -> dict[str, float]:
    """Phase seconds plus 'other' (the unattributed rest) and 'epoch' (the wall time)."""
    phases = dict(clock.seconds)
    phases["other"] = total - sum(phases.values())
    phases["epoch"] = total
    return phases


def reference_train_epoch(reference: ReferenceLoop, sync: Callable[[], None]) -> dict[str, float]:
    """ReferenceLoop.train_epoch, line for line, with a timer around each phase."""
    clock, tick = PhaseClock(), time.perf_counter
    model, device, fast = reference.model, reference.device, reference.fast
    sync()
    started = tick()
    model.train()
    order = torch.randperm(len(reference.images), generator=reference.generator).to(device)
    steps = len(reference.images) // reference.batch_size
    for start in range(0, steps * reference.batch_size, reference.batch_size):
        t0 = tick()
        index = order[start : start + reference.batch_size]
        images = reference_layout(reference.images[index], device, fast)
        t1 = tick()
        with reference_autocast(device, fast):
            logits = model(images)["class"]
        t2 = tick()
        loss = torch.nn.functional.cross_entropy(logits.float(), reference.labels[index])
        t3 = tick()
        reference.optimizer.zero_grad(set_to_none=True)
        t4 = tick()
        loss.backward()
        t5 = tick()
        reference.optimizer.step()
        t6 = tick()
        for name, seconds in (("data", t1 - t0), ("forward", t2 - t1), ("loss", t3 - t2), ("zero_grad", t4 - t3),
                              ("backward", t5 - t4), ("optimizer_step", t6 - t5)):
            clock.add(name, seconds)
    sync()
    return with_other(clock, tick() - started)


@torch.inference_mode()
def reference_infer_pass(reference: ReferenceLoop, sync: Callable[[], None]) -> dict[str, float]:
    """ReferenceLoop.infer with the forward timed ('data' is the slice and layout)."""
    clock, tick = PhaseClock(), time.perf_counter
    sync()
    started = tick()
    reference.model.eval()
    for start in range(0, len(reference.images), reference.infer_batch_size):
        t0 = tick()
        batch = reference_layout(reference.images[start : start + reference.infer_batch_size], reference.device, reference.fast)
        t1 = tick()
        with reference_autocast(reference.device, reference.fast):
            reference.model(batch)
        clock.add("data", t1 - t0)
        clock.add("forward", tick() - t1)
    sync()
    return with_other(clock, tick() - started)


def measure_epochs(bench: Bench, epochs: int, sync: Callable[[], None]) -> dict[str, dict[str, list[float]]]:
    """One warm-up epoch/pass of each, then ``epochs`` of each, alternating who goes first.
    Returns {"train_ours"|"train_reference"|"infer_ours"|"infer_reference": {phase: [seconds per epoch]}}."""
    sides: dict[str, Callable[[], dict[str, float]]] = {
        "train_ours": lambda: our_train_epoch(bench, sync),
        "train_reference": lambda: reference_train_epoch(bench.reference, sync),
        "infer_ours": lambda: our_infer_pass(bench, sync),
        "infer_reference": lambda: reference_infer_pass(bench.reference, sync),
    }
    for run in sides.values():
        run()  # warm-up
    measured: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in sides}
    for epoch in range(epochs):
        for kind in ("train", "infer"):
            order = [f"{kind}_ours", f"{kind}_reference"]
            for name in order if epoch % 2 == 0 else order[::-1]:
                for phase, seconds in sides[name]().items():
                    measured[name][phase].append(seconds)
    return measured


def stage_phases(bench: Bench, epochs: int, valid_images: int, workdir: Path) -> dict[str, list[float]]:
    """run_stage (the real one) for ``epochs`` epochs with its per-epoch parts timed."""
    clock = PhaseClock()
    ours = bench.ours
    valid = make_loader(Subset(ours.eval_loader.dataset, range(valid_images)), batch_size=bench.batch_size,
                        shuffle=False, seed=0, pin_memory=ours.device.type == "cuda")
    spec = replace(ours.stage, epochs=epochs, min_steps=0)
    patches = [(training, "seed_epoch", "seed_epoch"), (training, "train_one_epoch", "train_one_epoch"),
               (training, "evaluate", "evaluate"), (training, "_log_epoch", "log_epoch"), (training, "publish", "publish"),
               (training.TensorBoardScalars, "__call__", "hook_tensorboard"),
               (training.CheckpointKeeper, "__call__", "hook_checkpoints"), (training.StateSaver, "__call__", "hook_state")]
    with ExitStack() as stack:
        for target, attribute, name in patches:
            stack.enter_context(mock.patch.object(target, attribute, clock.wrap(name, getattr(target, attribute))))
        started = time.perf_counter()
        training.run_stage(ours.model, training.StageLoaders(ours.train_loader, valid), spec, out_dir=workdir / "out",
                           state_dir=workdir / "state", device=ours.device, seed=0, stage_fingerprint="train_phases")
        total = time.perf_counter() - started
    clock.check_called(STAGE_PHASES)
    per_epoch = {name: [seconds / (1 if name in PER_STAGE else epochs)] for name, seconds in clock.seconds.items()}
    per_epoch["stage_total"] = [total]
    per_epoch["setup_and_other"] = [total - sum(clock.seconds.values())]
    return per_epoch


def median(values: list[float]) -> float:
    return Spread(tuple(values)).median if values else 0.0


def phase_table(kind: str, ours: dict[str, list[float]], reference: dict[str, list[float]], phases: tuple[str, ...]) -> list[str]:
    """Markdown rows: each phase's median seconds per epoch for both loops, and what ours costs
    beyond the reference in % of the reference's epoch (the rows sum to the whole gap)."""
    ours_epoch, reference_epoch = median(ours["epoch"]), median(reference["epoch"])
    lines = [
        f"| {kind} phase | ours s/epoch | % of ours | reference s/epoch | % of reference "
        "| ours - reference, % of reference epoch |",
        "|---|---|---|---|---|---|",
    ]
    for phase in (*phases, "other"):
        mine, theirs = median(ours.get(phase, [])), median(reference.get(phase, []))
        lines.append(
            f"| {phase} | {mine:.4f} | {100 * mine / ours_epoch:.1f} | "
            + (f"{theirs:.4f} | {100 * theirs / reference_epoch:.1f}" if phase in reference else "- | -")
            + f" | {100 * (mine - theirs) / reference_epoch:+.1f} |"
        )
    lines.append(f"| epoch (wall) | {ours_epoch:.4f} | 100 | {reference_epoch:.4f} | 100 | "
                 f"{100 * (ours_epoch - reference_epoch) / reference_epoch:+.1f} |")
    ratios = Spread(tuple(r / o for o, r in zip(ours["epoch"], reference["epoch"])))
    lines.append(f"\n{kind} ratio (reference epoch time / ours, per epoch): {ratios.summary()}")
    return lines


def stage_table(stage: dict[str, list[float]], epochs: int) -> list[str]:
    train = stage["train_one_epoch"][0]
    lines = [f"| run_stage part ({epochs} epochs) | seconds per epoch | % of train_one_epoch |", "|---|---|---|"]
    for name in (*STAGE_PHASES, "setup_and_other"):
        seconds = stage[name][0]
        per = "once per stage" if name in PER_STAGE + ("setup_and_other",) else "per epoch"
        lines.append(f"| {name} ({per}) | {seconds:.4f} | {100 * seconds / train:.1f} |")
    lines.append(f"| whole stage (wall, s) | {stage['stage_total'][0]:.3f} | |")
    return lines


def figures_of(measured: dict[str, dict[str, list[float]]], stage: dict[str, list[float]] | None) -> dict[str, Any]:
    figures = {f"{side}_{phase}": Spread(tuple(values)).as_dict("s/epoch")
               for side, phases in measured.items() for phase, values in phases.items()}
    for kind in ("train", "infer"):
        ours, reference = measured[f"{kind}_ours"]["epoch"], measured[f"{kind}_reference"]["epoch"]
        figures[f"{kind}_ratio"] = Spread(tuple(r / o for o, r in zip(ours, reference))).as_dict("ours/reference")
    for name, values in (stage or {}).items():
        figures[f"stage_{name}"] = Spread(tuple(values)).as_dict("s/epoch" if name not in PER_STAGE else "s/stage")
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="softmax", help="recipe in config/experiments (default softmax)")
    p.add_argument("--images", type=int, default=1024, help="images per epoch (default 1024)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: the recipe's stage2 batch)")
    p.add_argument("--infer-batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3, help="measured epochs of each loop after a warm-up one (default 3)")
    p.add_argument("--stage-epochs", type=int, default=2, help="epochs of the run_stage table; 0 skips it (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON (for compare_runs.py)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    set_job_threads(args.threads)  # torch threads, and the budget loading plans share
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    settings = LoopSettings(experiment=args.experiment, batch_size=args.batch_size, infer_batch_size=args.infer_batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        bench = build_bench(DigitsImages.write(tmp, args.images), settings, device)
        print(f"recipe {args.experiment}, {bench.data_cfg['image_size']} px, batch {bench.batch_size}, {args.images} images, "
              f"device {device}, torch threads {args.threads}; medians of {args.epochs} epochs after a warm-up epoch")
        if warning := load_warning(machine):
            print(warning)
        measured = measure_epochs(bench, args.epochs, sync)
        stage = stage_phases(bench, args.stage_epochs, max(1, args.images // 4), Path(tmp)) if args.stage_epochs else None
    print()
    print("\n".join(phase_table("train", measured["train_ours"], measured["train_reference"], TRAIN_PHASES)))
    print()
    print("\n".join(phase_table("infer", measured["infer_ours"], measured["infer_reference"], INFER_PHASES)))
    if stage is not None:
        print()
        print("\n".join(stage_table(stage, args.stage_epochs)))
    if args.json:
        write_json(args.json, "train_phases", vars(args) | {"image_size": bench.data_cfg["image_size"],
                   "batch_size": bench.batch_size, "torch": torch.__version__}, figures_of(measured, stage), machine)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
