rule train_stage:
    input:
        unpack(train_inputs),
    output:
        best="results/{experiment}/{stage}/best.pt",
        last="results/{experiment}/{stage}/last.pt",
        metrics="results/{experiment}/{stage}/metrics.json",
        checkpoints=directory("results/{experiment}/{stage}/checkpoints"),
        tensorboard=directory("results/{experiment}/{stage}/tensorboard"),
    log:
        "results/logs/{experiment}/{stage}.log",
    benchmark:
        "results/benchmarks/{experiment}/{stage}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        experiment=run_experiment,
        valid_folds=run_valid_folds,
        seed=config["seed"],
        out_dir=subpath(output.best, parent=True),
        # resumable training state; not an output, so a failed job keeps it
        state_dir="results/{experiment}/state/{stage}",
    script:
        "../scripts/train_stage.py"


rule infer:
    input:
        checkpoint=final_checkpoint,
        dataset="results/data/dataset.csv",
        labeling="results/data/tag2cls.json",
        root=DATASET,
    output:
        logits="results/{experiment}/predictions/logits.npy",
        probabilities="results/{experiment}/predictions/probabilities.npy",
        embeddings="results/{experiment}/predictions/embeddings.npy",
        predictions="results/{experiment}/predictions/predictions.csv",
        heads="results/{experiment}/predictions/heads.csv",
    log:
        "results/logs/{experiment}/infer.log",
    benchmark:
        "results/benchmarks/{experiment}/infer.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        experiment=run_experiment,
        valid_folds=run_valid_folds,
        seed=config["seed"],
        batch_size=config["infer_batch_size"],
        out_dir=subpath(output.predictions, parent=True),
    script:
        "../scripts/infer.py"
