# Embeddings of any image set, TensorBoard projector, 2-D picture, similarity search with
# out-of-class rejection, and the out-of-class (OOD) evaluation.
# Targets (not part of `all`): embed_all, query_all, projector, ood.

if "ood" in EXPERIMENTS:
    raise WorkflowError(
        "an experiment may not be called 'ood': results/ood/ holds the out-of-class runs"
    )


rule embed:
    input:
        checkpoint=final_checkpoint,
        labeling="results/data/tag2cls.json",
        source=embed_set_source,
    output:
        embeddings="results/{experiment}/embeddings/{imageset}/embeddings.npy",
        table="results/{experiment}/embeddings/{imageset}/index.csv",
    log:
        "results/logs/{experiment}/embed_{imageset}.log",
    wildcard_constraints:
        imageset=r"[^/]+",
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        data=lambda wildcards: run_experiment(wildcards)["data"],
        batch_size=config["embed"]["batch_size"],
        out_dir=subpath(output.embeddings, parent=True),
    script:
        "../scripts/embed.py"


rule rejection:
    input:
        predictions="results/{experiment}/predictions/predictions.csv",
        embeddings="results/{experiment}/predictions/embeddings.npy",
        transform="results/{experiment}/index/transform.npz",
        index="results/{experiment}/index/knn.hnsw.bin",
        info="results/{experiment}/index/index.json",
        labeling="results/data/tag2cls.json",
        checkpoint=final_checkpoint,
    output:
        "results/{experiment}/index/rejection.json",
    log:
        "results/logs/{experiment}/rejection.log",
    conda:
        "../../envs/index.yaml"
    params:
        data=lambda wildcards: run_experiment(wildcards)["data"],
        quantile=config["query"]["rejection_quantile"],
        k=config["query"]["k"],
        vote_k=config["index"]["vote_k"],
    script:
        "../scripts/rejection.py"


rule query_set:
    input:
        rejection="results/{experiment}/index/rejection.json",
        embeddings="results/{experiment}/embeddings/{imageset}/embeddings.npy",
        table="results/{experiment}/embeddings/{imageset}/index.csv",
    output:
        "results/{experiment}/queries/{imageset}.csv",
    log:
        "results/logs/{experiment}/query_{imageset}.log",
    wildcard_constraints:
        imageset=r"[^/]+",
    conda:
        "../../envs/index.yaml"
    params:
        k=config["query"]["k"],
    script:
        "../scripts/query.py"


rule tensorboard_projector:
    input:
        predictions="results/{experiment}/predictions/predictions.csv",
        embeddings="results/{experiment}/predictions/embeddings.npy",
        labeling="results/data/tag2cls.json",
        root=DATASET,
    output:
        directory("results/{experiment}/projector"),
    log:
        "results/logs/{experiment}/projector.log",
    conda:
        "../../envs/torch.yaml"
    params:
        max_images=config["projector"]["max_images"],
        thumbnail_size=config["projector"]["thumbnail_size"],
        seed=config["seed"],
    script:
        "../scripts/projector.py"


rule embedding_plot:
    input:
        predictions="results/{experiment}/predictions/predictions.csv",
        embeddings="results/{experiment}/predictions/embeddings.npy",
        labeling="results/data/tag2cls.json",
    output:
        report(
            "results/{experiment}/embeddings_2d.png",
            caption="../report/embeddings_2d.rst",
            category="Embeddings",
            subcategory="{experiment}",
        ),
    log:
        "results/logs/{experiment}/embedding_plot.log",
    conda:
        "../../envs/torch.yaml"
    params:
        seed=config["seed"],
    script:
        "../scripts/embedding_plot.py"


# ---- out-of-class evaluation: the same steps on the dataset without `ood.classes`


rule ood_dataset:
    input:
        dataset="results/data/dataset.csv",
        labeling="results/data/tag2cls.json",
    output:
        dataset="results/ood/data/dataset.csv",
        labeling="results/ood/data/tag2cls.json",
        heldout="results/ood/data/heldout.csv",
    log:
        "results/logs/ood/dataset.log",
    conda:
        "../../envs/torch.yaml"
    params:
        classes=config["ood"]["classes"],
    script:
        "../scripts/ood_dataset.py"


rule ood_train_stage:
    input:
        unpack(ood_stage_inputs),
    output:
        best="results/ood/{experiment}/{stage}/best.pt",
        last="results/ood/{experiment}/{stage}/last.pt",
        metrics="results/ood/{experiment}/{stage}/metrics.json",
        checkpoints=directory("results/ood/{experiment}/{stage}/checkpoints"),
        tensorboard=directory("results/ood/{experiment}/{stage}/tensorboard"),
    log:
        "results/logs/ood/{experiment}/{stage}.log",
    wildcard_constraints:
        experiment=r"[A-Za-z0-9_.-]+",
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        experiment=lambda wildcards: ood_experiment(wildcards.experiment),
        valid_folds=VALID_FOLDS,
        seed=config["seed"],
        out_dir=subpath(output.best, parent=True),
        # resumable training state; not an output, so a failed job keeps it
        state_dir="results/ood/{experiment}/state/{stage}",
    script:
        "../scripts/train_stage.py"


rule ood_infer:
    input:
        checkpoint=ood_final_checkpoint,
        dataset="results/ood/data/dataset.csv",
        labeling="results/ood/data/tag2cls.json",
        root=DATASET,
    output:
        logits="results/ood/{experiment}/predictions/logits.npy",
        probabilities="results/ood/{experiment}/predictions/probabilities.npy",
        embeddings="results/ood/{experiment}/predictions/embeddings.npy",
        predictions="results/ood/{experiment}/predictions/predictions.csv",
        heads="results/ood/{experiment}/predictions/heads.csv",
    log:
        "results/logs/ood/{experiment}/infer.log",
    wildcard_constraints:
        experiment=r"[A-Za-z0-9_.-]+",
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        experiment=lambda wildcards: ood_experiment(wildcards.experiment),
        valid_folds=VALID_FOLDS,
        seed=config["seed"],
        batch_size=config["infer_batch_size"],
        out_dir=subpath(output.predictions, parent=True),
    script:
        "../scripts/infer.py"


rule ood_pca_index:
    input:
        predictions="results/ood/{experiment}/predictions/predictions.csv",
        embeddings="results/ood/{experiment}/predictions/embeddings.npy",
    output:
        transform="results/ood/{experiment}/index/transform.npz",
        index="results/ood/{experiment}/index/knn.hnsw.bin",
        info="results/ood/{experiment}/index/index.json",
    log:
        "results/logs/ood/{experiment}/pca_index.log",
    wildcard_constraints:
        experiment=r"[A-Za-z0-9_.-]+",
    conda:
        "../../envs/index.yaml"
    params:
        index={
            key: config["index"][key]
            for key in ("n_components", "space", "M", "ef_construction", "ef")
        },
        seed=config["seed"],
    script:
        "../scripts/pca_index.py"


rule ood_rejection:
    input:
        predictions="results/ood/{experiment}/predictions/predictions.csv",
        embeddings="results/ood/{experiment}/predictions/embeddings.npy",
        transform="results/ood/{experiment}/index/transform.npz",
        index="results/ood/{experiment}/index/knn.hnsw.bin",
        info="results/ood/{experiment}/index/index.json",
        labeling="results/ood/data/tag2cls.json",
        checkpoint=ood_final_checkpoint,
    output:
        "results/ood/{experiment}/index/rejection.json",
    log:
        "results/logs/ood/{experiment}/rejection.log",
    wildcard_constraints:
        experiment=r"[A-Za-z0-9_.-]+",
    conda:
        "../../envs/index.yaml"
    params:
        data=lambda wildcards: ood_experiment(wildcards.experiment)["data"],
        quantile=config["query"]["rejection_quantile"],
        k=config["query"]["k"],
        vote_k=config["index"]["vote_k"],
    script:
        "../scripts/rejection.py"


rule ood_embed_heldout:
    input:
        checkpoint=ood_final_checkpoint,
        labeling="results/ood/data/tag2cls.json",
        source="results/ood/data/heldout.csv",
        root=DATASET,
    output:
        embeddings="results/ood/{experiment}/heldout/embeddings.npy",
        table="results/ood/{experiment}/heldout/index.csv",
    log:
        "results/logs/ood/{experiment}/embed_heldout.log",
    wildcard_constraints:
        experiment=r"[A-Za-z0-9_.-]+",
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        data=lambda wildcards: ood_experiment(wildcards.experiment)["data"],
        batch_size=config["embed"]["batch_size"],
        out_dir=subpath(output.embeddings, parent=True),
    script:
        "../scripts/embed.py"


rule ood_evaluate:
    input:
        rejection="results/ood/{experiment}/index/rejection.json",
        predictions="results/ood/{experiment}/predictions/predictions.csv",
        embeddings="results/ood/{experiment}/predictions/embeddings.npy",
        heldout_embeddings="results/ood/{experiment}/heldout/embeddings.npy",
        heldout_table="results/ood/{experiment}/heldout/index.csv",
    output:
        "results/{experiment}/ood.json",
    log:
        "results/logs/{experiment}/ood_evaluate.log",
    wildcard_constraints:
        experiment=r"[A-Za-z0-9_.-]+",
    conda:
        "../../envs/index.yaml"
    script:
        "../scripts/ood_evaluate.py"


# ---- named targets


rule embed_all:
    input:
        lambda wildcards: embed_targets("embeddings"),


rule query_all:
    input:
        lambda wildcards: embed_targets("queries"),


rule projector:
    input:
        lambda wildcards: f"results/{embed_experiment()}/projector",
        lambda wildcards: f"results/{embed_experiment()}/embeddings_2d.png",


rule ood:
    input:
        lambda wildcards: f"results/{config['ood']['experiment']}/ood.json",
