from labelflow.search import evaluate_ood
from labelflow.jobs import start_job

start_job(snakemake)
evaluate_ood(
    rejection_json=snakemake.input.rejection,
    predictions_csv=snakemake.input.predictions,
    embeddings_npy=snakemake.input.embeddings,
    heldout_embeddings_npy=snakemake.input.heldout_embeddings,
    heldout_index_csv=snakemake.input.heldout_table,
    out_json=snakemake.output[0],
    experiment=snakemake.wildcards.experiment,
)
