"""Command line: ``labelflow <command> ...``, the same functions the workflow calls.

Commands register themselves in :data:`COMMANDS` with :func:`command`, so a new step
only needs a function that adds its arguments and one that runs it. Bad input
(:class:`~labelflow.io.DatasetError`) prints ``error: <message>`` and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from labelflow import dataset, demo
from labelflow.io import DatasetError, write_csv_atomic, write_json_atomic

Runner = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Runner


COMMANDS: dict[str, Command] = {}


def command(
    name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Runner], Runner]:
    """Decorator registering ``run`` as subcommand ``name``."""

    def register(run: Runner) -> Runner:
        COMMANDS[name] = Command(help, add_arguments, run)
        return run

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labelflow", description="Steps of the labelflow image-classification workflow."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(sub_parser)
        sub_parser.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- digits


def _digits_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must not exist)")
    p.add_argument(
        "--image-size", type=int, default=32, help="side of the square PNGs (default 32)"
    )


@command("digits", "write scikit-learn's digits as a folder-per-class PNG dataset", _digits_args)
def _digits(args: argparse.Namespace) -> int:
    n = demo.write_digits_dataset(args.out_dir, image_size=args.image_size)
    print(f"wrote {n} images ({args.image_size}x{args.image_size}) to {args.out_dir}")
    return 0


def _fashion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must not exist): OUT_DIR/train/<class>/, OUT_DIR/test/<class>/")
    p.add_argument("--size", type=int, default=28, help="side of the square images in pixels (default 28, the original)")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="image format (default png)")
    p.add_argument("--source", help="folder with the four IDX files (default: where the Debian package dataset-fashion-mnist puts them)")
    p.add_argument("--limit", type=int, help="images per split, a seeded class-stratified subset (default: all 60,000 + 10,000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")


@command("fashion", "write Fashion-MNIST (Debian package dataset-fashion-mnist) as class folders", _fashion_args)
def _fashion(args: argparse.Namespace) -> int:
    from labelflow.fashion import write_fashion_dataset

    counts = write_fashion_dataset(
        args.out_dir, size=args.size, image_format=args.format, source=args.source, limit=args.limit, seed=args.seed
    )
    for split, per_class in counts.items():
        print(f"{split}: {sum(per_class.values())} images in {len(per_class)} classes → {args.out_dir}/{split}/")
    return 0


# --------------------------------------------------------------------------- tag2label

_SHOWN = 10  # skipped rows and duplicate groups echoed to the terminal; the CSVs have them all


def _correlation_arg(text: str) -> float | None:
    """--min-correlation: a number in 0..1, or 'none' (no pixel check)."""
    if text == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in 0..1 or 'none', got {text!r}")
    return value


def _tag2label_args(p: argparse.ArgumentParser) -> None:
    defaults = dataset.DEFAULT_DUPLICATES
    p.add_argument("--in-dir", required=True, help="dataset folder, one sub-folder per class")
    p.add_argument("--out-dataset", required=True, help="CSV of path,tag,sha1,phash,group")
    p.add_argument("--out-tag2cls", required=True, help="JSON tag -> class index")
    p.add_argument("--out-skipped", required=True, help="CSV of path,reason")
    p.add_argument(
        "--out-duplicates",
        help="optional CSV of duplicate groups: group,size,members,classes,label_conflict,kind",
    )
    p.add_argument(
        "--max-distance",
        type=int,
        default=defaults.max_distance,
        help=f"pHash bits up to which images are near copies; -1: identical files only (default {defaults.max_distance})",
    )
    p.add_argument(
        "--label-conflicts",
        choices=dataset.LABEL_CONFLICT_ACTIONS,
        default=defaults.label_conflicts,
        help=f"copies of one picture in different classes: drop or keep them (default {defaults.label_conflicts})",
    )
    p.add_argument(
        "--min-correlation",
        type=_correlation_arg,
        default=defaults.min_correlation,
        help="pixel correlation (32x32 grayscale) a pHash pair needs to count as a near copy; "
        f"'none': no pixel check (default {defaults.min_correlation})",
    )


@command(
    "tag2label", "list a folder-per-class dataset and map tags to class indices", _tag2label_args
)
def _tag2label(args: argparse.Namespace) -> int:
    settings = dataset.DuplicateSettings(args.max_distance, args.label_conflicts, args.min_correlation)
    result = dataset.tag2label(args.in_dir, settings)
    write_csv_atomic(result.dataset, args.out_dataset)
    write_json_atomic(result.tag2cls, args.out_tag2cls)
    write_csv_atomic(result.skipped, args.out_skipped)
    if args.out_duplicates:
        write_csv_atomic(result.duplicates, args.out_duplicates)

    counts = result.dataset["tag"].value_counts()
    print(f"{len(result.dataset)} images in {len(result.tag2cls)} classes")
    for tag, cls in result.tag2cls.items():
        print(f"  {cls:>3}  {tag}: {counts.get(tag, 0)}")
    _summarise("skipped", result.skipped, "reason", args.out_skipped)
    _summarise_groups(result.duplicates, args.out_duplicates)
    return 0


def _summarise(what: str, table: pd.DataFrame, column: str, csv_path: str | None) -> None:
    if table.empty:
        return
    print(
        f"{len(table)} {what} file(s)" + (f" (all listed in {csv_path})" if csv_path else "") + ":"
    )
    for path, detail in table[["path", column]].head(_SHOWN).itertuples(index=False):
        print(f"  {path}: {detail}")
    if len(table) > _SHOWN:
        print(f"  ... and {len(table) - _SHOWN} more")


def _summarise_groups(groups: pd.DataFrame, csv_path: str | None) -> None:
    if groups.empty:
        return
    conflicts = int(groups["label_conflict"].sum())
    print(
        f"{len(groups)} duplicate group(s) of {int(groups['size'].sum())} images, {conflicts} label conflict(s)"
        + (f" (all listed in {csv_path})" if csv_path else "")
        + ":"
    )
    for row in groups.head(_SHOWN).itertuples(index=False):
        conflict = ", label conflict" if row.label_conflict else ""
        print(f"  group {row.group} ({row.kind}, classes {row.classes}{conflict}): {row.members}")
    if len(groups) > _SHOWN:
        print(f"  ... and {len(groups) - _SHOWN} more")


# --------------------------------------------------------------------------- split


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in-csv", required=True, help="CSV of path,tag[,group] from tag2label")
    p.add_argument("--tag2cls", required=True, help="JSON tag -> class index from tag2label")
    p.add_argument("--out-csv", required=True, help="CSV of path,tag,class,fold[,sha1,group]")
    p.add_argument("--n-folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed (default 42)")
    p.add_argument("--root", help="dataset folder; if given, check every path exists in it")
    p.add_argument("--duplicates", help="duplicate groups CSV from tag2label (--out-duplicates)")
    p.add_argument(
        "--out-duplicate-folds", help="with --duplicates: the groups CSV plus the fold of each group"
    )


@command(
    "split",
    "assign each image a class index and a stratified fold (duplicate groups stay in one fold)",
    _split_args,
)
def _split(args: argparse.Namespace) -> int:
    if bool(args.duplicates) != bool(args.out_duplicate_folds):
        raise DatasetError("--duplicates and --out-duplicate-folds go together: give both or neither")
    table = dataset.read_dataset_csv(args.in_csv, args.root, check_files=args.root is not None)
    tag2cls = dataset.read_tag2cls(args.tag2cls)
    result = dataset.split(table, tag2cls, n_folds=args.n_folds, seed=args.seed)
    write_csv_atomic(result, args.out_csv)
    if args.duplicates:
        groups = dataset.duplicate_folds(dataset.read_duplicates(args.duplicates), result)
        write_csv_atomic(groups, args.out_duplicate_folds)
    print(f"split {len(result)} images into {args.n_folds} folds (seed {args.seed}):")
    for fold, n in result["fold"].value_counts().sort_index().items():
        print(f"  fold {fold}: {n} images")
    return 0


# --------------------------------------------------------------------------- embed / query


def _experiment_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--experiment-dir",
        required=True,
        help="results/<experiment>: its index/rejection.json names the model, preprocessing and index",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--gpu", action="store_true", help="use CUDA when available (default: CPU)")


def _embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="folder of images (searched recursively) or CSV with a `path` column")
    p.add_argument("--out-dir", required=True, help="folder for embeddings.npy and index.csv (path,label)")
    p.add_argument("--root", help="folder the CSV's relative paths start from (default: the CSV's folder)")
    _experiment_dir_arg(p)


@command("embed", "embed a folder or CSV of images with an experiment's trained model", _embed_args)
def _embed(args: argparse.Namespace) -> int:
    from labelflow.embeddings import embed_images, read_model

    preprocessing, checkpoint, classes = read_model(args.experiment_dir)
    table = embed_images(
        checkpoint=checkpoint, source=args.source, out_dir=args.out_dir, data_cfg=preprocessing,
        classes=classes, root=args.root, batch_size=args.batch_size, want_gpu=args.gpu,
    )
    print(f"embedded {len(table)} images of {args.source} → {args.out_dir}/embeddings.npy, index.csv")
    return 0


def _query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files or folders of images")
    p.add_argument("-k", type=int, help="neighbours to return (default: config query.k used for the index)")
    p.add_argument("--out", help="also write the answers as JSON to this file")
    _experiment_dir_arg(p)


@command(
    "query",
    "nearest indexed images and a kNN label (or `unknown`) for each image",
    _query_args,
)
def _query(args: argparse.Namespace) -> int:
    from labelflow.search import query_images

    answers = query_images(
        experiment_dir=args.experiment_dir, images=args.images, k=args.k,
        batch_size=args.batch_size, want_gpu=args.gpu,
    )
    for a in answers:
        relation = ">" if a["rejected"] else "<="
        print(
            f"{a['path']}: {a['predicted']} (kNN vote {a['vote']}; nearest distance "
            f"{a['nearest_distance']:.4f} {relation} threshold {a['threshold']:.4f})"
        )
        for rank, n in enumerate(a["neighbours"], start=1):
            print(f"  {rank:>2}. {n['distance']:.4f}  {n['label']}  {n['path']}")
    if args.out:
        write_json_atomic(answers, args.out)
        print(f"wrote {len(answers)} answers to {args.out}")
    return 0


# --------------------------------------------------------------------------- predict / evaluate / export


def _trained(args: argparse.Namespace):
    """The run in --experiment-dir, on the device asked for."""
    from labelflow.device import job_threads, select_device, set_job_threads
    from labelflow.trained import ModelFiles, load_trained

    # the command's thread budget (torch's default pool, or OMP_NUM_THREADS), fixed before a
    # loading plan shrinks torch's pool to leave threads for decoding workers
    set_job_threads(job_threads())
    return load_trained(ModelFiles.in_run_dir(args.experiment_dir)), select_device(args.gpu)


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image files, folders (searched recursively) or CSVs with a `path` column")
    p.add_argument("--out", required=True, help="CSV: path, predicted (class or `unknown`), confidence, rejected, nearest_distance, top-k, error")
    p.add_argument("--top-k", type=int, default=3, help="most probable classes listed per image (default 3)")
    _experiment_dir_arg(p)


@command(
    "predict",
    "classify images with a trained run: class, calibrated confidence, top-k, `unknown` beyond the rejection threshold",
    _predict_args,
)
def _predict(args: argparse.Namespace) -> int:
    from labelflow.predict import collect_inputs, predict_to_csv

    trained, device = _trained(args)
    counts = predict_to_csv(
        trained, collect_inputs(args.inputs), args.out, top_k=args.top_k, batch_size=args.batch_size, device=device
    )
    predicted = ", ".join(f"{name or '(none)'} {n}" for name, n in counts["predicted"].items()) or "none"
    print(f"{counts['images']} files: {predicted}; unknown {counts['unknown']} (nearest indexed image farther than "
          f"{trained.threshold:.4f}); unreadable {counts['unreadable']} → {args.out}")  # fmt: skip
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="DIR", help="folder of class folders, or a CSV with columns path,label")
    p.add_argument("--out-dir", help="where metrics.json, confusion.png, errors.csv, errors/index.html go "
                   "(default: <experiment-dir>/eval/<name of DIR>)")  # fmt: skip
    _experiment_dir_arg(p)


@command("evaluate", "score a trained run on labelled images: metrics, confusion matrix, the errors as a contact sheet", _evaluate_args)
def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labelflow.evaluate import evaluate_images

    trained, device = _trained(args)
    out_dir = args.out_dir or str(Path(args.experiment_dir) / "eval" / Path(args.source).stem)
    m = evaluate_images(args.source, trained, out_dir, batch_size=args.batch_size, device=device)
    print(f"{m['n_images']} images ({m['n_unreadable']} unreadable): accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f}, "
          f"macro F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f}, rejected {m['rejected_fraction']:.2%}")  # fmt: skip
    print(f"{m['n_misclassified']} misclassified: {out_dir}/errors.csv, {out_dir}/errors/index.html; metrics in {out_dir}/metrics.json")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["torchscript", "onnx"], default="onnx", help="default onnx (needs pip install '.[export]')")
    p.add_argument("--out-dir", help="folder to write (replaced); default <experiment-dir>/export")
    _experiment_dir_arg(p)


@command("export", "export a trained run for serving: model, model_card.json and an example script", _export_args)
def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labelflow.export import export_model

    trained, _ = _trained(args)
    out_dir = args.out_dir or str(Path(args.experiment_dir) / "export")
    card = export_model(trained, out_dir, args.format)
    checked = card["check"]["max_abs_difference"]
    print(f"wrote {out_dir}/{card['file']}, model_card.json, example.py ({len(card['classes'])} classes, "
          f"{card['input']['image_size']} px); max abs difference to PyTorch: "
          f"{'not checked (no onnxruntime)' if checked is None else f'{checked:.2g}'}")  # fmt: skip
    print(f"try it: cd {out_dir} && python example.py IMAGE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
