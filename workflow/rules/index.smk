rule pca_index:
    input:
        predictions="results/{experiment}/predictions/predictions.csv",
        embeddings="results/{experiment}/predictions/embeddings.npy",
    output:
        transform="results/{experiment}/index/transform.npz",
        index="results/{experiment}/index/knn.hnsw.bin",
        info="results/{experiment}/index/index.json",
    log:
        "results/logs/{experiment}/pca_index.log",
    benchmark:
        "results/benchmarks/{experiment}/pca_index.tsv"
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


rule evaluate_index:
    input:
        predictions="results/{experiment}/predictions/predictions.csv",
        embeddings="results/{experiment}/predictions/embeddings.npy",
        transform="results/{experiment}/index/transform.npz",
        index="results/{experiment}/index/knn.hnsw.bin",
        info="results/{experiment}/index/index.json",
    output:
        "results/{experiment}/index/recall.json",
    log:
        "results/logs/{experiment}/evaluate_index.log",
    benchmark:
        "results/benchmarks/{experiment}/evaluate_index.tsv"
    conda:
        "../../envs/index.yaml"
    params:
        ks=config["index"]["ks"],
        vote_k=config["index"]["vote_k"],
    script:
        "../scripts/evaluate_index.py"
