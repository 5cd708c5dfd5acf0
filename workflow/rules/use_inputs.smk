# Input functions of workflow/rules/use.smk (predict, evaluate and export a trained run); no rules.


def use_experiment(section):
    """The experiment a `predict`, `evaluate` or `export` section names (null: the first)."""
    name = config[section]["experiment"] or EXPERIMENTS[0]
    if name not in EXPERIMENTS:
        raise WorkflowError(
            f"config key `{section}.experiment`: {name!r} is not one of `experiments` "
            f"{EXPERIMENTS}; its model must be trained by this workflow"
        )
    return name


def trained_model_files(wildcards):
    """What labelflow.trained.load_trained reads: the rejection card (checkpoint, preprocessing,
    classes, index), the calibrated temperature, the run's summary; and the checkpoint itself.
    """
    run = run_of(wildcards)
    return {
        "rejection": run.path("index", "rejection.json"),
        "calibration": run.path("calibration.json"),
        "summary": run.path("summary.json"),
        "checkpoint": run.checkpoint(),
    }


def use_set_source(section, name):
    sets = config[section]["sets"]
    if name not in sets:
        raise WorkflowError(
            f"no image set {name!r} in config key `{section}.sets` ({sorted(sets)})"
        )
    path = sets[name]
    if not os.path.exists(path):
        raise WorkflowError(
            f"config key `{section}.sets.{name}`: {path!r} does not exist; give a folder "
            "or a CSV"
        )
    return path


def predict_source(wildcards):
    return use_set_source("predict", wildcards.imageset)


def evaluate_source(wildcards):
    return use_set_source("evaluate", wildcards.imageset)


def use_targets(section, pattern):
    """`pattern` (with {experiment} and {name}) for every set of config `section`."""
    sets = config[section]["sets"]
    if not sets:
        raise WorkflowError(
            f"config key `{section}.sets` is empty; name the sets, e.g. "
            f"--config '{section}={{sets: {{new: data/new_images}}}}'"
        )
    experiment = use_experiment(section)
    return [pattern.format(experiment=experiment, name=name) for name in sets]
