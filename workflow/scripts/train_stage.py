from labelflow.experiment import stage_setup, train_stage
from labelflow.jobs import start_job

start_job(snakemake)
train_stage(
    stage_setup(snakemake),
    out_dir=snakemake.params.out_dir,
    state_dir=snakemake.params.state_dir,
    lr_json=snakemake.input.get("lr_json"),
    state_every_seconds=snakemake.params.state_every_seconds,
)
