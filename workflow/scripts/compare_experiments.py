from labelflow.jobs import start_job
from labelflow.reports import compare_experiments

start_job(snakemake)
stage_metrics = snakemake.params.stage_metrics
compare_experiments(
    summaries=dict(zip(stage_metrics, snakemake.input.summaries)),
    stage_metrics=stage_metrics,
    tests=dict(zip(stage_metrics, snakemake.input.tests)),
    out_csv=snakemake.output.table,
    out_png=snakemake.output.plot,
)
