rule summary:
    input:
        predictions="results/{experiment}/predictions/predictions.csv",
        logits="results/{experiment}/predictions/logits.npy",
        checkpoint=final_checkpoint,
        stage_metrics=all_stage_metrics,
        index_metrics="results/{experiment}/index/recall.json",
        labeling="results/data/tag2cls.json",
    output:
        summary="results/{experiment}/summary.json",
        confusion=report(
            "results/{experiment}/confusion_matrix.png",
            caption="../report/confusion_matrix.rst",
            category="Classification",
            subcategory="{experiment}",
        ),
    log:
        "results/logs/{experiment}/summary.log",
    conda:
        "../../envs/torch.yaml"
    params:
        stages=lambda wildcards: stage_names(wildcards.experiment),
    script:
        "../scripts/summary.py"
