# Helper functions and values derived from the validated config; no rules here.
import re

import yaml
from snakemake.exceptions import WorkflowError

from labelflow.autolabel import round_recipe
from labelflow.data import DatasetError, resolve_valid_folds
from labelflow.variants import GridError, grid_runs

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


def _grid_runs():
    if not config["grid"]["params"]:
        return {}
    try:
        name = config["grid"]["experiment"] or config["experiments"][0]
        runs = grid_runs(load_experiment(name), config["grid"]["params"])
    except GridError as exc:
        raise WorkflowError(f"config key `grid.params`: {exc}") from None
    for run_id, run in runs.items():
        try:
            validate(run["experiment"], "../../config/schemas/experiment.schema.yaml")
        except WorkflowError as exc:
            raise WorkflowError(
                f"config key `grid.params`: run {run_id} is not a valid experiment:\n{exc}"
            ) from None
    return runs


# Every trained model is a run: an experiment dict and its validation folds. Grid points and
# k-fold folds are runs named grid/<id> and kfold/<experiment>/fold_<k>, served by the same rules.
GRID_RUNS = _grid_runs()
RUNS = {
    name: {"experiment": exp, "valid_folds": VALID_FOLDS}
    for name, exp in EXPERIMENTS.items()
}
RUNS.update(
    {
        f"grid/{run_id}": {"experiment": run["experiment"], "valid_folds": VALID_FOLDS}
        for run_id, run in GRID_RUNS.items()
    }
)
KFOLD_EXPERIMENTS = {
    name: load_experiment(name)
    for name in config["kfold"]["experiments"] or config["experiments"][:1]
}
RUNS.update(
    {
        f"kfold/{name}/fold_{k}": {"experiment": exp, "valid_folds": [k]}
        for name, exp in KFOLD_EXPERIMENTS.items()
        for k in range(config["n_folds"])
    }
)


wildcard_constraints:
    experiment="|".join(re.escape(name) for name in RUNS),
    stage=r"\w+",


def run_experiment(wildcards):
    return RUNS[wildcards.experiment]["experiment"]


def run_valid_folds(wildcards):
    return RUNS[wildcards.experiment]["valid_folds"]


def labelling_inputs(wildcards):
    inputs = {"dataset": DATASET}
    if config["labels_csv"]:
        inputs["labels_csv"] = config["labels_csv"]
    return inputs


def stage_names(experiment):
    return list(RUNS[experiment]["experiment"]["stages"])


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


def train_inputs(wildcards):
    """stage_inputs, plus the LR finder's suggestion for a stage with `lr: auto`."""
    inputs = stage_inputs(wildcards)
    if run_experiment(wildcards)["stages"][wildcards.stage]["lr"] == "auto":
        inputs["lr_json"] = (
            f"results/{wildcards.experiment}/lrfinder/{wildcards.stage}/suggestion.json"
        )
    return inputs


def final_checkpoint(wildcards):
    return f"results/{wildcards.experiment}/{final_stage(wildcards.experiment)}/best.pt"


def all_stage_metrics(wildcards):
    return [
        f"results/{wildcards.experiment}/{stage}/metrics.json"
        for stage in stage_names(wildcards.experiment)
    ]


def print_results_table(experiments_csv):
    from labelflow.reports import (
        format_experiments,
    )  # imports torch: only at the end of a run

    table = format_experiments(experiments_csv)
    if table:
        print(f"\n{table}\n")


# --------------------------------------------------------------------------- autolabel
# Autolabel helpers run only when an autolabel target is requested, so an unconfigured
# `autolabel:` section never breaks the default workflow.
import json

AUTOLABEL_DATA = "results/autolabel/data"
AUTOLABEL_ROOT = "results/autolabel/root"
_AUTOLABEL_EXPERIMENT = {}


def autolabel_folders(wildcards):
    """The clean and raw folders; an error naming the config key when one is unusable."""
    settings = config["autolabel"]
    folders = {}
    for key, what in (
        ("clean", "one sub-folder of human-labelled images per class"),
        ("raw", "the unlabelled images (any nesting)"),
    ):
        path = settings[key]
        if not path:
            raise WorkflowError(
                f"config key `autolabel.{key}` is not set; the autolabel target needs a folder "
                f"with {what} (e.g. --config 'autolabel={{clean: data_clean, raw: data_raw}}' "
                "or an `autolabel:` section in a --configfile)"
            )
        if not os.path.isdir(path):
            raise WorkflowError(
                f"config key `autolabel.{key}`: folder {path!r} does not exist; it must hold {what}"
            )
        folders[key] = path
    classes = [
        entry.name
        for entry in os.scandir(folders["clean"])
        if entry.is_dir() and not entry.name.startswith(".")
    ]
    unknown = sorted(set(settings["class_thresholds"]) - set(classes))
    if unknown:
        raise WorkflowError(
            f"config key `autolabel.class_thresholds` names unknown class(es) {unknown}; "
            f"the class folders of {folders['clean']!r} are {sorted(classes)}"
        )
    return folders


def autolabel_experiment():
    """The recipe that trains every round (config key `autolabel.experiment`), loaded once."""
    name = config["autolabel"]["experiment"]
    if name not in _AUTOLABEL_EXPERIMENT:
        try:
            experiment = EXPERIMENTS.get(name) or load_experiment(name)
        except WorkflowError as exc:
            raise WorkflowError(f"config key `autolabel.experiment`: {exc}") from None
        _AUTOLABEL_EXPERIMENT[name] = round_recipe(experiment)
    return _AUTOLABEL_EXPERIMENT[name]


def autolabel_stages():
    return list(autolabel_experiment()["stages"])


def autolabel_final_model(round_):
    return f"results/autolabel/round_{round_}/{autolabel_stages()[-1]}/best.pt"


def autolabel_round_dataset_inputs(wildcards):
    """Human rows and the pseudo-labels accepted by every earlier round."""
    return {
        "human": f"{AUTOLABEL_DATA}/human.csv",
        "labeling": f"{AUTOLABEL_DATA}/tag2cls.json",
        "accepted": [
            f"results/autolabel/round_{r}/accepted.csv"
            for r in range(int(wildcards.round))
        ],
    }


def autolabel_train_inputs(wildcards):
    """A round's stage; a later stage starts from the previous stage, and with
    autolabel.warm_start the first stage from the previous round's final model."""
    names = autolabel_stages()
    if wildcards.stage not in names:
        raise WorkflowError(
            f"autolabel experiment {config['autolabel']['experiment']!r} has no stage "
            f"{wildcards.stage!r}; stages: {names}"
        )
    round_ = int(wildcards.round)
    inputs = {
        "dataset": f"results/autolabel/round_{round_}/dataset.csv",
        "labeling": f"{AUTOLABEL_DATA}/tag2cls.json",
        "root": AUTOLABEL_ROOT,
    }
    position = names.index(wildcards.stage)
    if position > 0:
        inputs["init"] = (
            f"results/autolabel/round_{round_}/{names[position - 1]}/best.pt"
        )
    elif config["autolabel"]["warm_start"] and round_ > 0:
        inputs["init"] = autolabel_final_model(round_ - 1)
    return inputs


def autolabel_round_inputs(wildcards):
    return {
        "checkpoint": autolabel_final_model(wildcards.round),
        "dataset": f"results/autolabel/round_{wildcards.round}/dataset.csv",
        "raw": f"{AUTOLABEL_DATA}/raw.csv",
        "labeling": f"{AUTOLABEL_DATA}/tag2cls.json",
        "root": AUTOLABEL_ROOT,
    }


def autolabel_is_last_round(wildcards):
    return int(wildcards.round) + 1 >= config["autolabel"]["max_rounds"]


def autolabel_rounds(wildcards):
    """Walk the rounds' checkpoints until one's status says stop; the outputs of them all."""
    autolabel_folders(wildcards)
    done = 0
    while done < config["autolabel"]["max_rounds"]:
        status = checkpoints.autolabel_round.get(round=done).output.status
        done += 1
        with open(status, encoding="utf-8") as f:
            if json.load(f)["stop"]:
                break
    rounds = range(done)
    return {
        "human": f"{AUTOLABEL_DATA}/human.csv",
        "raw": f"{AUTOLABEL_DATA}/raw.csv",
        "status": [f"results/autolabel/round_{r}/status.json" for r in rounds],
        "accepted": [f"results/autolabel/round_{r}/accepted.csv" for r in rounds],
        "metrics": [f"results/autolabel/round_{r}/metrics.json" for r in rounds],
        "predictions": f"results/autolabel/round_{done - 1}/predictions.csv",
    }


def autolabel_evaluation_inputs(wildcards):
    truth = config["autolabel"]["truth_csv"]
    if not truth or not os.path.isfile(truth):
        raise WorkflowError(
            f"config key `autolabel.truth_csv`: {'not set' if not truth else repr(truth) + ' does not exist'}; "
            "evaluation needs a CSV path,label of the raw images (paths relative to autolabel.raw)"
        )
    return {
        "dataset": "results/autolabel/dataset.csv",
        "raw": f"{AUTOLABEL_DATA}/raw.csv",
        "rounds": "results/autolabel/rounds.csv",
        "truth": truth,
    }


def autolabel_targets(wildcards):
    """What `snakemake autolabel` makes: the labelled set and its evidence."""
    autolabel_folders(wildcards)
    targets = [
        "results/autolabel/dataset.csv",
        "results/autolabel/unlabelled.csv",
        "results/autolabel/progress.png",
    ]
    if config["autolabel"]["truth_csv"]:
        autolabel_evaluation_inputs(wildcards)
        targets.append("results/autolabel/evaluation.json")
    if config["autolabel"]["materialize"] != "none":
        targets.append("results/autolabel/dataset")
    return targets


# --------------------------------------------------------------------------- embeddings, search, OOD
# Helpers for workflow/rules/embed.smk; they run only when its targets are requested.
_OOD_EXPERIMENT = {}


def embed_experiment():
    """The experiment whose model embeds, projects and answers queries (`embed.experiment`)."""
    name = config["embed"]["experiment"] or config["experiments"][0]
    if name not in EXPERIMENTS:
        raise WorkflowError(
            f"config key `embed.experiment`: {name!r} is not one of `experiments` "
            f"{list(EXPERIMENTS)}; its model must be trained by this workflow"
        )
    return name


def embed_set_source(wildcards):
    """The folder or CSV of config key `embed.sets.<name>`."""
    sets = config["embed"]["sets"]
    if wildcards.imageset not in sets:
        raise WorkflowError(
            f"no image set {wildcards.imageset!r} in config key `embed.sets` ({sorted(sets)})"
        )
    path = sets[wildcards.imageset]
    if not os.path.exists(path):
        raise WorkflowError(
            f"config key `embed.sets.{wildcards.imageset}`: {path!r} does not exist; give a "
            "folder of images or a CSV with a `path` column"
        )
    return path


def embed_targets(what):
    """Per configured set: its embeddings (`what`="embeddings") or query answers ("queries")."""
    sets = config["embed"]["sets"]
    if not sets:
        raise WorkflowError(
            "config key `embed.sets` is empty; name the image sets to embed, e.g. "
            "--config 'embed={sets: {new: data/new_images}}'"
        )
    experiment = embed_experiment()
    if what == "embeddings":
        return [
            f"results/{experiment}/embeddings/{name}/embeddings.npy" for name in sets
        ]
    return [f"results/{experiment}/queries/{name}.csv" for name in sets]


def ood_experiment(name=None):
    """The recipe trained without the held-out classes (`ood.experiment`), loaded once."""
    name = name or config["ood"]["experiment"]
    if name not in _OOD_EXPERIMENT:
        try:
            experiment = EXPERIMENTS.get(name) or load_experiment(name)
        except WorkflowError as exc:
            raise WorkflowError(f"config key `ood.experiment`: {exc}") from None
        _OOD_EXPERIMENT[name] = experiment
    return _OOD_EXPERIMENT[name]


def ood_stage_inputs(wildcards):
    """Like stage_inputs, on the dataset without the held-out classes."""
    names = list(ood_experiment(wildcards.experiment)["stages"])
    if wildcards.stage not in names:
        raise WorkflowError(
            f"experiment {wildcards.experiment!r} has no stage {wildcards.stage!r}; stages: {names}"
        )
    inputs = {
        "dataset": "results/ood/data/dataset.csv",
        "labeling": "results/ood/data/tag2cls.json",
        "root": DATASET,
    }
    position = names.index(wildcards.stage)
    if position > 0:
        inputs["init"] = (
            f"results/ood/{wildcards.experiment}/{names[position - 1]}/best.pt"
        )
    return inputs


def ood_final_checkpoint(wildcards):
    stages = list(ood_experiment(wildcards.experiment)["stages"])
    return f"results/ood/{wildcards.experiment}/{stages[-1]}/best.pt"


def grid_metrics(wildcards):
    if not GRID_RUNS:
        raise WorkflowError(
            "config key `grid.params` is empty; give dotted experiment keys and lists of values "
            "in a config file (--configfile), e.g. grid: {params: {stages.stage2.lr: [0.001, 0.0003]}}"
        )
    return [
        f"results/grid/{run_id}/{final_stage(f'grid/{run_id}')}/metrics.json"
        for run_id in GRID_RUNS
    ]


def kfold_files(name, kind):
    """Per-fold files of a k-fold experiment, fold 0 first."""
    runs = [f"kfold/{name}/fold_{k}" for k in range(config["n_folds"])]
    if kind == "metrics":
        return [f"results/{run}/{final_stage(run)}/metrics.json" for run in runs]
    if kind == "summary":
        return [f"results/{run}/summary.json" for run in runs]
    return [f"results/{run}/predictions/predictions.csv" for run in runs]
