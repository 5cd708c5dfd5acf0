# A trained run applied outside training: predict image sets, evaluate on labelled sets, export
# for serving (labelflow.predict, labelflow.evaluate, labelflow.export; the same functions as
# the `labelflow predict|evaluate|export` commands). Targets (not part of `all`): predict_all,
# evaluate_all, export.


rule predict_set:
    input:
        unpack(trained_model_files),
        source=predict_source,
    output:
        "results/{run}/predict/{imageset}.csv",
    log:
        "results/logs/{run}/predict_{imageset}.log",
    benchmark:
        "results/benchmarks/{run}/predict_{imageset}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        code=code_of("predict"),
        content=lambda wildcards: content_of(predict_source(wildcards)),
        top_k=config["predict"]["top_k"],
        batch_size=config["predict"]["batch_size"],
    script:
        "../scripts/predict.py"


rule evaluate_set:
    input:
        unpack(trained_model_files),
        source=evaluate_source,
    output:
        metrics="results/{run}/eval/{imageset}/metrics.json",
        confusion=report(
            "results/{run}/eval/{imageset}/confusion.png",
            caption="../report/eval_confusion.rst",
            category="Evaluation",
            subcategory="{run}",
        ),
        predictions="results/{run}/eval/{imageset}/predictions.csv",
        errors="results/{run}/eval/{imageset}/errors.csv",
        sheet=directory("results/{run}/eval/{imageset}/errors"),
    log:
        "results/logs/{run}/evaluate_{imageset}.log",
    benchmark:
        "results/benchmarks/{run}/evaluate_{imageset}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        code=code_of("evaluate"),
        content=lambda wildcards: content_of(evaluate_source(wildcards)),
        batch_size=config["evaluate"]["batch_size"],
        out_dir=subpath(output.metrics, parent=True),
    script:
        "../scripts/evaluate.py"


rule export_model:
    input:
        unpack(trained_model_files),
    output:
        directory("results/{run}/export"),
    log:
        "results/logs/{run}/export.log",
    conda:
        "../../envs/export.yaml"
    threads: config["threads"]
    params:
        code=code_of("export"),
        format=config["export"]["format"],
    script:
        "../scripts/export.py"


rule predict_all:
    input:
        lambda wildcards: use_targets(
            "predict", "results/{experiment}/predict/{name}.csv"
        ),


rule evaluate_all:
    input:
        lambda wildcards: use_targets(
            "evaluate", "results/{experiment}/eval/{name}/metrics.json"
        ),


rule export:
    input:
        lambda wildcards: f"results/{use_experiment('export')}/export",


rule test_evaluation:
    input:
        unpack(trained_model_files),
        table="results/data/test.csv",
    output:
        metrics="results/{run}/test.json",
        details=directory("results/{run}/test"),
    log:
        "results/logs/{run}/test_evaluation.log",
    benchmark:
        "results/benchmarks/{run}/test_evaluation.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        code=code_of("test_evaluation"),
        root=config["test_dataset"] or DATASET,
        batch_size=config["evaluate"]["batch_size"],
    script:
        "../scripts/test_evaluation.py"
