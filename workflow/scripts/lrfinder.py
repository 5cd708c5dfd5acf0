from labelflow.experiment import LRFinderSettings, lr_finder, stage_setup
from labelflow.jobs import start_job

start_job(snakemake)
lr_finder(
    stage_setup(snakemake),
    LRFinderSettings.from_config(snakemake.params.finder),
    out_csv=snakemake.output.table,
    out_json=snakemake.output.suggestion,
    out_png=snakemake.output.plot,
    tensorboard_dir=snakemake.output.tensorboard,
)
