# Input functions and helpers of workflow/rules/label_issues.smk; no rules here.

from labelflow.cleaning import LabelIssueSettings
from labelflow.runs import CLEANED_TABLE, CORRECTED_TABLE, DATASET_TABLE

LABEL_ISSUES = "results/label_issues"
AUTOLABEL_CORRECTED = "results/autolabel/data/corrected"
REVIEW = "results/autolabel/review"
# the test images held out of `dataset` (written by split)
HELD_OUT = "results/data/held_out.csv"

if config["corrections"] and not os.path.isfile(config["corrections"]):
    raise WorkflowError(
        f"config key `corrections`: file {config['corrections']!r} does not exist; give a CSV "
        "path,label (label `drop` removes the image) or set it to null"
    )
try:
    LABEL_ISSUE_SETTINGS = LabelIssueSettings.from_config(config["label_issues"])
except DatasetError as exc:
    raise WorkflowError(str(exc)) from None


def corrections_file(wildcards):
    """The corrections CSV, as an `ancient` input: its modification time alone reruns nothing;
    the rows that apply to a table do (`corrections_rows`, a param)."""
    if not config["corrections"]:
        raise WorkflowError(
            "config key `corrections` is not set; name a CSV path,label of human corrections"
        )
    return ancient(config["corrections"])


def corrections_rows(table):
    """Param: digest of the corrections rows that apply to `table` ("main": the training
    table, "test": the held-out test table, or "autolabel";
    labelflow.corrections.applying_rows_digest). Split's held-out table parts the main
    dataset's rows, so a test-set correction does not rerun the training; Snakemake evaluates
    params again just before a job runs, so a first run records them after split."""

    def digest(wildcards):
        from labelflow.corrections import applying_rows_digest

        try:
            if table == "autolabel":
                return applying_rows_digest(config["corrections"])
            return applying_rows_digest(
                config["corrections"], DATASET, HELD_OUT, test=table == "test"
            )
        except DatasetError as exc:
            raise WorkflowError(str(exc)) from None

    return digest


def label_issues_experiment():
    """The k-fold experiment whose out-of-fold predictions are scored (`label_issues.experiment`)."""
    name = (
        LABEL_ISSUE_SETTINGS.experiment
        or (config["kfold"]["experiments"] or EXPERIMENTS)[0]
    )
    if not RUNS.kfold_runs(name):
        raise WorkflowError(
            f"config key `label_issues.experiment`: {name!r} has no k-fold runs; list it in "
            "config key `kfold.experiments` (label issues need out-of-fold predictions)"
        )
    return name


def label_issues_inputs(wildcards):
    """Out-of-fold predictions and probabilities; per fold (with neighbours) the fold model's
    embeddings of its images and its index of training images."""
    name = label_issues_experiment()
    inputs = {
        "oof": f"results/kfold/{name}/oof_predictions.csv",
        "oof_probabilities": f"results/kfold/{name}/oof_probabilities.npy",
        "tag2cls": "results/data/tag2cls.json",
    }
    if LABEL_ISSUE_SETTINGS.neighbours:
        for key, parts in FOLD_FILES.items():
            inputs[key] = [run.path(*parts) for run in RUNS.kfold_runs(name)]
    return inputs


# what label_issues reads of each fold run (keys: labelflow.cleaning.fold_neighbours)
FOLD_FILES = {
    "predictions_csv": ("predictions", "predictions.csv"),
    "embeddings_npy": ("predictions", "embeddings.npy"),
    "transform_npz": ("index", "transform.npz"),
    "index_bin": ("index", "knn.hnsw.bin"),
    "index_json": ("index", "index.json"),
}


def cleaned_table_inputs(wildcards):
    if LABEL_ISSUE_SETTINGS.action == "report":
        raise WorkflowError(
            "config key `label_issues.action` is `report`: nothing trains on a cleaned table; set it "
            "to drop or relabel (e.g. --config 'label_issues={action: relabel}')"
        )
    return {
        "dataset": MAIN_TABLE,
        "scores": f"{LABEL_ISSUES}/scores.csv",
        "tag2cls": "results/data/tag2cls.json",
    }


def label_issues_targets(wildcards):
    """What `snakemake label_issues` makes: the tables, the sheet, and with action drop or
    relabel the summary of the run trained on the cleaned table."""
    targets = [
        f"{LABEL_ISSUES}/issues.csv",
        f"{LABEL_ISSUES}/scores.csv",
        f"{LABEL_ISSUES}/summary.json",
        f"{LABEL_ISSUES}/sheet",
    ]
    if LABEL_ISSUE_SETTINGS.action != "report":
        targets.append(f"results/cleaned/{label_issues_experiment()}/summary.json")
    return targets


def autolabel_human_table():
    """human.csv of the autolabel piles, after the corrections when they are configured."""
    if config["corrections"]:
        return f"{AUTOLABEL_CORRECTED}/human.csv"
    return f"{AUTOLABEL_DATA}/human.csv"


def autolabel_raw_table():
    """raw.csv of the autolabel piles, after the corrections when they are configured."""
    if config["corrections"]:
        return f"{AUTOLABEL_CORRECTED}/raw.csv"
    return f"{AUTOLABEL_DATA}/raw.csv"


def review_inputs(wildcards):
    """The labelled set, the images left, the last round's model and temperature, and what the
    pool leaves out: raw.csv (copies of clean images whose labels disagree) and, when set, the
    corrections file (images answered already)."""
    last = len(autolabel_rounds(wildcards)["status"]) - 1
    run = round_run(last)
    inputs = {
        "dataset": "results/autolabel/dataset.csv",
        "unlabelled": "results/autolabel/unlabelled.csv",
        "checkpoint": run.checkpoint(),
        "metrics": f"results/autolabel/round_{last}/metrics.json",
        "tag2cls": run.data.tag2cls,
        "root": run.data.root,
        "raw": autolabel_raw_table(),
    }
    if config["corrections"]:
        # ancient: its answers reach the pool through dataset.csv (autolabel_corrections' rows digest)
        inputs["corrections"] = corrections_file(wildcards)
    return inputs


def review_data_cfg(wildcards):
    """How the last round's model sees images (its experiment's `data` section)."""
    return round_run(0).experiment["data"]
