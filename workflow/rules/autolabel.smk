# Autolabel loop (target `autolabel`): human labels in autolabel.clean + the unlabelled pile in
# autolabel.raw → round 0, 1, ... (train, predict, calibrate, accept) until a round's status
# says stop → results/autolabel/dataset.csv. Rounds are driven by the checkpoint
# `autolabel_round`; the input function `autolabel_rounds` (common.smk) walks them.


rule autolabel_prepare:
    input:
        unpack(autolabel_folders),
    output:
        root=directory("results/autolabel/root"),
        human="results/autolabel/data/human.csv",
        labeling="results/autolabel/data/tag2cls.json",
        raw="results/autolabel/data/raw.csv",
        skipped="results/autolabel/skipped.csv",
    log:
        "results/logs/autolabel/prepare.log",
    conda:
        "../../envs/torch.yaml"
    params:
        n_folds=config["n_folds"],
        seed=config["seed"],
    script:
        "../scripts/autolabel_prepare.py"


rule autolabel_round_dataset:
    input:
        unpack(autolabel_round_dataset_inputs),
    output:
        "results/autolabel/round_{round}/dataset.csv",
    log:
        "results/logs/autolabel/round_{round}/dataset.log",
    wildcard_constraints:
        round=r"\d+",
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/autolabel_round_dataset.py"


rule autolabel_train:
    input:
        unpack(autolabel_train_inputs),
    output:
        best="results/autolabel/round_{round}/{stage}/best.pt",
        last="results/autolabel/round_{round}/{stage}/last.pt",
        metrics="results/autolabel/round_{round}/{stage}/metrics.json",
        checkpoints=directory("results/autolabel/round_{round}/{stage}/checkpoints"),
        tensorboard=directory("results/autolabel/round_{round}/{stage}/tensorboard"),
    log:
        "results/logs/autolabel/round_{round}/{stage}.log",
    wildcard_constraints:
        round=r"\d+",
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        experiment=lambda wildcards: autolabel_experiment(),
        valid_folds=VALID_FOLDS,
        seed=config["seed"],
        out_dir=subpath(output.best, parent=True),
        # resumable training state; not an output, so a failed job keeps it
        state_dir="results/autolabel/state/round_{round}/{stage}",
        experiment_name="autolabel round {round}",
    script:
        "../scripts/train_stage.py"


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
    wildcard_constraints:
        round=r"\d+",
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        experiment=lambda wildcards: autolabel_experiment(),
        valid_folds=VALID_FOLDS,
        threshold=config["autolabel"]["threshold"],
        class_thresholds=config["autolabel"]["class_thresholds"],
        min_temperature=config["autolabel"]["min_temperature"],
        max_new_per_class=config["autolabel"]["max_new_per_class"],
        neighbours=config["autolabel"]["neighbours"],
        last_round=autolabel_is_last_round,
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
        mode=config["autolabel"]["materialize"],
    script:
        "../scripts/autolabel_materialize.py"


rule autolabel:
    input:
        autolabel_targets,
