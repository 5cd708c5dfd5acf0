"""Round 0 of a finished autolabel_fashion.py seed folder, re-decided under other acceptance
policies, each judged against the peers at its own coverage (no retraining).

Round 0's model, calibration and neighbour guard do not depend on the policy: only which of its
predictions are accepted does. So from round_0/predictions.csv (every candidate's predicted
class, calibrated confidence and guard verdict, as the workflow wrote them) this script re-runs
labelflow's own selection (labelflow.autolabel.policy.select_pseudo_labels) with other class
caps and thresholds, and compares each accepted set's precision with the four peers of
autolabel_fashion.py (refitted here on the same split) at the same number of images. It also
prints the model's own ranking (its N most confident predictions, no cap, no guard): how well
the round-0 model orders the pile, whatever policy cuts it. Later rounds depend on what round 0
accepted, so they need a full run (autolabel_fashion.py --max-new-per-class ...).

    python benchmarks/autolabel_fashion.py --seeds 103 --max-rounds 1 --out DIR   # round 0 only
    python benchmarks/autolabel_policies.py DIR/clean100_raw9000/seed_103
    python benchmarks/autolabel_policies.py SEED_DIR --caps 1 2 3 5 none --min-confidence 0.9 0.95
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

import autolabel_fashion as af

COVERAGES = (0.03, 0.05, 0.085, 0.10, 0.15, 0.22, 0.30, 0.40, 0.50, 0.60, 0.70)


def simulate(candidates: pd.DataFrame, truth: dict[str, str], human_counts: dict[str, int], settings: dict,
             peers: dict[str, tuple[np.ndarray, np.ndarray]], peer_truth: np.ndarray) -> dict:
    """One policy on round 0's candidates: accepted count, precision (of the pseudo-labels), each
    peer's precision at that count, and the margin over the best peer (None when nothing is accepted)."""
    from labelflow.autolabel.policy import ACCEPTED, RoundSettings, select_pseudo_labels

    decided = select_pseudo_labels(candidates, human_counts, RoundSettings(**settings))
    accepted = decided[decided["decision"] == ACCEPTED]
    n = len(accepted)
    precision = float(np.mean([truth[p] == t for p, t in zip(accepted["path"], accepted["tag"])])) if n else None
    at_n = {peer: af.precision_at(predicted, confidence, peer_truth, n) for peer, (predicted, confidence) in peers.items()}
    best = max((v for v in at_n.values() if v is not None), default=None)
    margin = None if precision is None or best is None else precision - best
    return {"accepted": n, "precision": precision, "peers": at_n, "margin": margin}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("seed_dir", type=Path, help="an autolabel_fashion.py seed folder (…/clean100_raw9000/seed_<s>)")
    parser.add_argument("--caps", nargs="+", type=af.class_cap, default=[1.0, 2.0, 3.0, 5.0, None],
                        help="autolabel.max_new_per_class values to try (none: no cap)")
    parser.add_argument("--min-confidence", nargs="+", type=float, default=[0.9], help="autolabel.min_confidence values")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    seed_dir = args.seed_dir
    seed = int(seed_dir.name.split("_")[1])
    data, work = seed_dir / "data", seed_dir / "work"
    round_0 = work / "results/autolabel/round_0"
    if not (round_0 / "predictions.csv").is_file():
        raise SystemExit(f"{round_0 / 'predictions.csv'} is missing: run benchmarks/autolabel_fashion.py for this seed first")
    name = yaml.safe_load((seed_dir / "autolabel.yaml").read_text())["autolabel"]["experiment"]
    peer_args = argparse.Namespace(cores=args.cores)
    peers, peer_truth, classes = af.run_peers(data, work, data / "clean", data / "raw", data / "truth.csv",
                                              seed_dir / "experiments", name, peer_args, seed)
    truth_table = pd.read_csv(data / "truth.csv")
    truth = dict(zip("raw/" + truth_table["path"], truth_table["label"]))
    candidates = pd.read_csv(round_0 / "predictions.csv", dtype={"path": str, "tag": str})
    candidates = candidates[[c for c in ("path", "tag", "confidence", "neighbours_agree") if c in candidates]]
    counts = pd.read_csv(round_0 / "counts.csv", dtype={"tag": str})
    human_counts = dict(zip(counts["tag"], counts["human"].astype(int)))  # what the round's cap multiplies
    round_metrics = json.loads((round_0 / "metrics.json").read_text())
    base = {"neighbours": round_metrics["neighbours"], "reference_per_class": 500}  # the guard's verdicts are as run

    predicted = np.array([classes.index(t) for t in candidates["tag"]])
    confidence = candidates["confidence"].to_numpy()
    candidate_truth = np.array([classes.index(truth[p]) for p in candidates["path"]])
    n_raw = len(peer_truth)
    print(f"seed {seed}, round 0: {len(candidates):,} candidates of {n_raw:,} raw images; precision in % at each coverage")
    print(f"{'ranking':<28}" + "".join(f"{100 * c:>8.1f}" for c in COVERAGES))
    rows = {"round-0 model (its top N)": (predicted, confidence, candidate_truth)}
    rows.update({peer: (p, c, peer_truth) for peer, (p, c) in peers.items()})
    rankings = {}
    for label, (p, c, t) in rows.items():
        rankings[label] = [af.precision_at(p, c, t, int(round(f * n_raw))) for f in COVERAGES]
        print(f"{label:<28}" + "".join(f"{af.pct(v):>8}" for v in rankings[label]))

    print(f"\n{'policy':<34} {'accepted':>8} {'coverage':>8} {'workflow':>8} {'best peer':>9} {'margin':>7}")
    policies = []
    for min_confidence in args.min_confidence:
        for cap in args.caps:
            settings = {**base, "min_confidence": min_confidence, "max_new_per_class": cap}
            result = simulate(candidates, truth, human_counts, settings, peers, peer_truth)
            best = max((v for v in result["peers"].values() if v is not None), default=None)
            label = f"min_confidence {min_confidence}, cap {cap}"
            print(f"{label:<34} {result['accepted']:>8} {af.pct(result['accepted'] / n_raw):>8} "
                  f"{af.pct(result['precision']):>8} {af.pct(best):>9} {af.pct(result['margin']):>7}")
            policies.append({"min_confidence": min_confidence, "max_new_per_class": cap, **result})
    if args.json:
        args.json.write_text(json.dumps({"seed": seed, "coverages": COVERAGES, "rankings": rankings, "policies": policies}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
