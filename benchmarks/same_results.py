"""Do two revisions of the workflow give bit-identical results on the digits defaults?

For each revision (a git ref, or WORKTREE for the checkout as it is) this exports the tree
into --out, runs the real workflow there with the default config, and compares the files
that people read off a run:

    results/<experiment>/summary.json        every default experiment (target all)
    results/<experiment>/index/recall.json   every default experiment
    results/softmax/ood.json                 target ood
    results/autolabel/dataset.csv            target autolabel (digits, 10 % labelled, split seed 0)

    python benchmarks/same_results.py --base HEAD~5 --head WORKTREE --out /tmp/same
    python benchmarks/same_results.py --base A --head B --out /tmp/same --autolabel-rounds 3

A revision's run is kept in --out/<name>/ and reused when it finished before, so the base
can run once while the other revision is still being written. The autolabel data (clean,
raw, truth) is built once and shared by both revisions. Exit status 0 when every file is
byte-identical, 1 otherwise. About 35-45 min per revision on 2 CPU cores (all four
experiments, the OOD run and ten autolabel rounds).
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("softmax", "bce", "focal", "augs")


def compared_files(autolabel: bool) -> list[str]:
    files = [f"results/{e}/summary.json" for e in EXPERIMENTS]
    files += [f"results/{e}/index/recall.json" for e in EXPERIMENTS]
    files.append("results/softmax/ood.json")
    if autolabel:
        files.append("results/autolabel/dataset.csv")
    return files


def export_tree(revision: str, target: Path) -> Path:
    """The revision's files in ``target`` (git archive; WORKTREE: tracked + untracked files)."""
    if (target / "Snakefile").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    if revision == "WORKTREE":
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, check=True, capture_output=True,
        ).stdout.split(b"\0")
        subprocess.run(
            ["tar", "-C", str(REPO), "--null", "-T", "-", "-cf", "-"],
            input=b"\0".join(p for p in listed if p and (REPO / p.decode()).exists()),
            check=True, stdout=open(target / ".tree.tar", "wb"),
        )
    else:
        with open(target / ".tree.tar", "wb") as out:
            subprocess.run(["git", "archive", revision], cwd=REPO, check=True, stdout=out)
    subprocess.run(["tar", "-xf", ".tree.tar"], cwd=target, check=True)
    (target / ".tree.tar").unlink()
    return target


def autolabel_data(out: Path) -> Path:
    """clean/raw/truth of the autolabel digits benchmark (split seed 0), built once."""
    data = out / "autolabel_data"
    if not (data / "truth.csv").exists():
        sys.path.insert(0, str(REPO / "benchmarks"))
        from autolabel_digits import build_split

        build_split(data, labelled_fraction=0.1, seed=0, image_size=32)
    return data


def run_revision(name: str, revision: str, out: Path, cores: int, autolabel_rounds: int | None) -> Path:
    run_dir = out / name
    done = run_dir / "finished"
    if done.exists():
        print(f"{name} ({revision}): reusing the finished run in {run_dir}", flush=True)
        return run_dir / "work"
    tree = export_tree(revision, run_dir / "tree")
    work = run_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    snakemake = [str(Path(sys.executable).parent / "snakemake"), "-s", str(tree / "Snakefile"), "-d", str(work)]
    common = ["--cores", str(cores), "--resources", "gpu=1"]
    targets = [["all", "ood"]]
    if autolabel_rounds != 0:
        data = autolabel_data(out)
        config = work / "autolabel.yaml"
        rounds = f"\n  max_rounds: {autolabel_rounds}" if autolabel_rounds else ""
        config.write_text(
            f"autolabel:\n  clean: {data / 'clean'}\n  raw: {data / 'raw'}\n  truth_csv: {data / 'truth.csv'}{rounds}\n"
        )
        targets.append(["autolabel", "--configfile", str(config)])
    started = time.perf_counter()
    # a run killed before (the machine went away) left a lock and incomplete files: resume it
    subprocess.run([*snakemake, "--unlock"], cwd=work, env=env, check=True, capture_output=True)
    common.append("--rerun-incomplete")
    for target in targets:
        print(f"{name} ({revision}): snakemake {' '.join(target)}", flush=True)
        # targets first: --resources takes several values
        subprocess.run([*snakemake, *target, *common], cwd=work, env=env, check=True)
    done.write_text(f"{revision}\n{(time.perf_counter() - started) / 60:.1f} min\n")
    return work


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git ref of the reference revision")
    parser.add_argument("--head", default="WORKTREE", help="git ref, or WORKTREE (default)")
    parser.add_argument("--out", type=Path, required=True, help="working folder (kept for reuse)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--autolabel-rounds", type=int, help="cap autolabel.max_rounds (0: skip autolabel)")
    parser.add_argument("--only", choices=["base", "head"], help="run one revision and stop")
    args = parser.parse_args(argv)
    runs = {}
    for name, revision in (("base", args.base), ("head", args.head)):
        if args.only in (None, name):
            runs[name] = run_revision(name, revision, args.out, args.cores, args.autolabel_rounds)
    if args.only:
        return 0
    same = True
    for rel in compared_files(args.autolabel_rounds != 0):
        a, b = runs["base"] / rel, runs["head"] / rel
        if not (a.exists() and b.exists()):
            print(f"MISSING    {rel} (base: {a.exists()}, head: {b.exists()})")
            same = False
            continue
        equal = filecmp.cmp(a, b, shallow=False)
        same &= equal
        print(f"{'identical' if equal else 'DIFFERENT'}  {rel}  {sha(a)} {sha(b)}")
    print("all compared files are byte-identical" if same else "some files differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
