from labelflow.autolabel.results import materialize
from labelflow.jobs import start_job

start_job(snakemake)
materialize(
    dataset_csv=snakemake.input.dataset,
    root=snakemake.input.root,
    out_dir=snakemake.output[0],
    mode=snakemake.params.mode,
)
