from labelflow.jobs import start_job
from labelflow.reports import summarize

start_job(snakemake)
summarize(
    experiment=snakemake.wildcards.experiment,
    dataset_csv=snakemake.input.dataset,
    tag2cls_json=snakemake.input.labeling,
    predictions_csv=snakemake.input.predictions,
    logits_npy=snakemake.input.logits,
    heads_csv=snakemake.input.heads,
    checkpoint=snakemake.input.checkpoint,
    stage_metrics=dict(zip(snakemake.params.stages, snakemake.input.stage_metrics)),
    index_metrics_json=snakemake.input.index_metrics,
    out_json=snakemake.output.summary,
    confusion_dir=snakemake.output.confusion,
    tensorboard_dir=snakemake.output.tensorboard,
)
