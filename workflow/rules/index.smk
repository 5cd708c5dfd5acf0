# The similarity index of every run: PCA + hnswlib over the train embeddings, recall@k of the
# valid embeddings, the out-of-class rejection threshold, and answers for embedded image sets.
# No model here: envs/index.yaml has no torch.

# A run's index and what it was built from: what evaluating or calibrating it reads.
INDEX_FILES = {
    "predictions": "results/{run}/predictions/predictions.csv",
    "embeddings": "results/{run}/predictions/embeddings.npy",
    "transform": "results/{run}/index/transform.npz",
    "index": "results/{run}/index/knn.hnsw.bin",
    "info": "results/{run}/index/index.json",
}


rule pca_index:
    input:
        predictions="results/{run}/predictions/predictions.csv",
        embeddings="results/{run}/predictions/embeddings.npy",
    output:
        transform="results/{run}/index/transform.npz",
        index="results/{run}/index/knn.hnsw.bin",
        info="results/{run}/index/index.json",
    log:
        "results/logs/{run}/pca_index.log",
    benchmark:
        "results/benchmarks/{run}/pca_index.tsv"
    conda:
        "../../envs/index.yaml"
    params:
        code=code_of("pca_index"),
        index=config["index"],
        seed=config["seed"],
    script:
        "../scripts/pca_index.py"


rule evaluate_index:
    input:
        **INDEX_FILES,
    output:
        "results/{run}/index/recall.json",
    log:
        "results/logs/{run}/evaluate_index.log",
    benchmark:
        "results/benchmarks/{run}/evaluate_index.tsv"
    conda:
        "../../envs/index.yaml"
    params:
        code=code_of("evaluate_index"),
        index=config["index"],
    script:
        "../scripts/evaluate_index.py"


rule rejection:
    input:
        **INDEX_FILES,
        tag2cls=lambda wildcards: run_of(wildcards).data.tag2cls,
        checkpoint=final_checkpoint,
    output:
        "results/{run}/index/rejection.json",
    log:
        "results/logs/{run}/rejection.log",
    benchmark:
        "results/benchmarks/{run}/rejection.tsv"
    conda:
        "../../envs/index.yaml"
    params:
        code=code_of("rejection"),
        run=run_params,
        settings={"query": config["query"], "index": config["index"]},
    script:
        "../scripts/rejection.py"


rule query_set:
    input:
        rejection="results/{run}/index/rejection.json",
        embeddings="results/{run}/embeddings/{imageset}/embeddings.npy",
        table="results/{run}/embeddings/{imageset}/index.csv",
    output:
        "results/{run}/queries/{imageset}.csv",
    log:
        "results/logs/{run}/query_{imageset}.log",
    conda:
        "../../envs/index.yaml"
    params:
        code=code_of("query"),
        k=config["query"]["k"],
    script:
        "../scripts/query.py"
