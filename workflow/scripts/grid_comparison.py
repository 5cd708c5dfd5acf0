from labelflow.jobs import start_job
from labelflow.reports import grid_comparison

start_job(snakemake)
runs = snakemake.params.runs
grid_comparison(
    runs=runs,
    metrics_paths=dict(zip(runs, snakemake.input.metrics)),
    predictions_paths=dict(zip(runs, snakemake.input.predictions)),
    configs_out=dict(zip(runs, snakemake.output.configs)),
    out_csv=snakemake.output.table,
    out_png=snakemake.output.plot,
    tensorboard_dir=snakemake.output.tensorboard,
)
