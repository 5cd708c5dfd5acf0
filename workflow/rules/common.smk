# Config, experiments and runs (labelflow.runs), and the input functions every run's rules
# share; no rules here. Helpers of one rule family live in that family's .smk file.
import os
from functools import lru_cache

import yaml
from snakemake.exceptions import WorkflowError

from labelflow.dataset import resolve_valid_folds
from labelflow.heads import check_experiment
from labelflow.heldout import HeldOutSettings
from labelflow.io import DatasetError
from labelflow.manifest import code_digest, files_digest, source_digest
from labelflow.runs import NAME_PATTERN, RunError, RunTable, main_table

# Rule demo_dataset writes the digits here; any other `dataset` must already exist.
DEMO_DATASET = "data/digits"
# absolute: experiments of on-demand runs are validated while the DAG is built, when Snakemake
# no longer knows which file a relative schema path was relative to
EXPERIMENT_SCHEMA = os.path.join(
    workflow.basedir, "config/schemas/experiment.schema.yaml"
)


def _existing_path(path):
    """A relative path from the config: the working directory first, then the workflow's own."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(workflow.basedir, path)


def validate_experiment(experiment, what):
    """Schema (fills defaults) and the heads registry; a WorkflowError naming `what`."""
    try:
        validate(experiment, EXPERIMENT_SCHEMA)
        check_experiment(experiment)
    except (WorkflowError, ValueError) as exc:
        raise WorkflowError(f"{what} is invalid:\n{exc}") from None


def load_experiment(name):
    path = os.path.join(_existing_path(config["experiments_dir"]), f"{name}.yaml")
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        known = (
            sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
            if os.path.isdir(folder)
            else []
        )
        raise WorkflowError(
            f"unknown experiment {name!r} (no file {path}); available: {known}"
        )
    with open(path, encoding="utf-8") as f:
        experiment = yaml.safe_load(f) or {}
    validate_experiment(experiment, f"experiment file {path}")
    return experiment


def _check_dataset(path):
    if os.path.normpath(path) != DEMO_DATASET and not os.path.isdir(path):
        raise WorkflowError(
            f"config key `dataset`: folder {path!r} does not exist. Point it at a folder with one "
            "sub-folder per class (--config dataset=/path/to/images), or leave the default "
            f"{DEMO_DATASET!r} to use the generated digits demo."
        )
    return path


DATASET = _check_dataset(config["dataset"])
if config["test_dataset"] and not os.path.isdir(config["test_dataset"]):
    raise WorkflowError(
        f"config key `test_dataset`: folder {config['test_dataset']!r} does not exist; give a "
        "folder with one sub-folder of test images per class, or set it to null"
    )
if config["labels_csv"] and not os.path.isfile(config["labels_csv"]):
    raise WorkflowError(
        f"config key `labels_csv`: file {config['labels_csv']!r} does not exist; give a CSV with "
        "columns path,labels or set it to null to use class folders"
    )
try:
    TEST = HeldOutSettings.from_config(config)
    VALID_FOLDS = resolve_valid_folds(config["n_folds"], config["valid_folds"])
    RUNS = RunTable.from_config(
        config,
        load_experiment,
        validate_experiment=validate_experiment,
        valid_folds=VALID_FOLDS,
    )
except (DatasetError, RunError) as exc:
    raise WorkflowError(str(exc)) from None
EXPERIMENTS = list(config["experiments"])
# the table runs on the main dataset train on: split's, or with `corrections` the corrected one
MAIN_TABLE = main_table(config)


wildcard_constraints:
    run=RUNS.names_pattern(),
    stage=r"\w+",
    experiment=NAME_PATTERN,
    imageset=r"[^/]+",
    round=r"\d+",


def run_named(name):
    try:
        return RUNS[name]
    except RunError as exc:
        raise WorkflowError(str(exc)) from None


def run_of(wildcards):
    return run_named(wildcards.run)


def params_of(run):
    """What a model job of a run needs besides files: its name, recipe and validation folds."""
    return {
        "name": run.name,
        "experiment": run.experiment,
        "valid_folds": list(run.valid_folds),
        "calibration_share": run.calibration_share,
    }


def run_params(wildcards):
    return params_of(run_of(wildcards))


def run_data(wildcards):
    data = run_of(wildcards).data
    return {"dataset": data.table, "tag2cls": data.tag2cls, "root": data.root}


def stage_inputs(wildcards):
    """A stage's data and starting weights (the previous stage's best, or the run's init)."""
    try:
        return run_of(wildcards).stage_inputs(wildcards.stage)
    except RunError as exc:
        raise WorkflowError(str(exc)) from None


def train_inputs(wildcards):
    """stage_inputs, plus the LR finder's suggestion for a stage with `lr: auto`."""
    inputs = stage_inputs(wildcards)
    suggestion = run_of(wildcards).lr_suggestion(wildcards.stage)
    if suggestion:
        inputs["lr_json"] = suggestion
    return inputs


def final_checkpoint(wildcards):
    return run_of(wildcards).checkpoint()


def infer_inputs(wildcards):
    return {"checkpoint": final_checkpoint(wildcards), **run_data(wildcards)}


def stage_metrics_files(run):
    return [run.path(stage, "metrics.json") for stage in run.stages]


@lru_cache(maxsize=None)
def content_of(path):
    """Digest of a folder's (or a CSV of image paths') files: a rule passes it as a param so that
    an image added, replaced or removed anywhere below reruns it (labelflow.manifest).
    """
    return source_digest(path)


def code_of(script):
    """Digest of the package code a workflow script runs: a change to it reruns the rule."""
    return code_digest(
        os.path.join(workflow.basedir, "workflow", "scripts", f"{script}.py")
    )


def dataset_content(wildcards):
    """What tag2label reads besides its declared inputs: every file below `dataset` (the demo
    folder is a rule's output, which Snakemake tracks itself) and the labels CSV."""
    parts = []
    if os.path.normpath(DATASET) != DEMO_DATASET:
        parts.append(content_of(DATASET))
    if config["labels_csv"]:
        labels = config["labels_csv"]
        parts.append(files_digest([labels], os.path.dirname(os.path.abspath(labels))))
    return ",".join(parts)


def labelling_inputs(wildcards):
    inputs = {"dataset": DATASET}
    if config["labels_csv"]:
        inputs["labels_csv"] = config["labels_csv"]
    return inputs


def print_results_table(experiments_csv):
    from labelflow.reports import (
        format_experiments,
    )  # imports pandas: only at the end of a run

    table = format_experiments(experiments_csv)
    if table:
        print(f"\n{table}\n")


def summary_inputs(wildcards):
    run = run_of(wildcards)
    return {
        "dataset": run.data.table,
        "tag2cls": run.data.tag2cls,
        "predictions": run.path("predictions", "predictions.csv"),
        "logits": run.path("predictions", "logits.npy"),
        "heads": run.path("predictions", "heads.csv"),
        "checkpoint": run.checkpoint(),
        "index": run.path("index", "recall.json"),
        "calibration": run.path("calibration.json"),
        "stage_metrics": stage_metrics_files(run),
    }


def grid_metrics(wildcards):
    if not RUNS.grid:
        raise WorkflowError(
            "config key `grid.params` is empty; give dotted experiment keys and lists of values "
            "in a config file (--configfile), e.g. grid: {params: {stages.stage2.lr: [0.001, 0.0003]}}"
        )
    return [
        RUNS[f"grid/{i}"].path(RUNS[f"grid/{i}"].final_stage, "metrics.json")
        for i in RUNS.grid
    ]


def kfold_inputs(wildcards):
    runs = RUNS.kfold_runs(wildcards.experiment)
    if not runs:
        raise WorkflowError(
            f"experiment {wildcards.experiment!r} has no k-fold runs; list it in config key "
            "`kfold.experiments`"
        )
    return {
        "metrics": [run.path(run.final_stage, "metrics.json") for run in runs],
        "summaries": [run.path("summary.json") for run in runs],
        "predictions": [run.path("predictions", "predictions.csv") for run in runs],
        "probabilities": [run.path("predictions", "probabilities.npy") for run in runs],
    }
