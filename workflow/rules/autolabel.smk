# Autolabel loop (target `autolabel`): human labels in autolabel.clean + the unlabelled pile in
# autolabel.raw → round 0, 1, ... until a round's status says stop → results/autolabel/dataset.csv.
# Each round is the run autolabel/round_<r> (labelflow.runs): the ordinary train_stage rule
# trains it on the round's table; the checkpoint `autolabel_round` predicts, calibrates and
# accepts. Helpers run only when an autolabel target is requested, so an unconfigured
# `autolabel:` section never breaks the default workflow.


rule autolabel_prepare:
    input:
        unpack(autolabel_folders),
    output:
        root=directory(AUTOLABEL_ROOT),
        human=f"{AUTOLABEL_DATA}/human.csv",
        tag2cls=AUTOLABEL_TAG2CLS,
        raw=f"{AUTOLABEL_DATA}/raw.csv",
        skipped="results/autolabel/skipped.csv",
    log:
        "results/logs/autolabel/prepare.log",
    benchmark:
        "results/benchmarks/autolabel/prepare.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("autolabel_prepare"),
        content=lambda wildcards: {
            key: content_of(path) for key, path in autolabel_folders(wildcards).items()
        },
        n_folds=config["n_folds"],
        seed=config["seed"],
        duplicates=config["duplicates"],
    script:
        "../scripts/autolabel_prepare.py"


rule autolabel_round_dataset:
    input:
        unpack(autolabel_round_dataset_inputs),
    output:
        "results/autolabel/round_{round}/dataset.csv",
    log:
        "results/logs/autolabel/round_{round}/dataset.log",
    benchmark:
        "results/benchmarks/autolabel/round_{round}/dataset.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("autolabel_round_dataset"),
    script:
        "../scripts/autolabel_round_dataset.py"


checkpoint autolabel_round:
    input:
        unpack(autolabel_round_inputs),
    output:
        status="results/autolabel/round_{round}/status.json",
        accepted="results/autolabel/round_{round}/accepted.csv",
        predictions="results/autolabel/round_{round}/predictions.csv",
        counts="results/autolabel/round_{round}/counts.csv",
        metrics="results/autolabel/round_{round}/metrics.json",
    log:
        "results/logs/autolabel/round_{round}/round.log",
    benchmark:
        "results/benchmarks/autolabel/round_{round}/round.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        code=code_of("autolabel_round"),
        run=lambda wildcards: params_of(round_run(wildcards.round)),
        settings=RoundSettings.keys_of(config["autolabel"]),
        calibration=config["calibration"],
        seed=config["seed"],
        last_round=is_last_round,
        batch_size=config["infer_batch_size"],
    script:
        "../scripts/autolabel_round.py"


rule autolabel_dataset:
    input:
        unpack(autolabel_rounds),
    output:
        dataset="results/autolabel/dataset.csv",
        unlabelled="results/autolabel/unlabelled.csv",
        rounds="results/autolabel/rounds.csv",
    log:
        "results/logs/autolabel/dataset.log",
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("autolabel_dataset"),
    script:
        "../scripts/autolabel_dataset.py"


rule autolabel_progress:
    input:
        "results/autolabel/rounds.csv",
    output:
        report(
            "results/autolabel/progress.png",
            caption="../report/autolabel_progress.rst",
            category="Autolabel",
        ),
    log:
        "results/logs/autolabel/progress.log",
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("autolabel_progress"),
    script:
        "../scripts/autolabel_progress.py"


rule autolabel_evaluate:
    input:
        unpack(autolabel_evaluation_inputs),
    output:
        "results/autolabel/evaluation.json",
    log:
        "results/logs/autolabel/evaluate.log",
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("autolabel_evaluate"),
    script:
        "../scripts/autolabel_evaluate.py"


rule autolabel_materialize:
    input:
        dataset="results/autolabel/dataset.csv",
        root="results/autolabel/root",
    output:
        directory("results/autolabel/dataset"),
    log:
        "results/logs/autolabel/materialize.log",
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("autolabel_materialize"),
        mode=config["autolabel"]["materialize"],
    script:
        "../scripts/autolabel_materialize.py"


rule autolabel:
    input:
        autolabel_targets,
