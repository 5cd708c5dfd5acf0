from labelflow.experiment import train_stage
from labelflow.jobs import stage_setup, start_job

start_job(snakemake)
train_stage(
    stage_setup(snakemake),
    out_dir=snakemake.params.out_dir,
    state_dir=snakemake.params.state_dir,
    lr_json=snakemake.input.get("lr_json"),
)
