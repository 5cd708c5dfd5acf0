rule lrfinder_stage:
    input:
        unpack(stage_inputs),
    output:
        table="results/{experiment}/lrfinder/{stage}/lr_loss.csv",
        suggestion="results/{experiment}/lrfinder/{stage}/suggestion.json",
        plot=report(
            "results/{experiment}/lrfinder/{stage}/lrfinder.png",
            caption="../report/lrfinder.rst",
            category="LR finder",
            subcategory="{experiment}",
        ),
        tensorboard=directory("results/{experiment}/lrfinder/{stage}/tensorboard"),
    log:
        "results/logs/{experiment}/lrfinder_{stage}.log",
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        experiment=run_experiment,
        valid_folds=run_valid_folds,
        seed=config["seed"],
        finder=config["lrfinder"],
    script:
        "../scripts/lrfinder.py"


rule lrfinder:
    input:
        [
            f"results/{name}/lrfinder/{stage}/suggestion.json"
            for name in EXPERIMENTS
            for stage in stage_names(name)
        ],


rule kfold_summary:
    input:
        metrics=lambda wildcards: kfold_files(wildcards.name, "metrics"),
        summaries=lambda wildcards: kfold_files(wildcards.name, "summary"),
        predictions=lambda wildcards: kfold_files(wildcards.name, "predictions"),
    output:
        table="results/kfold/{name}/summary.csv",
        summary="results/kfold/{name}/summary.json",
        plot=report(
            "results/kfold/{name}/kfold.png",
            caption="../report/kfold.rst",
            category="K-fold",
        ),
        oof="results/kfold/{name}/oof_predictions.csv",
    log:
        "results/logs/kfold/{name}/summary.log",
    wildcard_constraints:
        name="|".join(re.escape(name) for name in KFOLD_EXPERIMENTS) or "(?!)",
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/kfold_summary.py"


rule kfold:
    input:
        expand("results/kfold/{name}/summary.json", name=KFOLD_EXPERIMENTS),


rule grid_comparison:
    input:
        metrics=grid_metrics,
    output:
        table="results/grid/comparison.csv",
        plot=report(
            "results/grid/comparison.png",
            caption="../report/grid.rst",
            category="Grid search",
        ),
        configs=[f"results/grid/{run_id}/experiment.yaml" for run_id in GRID_RUNS],
        tensorboard=directory("results/grid/tensorboard"),
    log:
        "results/logs/grid/comparison.log",
    conda:
        "../../envs/torch.yaml"
    params:
        runs=GRID_RUNS,
    script:
        "../scripts/grid_comparison.py"


rule grid:
    input:
        "results/grid/comparison.csv",
