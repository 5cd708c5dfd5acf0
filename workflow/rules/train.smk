# Model jobs of every run (labelflow.runs): train a stage, the LR finder of a stage, and
# inference of the final model over the run's images.


rule train_stage:
    input:
        unpack(train_inputs),
    output:
        best="results/{run}/{stage}/best.pt",
        last="results/{run}/{stage}/last.pt",
        metrics="results/{run}/{stage}/metrics.json",
        checkpoints=directory("results/{run}/{stage}/checkpoints"),
        tensorboard=directory("results/{run}/{stage}/tensorboard"),
    log:
        "results/logs/{run}/{stage}.log",
    benchmark:
        "results/benchmarks/{run}/{stage}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        code=code_of("train_stage"),
        run=run_params,
        seed=config["seed"],
        out_dir=subpath(output.best, parent=True),
        # resumable training state; not an output, so a failed job keeps it
        state_dir="results/{run}/state/{stage}",
        state_every_seconds=config["training"]["state_every_seconds"],
    script:
        "../scripts/train_stage.py"


rule lrfinder_stage:
    input:
        unpack(stage_inputs),
    output:
        table="results/{run}/lrfinder/{stage}/lr_loss.csv",
        suggestion="results/{run}/lrfinder/{stage}/suggestion.json",
        plot=report(
            "results/{run}/lrfinder/{stage}/lrfinder.png",
            caption="../report/lrfinder.rst",
            category="LR finder",
            subcategory="{run}",
        ),
        tensorboard=directory("results/{run}/lrfinder/{stage}/tensorboard"),
    log:
        "results/logs/{run}/lrfinder_{stage}.log",
    benchmark:
        "results/benchmarks/{run}/lrfinder_{stage}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        code=code_of("lrfinder"),
        run=run_params,
        seed=config["seed"],
        finder=config["lrfinder"],
    script:
        "../scripts/lrfinder.py"


rule infer:
    input:
        unpack(infer_inputs),
    output:
        logits="results/{run}/predictions/logits.npy",
        probabilities="results/{run}/predictions/probabilities.npy",
        embeddings="results/{run}/predictions/embeddings.npy",
        predictions="results/{run}/predictions/predictions.csv",
        heads="results/{run}/predictions/heads.csv",
    log:
        "results/logs/{run}/infer.log",
    benchmark:
        "results/benchmarks/{run}/infer.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        code=code_of("infer"),
        run=run_params,
        seed=config["seed"],
        batch_size=config["infer_batch_size"],
        out_dir=subpath(output.predictions, parent=True),
    script:
        "../scripts/infer.py"


rule calibrate:
    input:
        predictions="results/{run}/predictions/predictions.csv",
        logits="results/{run}/predictions/logits.npy",
        tag2cls=lambda wildcards: run_of(wildcards).data.tag2cls,
    output:
        "results/{run}/calibration.json",
    log:
        "results/logs/{run}/calibrate.log",
    benchmark:
        "results/benchmarks/{run}/calibrate.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("calibrate"),
        run=run_params,
        seed=config["seed"],
        settings=config["calibration"],
    script:
        "../scripts/calibrate.py"
