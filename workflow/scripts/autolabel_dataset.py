from labelflow.autolabel.results import assemble
from labelflow.jobs import start_job

start_job(snakemake)
assemble(
    human_csv=snakemake.input.human,
    raw_csv=snakemake.input.raw,
    accepted_csvs=list(snakemake.input.accepted),
    status_jsons=list(snakemake.input.status),
    metrics_jsons=list(snakemake.input.metrics),
    predictions_csv=snakemake.input.predictions,
    dataset_csv=snakemake.output.dataset,
    unlabelled_csv=snakemake.output.unlabelled,
    rounds_csv=snakemake.output.rounds,
)
