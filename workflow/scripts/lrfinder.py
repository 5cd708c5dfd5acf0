from labelflow.jobs import stage_setup, start_job
from labelflow.pipeline import lr_finder

start_job(snakemake)
lr_finder(
    out_csv=snakemake.output.table,
    out_json=snakemake.output.suggestion,
    out_png=snakemake.output.plot,
    tensorboard_dir=snakemake.output.tensorboard,
    **snakemake.params.finder,
    **stage_setup(snakemake),
)
