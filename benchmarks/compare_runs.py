"""Do two runs of a benchmark agree? Compares the medians of the figures two --json files share.

    python benchmarks/train_throughput.py --json a.json
    python benchmarks/train_throughput.py --json b.json
    python benchmarks/compare_runs.py a.json b.json                      # every shared figure
    python benchmarks/compare_runs.py a.json b.json --figures '*ratio'   # the ratios only

For each figure present in both files (train_throughput.py, train_phases.py, index_scale.py and
gpu_check.py write the same layout: benchmarks/spread.py) it prints both medians, both min-max
spreads and the difference of the medians in % of the first run's median, and marks the figure
"agree" when that difference is within --tolerance (default 3 %).

Exit status: 0 when every compared figure agrees, 1 when one does not, 2 when the two files
share no figure (or the selection matches none).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", type=Path, help="JSON of the first run (the baseline of the difference)")
    p.add_argument("second", type=Path, help="JSON of the second run")
    p.add_argument("--tolerance", type=float, default=3.0, help="largest |difference of medians| in %% that agrees (default 3)")
    p.add_argument("--figures", nargs="+", default=["*"], metavar="PATTERN",
                   help="compare only figures whose name matches one of these shell patterns (default: all)")
    return p.parse_args(argv)


def load_figures(path: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    payload = json.loads(path.read_text(encoding="utf-8"))
    return payload.get("benchmark", "?"), payload["figures"]


def median_difference_percent(first: float, second: float) -> float:
    """(second - first) / |first| in %; 0 when both are 0, infinite when only the first is."""
    if first == 0:
        return 0.0 if second == 0 else float("inf")
    return 100.0 * (second - first) / abs(first)


def comparison_rows(first: dict[str, Any], second: dict[str, Any], patterns: list[str], tolerance: float) -> list[dict[str, Any]]:
    """One row per shared figure that matches a pattern: medians, spreads, difference, verdict."""
    rows = []
    for name in sorted(set(first) & set(second)):
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            continue
        a, b = first[name], second[name]
        difference = median_difference_percent(a["median"], b["median"])
        rows.append({
            "figure": name, "unit": a.get("unit", ""), "first": a, "second": b,
            "difference_percent": difference, "agree": abs(difference) <= tolerance,
        })
    return rows


def format_figure(figure: dict[str, Any]) -> str:
    return f"{figure['median']:.4g} [{figure['min']:.4g}, {figure['max']:.4g}] ({len(figure.get('rounds', []))})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    first_name, first = load_figures(args.first)
    second_name, second = load_figures(args.second)
    if first_name != second_name:
        print(f"note: comparing a {first_name} run with a {second_name} run")
    rows = comparison_rows(first, second, args.figures, args.tolerance)
    if not rows:
        print(f"no shared figure matches {args.figures}: nothing compared")
        return 2
    print(f"| figure | unit | {args.first.name}: median [min, max] (rounds) | {args.second.name}: median [min, max] (rounds) "
          f"| difference of medians | within {args.tolerance:g} % |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['figure']} | {row['unit']} | {format_figure(row['first'])} | {format_figure(row['second'])} | "
              f"{row['difference_percent']:+.1f} % | {'agree' if row['agree'] else 'DIFFER'} |")
    differing = [row["figure"] for row in rows if not row["agree"]]
    if differing:
        print(f"{len(differing)} of {len(rows)} figures differ by more than {args.tolerance:g} %: {', '.join(differing)}")
        return 1
    print(f"all {len(rows)} figures agree within {args.tolerance:g} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
