"""How the throughput benchmarks measure: interleaved rounds, per-round ratios, their spread.

On a shared machine one timing is noise: another job, a frequency change or the scheduler
can slow one pass by 2x. So every benchmark here

* times ours and the reference in the same round, back to back, and alternates which goes
  first (even rounds: ours first, odd rounds: the reference first), so a slow spell hits
  both, and neither always runs on a warm (or cold) cache after the other;
* repeats a pass until one measurement lasts at least ``min_seconds`` (calibrated once, in
  the warm-up round), so a scheduler hiccup of a few milliseconds is a small share of it;
* computes one ratio per round (ours / reference, from that round's two measurements) and
  prints every round's ratio and their min / median / max. The median is the figure; the
  min-max range is its spread. A target is met only when the median clears it.

``write_json`` writes the figures in one layout that ``compare_runs.py`` reads:
``{"benchmark", "created", "machine", "settings", "figures": {name: {"unit", "rounds",
"min", "median", "max"}}}``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A pass runs the loop once and returns how many items (images, queries) it processed.
Pass = Callable[[], int]


@dataclass(frozen=True)
class Spread:
    """Per-round values of one figure and their min / median / max."""

    rounds: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.rounds)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def max(self) -> float:
        return max(self.rounds)

    def as_dict(self, unit: str) -> dict[str, Any]:
        return {"unit": unit, "rounds": list(self.rounds), "min": self.min, "median": self.median, "max": self.max}

    def summary(self, digits: int = 3) -> str:
        """'median 0.973 (min 0.951, max 0.990, 7 rounds)'."""
        return (
            f"median {self.median:.{digits}f} (min {self.min:.{digits}f}, max {self.max:.{digits}f}, "
            f"{len(self.rounds)} rounds)"
        )


@dataclass
class Comparison:
    """One ours-vs-reference pair: what each pass does, and the rates measured per round."""

    name: str
    ours: Pass
    reference: Pass
    ours_repeats: int = 1  # passes per measurement, set in the warm-up round
    reference_repeats: int = 1
    ours_label: str = "ours"
    reference_label: str = "reference"
    ours_rates: list[float] = field(default_factory=list)  # items/s, one per timed round
    reference_rates: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> Spread:
        return Spread(tuple(o / r for o, r in zip(self.ours_rates, self.reference_rates)))

    def figures(self, unit: str = "img/s") -> dict[str, dict[str, Any]]:
        """``<name>_ratio``, ``<name>_ours``, ``<name>_reference`` for write_json."""
        return {
            f"{self.name}_ratio": self.ratios.as_dict("ours/reference"),
            f"{self.name}_ours": Spread(tuple(self.ours_rates)).as_dict(unit),
            f"{self.name}_reference": Spread(tuple(self.reference_rates)).as_dict(unit),
        }


def timed_rate(run_pass: Pass, repeats: int, sync: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """(items/s, seconds) of ``repeats`` back-to-back passes; ``sync`` waits for queued device
    work (torch.cuda.synchronize) so that the clock stops when the work is done, not queued."""
    sync()
    started = time.perf_counter()
    items = sum(run_pass() for _ in range(repeats))
    sync()
    seconds = time.perf_counter() - started
    return items / seconds, seconds


def run_interleaved(
    comparisons: Sequence[Comparison],
    rounds: int,
    *,
    min_seconds: float = 0.0,
    sync: Callable[[], None] = lambda: None,
    progress: Callable[[str], None] | None = print,
    before_round: Callable[[int], None] = lambda round_: None,
) -> None:
    """One untimed warm-up round (caches, allocators, cudnn autotuning; it also sets each
    side's repeat count so one measurement lasts >= ``min_seconds``: a side 40x faster than
    the other gets 40x the passes, not a 40x shorter measurement), then ``rounds`` timed
    rounds. In round r every comparison runs ours and the reference back to back, ours first
    when r is even. Fills ``ours_rates`` and ``reference_rates``. ``before_round(r)`` runs,
    untimed, before every timed round (e.g. to reload a structure, so that where it lands in
    memory varies from round to round and not only from process to process)."""
    for comparison in comparisons:
        _, ours_s = timed_rate(comparison.ours, 1, sync)
        _, reference_s = timed_rate(comparison.reference, 1, sync)
        comparison.ours_repeats = max(1, math.ceil(min_seconds / max(1e-9, ours_s)))
        comparison.reference_repeats = max(1, math.ceil(min_seconds / max(1e-9, reference_s)))
    for round_ in range(rounds):
        before_round(round_)
        for comparison in comparisons:
            sides = [("ours", comparison.ours, comparison.ours_repeats),
                     ("reference", comparison.reference, comparison.reference_repeats)]
            for side, run_pass, repeats in sides if round_ % 2 == 0 else sides[::-1]:
                rate, _ = timed_rate(run_pass, repeats, sync)
                (comparison.ours_rates if side == "ours" else comparison.reference_rates).append(rate)
            if progress is not None:
                progress(
                    f"  round {round_ + 1}/{rounds} {comparison.name}: {comparison.ours_label} "
                    f"{comparison.ours_rates[-1]:.1f}/s, {comparison.reference_label} {comparison.reference_rates[-1]:.1f}/s, "
                    f"ratio {comparison.ratios.rounds[-1]:.3f}"
                    f"{'' if round_ % 2 == 0 else f' ({comparison.reference_label} first)'}"
                )


def ratio_lines(comparison: Comparison, unit: str = "img/s", ratio_name: str = "ratio") -> list[str]:
    """The printed figures of one comparison: rates, every round's ratio and the spread."""
    ours, reference = Spread(tuple(comparison.ours_rates)), Spread(tuple(comparison.reference_rates))
    ratios = comparison.ratios
    mine, theirs = comparison.ours_label, comparison.reference_label
    return [
        f"{comparison.name}: {mine} {ours.median:.1f} {unit} (min {ours.min:.1f}, max {ours.max:.1f}), "
        f"{theirs} {reference.median:.1f} {unit} (min {reference.min:.1f}, max {reference.max:.1f}); "
        f"passes per measurement: {mine} {comparison.ours_repeats}, {theirs} {comparison.reference_repeats}",
        f"{comparison.name} {ratio_name} per round: " + " ".join(f"{r:.3f}" for r in ratios.rounds),
        f"{comparison.name} {ratio_name}: {ratios.summary()}",
    ]


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge whether two runs are comparable."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        # the 1-minute load average at the start: above the core count means the figures are suspect
        info["load_average_1min"] = os.getloadavg()[0]
    return info


def write_json(
    path: str | Path,
    benchmark: str,
    settings: dict[str, Any],
    figures: dict[str, Any],
    machine: dict[str, Any] | None = None,
) -> None:
    """The run's figures in the layout compare_runs.py reads. ``machine`` is machine_info()
    taken at the start (its load average is the one that says whether the run was quiet);
    the load average at the end is added."""
    machine = dict(machine or machine_info())
    if hasattr(os, "getloadavg"):
        machine["load_average_1min_end"] = os.getloadavg()[0]
    payload = {
        "benchmark": benchmark,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": settings,
        "figures": figures,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def load_warning(machine: dict[str, Any]) -> str | None:
    """A warning line when the machine was not quiet at the start: a 1-minute load average
    above half the usable cores means other work shares the CPUs the benchmark times."""
    load, cores = machine.get("load_average_1min"), machine.get("cpus_usable") or 1
    if load is None or load <= cores / 2:
        return None
    return (
        f"WARNING: 1-minute load average {load:.1f} on {cores} usable cores at the start: other work "
        "shares the CPUs, so these figures are not evidence (README, 'Measured figures': a quiet machine)"
    )
