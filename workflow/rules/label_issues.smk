# Label mistakes (target `label_issues`): confident learning on the k-fold runs' out-of-fold
# predictions with neighbour votes from each fold's index → issues, scores, a contact sheet;
# with `label_issues.action` drop or relabel the run cleaned/<experiment> trains on the cleaned
# table. Human corrections (`corrections`) override labels of the main dataset and of the
# autolabel piles. After the autolabel loop, a review queue (target `autolabel_review`).


rule apply_corrections:
    input:
        dataset=DATASET_TABLE,
        tag2cls="results/data/tag2cls.json",
        corrections=corrections_file,
        held_out=HELD_OUT,
    output:
        dataset=CORRECTED_TABLE,
        report="results/data/corrections_applied.csv",
    log:
        "results/logs/apply_corrections.log",
    conda:
        "../../envs/index.yaml"
    params:
        code=code_of("apply_corrections"),
        rows=corrections_rows("main"),
    script:
        "../scripts/apply_corrections.py"


rule label_issues_find:
    input:
        unpack(label_issues_inputs),
    output:
        scores=f"{LABEL_ISSUES}/scores.csv",
        issues=f"{LABEL_ISSUES}/issues.csv",
        summary=f"{LABEL_ISSUES}/summary.json",
    log:
        "results/logs/label_issues/find.log",
    benchmark:
        "results/benchmarks/label_issues/find.tsv"
    conda:
        "../../envs/index.yaml"
    params:
        code=code_of("label_issues_find"),
        neighbours=config["label_issues"]["neighbours"],
        experiment=lambda wildcards: label_issues_experiment(),
    script:
        "../scripts/label_issues_find.py"


rule label_issues_sheet:
    input:
        issues=f"{LABEL_ISSUES}/issues.csv",
        root=DATASET,
    output:
        directory(f"{LABEL_ISSUES}/sheet"),
    log:
        "results/logs/label_issues/sheet.log",
    conda:
        "../../envs/index.yaml"
    params:
        code=code_of("label_issues_sheet"),
        max_rows=config["label_issues"]["max_sheet_rows"],
    script:
        "../scripts/label_issues_sheet.py"


rule label_issues_dataset:
    input:
        unpack(cleaned_table_inputs),
    output:
        CLEANED_TABLE,
    log:
        "results/logs/label_issues/dataset.log",
    conda:
        "../../envs/index.yaml"
    params:
        code=code_of("label_issues_dataset"),
        action=config["label_issues"]["action"],
        relabel_threshold=config["label_issues"]["relabel_threshold"],
    script:
        "../scripts/label_issues_dataset.py"


rule label_issues:
    input:
        label_issues_targets,


rule autolabel_corrections:
    input:
        human=f"{AUTOLABEL_DATA}/human.csv",
        raw=f"{AUTOLABEL_DATA}/raw.csv",
        tag2cls=AUTOLABEL_TAG2CLS,
        corrections=corrections_file,
    output:
        human=f"{AUTOLABEL_CORRECTED}/human.csv",
        raw=f"{AUTOLABEL_CORRECTED}/raw.csv",
        report=f"{AUTOLABEL_CORRECTED}/corrections_applied.csv",
    log:
        "results/logs/autolabel/corrections.log",
    conda:
        "../../envs/index.yaml"
    params:
        code=code_of("autolabel_corrections"),
        rows=corrections_rows("autolabel"),
    script:
        "../scripts/autolabel_corrections.py"


rule autolabel_review_queue:
    input:
        unpack(review_inputs),
    output:
        queue=f"{REVIEW}/queue.csv",
        tasks=f"{REVIEW}/label_studio_tasks.json",
        label_config=f"{REVIEW}/label_studio_config.xml",
    log:
        "results/logs/autolabel/review_queue.log",
    benchmark:
        "results/benchmarks/autolabel/review_queue.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
    params:
        code=code_of("autolabel_review_queue"),
        settings=config["autolabel"]["review"],
        data=review_data_cfg,
        batch_size=config["infer_batch_size"],
    script:
        "../scripts/autolabel_review_queue.py"


rule autolabel_review_sheet:
    input:
        queue=f"{REVIEW}/queue.csv",
        root=AUTOLABEL_ROOT,
    output:
        directory(f"{REVIEW}/sheet"),
    log:
        "results/logs/autolabel/review_sheet.log",
    conda:
        "../../envs/index.yaml"
    params:
        code=code_of("autolabel_review_sheet"),
    script:
        "../scripts/autolabel_review_sheet.py"


rule autolabel_review:
    input:
        f"{REVIEW}/queue.csv",
        f"{REVIEW}/label_studio_tasks.json",
        f"{REVIEW}/sheet",
