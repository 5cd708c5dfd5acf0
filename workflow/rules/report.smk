# Summaries and comparisons: summary.json of every run, the experiments table (default
# target), and the LR finder, grid and k-fold targets.


rule summary:
    input:
        unpack(summary_inputs),
    output:
        summary="results/{run}/summary.json",
        confusion=report(
            directory("results/{run}/confusion"),
            patterns=["{head}.png"],
            caption="../report/confusion_matrix.rst",
            category="Classification",
            subcategory="{run}",
        ),
        tensorboard=directory("results/{run}/summary_tensorboard"),
    log:
        "results/logs/{run}/summary.log",
    benchmark:
        "results/benchmarks/{run}/summary.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("summary"),
        stages=lambda wildcards: run_of(wildcards).stages,
    script:
        "../scripts/summary.py"


rule compare_experiments:
    input:
        summaries=expand("results/{run}/summary.json", run=EXPERIMENTS),
        stage_metrics=[
            f for name in EXPERIMENTS for f in stage_metrics_files(RUNS[name])
        ],
        # the held-out test set, when one is configured (test_fraction or test_dataset)
        tests=expand(
            "results/{run}/test.json", run=EXPERIMENTS if TEST.configured else []
        ),
    output:
        table="results/experiments.csv",
        plot=report(
            "results/experiments.png",
            caption="../report/experiments.rst",
            category="Comparison",
        ),
    log:
        "results/logs/compare_experiments.log",
    benchmark:
        "results/benchmarks/compare_experiments.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("compare_experiments"),
        stage_metrics={name: stage_metrics_files(RUNS[name]) for name in EXPERIMENTS},
    script:
        "../scripts/compare_experiments.py"


rule lrfinder:
    input:
        [
            RUNS[name].path("lrfinder", stage, "suggestion.json")
            for name in EXPERIMENTS
            for stage in RUNS[name].stages
        ],


rule kfold_summary:
    input:
        unpack(kfold_inputs),
    output:
        table="results/kfold/{experiment}/summary.csv",
        summary="results/kfold/{experiment}/summary.json",
        plot=report(
            "results/kfold/{experiment}/kfold.png",
            caption="../report/kfold.rst",
            category="K-fold",
        ),
        oof="results/kfold/{experiment}/oof_predictions.csv",
        # row i: the class probabilities of row i of oof_predictions.csv
        oof_probabilities="results/kfold/{experiment}/oof_probabilities.npy",
    log:
        "results/logs/kfold/{experiment}/summary.log",
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("kfold_summary"),
    script:
        "../scripts/kfold_summary.py"


rule kfold:
    input:
        expand(
            "results/kfold/{experiment}/summary.json",
            experiment=config["kfold"]["experiments"] or EXPERIMENTS[:1],
        ),


rule grid_comparison:
    input:
        metrics=grid_metrics,
        predictions=lambda wildcards: [
            RUNS[f"grid/{grid_id}"].path("predictions", "predictions.csv")
            for grid_id in RUNS.grid
        ],
    output:
        table="results/grid/comparison.csv",
        plot=report(
            "results/grid/comparison.png",
            caption="../report/grid.rst",
            category="Grid search",
        ),
        configs=[f"results/grid/{grid_id}/experiment.yaml" for grid_id in RUNS.grid],
        tensorboard=directory("results/grid/tensorboard"),
    log:
        "results/logs/grid/comparison.log",
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("grid_comparison"),
        runs=RUNS.grid,
    script:
        "../scripts/grid_comparison.py"


rule grid:
    input:
        "results/grid/comparison.csv",
