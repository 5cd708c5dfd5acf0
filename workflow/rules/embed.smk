# Embeddings of any image set with a run's final model, the TensorBoard projector, a 2-D
# picture, and the out-of-class (OOD) evaluation: the run ood/<experiment> trains without
# `ood.classes` and embeds the held-out images as its image set `heldout`.
# Targets (not part of `all`): embed_all, query_all, projector, ood.


rule embed:
    input:
        unpack(image_set),
        checkpoint=final_checkpoint,
        tag2cls=lambda wildcards: run_of(wildcards).data.tag2cls,
    output:
        embeddings="results/{run}/embeddings/{imageset}/embeddings.npy",
        table="results/{run}/embeddings/{imageset}/index.csv",
    log:
        "results/logs/{run}/embed_{imageset}.log",
    benchmark:
        "results/benchmarks/{run}/embed_{imageset}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        code=code_of("embed"),
        content=image_set_content,
        run=run_params,
        batch_size=config["embed"]["batch_size"],
        out_dir=subpath(output.embeddings, parent=True),
    script:
        "../scripts/embed.py"


rule tensorboard_projector:
    input:
        predictions="results/{run}/predictions/predictions.csv",
        embeddings="results/{run}/predictions/embeddings.npy",
        root=lambda wildcards: run_of(wildcards).data.root,
    output:
        directory("results/{run}/projector"),
    log:
        "results/logs/{run}/projector.log",
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("projector"),
        max_images=config["projector"]["max_images"],
        thumbnail_size=config["projector"]["thumbnail_size"],
        seed=config["seed"],
    script:
        "../scripts/projector.py"


rule embedding_plot:
    input:
        predictions="results/{run}/predictions/predictions.csv",
        embeddings="results/{run}/predictions/embeddings.npy",
        tag2cls=lambda wildcards: run_of(wildcards).data.tag2cls,
    output:
        report(
            "results/{run}/embeddings_2d.png",
            caption="../report/embeddings_2d.rst",
            category="Embeddings",
            subcategory="{run}",
        ),
    log:
        "results/logs/{run}/embedding_plot.log",
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("embedding_plot"),
        seed=config["seed"],
    script:
        "../scripts/embedding_plot.py"


rule ood_dataset:
    input:
        dataset=MAIN_TABLE,
        tag2cls="results/data/tag2cls.json",
    output:
        dataset=f"{OOD_DATA}/dataset.csv",
        tag2cls=f"{OOD_DATA}/tag2cls.json",
        heldout=f"{OOD_DATA}/heldout.csv",
    log:
        "results/logs/ood/dataset.log",
    conda:
        "../../envs/index.yaml"
    params:
        code=code_of("ood_dataset"),
        classes=config["ood"]["classes"],
    script:
        "../scripts/ood_dataset.py"


rule ood_evaluate:
    input:
        rejection="results/ood/{experiment}/index/rejection.json",
        predictions="results/ood/{experiment}/predictions/predictions.csv",
        embeddings="results/ood/{experiment}/predictions/embeddings.npy",
        heldout_embeddings="results/ood/{experiment}/embeddings/heldout/embeddings.npy",
        heldout_table="results/ood/{experiment}/embeddings/heldout/index.csv",
    output:
        "results/{experiment}/ood.json",
    log:
        "results/logs/{experiment}/ood_evaluate.log",
    conda:
        "../../envs/index.yaml"
    params:
        code=code_of("ood_evaluate"),
    script:
        "../scripts/ood_evaluate.py"


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
        f"results/{config['ood']['experiment']}/ood.json",
