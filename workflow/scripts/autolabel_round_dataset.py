from labelflow.autolabel import round_dataset
from labelflow.jobs import start_job

start_job(snakemake)
round_dataset(
    human_csv=snakemake.input.human,
    accepted_csvs=list(snakemake.input.accepted),
    labeling_json=snakemake.input.labeling,
    out_csv=snakemake.output[0],
)
