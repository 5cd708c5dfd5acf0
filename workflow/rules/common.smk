# Helper functions and values derived from the validated config; no rules here.
import re

import yaml
from snakemake.exceptions import WorkflowError

from labelflow.data import DatasetError, resolve_valid_folds
from labelflow.reports import format_experiments

# Rule demo_dataset writes the digits here; any other `dataset` must already exist.
DEMO_DATASET = "data/digits"


def _existing_path(path):
    """A relative path from the config: the working directory first, then the workflow's own."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(workflow.basedir, path)


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
            f"config key `experiments`: unknown experiment {name!r} (no file {path}); "
            f"available: {known}"
        )
    with open(path, encoding="utf-8") as f:
        experiment = yaml.safe_load(f) or {}
    try:
        validate(experiment, "../../config/schemas/experiment.schema.yaml")
    except WorkflowError as exc:
        raise WorkflowError(f"experiment file {path} is invalid:\n{exc}") from None
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
if config["labels_csv"] and not os.path.isfile(config["labels_csv"]):
    raise WorkflowError(
        f"config key `labels_csv`: file {config['labels_csv']!r} does not exist; give a CSV with "
        "columns path,labels or set it to null to use class folders"
    )
EXPERIMENTS = {name: load_experiment(name) for name in config["experiments"]}
try:
    VALID_FOLDS = resolve_valid_folds(config["n_folds"], config["valid_folds"])
except DatasetError as exc:
    raise WorkflowError(str(exc)) from None


wildcard_constraints:
    experiment="|".join(re.escape(name) for name in EXPERIMENTS),
    stage=r"\w+",


def labelling_inputs(wildcards):
    inputs = {"dataset": DATASET}
    if config["labels_csv"]:
        inputs["labels_csv"] = config["labels_csv"]
    return inputs


def stage_names(experiment):
    return list(EXPERIMENTS[experiment]["stages"])


def final_stage(experiment):
    return stage_names(experiment)[-1]


def stage_inputs(wildcards):
    """Data for every stage; a later stage also needs the previous stage's best weights."""
    names = stage_names(wildcards.experiment)
    if wildcards.stage not in names:
        raise WorkflowError(
            f"experiment {wildcards.experiment!r} has no stage {wildcards.stage!r}; stages: {names}"
        )
    inputs = {
        "dataset": "results/data/dataset.csv",
        "labeling": "results/data/tag2cls.json",
        "root": DATASET,
    }
    position = names.index(wildcards.stage)
    if position > 0:
        inputs["init"] = f"results/{wildcards.experiment}/{names[position - 1]}/best.pt"
    return inputs


def final_checkpoint(wildcards):
    return f"results/{wildcards.experiment}/{final_stage(wildcards.experiment)}/best.pt"


def all_stage_metrics(wildcards):
    return [
        f"results/{wildcards.experiment}/{stage}/metrics.json"
        for stage in stage_names(wildcards.experiment)
    ]


def print_results_table(experiments_csv):
    table = format_experiments(experiments_csv)
    if table:
        print(f"\n{table}\n")
