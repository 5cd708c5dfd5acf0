"""How the hnswlib KNN index scales: build time, queries/s and recall@10 against exact search.

Builds an index of synthetic 128-d vectors per size (default 10k and 100k), then answers the same
held-out queries with the index and with exact brute force in numpy, measured in the same run:

    python benchmarks/index_scale.py                       # 10k and 100k, defaults below
    python benchmarks/index_scale.py --sizes 2000 --queries 100   # a smoke test, seconds
    python benchmarks/index_scale.py --data gaussian --ef 400     # the structure-free worst case

Queries/s is measured two ways, the same for both methods:
  single: one query per call, as a search service or `labelflow query` answers them (latency-bound);
  batch:  all queries in one call (numpy: one matrix product per block of queries, BLAS; hnswlib:
          knn_query over the whole block).
Both methods use the same number of threads (--threads, default 1; numpy's BLAS is limited with
threadpoolctl), so the speed-up is per core, not a thread-count artefact.

recall@10 = mean over queries of |index top-10 ∩ exact top-10| / 10 (the usual ANN recall).

Data (--data):
  clustered (default): --clusters Gaussian blobs in a --intrinsic-dim latent space, mapped linearly
      into --dim dimensions plus a little isotropic noise. Trained embeddings look like this: grouped
      by class and of low intrinsic dimension (a few dozen principal axes carry almost all variance).
  gaussian: i.i.d. N(0, I) vectors with no structure at all, the worst case for any graph index
      (at 100k x 128-d, recall@10 stays below 0.8 even at ef=512; exact search is the tool there).
"""

from __future__ import annotations

import argparse
import sys
import time

import hnswlib
import numpy as np
from threadpoolctl import threadpool_limits

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
    args = p.parse_args(argv)
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


def brute_force(queries, data, space, k, batch, single):
    data_sq = np.einsum("ij,ij->i", data, data) if space == "l2" else None
    started = time.perf_counter()
    if single:
        ids = np.stack([top_k(exact_scores(q[None], data, data_sq, space), k)[0] for q in queries])
    else:
        ids = np.concatenate(
            [top_k(exact_scores(queries[i : i + batch], data, data_sq, space), k) for i in range(0, len(queries), batch)]
        )
    return ids, time.perf_counter() - started


def hnsw_query(index, queries, k, threads, single):
    started = time.perf_counter()
    if single:
        ids = np.concatenate([index.knn_query(q[None], k=k, num_threads=1)[0] for q in queries])
    else:
        ids = index.knn_query(queries, k=k, num_threads=threads)[0]
    return ids.astype(np.int64), time.perf_counter() - started


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))


def run_size(n: int, args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng([args.seed, n])
    synthetic = Synthetic(args, rng)
    data = synthetic(n)
    queries = synthetic(args.queries)  # same distribution, not in the index

    started = time.perf_counter()
    index = hnswlib.Index(space=args.space, dim=args.dim)
    index.init_index(max_elements=n, ef_construction=args.ef_construction, M=args.M, random_seed=args.seed)
    index.add_items(data, np.arange(n), num_threads=args.threads)
    build_s = time.perf_counter() - started
    index.set_ef(max(args.ef, args.k))

    exact_data, exact_queries = prepare(data, args.space), prepare(queries, args.space)
    truth, brute_batch_s = brute_force(exact_queries, exact_data, args.space, args.k, args.batch, single=False)
    single_truth, brute_single_s = brute_force(exact_queries, exact_data, args.space, args.k, args.batch, single=True)
    found_single, hnsw_single_s = hnsw_query(index, queries, args.k, args.threads, single=True)
    found_batch, hnsw_batch_s = hnsw_query(index, queries, args.k, args.threads, single=False)
    q = len(queries)
    return {
        "n": n,
        "build_s": build_s,
        "hnsw_qps_single": q / hnsw_single_s,
        "brute_qps_single": q / brute_single_s,
        "hnsw_qps_batch": q / hnsw_batch_s,
        "brute_qps_batch": q / brute_batch_s,
        "recall": recall(found_single, truth),
        "recall_batch": recall(found_batch, truth),
        # the two exact searches agree (up to ties), a check on the reference itself
        "exact_agreement": recall(single_truth, truth),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"data {args.data}"
        + (
            f" ({args.clusters} clusters in {args.intrinsic_dim}-d, spread {args.spread}, noise {args.noise})"
            if args.data == "clustered"
            else ""
        )
        + f" | dim {args.dim} | space {args.space} | M {args.M} | ef_construction {args.ef_construction}"
        f" | ef {args.ef} | k {args.k} | {args.queries} queries | threads {args.threads}",
        flush=True,
    )
    rows = []
    with threadpool_limits(limits=args.threads):
        for n in args.sizes:
            row = run_size(n, args)
            rows.append(row)
            print(
                f"n={n}: build {row['build_s']:.2f} s ({n / row['build_s']:.0f} vectors/s) | "
                f"single: hnsw {row['hnsw_qps_single']:.0f} q/s, brute force {row['brute_qps_single']:.0f} q/s, "
                f"speed-up {row['hnsw_qps_single'] / row['brute_qps_single']:.1f}x | "
                f"batch: hnsw {row['hnsw_qps_batch']:.0f} q/s, brute force {row['brute_qps_batch']:.0f} q/s, "
                f"speed-up {row['hnsw_qps_batch'] / row['brute_qps_batch']:.1f}x | "
                f"recall@{args.k}={row['recall']:.4f}",
                flush=True,
            )
    print()
    header = (
        f"| vectors | build s | hnsw q/s (single) | numpy q/s (single) | speed-up | "
        f"hnsw q/s (batch) | numpy q/s (batch) | speed-up | recall@{args.k} |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(
            f"| {r['n']:,} | {r['build_s']:.1f} | {r['hnsw_qps_single']:,.0f} | {r['brute_qps_single']:,.0f} | "
            f"{r['hnsw_qps_single'] / r['brute_qps_single']:.1f}x | {r['hnsw_qps_batch']:,.0f} | "
            f"{r['brute_qps_batch']:,.0f} | {r['hnsw_qps_batch'] / r['brute_qps_batch']:.1f}x | {r['recall']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
