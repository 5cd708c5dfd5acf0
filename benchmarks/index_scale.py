"""How the hnswlib KNN index scales: build time, queries/s and recall@10 against exact search.

Builds an index of synthetic 128-d vectors per size (default 10k and 100k), then answers the same
held-out queries with the index and with exact brute force in numpy, measured in the same run:

    python benchmarks/index_scale.py                       # 10k and 100k, defaults below
    python benchmarks/index_scale.py --sizes 2000 --queries 100   # a smoke test, seconds
    python benchmarks/index_scale.py --data gaussian --ef 400     # the structure-free worst case
    python benchmarks/index_scale.py --json a.json                # then compare_runs.py a.json b.json

Queries/s is measured two ways, the same for both methods:
  single: one query per call, as a search service or `labelflow query` answers them (latency-bound);
  batch:  all queries in one call (numpy: one matrix product per block of queries, BLAS; hnswlib:
          knn_query over the whole block).
Both methods use the same number of threads (--threads, default 1; numpy's BLAS is limited with
threadpoolctl), so the speed-up is per core, not a thread-count artefact.

recall@10 = mean over queries of |index top-10 ∩ exact top-10| / 10 (the usual ANN recall).

Speed-ups with their spread (benchmarks/spread.py): --rounds rounds, split across --processes
fresh processes (default 15 rounds in 3 processes of 5; see measure_in_processes), each process
after one untimed warm-up round of its own; in every round hnswlib and brute force run back to
back on the same queries (hnswlib first in even rounds, brute force first in odd ones); a
measurement repeats the query pass until it lasts at least --min-seconds. Each round gives one
speed-up (hnsw q/s / brute-force q/s); the script prints every round's speed-up and their
min / median / max over all processes, and --json OUT writes them for compare_runs.py. What
varies between two runs of the same command:
  * the machine: CPU frequency (turbo, thermal state), other processes on the cores and on the
    memory bus; this moved the 100k single-query speed-up from 12x to 24x between two runs on a
    loaded 2-core machine;
  * where the index and the vectors land in memory: so that this varies within a run, not only
    between runs, both are reloaded into new memory before every timed round (the index from a
    file it saved, the vectors copied), untimed; the batch speed-up still moved 6 % between
    runs with it (hnswlib's rate, not numpy's: something between runs, not placement);
  * the process: hnswlib's single-query rate is set per process (three processes of 5 rounds:
    medians 42.7x, 48.0x, 45.4x, the rounds within each closer than that), so a run's rounds
    come from several processes (--processes) and the process is sampled within a run;
  * the graph, only with --threads > 1: hnswlib inserts in parallel, so insertion order, graph,
    recall and speed change from run to run; with one thread and a fixed --seed the graph,
    recall and the results are the same in every run (only the timings vary);
  * the build time, measured once per size (no repeats: it is seconds to minutes).

Data (--data):
  clustered (default): --clusters Gaussian blobs in a --intrinsic-dim latent space, mapped linearly
      into --dim dimensions plus a little isotropic noise. Trained embeddings look like this: grouped
      by class and of low intrinsic dimension (a few dozen principal axes carry almost all variance).
  gaussian: i.i.d. N(0, I) vectors with no structure at all, the worst case for any graph index
      (at 100k x 128-d, recall@10 stays below 0.8 even at ef=512; exact search is the tool there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hnswlib
import numpy as np
from threadpoolctl import threadpool_limits

from spread import Comparison, Spread, load_warning, machine_info, ratio_lines, run_interleaved, write_json

SPACES = ("cosine", "l2", "ip")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="index sizes (default 10000 100000)")
    p.add_argument("--dim", type=int, default=128, help="vector dimension (default 128)")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries per size (default 1000)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query; recall@k (default 10)")
    p.add_argument("--space", choices=SPACES, default="cosine", help="distance, as config index.space (default cosine)")
    p.add_argument("--M", type=int, default=16, help="hnswlib M, graph degree (default 16)")
    p.add_argument("--ef-construction", type=int, default=200, help="hnswlib ef_construction (default 200)")
    p.add_argument("--ef", type=int, default=64, help="hnswlib ef at query time (default 64)")
    p.add_argument("--data", choices=("clustered", "gaussian"), default="clustered", help="synthetic data (default clustered)")
    p.add_argument("--clusters", type=int, default=100, help="blobs for --data clustered (default 100)")
    p.add_argument("--spread", type=float, default=0.5, help="blob std relative to the centres' std (default 0.5)")
    p.add_argument("--intrinsic-dim", type=int, default=16, help="latent dimension of --data clustered (default 16)")
    p.add_argument("--noise", type=float, default=0.05, help="isotropic noise added in all --dim dimensions (default 0.05)")
    p.add_argument("--threads", type=int, default=1, help="threads for both methods (default 1)")
    p.add_argument("--batch", type=int, default=256, help="queries per numpy matrix product in batch mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=15, help="timed interleaved rounds of query passes (default 15)")
    # 7 rounds of >= 1 s left the 100k single-query speed-up 6 % apart between two quiet runs; 15 of >= 3 s, 2 %
    p.add_argument("--min-seconds", type=float, default=3.0,
                   help="repeat a query pass until one measurement lasts this long (default 3.0)")
    p.add_argument("--processes", type=int, default=3,
                   help="fresh processes the timed rounds are split across, each loading the saved index (default 3; "
                        "1: every round in this process)")
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON (for compare_runs.py)")
    p.add_argument("--measure-in", metavar="FOLDER", help=argparse.SUPPRESS)  # a child process's inputs (run_size)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.processes < 1:
        p.error("--rounds and --processes must be at least 1")
    if min(args.sizes) <= args.k:
        p.error(f"every size must exceed --k={args.k}")
    return args


class Synthetic:
    """Vectors of one distribution; call it for as many as needed (index, then queries)."""

    def __init__(self, args: argparse.Namespace, rng: np.random.Generator):
        self.args, self.rng = args, rng
        d = min(args.intrinsic_dim, args.dim)
        self.centres = rng.standard_normal((args.clusters, d))
        self.lift = rng.standard_normal((d, args.dim)) / np.sqrt(d)  # latent → dim, a random linear map

    def __call__(self, n: int) -> np.ndarray:
        args, rng = self.args, self.rng
        if args.data == "gaussian":
            return rng.standard_normal((n, args.dim), dtype=np.float32)
        members = rng.integers(args.clusters, size=n)
        latent = self.centres[members] + args.spread * rng.standard_normal((n, self.centres.shape[1]))
        noise = args.noise * rng.standard_normal((n, args.dim))
        return (latent @ self.lift + noise).astype(np.float32)


def prepare(x: np.ndarray, space: str) -> np.ndarray:
    """Vectors for exact search: cosine = inner product of unit vectors (as hnswlib does)."""
    if space == "cosine":
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    return x


def exact_scores(queries: np.ndarray, data: np.ndarray, data_sq: np.ndarray, space: str) -> np.ndarray:
    """Higher is closer: -(squared l2 up to a per-query constant) or the inner product."""
    products = queries @ data.T
    if space == "l2":
        return 2 * products - data_sq
    return products


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


def brute_force(queries: np.ndarray, data: np.ndarray, space: str, k: int, batch: int, single: bool) -> np.ndarray:
    """Exact top-k ids: one query per call (single) or one matrix product per block of queries."""
    data_sq = np.einsum("ij,ij->i", data, data) if space == "l2" else None
    if single:
        return np.stack([top_k(exact_scores(q[None], data, data_sq, space), k)[0] for q in queries])
    return np.concatenate(
        [top_k(exact_scores(queries[i : i + batch], data, data_sq, space), k) for i in range(0, len(queries), batch)]
    )


def hnsw_query(index: hnswlib.Index, queries: np.ndarray, k: int, threads: int, single: bool) -> np.ndarray:
    """hnswlib top-k ids: one knn_query per query (single, one thread) or one for the block."""
    if single:
        return np.concatenate([index.knn_query(q[None], k=k, num_threads=1)[0] for q in queries]).astype(np.int64)
    return index.knn_query(queries, k=k, num_threads=threads)[0].astype(np.int64)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))


def query_pass(search, *search_args, count: int, **search_kwargs):
    """A timed pass for spread.run_interleaved: answer every query, return how many."""

    def run_pass() -> int:
        search(*search_args, **search_kwargs)
        return count

    return run_pass


def build_index(data: np.ndarray, args: argparse.Namespace) -> tuple[hnswlib.Index, float]:
    started = time.perf_counter()
    index = hnswlib.Index(space=args.space, dim=args.dim)
    index.init_index(max_elements=len(data), ef_construction=args.ef_construction, M=args.M, random_seed=args.seed)
    index.add_items(data, np.arange(len(data)), num_threads=args.threads)
    build_s = time.perf_counter() - started
    index.set_ef(max(args.ef, args.k))
    return index, build_s


class FreshCopies:
    """The index and the exact search's vectors, reloaded into new memory before every timed round.

    Two runs of the same command once differed by 8 % in hnswlib's batch rate while the spread
    within each run was narrower. Suspecting where the graph lands in memory, both sides are
    reloaded every round, so one run samples many placements. Measured since (README, Index at
    scale): it did not close the gap (batch medians still 6 % apart, hnswlib slower in the
    second run of each pair while brute force agreed), so placement within a process is not
    the cause; the reload stays so that it is ruled out in every run."""

    def __init__(self, index: hnswlib.Index | None, data: np.ndarray, args: argparse.Namespace, folder: Path):
        self.path, self.args = folder / "index.bin", args
        if index is not None:  # else the index is already saved there (a child process's copy)
            index.save_index(str(self.path))
        self.index, self.data, self.size = index, data, len(data)

    def reload(self, round_: int = 0) -> None:
        index = hnswlib.Index(space=self.args.space, dim=self.args.dim)
        index.load_index(str(self.path), max_elements=self.size)
        index.set_ef(max(self.args.ef, self.args.k))
        self.index, self.data = index, self.data.copy()


class Searches:
    """Both methods over the same queries, on ``fresh``'s current copies."""

    def __init__(self, fresh: FreshCopies, queries: np.ndarray, args: argparse.Namespace):
        self.fresh, self.queries, self.args = fresh, queries, args
        self.exact_queries = prepare(queries, args.space)

    def exact(self, single: bool) -> np.ndarray:
        return brute_force(self.exact_queries, self.fresh.data, self.args.space, self.args.k, self.args.batch, single)

    def search(self, single: bool) -> np.ndarray:
        return hnsw_query(self.fresh.index, self.queries, self.args.k, self.args.threads, single)

    def comparisons(self) -> list[Comparison]:
        q = len(self.queries)
        return [
            Comparison(mode, query_pass(self.search, count=q, single=mode == "single"),
                       query_pass(self.exact, count=q, single=mode == "single"), ours_label="hnsw",
                       reference_label="brute force")
            for mode in ("single", "batch")
        ]


def rounds_per_process(rounds: int, processes: int) -> list[int]:
    """``rounds`` split as evenly as possible over at most ``processes`` processes."""
    return [r for r in (rounds // processes + (i < rounds % processes) for i in range(processes)) if r]


def measure_in_processes(searches: Searches, folder: Path, args: argparse.Namespace) -> list[Comparison]:
    """The timed rounds, split across fresh processes (``--processes``). Two runs of the same
    command differed by 4-9 % in hnswlib's single-query rate while the rounds within each run
    agreed more closely; three processes of 5 rounds each then gave medians of 42.7x, 48.0x
    and 45.4x, every round of the second above the first's median: the rate is set
    per process (not by where the index lands in memory: FreshCopies rules that out). So a
    run samples several processes, and its median is the median of all their rounds. Each
    process runs its own warm-up round and alternates from ours-first; it loads the saved
    index and the vectors from ``folder`` and writes its rates there as JSON."""
    comparisons = searches.comparisons()
    if args.processes == 1:
        run_interleaved(comparisons, args.rounds, min_seconds=args.min_seconds, before_round=searches.fresh.reload)
        return comparisons
    np.save(folder / "data.npy", searches.fresh.data)
    np.save(folder / "queries.npy", searches.queries)
    plan = rounds_per_process(args.rounds, args.processes)
    for number, rounds in enumerate(plan):
        print(f"  process {number + 1}/{len(plan)}: {rounds} rounds", flush=True)
        settings = {**vars(args), "rounds": rounds, "json": None, "measure_in": None}
        (folder / "settings.json").write_text(json.dumps(settings))
        (folder / "rates.json").unlink(missing_ok=True)  # never read a previous process's rates
        subprocess.run([sys.executable, __file__, "--measure-in", str(folder)], check=True)
        rates = json.loads((folder / "rates.json").read_text())
        for comparison in comparisons:
            comparison.ours_rates += rates[comparison.name]["ours"]
            comparison.reference_rates += rates[comparison.name]["reference"]
            comparison.ours_repeats, comparison.reference_repeats = rates[comparison.name]["repeats"]  # the last process's
    return comparisons


def measure_child(folder: Path) -> int:
    """A child process of measure_in_processes: the rounds its settings ask for."""
    args = argparse.Namespace(**json.loads((folder / "settings.json").read_text()))
    data = np.load(folder / "data.npy")
    fresh = FreshCopies(None, data, args, folder)
    fresh.reload()
    searches = Searches(fresh, np.load(folder / "queries.npy"), args)
    comparisons = searches.comparisons()
    with threadpool_limits(limits=args.threads):
        run_interleaved(comparisons, args.rounds, min_seconds=args.min_seconds, before_round=fresh.reload)
    rates = {c.name: {"ours": c.ours_rates, "reference": c.reference_rates, "repeats": [c.ours_repeats, c.reference_repeats]}
             for c in comparisons}
    (folder / "rates.json").write_text(json.dumps(rates))
    return 0


def run_size(n: int, args: argparse.Namespace) -> dict:
    """Build, check recall once, then time both methods in interleaved rounds (single, batch)."""
    rng = np.random.default_rng([args.seed, n])
    synthetic = Synthetic(args, rng)
    data = synthetic(n)
    queries = synthetic(args.queries)  # same distribution, not in the index
    index, build_s = build_index(data, args)
    with tempfile.TemporaryDirectory() as folder:
        fresh = FreshCopies(index, prepare(data, args.space), args, Path(folder))
        del index  # fresh holds it until the first reload
        searches = Searches(fresh, queries, args)
        exact, search = searches.exact, searches.search
        truth = exact(single=False)
        comparisons = measure_in_processes(searches, Path(folder), args)
        return {
            "n": n,
            "build_s": build_s,
            "comparisons": {c.name: c for c in comparisons},
            "recall": recall(search(single=True), truth),
            "recall_batch": recall(search(single=False), truth),
            # the two exact searches agree (up to ties), a check on the reference itself
            "exact_agreement": recall(exact(single=True), truth),
        }


def size_figures(row: dict) -> dict:
    """The JSON figures of one size (spread.write_json's layout)."""
    n, figures = row["n"], {}
    for mode, comparison in row["comparisons"].items():
        figures[f"n{n}_{mode}_speedup"] = comparison.ratios.as_dict("hnsw/brute force")
        figures[f"n{n}_{mode}_hnsw_qps"] = Spread(tuple(comparison.ours_rates)).as_dict("queries/s")
        figures[f"n{n}_{mode}_brute_qps"] = Spread(tuple(comparison.reference_rates)).as_dict("queries/s")
    for name, unit in (("build_s", "s"), ("recall", "recall@k"), ("exact_agreement", "recall@k")):
        value = row[name]
        figures[f"n{n}_{name}"] = {"unit": unit, "rounds": [value], "min": value, "median": value, "max": value}
    return figures


def print_table(rows: list[dict], k: int) -> None:
    header = (
        f"| vectors | build s | hnsw q/s (single) | numpy q/s (single) | speed-up: median [min, max] | "
        f"hnsw q/s (batch) | numpy q/s (batch) | speed-up: median [min, max] | recall@{k} |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        cells = []
        for mode in ("single", "batch"):
            c = r["comparisons"][mode]
            ratio = c.ratios
            cells.append(
                f"{Spread(tuple(c.ours_rates)).median:,.0f} | {Spread(tuple(c.reference_rates)).median:,.0f} | "
                f"{ratio.median:.1f}x [{ratio.min:.1f}, {ratio.max:.1f}]"
            )
        print(f"| {r['n']:,} | {r['build_s']:.1f} | {cells[0]} | {cells[1]} | {r['recall']:.4f} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure_in:
        return measure_child(Path(args.measure_in))
    machine = machine_info()
    print(
        f"data {args.data}"
        + (
            f" ({args.clusters} clusters in {args.intrinsic_dim}-d, spread {args.spread}, noise {args.noise})"
            if args.data == "clustered"
            else ""
        )
        + f" | dim {args.dim} | space {args.space} | M {args.M} | ef_construction {args.ef_construction}"
        f" | ef {args.ef} | k {args.k} | {args.queries} queries | threads {args.threads}"
        f" | {args.rounds} interleaved rounds in {len(rounds_per_process(args.rounds, args.processes))} process(es),"
        f" >= {args.min_seconds:g} s per measurement",
        flush=True,
    )
    if warning := load_warning(machine):
        print(warning)
    rows = []
    with threadpool_limits(limits=args.threads):
        for n in args.sizes:
            print(f"n={n}:", flush=True)
            row = run_size(n, args)
            rows.append(row)
            print(f"n={n}: build {row['build_s']:.2f} s ({n / row['build_s']:.0f} vectors/s), "
                  f"recall@{args.k}={row['recall']:.4f} (batch {row['recall_batch']:.4f})")
            for comparison in row["comparisons"].values():
                for line in ratio_lines(comparison, unit="q/s", ratio_name="speed-up"):
                    print(f"n={n} {line}", flush=True)
    print()
    print_table(rows, args.k)
    if args.json:
        figures = {name: value for row in rows for name, value in size_figures(row).items()}
        write_json(args.json, "index_scale", vars(args), figures, machine)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
