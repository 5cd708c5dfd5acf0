rule demo_dataset:
    output:
        directory(DEMO_DATASET),
    log:
        "results/logs/demo_dataset.log",
    benchmark:
        "results/benchmarks/demo_dataset.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("demo_dataset"),
        image_size=config["demo"]["image_size"],
    script:
        "../scripts/demo_dataset.py"


rule tag2label:
    input:
        unpack(labelling_inputs),
    output:
        dataset="results/data/dataset_raw.csv",
        tag2cls="results/data/tag2cls.json",
        skipped="results/data/skipped.csv",
        duplicates="results/data/duplicates.csv",
    log:
        "results/logs/tag2label.log",
    benchmark:
        "results/benchmarks/tag2label.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("tag2label"),
        content=dataset_content,
        duplicates=config["duplicates"],
    script:
        "../scripts/tag2label.py"


rule split:
    input:
        dataset="results/data/dataset_raw.csv",
        tag2cls="results/data/tag2cls.json",
        duplicates="results/data/duplicates.csv",
    output:
        dataset="results/data/dataset.csv",
        duplicate_folds="results/data/duplicate_folds.csv",
        held_out="results/data/held_out.csv",
    log:
        "results/logs/split.log",
    benchmark:
        "results/benchmarks/split.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("split"),
        n_folds=config["n_folds"],
        seed=config["seed"],
        test_fraction=config["test_fraction"],
    script:
        "../scripts/split.py"


rule test_table:
    input:
        held_out="results/data/held_out.csv",
        raw="results/data/dataset_raw.csv",
        tag2cls="results/data/tag2cls.json",
        # human corrections of held-out images (helpers in label_issues_inputs.smk)
        corrections=lambda wildcards: (
            corrections_file(wildcards) if config["corrections"] else []
        ),
    output:
        table="results/data/test.csv",
        skipped="results/data/test_skipped.csv",
        # corrections applied to held-out images (header only without any)
        report="results/data/test_corrections_applied.csv",
    log:
        "results/logs/test_table.log",
    benchmark:
        "results/benchmarks/test_table.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        code=code_of("test_table"),
        content=lambda wildcards: (
            content_of(config["test_dataset"]) if config["test_dataset"] else ""
        ),
        test={key: config[key] for key in ("test_fraction", "test_dataset")},
        duplicates=config["duplicates"],
        train_root=DATASET,  # where the pixel check of near copies reads the training images
        corrections=lambda wildcards: (
            corrections_rows("test")(wildcards) if config["corrections"] else ""
        ),
    script:
        "../scripts/test_table.py"
