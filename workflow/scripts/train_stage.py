from labelflow.jobs import stage_setup, start_job
from labelflow.pipeline import train_stage

start_job(snakemake)
train_stage(
    out_dir=snakemake.params.out_dir,
    state_dir=snakemake.params.state_dir,
    lr_json=snakemake.input.get("lr_json"),
    **stage_setup(snakemake),
)
