from labelflow.jobs import start_job
from labelflow.reports import summarize

start_job(snakemake)
summarize(
    run=snakemake.wildcards.run,
    inputs={
        name: snakemake.input[name]
        for name in (
            "dataset",
            "tag2cls",
            "predictions",
            "logits",
            "heads",
            "checkpoint",
            "index",
            "calibration",
        )
    },
    stage_metrics=dict(zip(snakemake.params.stages, snakemake.input.stage_metrics)),
    out_json=snakemake.output.summary,
    confusion_dir=snakemake.output.confusion,
    tensorboard_dir=snakemake.output.tensorboard,
)
