rule summary:
    input:
        dataset="results/data/dataset.csv",
        labeling="results/data/tag2cls.json",
        predictions="results/{experiment}/predictions/predictions.csv",
        logits="results/{experiment}/predictions/logits.npy",
        heads="results/{experiment}/predictions/heads.csv",
        checkpoint=final_checkpoint,
        stage_metrics=all_stage_metrics,
        index_metrics="results/{experiment}/index/recall.json",
    output:
        summary="results/{experiment}/summary.json",
        confusion=report(
            directory("results/{experiment}/confusion"),
            patterns=["{head}.png"],
            caption="../report/confusion_matrix.rst",
            category="Classification",
            subcategory="{experiment}",
        ),
        tensorboard=directory("results/{experiment}/summary_tensorboard"),
    log:
        "results/logs/{experiment}/summary.log",
    benchmark:
        "results/benchmarks/{experiment}/summary.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        stages=lambda wildcards: stage_names(wildcards.experiment),
    script:
        "../scripts/summary.py"


rule compare_experiments:
    input:
        summaries=expand("results/{experiment}/summary.json", experiment=EXPERIMENTS),
        stage_metrics=[
            f"results/{name}/{stage}/metrics.json"
            for name in EXPERIMENTS
            for stage in stage_names(name)
        ],
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
        stage_metrics={
            name: [
                f"results/{name}/{stage}/metrics.json" for stage in stage_names(name)
            ]
            for name in EXPERIMENTS
        },
    script:
        "../scripts/compare_experiments.py"
