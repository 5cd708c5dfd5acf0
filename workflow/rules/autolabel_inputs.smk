# Input functions and helpers of workflow/rules/autolabel.smk; no rules here.
import json

from labelflow.autolabel.policy import RoundSettings, check_class_min_confidence
from labelflow.runs import AUTOLABEL_DATA, AUTOLABEL_ROOT, AUTOLABEL_TAG2CLS


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
    try:  # before any job runs; the policy checks its input again when it decides
        check_class_min_confidence(settings["class_min_confidence"], classes)
    except DatasetError as exc:
        raise WorkflowError(f"{exc} (folder {folders['clean']!r})") from None
    return folders


def round_run(round_):
    return run_named(f"autolabel/round_{round_}")


def is_last_round(wildcards):
    return int(wildcards.round) + 1 >= config["autolabel"]["max_rounds"]


def autolabel_round_dataset_inputs(wildcards):
    """Human rows, the pseudo-labels accepted by every earlier round, and raw.csv (their sha1)."""
    return {
        "human": autolabel_human_table(),
        "raw": autolabel_raw_table(),
        "tag2cls": AUTOLABEL_TAG2CLS,
        "accepted": [
            f"results/autolabel/round_{r}/accepted.csv"
            for r in range(int(wildcards.round))
        ],
    }


def autolabel_round_inputs(wildcards):
    run = round_run(wildcards.round)
    return {
        "checkpoint": run.checkpoint(),
        "dataset": run.data.table,
        "raw": autolabel_raw_table(),
        "tag2cls": run.data.tag2cls,
        "root": run.data.root,
    }


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
        "human": autolabel_human_table(),
        "raw": autolabel_raw_table(),
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
        "raw": autolabel_raw_table(),
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
