"""The first run on a GPU, as one command: does our CUDA path work, how fast is it, is it right?

    python benchmarks/gpu_check.py --out results/gpu_check        # on the GPU machine: about 5 min (H200)
    python benchmarks/gpu_check.py --device cpu --out /tmp/gc --sizes 32 --images 64 --batch 16 \\
        --rounds 2 --min-seconds 0 --recipe short --recipe-images 100 --fashion-limit 100 --workers 1  # the pieces, on CPU

Installs nothing and needs no network. It writes --out/gpu_check.json (every figure) and
--out/gpu_check.md (the tables, also printed), in four sections:

1. Device: torch.cuda.get_device_name, compute capability, memory, torch / CUDA / cuDNN versions.
2. Throughput, for each --sizes (default 32 and 224 px; ResNet-18 with the recipe's small-input
   stem up to 64 px and the standard stem above; --batch 256 for training and inference) and two
   modes:
     bf16+channels_last  labelflow.device as it is: bf16 autocast, channels_last, pinned memory,
                         non-blocking copies; the reference loop uses bf16 and channels_last too;
     fp32                THE PACKAGE PATCHED FOR THIS ROW ONLY (fast_paths_off below):
                         labelflow.device's autocast, images_for and place_model are replaced by
                         float32 / default-layout versions; the reference runs float32 too.
   cudnn.benchmark is on in both (labelflow.device.select_device turns it on). Ours and the
   reference (benchmarks/digits_loops.py: our real train_one_epoch / predict vs a bare loop
   over images already on the GPU) alternate in --rounds interleaved rounds
   (benchmarks/spread.py); each row gives images/s, the ratio's min / median / max, the peak
   GPU memory of one pass of each (torch.cuda.max_memory_allocated, including what is already
   held: models, optimizer state, the reference's on-GPU images), and what the model saw
   (autocast on/off, channels_last input yes/no), checked by a forward pre-hook, so a patch
   that missed cannot pass unnoticed. In the bf16 mode, one epoch of each loop is also broken
   down by phase (benchmarks/train_phases.py), and our training is timed once more as
   data.cache/num_workers auto load on a GPU: no cache, --workers persistent loader processes
   (the first rows use the cache in one process, as on the CPU, so that they compare the
   loops), and the training loaders are timed alone, without the model (is the loader the
   bound, or handing its batches to the GPU?): the cached one, the streaming one, and three
   diagnostic variants of the streaming one (diagnostic_loaders: + the copy to the device;
   uint8 batches normalised on the device; no augmentation). --modes runs one mode only.
3. Recipe: the digits softmax recipe (config/experiments/softmax.yaml, validated with the
   schema) trained by experiment.train_stage, stage1 then stage2, on the device and on the CPU
   in the same run, same data, folds (5, seed 42, valid fold 4, no calibration hold-out),
   seed and loading (data.cache true, no worker process, so the same batches). Passes when
   |valid accuracy (device) - valid accuracy (CPU)| <= --tolerance (0.01).
   --recipe full is the recipe as configured (2 + 14 epochs); short is 1 + 3 epochs with
   min_steps 0 (a plumbing check; its accuracy is lower and noisier). --cpu-accuracy X skips
   the CPU run and compares with X instead (measured beforehand with the same --recipe,
   e.g. `--device cpu --sections recipe`).
4. Fashion-MNIST, when labelflow.fashion.find_source finds the IDX files (Debian package
   dataset-fashion-mnist: /usr/share/datasets/fashion-mnist/): --fashion-limit images per
   split (default 20000: 2,000 per class for training, the whole 10,000 test set; 0 = all),
   written as class folders, folds as the workflow makes them, stage2 of the softmax recipe for
   --fashion-epochs (2) from scratch on the device; valid and test accuracy, seconds per epoch.

Exit status: 0 when everything ran and the recipe check passed (or was not run); 1 when the
recipe check failed; 3 when --device cuda (the default) finds no CUDA device: it prints "no
CUDA", writes that into the JSON and Markdown, measures nothing, and exits 3, so a GPU job
whose GPU is missing does not look like a success.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader

import digits_loops
import labelflow.device
import labelflow.inference
import labelflow.training
from digits_loops import Bench, DigitsImages, LoopSettings, build_bench, data_only_rate, load_recipe
from labelflow.dataset import split, tag2label
from labelflow.device import select_device, set_job_threads
from labelflow.experiment import StageSetup, train_stage
from labelflow.inference import predict
from labelflow.io import DatasetError, write_csv_atomic, write_json_atomic
from labelflow.loaders import ImageTableDataset, build_augmentations, build_transform, eval_loader, make_loader
from labelflow.models import load_model
from spread import Comparison, Spread, machine_info, ratio_lines, run_interleaved
from train_phases import INFER_PHASES, TRAIN_PHASES, measure_epochs, phase_table

EXIT_RECIPE_FAILED = 1
EXIT_NO_CUDA = 3
SECTIONS = ("throughput", "recipe", "fashion")
MODES = {"bf16+channels_last": True, "fp32": False}  # mode -> labelflow.device's CUDA fast paths on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where ours and the reference run (default cuda)")
    p.add_argument("--out", type=Path, default=Path("results/gpu_check"), help="folder for gpu_check.json and .md")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run (default: all)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224], help="image sizes in px (default 32 224)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="throughput modes (default: both)")
    p.add_argument("--batch", type=int, default=256, help="batch for training and inference (default 256)")
    p.add_argument("--images", type=int, default=1797, help="images per epoch; digits repeat past 1,797 (default 1797)")
    p.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))),
                   help="also time our training with this many loader processes (data.num_workers); "
                        "0 skips (default min(8, cores))")
    p.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds (default 7)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shortest measurement, in s (default 1.0)")
    p.add_argument("--recipe", choices=("full", "short"), default="full", help="digits softmax recipe length (default full)")
    p.add_argument("--recipe-images", type=int, default=0, help="seeded subset of the digits for the recipe; 0 = all")
    p.add_argument("--cpu-accuracy", type=float, default=None, help="the CPU run's valid accuracy, measured beforehand")
    p.add_argument("--tolerance", type=float, default=0.01, help="largest |device - CPU| valid accuracy (default 0.01)")
    p.add_argument("--fashion-limit", type=int, default=20000, help="Fashion-MNIST images per split; 0 = all (default 20000)")
    p.add_argument("--fashion-epochs", type=int, default=2)
    p.add_argument("--fashion-source", type=Path, default=None,
                   help="folder holding the four IDX files (default: where dataset-fashion-mnist puts them)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- 1. device


def device_report(device: torch.device) -> dict[str, Any]:
    report: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
                              "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                              "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        report |= {"name": torch.cuda.get_device_name(device), "capability": capability,
                   "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
                   "bf16_supported": torch.cuda.is_bf16_supported()}
    return report


# --------------------------------------------------------------------------- 2. throughput


@contextmanager
def fast_paths_off() -> Iterator[None]:
    """FOR THE 'fp32' ROWS ONLY: our loop without bf16 autocast and channels_last.

    labelflow.device turns both on for every CUDA run (a stage's `precision: fp32` turns off
    autocast only, not channels_last). Here its autocast,
    images_for and place_model are replaced, in every module that imported them by name, by
    float32 / default-layout versions; pinned memory, non-blocking copies and cudnn.benchmark
    stay. The forward pre-hook of `observe_inputs` reports what the model really saw."""

    def autocast_off(device: torch.device, precision: str = "auto"):
        return torch.autocast(device_type=device.type, enabled=False)

    def images_as_they_are(images: torch.Tensor, device: torch.device) -> torch.Tensor:
        return images

    def place_only(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return model.to(device)

    replacements = {"autocast": autocast_off, "images_for": images_as_they_are, "place_model": place_only}
    for module in (labelflow.training, labelflow.inference):
        if not hasattr(module, "autocast") or not hasattr(module, "images_for"):
            raise RuntimeError(f"{module.__name__} no longer imports autocast and images_for by name; "
                               "update gpu_check.fast_paths_off so the fp32 rows really are float32")
    with ExitStack() as stack:
        for module in (labelflow.device, labelflow.training, labelflow.inference, digits_loops):
            for name, replacement in replacements.items():
                if hasattr(module, name):
                    stack.enter_context(mock.patch.object(module, name, replacement))
        yield


@contextmanager
def observe_inputs(model: torch.nn.Module, device: torch.device, seen: set[str]) -> Iterator[None]:
    """Record, for every forward, whether autocast was on and the input was channels_last."""

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if torch.is_autocast_enabled(device.type):
            autocast = f"{str(torch.get_autocast_dtype(device.type)).removeprefix('torch.')} autocast"
        else:
            autocast = "no autocast"
        images = args[0]
        # degenerate shapes (1 channel, 1x1 pixels) pass both layout tests; call those contiguous
        channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        seen.add(f"{autocast}, {'channels_last' if channels_last else 'contiguous'}")

    handle = model.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def peak_memory(run_pass: Callable[[], int], device: torch.device) -> dict[str, float] | None:
    """GiB held before one pass and the peak during it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    run_pass()
    torch.cuda.synchronize()
    return {"held_gib": held / 2**30, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def workers_loader(bench: Bench, workers: int, device: torch.device, transform: A.Compose | None = None) -> DataLoader:
    """Our training loader as data.cache/num_workers auto make it on a GPU: no cache,
    ``workers`` persistent loader processes (with another ``transform`` for the diagnostics)."""
    cached = bench.ours.train_loader.dataset
    streamed = ImageTableDataset(cached.root, cached.paths, cached.targets, cached.image_size,
                                 cached.transform if transform is None else transform, cache=False)  # fmt: skip
    return make_loader(streamed, batch_size=bench.batch_size, shuffle=True, seed=0,
                       drop_last=True, pin_memory=device.type == "cuda", num_workers=workers)


class DeviceHandOver:
    """A loader whose batches are also copied to the device (and, for uint8 batches, turned
    into normalised float there), synchronised at the end of each pass: the loader alone plus
    the hand-over, still without a model."""

    def __init__(self, loader: DataLoader, device: torch.device, data_cfg: dict[str, Any]):
        self.loader, self.device = loader, device
        self.mean = torch.tensor(data_cfg["mean"], device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(data_cfg["std"], device=device).view(1, 3, 1, 1) * 255.0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            images = batch["image"].to(self.device, non_blocking=self.device.type == "cuda")
            if images.dtype == torch.uint8:
                images = (images.float() - self.mean) / self.std
            yield {**batch, "image": images}
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def diagnostic_loaders(bench: Bench, workers: int, device: torch.device) -> dict[str, Any]:
    """What bounds the streaming loader on a GPU, one change at a time (no model; the first
    GPU check found the data phase 85-92 % of our epoch and 8 workers only 1.4-2.2x one
    process): handing float32 batches to the device; uint8 batches (augmented, not normalised:
    4x fewer bytes through shared and pinned memory) normalised on the device; no augmentation
    (decode, resize, normalise only)."""
    data_cfg = bench.data_cfg
    augment_uint8 = A.Compose([*build_augmentations(data_cfg["augmentations"]), ToTensorV2()], seed=0)
    no_augmentation = build_transform(train=False, mean=data_cfg["mean"], std=data_cfg["std"])
    return {
        f"stream, {workers} workers, float32 to {device.type}": DeviceHandOver(workers_loader(bench, workers, device), device, data_cfg),
        f"stream, {workers} workers, uint8 to {device.type}, normalised there": DeviceHandOver(
            workers_loader(bench, workers, device, augment_uint8), device, data_cfg),
        f"stream, {workers} workers, no augmentation": workers_loader(bench, workers, device, no_augmentation),
    }


def workers_comparison(bench: Bench, loader: DataLoader, workers: int) -> Comparison:
    """Our training epoch over ``loader`` against the same reference epoch: does the input
    pipeline keep up?"""
    with_workers = replace(bench.ours, train_loader=loader)
    return Comparison(f"train_workers{workers}", with_workers.train_epoch, bench.reference.train_epoch)


def loader_only_rates(loaders: dict[str, Any], passes: int = 3) -> dict[str, Any]:
    """Images/s of each training loader alone, no model (decoding, augmentation, collation,
    pinned memory), over ``passes`` passes after a warm-up pass. Beside the training rows it
    tells where the bound is: a loader alone slower than the bare loop is the bound itself; one
    faster means the time goes in handing its batches to the GPU."""
    rates = {}
    for name, loader in loaders.items():
        data_only_rate(loader)
        rates[name] = Spread(tuple(data_only_rate(loader) for _ in range(passes))).as_dict("img/s")
    return rates


def throughput_row(bench: Bench, args: argparse.Namespace, device: torch.device, fast: bool) -> dict[str, Any]:
    """Interleaved rounds of ours vs the reference (train, infer), memory, what the model saw,
    and in the bf16 mode a phase breakdown."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seen: dict[str, set[str]] = {"ours": set(), "reference": set()}
    comparisons = bench.comparisons()
    loaders = {"cache, no worker": bench.ours.train_loader}
    if fast and args.workers > 0:
        loaders[f"stream, {args.workers} workers"] = workers_loader(bench, args.workers, device)
        comparisons.append(workers_comparison(bench, loaders[f"stream, {args.workers} workers"], args.workers))
    with observe_inputs(bench.ours.model, device, seen["ours"]), observe_inputs(bench.reference.model, device, seen["reference"]):
        run_interleaved(comparisons, args.rounds, min_seconds=args.min_seconds, sync=sync)
    row: dict[str, Any] = {"seen": {side: sorted(values) for side, values in seen.items()}, "loops": {}}
    for comparison in comparisons:
        row["loops"][comparison.name] = {
            "ours_img_s": Spread(tuple(comparison.ours_rates)).as_dict("img/s"),
            "reference_img_s": Spread(tuple(comparison.reference_rates)).as_dict("img/s"),
            "ratio": comparison.ratios.as_dict("ours/reference"),
            "memory": {"ours": peak_memory(comparison.ours, device), "reference": peak_memory(comparison.reference, device)},
            "lines": ratio_lines(comparison),
        }
    if fast:
        row["phases"] = {side: {phase: Spread(tuple(v)).median for phase, v in phases.items()}
                         for side, phases in measure_epochs(bench, 1, sync).items()}
        if args.workers > 0:
            loaders.update(diagnostic_loaders(bench, args.workers, device))
        row["loader_only"] = loader_only_rates(loaders)
    return row


def run_throughput(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    images = DigitsImages.write(workdir, args.images)
    results: dict[str, Any] = {}
    for size in args.sizes:
        for mode, fast in ((mode, MODES[mode]) for mode in args.modes):
            started = time.perf_counter()
            with nullcontext() if fast else fast_paths_off():
                settings = LoopSettings(batch_size=args.batch, infer_batch_size=args.batch, image_size=size,
                                        small_input=size <= 64, fast=fast)
                bench = build_bench(images, settings, device)
                row = throughput_row(bench, args, device, fast)
            del bench
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row["seconds"] = time.perf_counter() - started
            results[f"{size}px {mode}"] = row
            print(f"{size} px, {mode}: " + "; ".join(loop["lines"][-1] for loop in row["loops"].values())
                  + f" ({row['seconds']:.0f} s)", flush=True)
    return results


# --------------------------------------------------------------------------- 3. recipe


def recipe_experiment(length: str) -> dict[str, Any]:
    """The softmax recipe, validated; ``short``: stage1 1 epoch, stage2 3 epochs, no min_steps.
    Loading is pinned (cache, no worker process) for the device and the CPU run alike: ``auto``
    streams through workers on a GPU only, and a loader with workers draws another random
    stream (loaders.SeededBatchSampler), so the two runs would see other batches and the
    check would mix chance with numerics."""
    experiment = load_recipe("softmax")
    experiment["data"] |= {"cache": True, "num_workers": 0}
    if length == "short":
        experiment["stages"]["stage1"] |= {"epochs": 1, "min_steps": 0}
        experiment["stages"]["stage2"] |= {"epochs": 3, "min_steps": 0}
    return experiment


def write_run_tables(root: Path, table_dir: Path, limit: int, seed: int = 42) -> tuple[Path, Path]:
    """dataset.csv (path, tag, class, fold: 5 stratified folds) and tag2cls.json of a class-folder
    set, as the workflow's tag2label and split rules write them; ``limit`` > 0 keeps a seeded subset
    of about ``limit`` images, the same number from each class (at least one per fold)."""
    table_dir.mkdir(parents=True, exist_ok=True)
    found = tag2label(root)
    dataset = found.dataset
    if 0 < limit < len(dataset):
        per_class = max(5, limit // dataset["tag"].nunique())
        dataset = dataset.sample(frac=1.0, random_state=0).groupby("tag").head(per_class)
    dataset_csv, tag2cls_json = table_dir / "dataset.csv", table_dir / "tag2cls.json"
    write_csv_atomic(split(dataset, found.tag2cls, n_folds=5, seed=seed), dataset_csv)
    write_json_atomic(found.tag2cls, tag2cls_json)
    return dataset_csv, tag2cls_json


def train_recipe(root: Path, tables: tuple[Path, Path], experiment: dict[str, Any], want_gpu: bool,
                 out: Path, stages: tuple[str, ...] = ("stage1", "stage2")) -> dict[str, Any]:
    """Train ``stages`` in order with experiment.train_stage (each from the previous best.pt),
    valid fold 4 of 5, seed 42, no calibration hold-out. Returns the last stage's accuracies."""
    started, init, metrics = time.perf_counter(), None, {}
    for stage in stages:
        setup = StageSetup(dataset_csv=tables[0], tag2cls_json=tables[1], root=root, experiment=experiment, stage=stage,
                           valid_folds=[4], seed=42, calibration_share=0.0, init_checkpoint=init, want_gpu=want_gpu)
        metrics = train_stage(setup, out_dir=out / stage, state_dir=out / f"{stage}_state")
        init = out / stage / "best.pt"
    epochs = metrics["epochs"]
    return {
        "valid_accuracy_best": metrics["best"]["value"], "best_epoch": metrics["best"]["epoch"],
        "valid_accuracy_last": epochs[-1]["valid"]["accuracy"], "epochs": len(epochs),
        "seconds_per_epoch": float(np.mean([e["seconds"] for e in epochs])), "seconds": time.perf_counter() - started,
        "best_checkpoint": str(init),
    }


def run_recipe(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    """The recipe on the device and (unless --cpu-accuracy) on the CPU; the verdict."""
    root = workdir / "digits"
    if not root.exists():
        digits_loops.write_digits_dataset(root, image_size=digits_loops.DIGITS_PNG_SIZE)
    tables = write_run_tables(root, workdir, args.recipe_images)
    experiment = recipe_experiment(args.recipe)
    on_device = train_recipe(root, tables, experiment, device.type == "cuda", workdir / "recipe_device")
    if args.cpu_accuracy is None:
        on_cpu = train_recipe(root, tables, experiment, False, workdir / "recipe_cpu")
        cpu_accuracy, cpu_source = on_cpu["valid_accuracy_best"], "measured in this run"
    else:
        on_cpu, cpu_accuracy, cpu_source = None, args.cpu_accuracy, "passed in (--cpu-accuracy)"
    difference = on_device["valid_accuracy_best"] - cpu_accuracy
    return {
        "recipe": args.recipe, "images": args.recipe_images or "all", "device_run": on_device, "cpu_run": on_cpu,
        "cpu_accuracy": cpu_accuracy, "cpu_accuracy_source": cpu_source, "difference": difference,
        "tolerance": args.tolerance, "passed": abs(difference) <= args.tolerance,
    }


# --------------------------------------------------------------------------- 4. Fashion-MNIST


def run_fashion(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    """Stage2 of the softmax recipe for --fashion-epochs on Fashion-MNIST, then the test set."""
    from labelflow.fashion import find_source, write_fashion_dataset

    try:
        source = find_source(args.fashion_source)
    except DatasetError as exc:
        return {"skipped": str(exc)}
    started = time.perf_counter()
    root = workdir / "fashion"
    write_fashion_dataset(root, source=source.folder, limit=args.fashion_limit or None, seed=0)
    tables = write_run_tables(root / "train", workdir / "fashion_tables", 0)
    experiment = load_recipe("softmax")
    experiment["stages"]["stage2"] |= {"epochs": args.fashion_epochs, "min_steps": 0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trained = train_recipe(root / "train", tables, experiment, device.type == "cuda", workdir / "fashion_run", ("stage2",))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    test = tag2label(root / "test").dataset
    tag2cls = json.loads(tables[1].read_text())
    loader = eval_loader(root / "test", test["path"], experiment["data"], batch_size=args.batch, device=device)
    probabilities = predict(load_model(trained["best_checkpoint"]), loader, device)["probabilities"]
    test_accuracy = float((probabilities.argmax(axis=1) == test["tag"].map(tag2cls).to_numpy()).mean())
    return trained | {"source": str(source.folder), "limit": args.fashion_limit or "all", "test_images": len(test),
                      "test_accuracy": test_accuracy, "peak_gib": peak, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- report


def figure_range(figure: dict[str, Any], digits: int = 3) -> str:
    return f"{figure['median']:.{digits}f} [{figure['min']:.{digits}f}, {figure['max']:.{digits}f}]"


def memory_cell(memory: dict[str, Any]) -> str:
    ours, reference = memory["ours"], memory["reference"]
    if ours is None:
        return "n/a (CPU)"
    return f"{ours['peak_gib']:.2f} / {reference['peak_gib']:.2f}"


def throughput_markdown(results: dict[str, Any]) -> list[str]:
    lines = ["| size, mode | loop | ours img/s | reference img/s | ratio: median [min, max] | peak GiB ours / reference "
             "| model saw (ours; reference) |",
             "|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        seen = f"{', '.join(row['seen']['ours'])}; {', '.join(row['seen']['reference'])}"
        for loop, r in row["loops"].items():
            lines.append(f"| {name} | {loop} | {r['ours_img_s']['median']:.0f} | {r['reference_img_s']['median']:.0f} | "
                         f"{figure_range(r['ratio'])} | {memory_cell(r['memory'])} | {seen} |")
    for name, row in results.items():
        if "loader_only" in row:
            lines += ["", f"Training loader alone (no model), {name}: " + "; ".join(
                f"{loader} {figure_range(rate, 0)} img/s" for loader, rate in row["loader_only"].items())]
    for name, row in results.items():
        if "phases" in row:
            ours, reference = ({p: [v] for p, v in row["phases"][f"train_{side}"].items()} for side in ("ours", "reference"))
            lines += ["", f"Phases of one training epoch, {name}:", ""]
            lines += phase_table("train", ours, reference, TRAIN_PHASES)[:-2]
            ours, reference = ({p: [v] for p, v in row["phases"][f"infer_{side}"].items()} for side in ("ours", "reference"))
            lines += ["", f"Phases of one inference pass, {name}:", ""]
            lines += phase_table("infer", ours, reference, INFER_PHASES)[:-2]
    return lines


def recipe_markdown(recipe: dict[str, Any]) -> list[str]:
    device_run, verdict = recipe["device_run"], "PASS" if recipe["passed"] else "FAIL"
    return [
        f"Digits softmax recipe ({recipe['recipe']}, images: {recipe['images']}): valid accuracy on the device "
        f"{device_run['valid_accuracy_best']:.4f} (best epoch {device_run['best_epoch']} of {device_run['epochs']}, "
        f"last {device_run['valid_accuracy_last']:.4f}, {device_run['seconds_per_epoch']:.1f} s/epoch), CPU "
        f"{recipe['cpu_accuracy']:.4f} ({recipe['cpu_accuracy_source']}); difference {recipe['difference']:+.4f}, "
        f"tolerance {recipe['tolerance']}: **{verdict}**",
    ]


def fashion_markdown(fashion: dict[str, Any]) -> list[str]:
    if "skipped" in fashion:
        return [f"Fashion-MNIST: not run ({fashion['skipped']})"]
    peak = "n/a (CPU)" if fashion["peak_gib"] is None else f"{fashion['peak_gib']:.2f} GiB"
    return [
        f"Fashion-MNIST ({fashion['limit']} images per split, {fashion['epochs']} epochs of stage2 from scratch): "
        f"valid accuracy {fashion['valid_accuracy_best']:.4f}, test accuracy {fashion['test_accuracy']:.4f} "
        f"({fashion['test_images']} test images), {fashion['seconds_per_epoch']:.1f} s/epoch, peak GPU memory {peak}, "
        f"{fashion['seconds']:.0f} s in all",
    ]


def markdown(report: dict[str, Any]) -> str:
    device = report["device"]
    lines = ["# gpu_check", "", f"Device: {device.get('name', device['device'])}"
             + (f", capability {device['capability']}, {device['memory_gib']} GiB" if "capability" in device else "")
             + f"; torch {device['torch']}, CUDA {device['cuda']}, cuDNN {device['cudnn']}; "
             f"CPU threads {device['torch_threads']}", ""]
    if "message" in report:
        lines += [report["message"], ""]
    if "throughput" in report:
        lines += ["## Throughput", ""]
        if device["device"] == "cpu":
            lines += ["On the CPU both modes run float32 with the default layout (labelflow.device's rule), "
                      "as the column 'model saw' shows: the rows check the plumbing, not the CUDA paths.", ""]
        lines += throughput_markdown(report["throughput"]) + [""]
    if "recipe" in report:
        lines += ["## Recipe, device vs CPU", ""] + recipe_markdown(report["recipe"]) + [""]
    if "fashion" in report:
        lines += ["## Fashion-MNIST", ""] + fashion_markdown(report["fashion"]) + [""]
    return "\n".join(lines)


def json_ready(value: Any) -> Any:
    """The report without the printed lines (they are in the Markdown)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items() if k != "lines"}
    return value


def compare_figures(throughput: dict[str, Any]) -> dict[str, Any]:
    """The throughput figures in spread.write_json's layout, so compare_runs.py reads two checks."""
    figures = {}
    for name, row in throughput.items():
        key = name.replace(" ", "_").replace("+", "_")
        for loop, values in row["loops"].items():
            for figure in ("ratio", "ours_img_s", "reference_img_s"):
                figures[f"{key}_{loop}_{figure}"] = values[figure]
    return figures


def write_report(report: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    payload = json_ready(report) | {"figures": compare_figures(report.get("throughput", {}))}
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    text = markdown(report)
    (out / "gpu_check.md").write_text(text + "\n", encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_job_threads(args.threads)  # torch threads, and the budget loading plans share
    report: dict[str, Any] = {"benchmark": "gpu_check", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "machine": machine_info(), "settings": vars(args) | {"out": str(args.out)}}
    if args.device == "cuda" and not torch.cuda.is_available():
        report["device"] = device_report(torch.device("cpu"))
        report["message"] = (f"no CUDA: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no GPU, so "
                             f"nothing was measured. Run this on a machine with an NVIDIA GPU, or pass --device cpu "
                             f"to exercise the pieces. Exit status {EXIT_NO_CUDA}.")
        print(report["message"])
        write_report(report, args.out)
        return EXIT_NO_CUDA
    device = select_device(args.device == "cuda")  # the package's choice: cudnn.benchmark on CUDA
    report["device"] = device_report(device)
    print(f"device: {json.dumps(report['device'])}", flush=True)
    sections = {"throughput": run_throughput, "recipe": run_recipe, "fashion": run_fashion}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sections:
            started = time.perf_counter()
            report[name] = sections[name](args, device, Path(tmp))
            print(f"section {name}: {time.perf_counter() - started:.0f} s", flush=True)
            write_report(report, args.out)  # after every section: a run cut short keeps what it measured
    print(write_report(report, args.out))
    print(f"written: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")
    recipe = report.get("recipe")
    return EXIT_RECIPE_FAILED if recipe is not None and not recipe["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
