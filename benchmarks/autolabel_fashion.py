"""Autolabel on Fashion-MNIST beside scikit-learn's semi-supervised peers, at equal coverage.

Per split seed, builds in --out/clean<per-class>_raw<raw>/seed_<s>/ (from the 60,000
Fashion-MNIST training images, written by labelflow.fashion.write_fashion_dataset as a seeded,
class-stratified subset):

    data/clean/<class>/<NNNNN>.png   --per-class labelled images per class (default 100: 1,000)
    data/raw/<k>/<NNNNN>.png         --raw more images (default 9,000), in folders 0..6 that say
                                     nothing about the class (NNNNN: index in the source arrays)
    data/truth.csv                   path,label of the raw images, relative to raw/ (evaluation only)
    work/                            the snakemake working directory

runs `snakemake autolabel` with the default autolabel settings (config/config.yaml's
autolabel.*: min_confidence 0.9, max_rounds 10, neighbour guard 10, ...) and the `fashion`
recipe (config/experiments/fashion.yaml, 1 + 14 epochs; --experiment, --epochs for others),
and prints precision and coverage of the raw pile after every round (results/autolabel/
evaluation.json; cumulative).

In the same run and on the same split, four peers label the same raw pile:

    LabelSpreading (kNN kernel, 7 neighbours) and SelfTrainingClassifier (LogisticRegression,
    threshold 0.75), each on
    pixels       the 28x28 grayscale pixels, standardised, PCA to 50 dimensions (fitted on
                 clean + raw, as a transductive method may), and on
    embeddings   the round-0 model's embeddings (results/autolabel/round_0/<last stage>/best.pt,
                 trained by the workflow on the clean images only; labelflow.embeddings.embed_paths,
                 L2-normalised for LabelSpreading, standardised for the logistic regression).

Equal coverage: after round r the workflow has labelled N_r raw images (pseudo-labels and
raw copies of clean images). Each peer ranks its raw predictions by its own confidence
(LabelSpreading: the largest entry of its label distribution; self-training: the final
classifier's largest predict_proba) and its precision at round r is that of its top N_r.
The workflow's precision at that coverage is over the same N_r images (evaluation.json's
precision_all; `precision` there counts pseudo-labels only). Goal: at every coverage the
workflow reaches, its precision is above (strictly) every peer's; a tie is not above.

For reference (not the goal), a second table compares at the workflow's class mix: after
round r the workflow has labelled n_c raw images with class c (results/autolabel/dataset.csv);
each peer's precision there is that of its n_c most confident predictions of each class c
(all of them where it predicted fewer). The workflow holds classes level on purpose
(autolabel.max_new_per_class), so at plain equal coverage a peer may fill its N_r from the
easy classes alone; this table shows how much of the gap that choice explains.

    python benchmarks/autolabel_fashion.py                     # seeds 100..102 (~60 min each on 2 quiet cores; 59.1 min measured for seed 100)
    python benchmarks/autolabel_fashion.py --seeds 100         # one split
    python benchmarks/autolabel_fashion.py --epochs 4          # a shorter recipe: stage2 trains 4 epochs
    python benchmarks/autolabel_fashion.py --out /tmp/alf --json alf.json   # keep results (a rerun reuses them)
    python benchmarks/autolabel_fashion.py --quick             # 10 per class, 200 raw, 2 short rounds: smoke test
    python benchmarks/autolabel_fashion.py --seeds 103 --max-new-per-class none   # a policy variant (own folders)

With several seeds the summary gives the mean, min and max over seeds of the final precision
and coverage, of every peer's precision at the workflow's final coverage, and of the smallest
margin (workflow minus best peer, over the rounds; also at the class mix), then the verdict
at the class mix (for reference) and the goal's verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
RAW_FOLDERS = 7  # raw/<source index % 7>/: nesting that carries no label
PCA_COMPONENTS = 50
QUICK_MIN_STEPS = 40
DEFAULT = object()  # an option left at the config's value
PEERS = ("LabelSpreading pixels", "SelfTraining pixels", "LabelSpreading embeddings", "SelfTraining embeddings")
PEER_COLUMNS = dict(zip(PEERS, ("LS pix", "ST pix", "LS emb", "ST emb"), strict=True))


# --------------------------------------------------------------------------- data


def build_split(data: Path, per_class: int, n_raw: int, seed: int) -> tuple[Path, Path, Path]:
    """clean/, raw/ and truth.csv from a seeded subset of the training split (built once)."""
    from sklearn.model_selection import train_test_split

    from labelflow.fashion import CLASS_FOLDERS, write_fashion_dataset

    clean, raw, truth_csv = data / "clean", data / "raw", data / "truth.csv"
    if truth_csv.exists():
        return clean, raw, truth_csv
    if data.exists():
        shutil.rmtree(data)  # an interrupted build
    n_clean = per_class * len(CLASS_FOLDERS)
    source = data / "source"
    write_fashion_dataset(source, limit=n_clean + n_raw, seed=seed)
    files = sorted((source / "train").glob("*/*.png"))
    labels = [f.parent.name for f in files]
    clean_files, raw_files = train_test_split(files, train_size=n_clean, stratify=labels, random_state=seed)
    for f in clean_files:
        (clean / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.replace(f, clean / f.parent.name / f.name)
    truth = []
    for f in sorted(raw_files, key=lambda p: p.name):
        rel = Path(str(int(f.stem) % RAW_FOLDERS)) / f.name
        (raw / rel.parent).mkdir(parents=True, exist_ok=True)
        os.replace(f, raw / rel)
        truth.append((rel.as_posix(), f.parent.name))
    shutil.rmtree(source)
    pd.DataFrame(truth, columns=["path", "label"]).to_csv(truth_csv, index=False)
    print(f"fashion split seed {seed}: {len(clean_files)} labelled (clean), {len(raw_files)} raw", flush=True)
    return clean, raw, truth_csv


def recipe_file(out: Path, args: argparse.Namespace) -> tuple[str, Path]:
    """The experiment that trains every round, copied into out/experiments: with --epochs the
    last stage trains that many epochs; --quick trains every stage in batches of 16, one epoch
    each, and the last stage at least QUICK_MIN_STEPS steps (about 8 epochs of 80 images), so
    that round 0 is confident enough to label something."""
    given = Path(args.experiment)
    name, path = (given.stem, given) if given.suffix in (".yaml", ".yml") else (
        args.experiment, REPO / "config/experiments" / f"{args.experiment}.yaml")
    recipe = yaml.safe_load(path.read_text())
    stages = list(recipe["stages"].values())
    if args.epochs is not None:
        stages[-1]["epochs"] = args.epochs
        stages[-1].pop("min_steps", None)
    if args.quick:
        for stage in stages:
            stage.update(epochs=1, batch_size=16)
        stages[-1]["min_steps"] = QUICK_MIN_STEPS
    folder = out / "experiments"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return name, folder


# --------------------------------------------------------------------------- workflow


def autolabel_section(clean: Path, raw: Path, truth: Path, name: str, args: argparse.Namespace) -> dict:
    """Config section ``autolabel`` of the run: the split, the recipe, and the settings given on
    the command line (the config's defaults for the rest)."""
    autolabel = {"clean": str(clean), "raw": str(raw), "truth_csv": str(truth), "experiment": name}
    if args.max_rounds:
        autolabel["max_rounds"] = args.max_rounds
    if args.max_new_per_class is not DEFAULT:
        autolabel["max_new_per_class"] = args.max_new_per_class
    return autolabel


def class_cap(text: str) -> float | None:
    """--max-new-per-class: a number >= 0, or `none` (no class cap)."""
    if text.lower() in ("none", "null"):
        return None
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or none, got {text}")
    return value


def seed_folder(split: Path, seed: int, args: argparse.Namespace) -> Path:
    """A split seed's folder; a policy other than the default gets its own (a rerun never mixes them)."""
    suffix = "" if args.max_new_per_class is DEFAULT else f"_cap{args.max_new_per_class}".lower()
    return split / f"seed_{seed}{suffix}"


def run_autolabel(out: Path, clean: Path, raw: Path, truth: Path, recipe: tuple[str, Path],
                  args: argparse.Namespace) -> float:
    name, experiments = recipe
    autolabel = autolabel_section(clean, raw, truth, name, args)
    config = out / "autolabel.yaml"
    config.write_text(yaml.safe_dump({
        "experiments": [name], "experiments_dir": str(experiments), "autolabel": autolabel,
        "gpu": args.gpu, "threads": args.cores,
    }, sort_keys=False))
    log = out / "snakemake.log"
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(out / "work"), "autolabel",
           "--cores", str(args.cores), "--resources", "gpu=1", "--configfile", str(config)]
    print(f"running: {' '.join(cmd)}\n  (log: {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed (exit {result.returncode}); see {log} and "
                         f"{out}/work/results/logs/autolabel:\n{log.read_text(errors='replace')[-3000:]}")
    return time.perf_counter() - started


# --------------------------------------------------------------------------- peers


def pile_table(clean: Path, raw: Path, truth_csv: Path) -> pd.DataFrame:
    """path (relative to the data folder), label (class name; clean only), true (raw only), is_raw."""
    rows = [(f"clean/{p.parent.name}/{p.name}", p.parent.name, "", False) for p in sorted(clean.glob("*/*.png"))]
    truth = pd.read_csv(truth_csv)
    rows += [(f"raw/{p}", "", t, True) for p, t in zip(truth["path"], truth["label"])]
    return pd.DataFrame(rows, columns=["path", "label", "true", "is_raw"])


def pixel_features(data: Path, table: pd.DataFrame, seed: int) -> np.ndarray:
    from PIL import Image
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    pixels = np.stack([np.asarray(Image.open(data / p).convert("L"), dtype=np.float32).ravel() / 255 for p in table["path"]])
    scaled = StandardScaler().fit_transform(pixels)
    return PCA(n_components=min(PCA_COMPONENTS, *scaled.shape), random_state=seed).fit_transform(scaled)


def embedding_features(data: Path, work: Path, table: pd.DataFrame, experiments: Path, name: str, cores: int) -> np.ndarray:
    """Embeddings of every clean and raw image by the round-0 model (its last stage's best.pt)."""
    import torch
    from snakemake.utils import validate

    from labelflow.device import set_job_threads
    from labelflow.embeddings import embed_paths
    from labelflow.models import load_model

    recipe = yaml.safe_load((experiments / f"{name}.yaml").read_text())
    validate(recipe, str(REPO / "config/schemas/experiment.schema.yaml"))  # fills the data defaults
    checkpoint = work / "results/autolabel/round_0" / list(recipe["stages"])[-1] / "best.pt"
    set_job_threads(cores)  # torch threads, and the budget loading plans share
    model = load_model(checkpoint)
    return embed_paths(model, data, list(table["path"]), recipe["data"], torch.device("cpu"))


def peer_predictions(
    spreading_features: np.ndarray, selftraining_features: np.ndarray, labels: np.ndarray, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(predicted class index, confidence) of every row, for LabelSpreading and self-training.
    ``labels``: class index for labelled rows, -1 for unlabelled ones."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.semi_supervised import LabelSpreading, SelfTrainingClassifier

    spreading = LabelSpreading(kernel="knn", n_neighbors=7, max_iter=1000).fit(spreading_features, labels)
    distributions = spreading.label_distributions_
    standardised = StandardScaler().fit_transform(selftraining_features)
    selftraining = SelfTrainingClassifier(LogisticRegression(max_iter=2000, random_state=seed)).fit(standardised, labels)
    probabilities = selftraining.predict_proba(standardised)
    return {
        "LabelSpreading": (spreading.classes_[distributions.argmax(1)], distributions.max(1)),
        "SelfTraining": (selftraining.classes_[probabilities.argmax(1)], probabilities.max(1)),
    }


def precision_at(predicted: np.ndarray, confidence: np.ndarray, truth: np.ndarray, n: int) -> float | None:
    """Precision of the ``n`` most confident predictions (ties: the earlier row first)."""
    if n <= 0:
        return None
    top = np.argsort(-confidence, kind="stable")[:n]
    return float((predicted[top] == truth[top]).mean())


def precision_at_class_mix(predicted: np.ndarray, confidence: np.ndarray, truth: np.ndarray,
                           counts: dict[int, int]) -> tuple[float | None, int]:
    """(precision, images judged) at the workflow's class mix: for every class c, the
    ``counts[c]`` most confident predictions of c (all of them where fewer were made, so a peer
    may be judged on fewer images than the workflow; ties: the earlier row first)."""
    taken = []
    for label, n in counts.items():
        rows = np.flatnonzero(predicted == label)
        taken.append(rows[np.argsort(-confidence[rows], kind="stable")[:n]])
    chosen = np.concatenate(taken) if taken else np.array([], dtype=int)
    return (float((predicted[chosen] == truth[chosen]).mean()) if len(chosen) else None), len(chosen)


def class_mix_per_round(work: Path, classes: list[str], rounds: list[int]) -> dict[int, dict[int, int]]:
    """Per round of ``rounds``: how many raw images the workflow has labelled with each class by
    the end of it (results/autolabel/dataset.csv: raw rows, cumulative; a round that accepted
    nothing keeps the mix before it)."""
    labelled = pd.read_csv(work / "results/autolabel/dataset.csv")
    raw = labelled[labelled["path"].str.startswith("raw/")]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(raw["label"]) - set(index))
    if unknown:
        raise SystemExit(f"{work / 'results/autolabel/dataset.csv'}: labels {unknown} are not classes of clean/ "
                         f"({', '.join(classes)}); the file is from another split")
    mixes = {}
    for r in rounds:
        counts = raw.loc[raw["round"] <= r, "label"].value_counts()
        mixes[r] = {index[c]: int(n) for c, n in counts.items()}
    return mixes


def run_peers(data: Path, work: Path, clean: Path, raw: Path, truth_csv: Path, experiments: Path, name: str,
              args: argparse.Namespace, seed: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray, list[str]]:
    """Every peer's (predicted, confidence) over the raw rows, the raw rows' true class indices
    and the class names in index order."""
    from sklearn.preprocessing import normalize

    table = pile_table(clean, raw, truth_csv)
    classes = sorted(set(table.loc[~table["is_raw"], "label"]))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] if not r else -1 for c, r in zip(table["label"], table["is_raw"])])
    truth = np.array([index[c] for c in table.loc[table["is_raw"], "true"]])
    is_raw = table["is_raw"].to_numpy()
    started = time.perf_counter()
    pixels = pixel_features(data, table, seed)
    embeddings = embedding_features(data, work, table, experiments, name, args.cores)
    features = {  # (for LabelSpreading, for self-training)
        "pixels": (pixels, pixels),
        "embeddings": (normalize(embeddings), embeddings),  # cosine neighbours, as the workflow's guard
    }
    peers = {}
    for kind, (spreading_features, selftraining_features) in features.items():
        found = peer_predictions(spreading_features, selftraining_features, labels, seed)
        for method, (predicted, confidence) in found.items():
            peers[f"{method} {kind}"] = (predicted[is_raw], confidence[is_raw])
    print(f"peers: features and fits in {time.perf_counter() - started:.1f} s", flush=True)
    return peers, truth, classes


# --------------------------------------------------------------------------- report


def compare(evaluation: dict, peers: dict, truth: np.ndarray, mixes: dict[int, dict[int, int]] | None = None) -> list[dict]:
    """Per workflow round: its labelled count, coverage, precision and each peer's precision at
    that count; with ``mixes`` ({round: {class index: count}}) also each peer's precision at the
    workflow's class mix (keys ending in ``_class_mix``; ``judged_class_mix``: how many images
    each peer was judged on there)."""
    rows = []
    for r in evaluation["rounds"]:
        n = r["labelled"]
        ours = r["precision_all"]
        row = {"round": r["round"], "labelled": n, "coverage": r["coverage"], "precision": ours,
               "pseudo_precision": r["precision"], "new": r["new"]}
        judged = {"": {peer: precision_at(predicted, confidence, truth, n) for peer, (predicted, confidence) in peers.items()}}
        if mixes is not None:
            mix = mixes[r["round"]]
            if sum(mix.values()) != n:
                raise SystemExit(f"round {r['round']}: results/autolabel/dataset.csv holds {sum(mix.values())} labelled raw "
                                 f"images, evaluation.json {n}; the two files are from different runs")
            at_mix = {peer: precision_at_class_mix(predicted, confidence, truth, mix) for peer, (predicted, confidence) in peers.items()}
            judged["_class_mix"] = {peer: precision for peer, (precision, _) in at_mix.items()}
            row["judged_class_mix"] = {peer: count for peer, (_, count) in at_mix.items()}
        for suffix, at in judged.items():
            best_peer = max((v for v in at.values() if v is not None), default=None)
            row[f"peers{suffix}"] = at
            row[f"margin{suffix}"] = None if ours is None or best_peer is None else ours - best_peer
            # nothing labelled yet: no coverage to compare at
            row[f"above_all{suffix}"] = None if n == 0 or best_peer is None else ours > best_peer
        rows.append(row)
    return rows


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def verdict(passed: bool | None) -> str:
    return "-" if passed is None else ("PASS" if passed else "FAIL")


def print_rounds(rows: list[dict], evaluation: dict, title: str) -> None:
    print(f"\nautolabel on Fashion-MNIST ({title}); {evaluation['with_truth']:,} raw images with truth")
    print("precision in % of the labelled raw images; each peer at the same number of images (its most confident):")
    print("  " + ", ".join(f"{PEER_COLUMNS[p]} = {p}" for p in PEERS))
    suffixes = {"": "(the goal)"}
    if rows and "peers_class_mix" in rows[0]:
        suffixes["_class_mix"] = ("(for reference) each peer at the workflow's class mix: its most confident n_c "
                                  "predictions of each class c, n_c = the workflow's labelled raw images of c "
                                  "(* judged on fewer images: it predicted fewer than n_c of a class)")
    for suffix, heading in suffixes.items():
        print(heading)
        print(f"{'round':>5} {'new':>6} {'labelled':>8} {'coverage':>8} {'workflow':>8} "
              + " ".join(f"{PEER_COLUMNS[p]:>8}" for p in PEERS) + f" {'margin':>7}  above every peer")
        for row in rows:
            margin, above = row[f"margin{suffix}"], row[f"above_all{suffix}"]
            tie = above is False and margin == 0
            fewer = {p for p, count in row.get(f"judged{suffix}", {}).items() if count < row["labelled"]}
            print(f"{row['round']:>5} {row['new']:>6} {row['labelled']:>8} {pct(row['coverage']):>8} {pct(row['precision']):>8} "
                  + " ".join(f"{pct(row[f'peers{suffix}'][p]) + ('*' if p in fewer else ''):>8}" for p in PEERS)
                  + f" {pct(margin):>7}  {verdict(above)}{' (tie)' if tie else ''}")
    final = evaluation["final"]
    print(f"final: precision {pct(final['precision_all'])} % at coverage {pct(final['coverage'])} % "
          f"(pseudo-labels alone {pct(final['precision'])} %)", flush=True)


def summarise(finals: list[dict]) -> list[str]:
    lines = [f"{len(finals)} split seeds ({', '.join(str(f['seed']) for f in finals)}): mean [min, max]"]

    def line(label: str, values: list[float | None], unit: str = "%") -> None:
        present = np.array([v for v in values if v is not None], dtype=float)
        if len(present):
            lines.append(f"  {label:<48} {100 * present.mean():6.2f} {unit} "
                         f"[{100 * present.min():.2f}, {100 * present.max():.2f}]")

    line("final precision (workflow)", [f["precision"] for f in finals])
    line("final coverage", [f["coverage"] for f in finals])
    for peer in PEERS:
        line(f"{peer} at the final coverage", [f["peers"][peer] for f in finals])
    line("smallest margin over the rounds (vs best peer)", [f["min_margin"] for f in finals], unit="points")
    line("smallest margin at the workflow's class mix", [f.get("min_margin_class_mix") for f in finals], unit="points")
    # the goal's verdict last
    for key, what in (("goal_class_mix", "(for reference) workflow precision above every peer at every round's class mix"),
                      ("goal", "workflow precision above every peer at every round's coverage")):
        judged = [f for f in finals if f.get(key) is not None]
        met = sum(f[key] for f in judged)
        label = "NOT JUDGED" if not judged else ("PASS" if met == len(judged) else "FAIL")
        nothing = len(finals) - len(judged)
        lines.append(f"{label} {what}: {met} of {len(judged)} seeds" + (f" ({nothing} seeds not judged)" if nothing else ""))
    return lines


def run_one(out: Path, seed: int, args: argparse.Namespace) -> dict:
    data, work = out / "data", out / "work"
    work.mkdir(parents=True, exist_ok=True)
    clean, raw, truth = build_split(data, args.per_class, args.raw, seed)
    name, experiments = recipe_file(out, args)
    seconds = run_autolabel(out, clean, raw, truth, (name, experiments), args)
    evaluation = json.loads((work / "results/autolabel/evaluation.json").read_text())
    peers, truth_index, classes = run_peers(data, work, clean, raw, truth, experiments, name, args, seed)
    rounds = [r["round"] for r in evaluation["rounds"]]
    rows = compare(evaluation, peers, truth_index, class_mix_per_round(work, classes, rounds))
    print_rounds(rows, evaluation, f"split seed {seed}, {args.per_class} per class + {args.raw:,} raw, recipe "
                 f"{name}, {seconds / 60:.1f} min")
    whole_pile = {peer: precision_at(predicted, confidence, truth_index, len(truth_index))
                  for peer, (predicted, confidence) in peers.items()}
    print("peers on the whole raw pile (100 % coverage): "
          + ", ".join(f"{peer} {pct(value)} %" for peer, value in whole_pile.items()), flush=True)
    final = rows[-1]
    figures = {"seed": seed, "minutes": seconds / 60, "rounds": rows, "precision": final["precision"],
               "coverage": final["coverage"], "peers": final["peers"], "peers_class_mix": final["peers_class_mix"],
               "peers_whole_pile": whole_pile}
    for suffix in ("", "_class_mix"):
        margins = [r[f"margin{suffix}"] for r in rows if r[f"margin{suffix}"] is not None]
        figures[f"min_margin{suffix}"] = min(margins) if margins else None
        above = [r[f"above_all{suffix}"] for r in rows]
        figures[f"goal{suffix}"] = None if all(a is None for a in above) else all(a is not False for a in above)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, help="labelled (clean) images per class (default 100; --quick 10)")
    parser.add_argument("--raw", type=int, help="raw pile size (default 9000; --quick 200)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102], help="split seeds (default 100 101 102)")
    parser.add_argument("--experiment", default="fashion", help="recipe of every round: a name in config/experiments or a .yaml")
    parser.add_argument("--epochs", type=int, help="the recipe's last stage trains this many epochs (a shorter recipe)")
    parser.add_argument("--max-rounds", type=int, help="autolabel.max_rounds (default: the config's 10; --quick 2)")
    parser.add_argument("--max-new-per-class", type=class_cap, default=DEFAULT,
                        help="autolabel.max_new_per_class: a number, or none for no class cap (default: the config's, 1.0); "
                        "its runs get their own folders (seed_<s>_cap<value>)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--gpu", type=int, default=0, help="config key gpu (default 0: CPU)")
    parser.add_argument("--quick", action="store_true", help="10 per class, 200 raw, 2 rounds of a short recipe: the smoke test")
    parser.add_argument("--out", type=Path, help="working folder, kept (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    args.per_class = args.per_class or (10 if args.quick else 100)
    args.raw = args.raw or (200 if args.quick else 9000)
    if args.quick and not args.max_rounds:
        args.max_rounds = 2
    out = args.out or Path(tempfile.mkdtemp(prefix="autolabel_fashion_"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    split = out / f"clean{args.per_class}_raw{args.raw}"  # a rerun with other sizes does not reuse the piles
    finals = [run_one(seed_folder(split, seed, args), seed, args) for seed in args.seeds]
    print("\n" + "\n".join(summarise(finals)))
    if args.json:
        args.json.write_text(json.dumps({"per_class": args.per_class, "raw": args.raw, "experiment": args.experiment,
                                         "epochs": args.epochs, "max_rounds": args.max_rounds,
                                         "max_new_per_class": "config" if args.max_new_per_class is DEFAULT else args.max_new_per_class,
                                         "seeds": finals}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
