from labelflow.autolabel.results import evaluate
from labelflow.jobs import start_job

start_job(snakemake)
evaluate(
    dataset_csv=snakemake.input.dataset,
    raw_csv=snakemake.input.raw,
    rounds_csv=snakemake.input.rounds,
    truth_csv=snakemake.input.truth,
    out_json=snakemake.output[0],
)
