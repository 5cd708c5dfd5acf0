from labelflow.autolabel.round import round_dataset
from labelflow.jobs import start_job

start_job(snakemake)
round_dataset(
    human_csv=snakemake.input.human,
    raw_csv=snakemake.input.raw,
    accepted_csvs=list(snakemake.input.accepted),
    tag2cls_json=snakemake.input.tag2cls,
    out_csv=snakemake.output[0],
)
