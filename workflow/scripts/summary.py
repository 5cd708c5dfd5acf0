from labelflow.jobs import start_job
from labelflow.reports import summarize

start_job(snakemake)
summarize(
    experiment=snakemake.wildcards.experiment,
    predictions_csv=snakemake.input.predictions,
    logits_npy=snakemake.input.logits,
    checkpoint=snakemake.input.checkpoint,
    stage_metrics=dict(zip(snakemake.params.stages, snakemake.input.stage_metrics)),
    index_metrics_json=snakemake.input.index_metrics,
    tag2cls_json=snakemake.input.labeling,
    out_json=snakemake.output.summary,
    out_confusion_png=snakemake.output.confusion,
)
