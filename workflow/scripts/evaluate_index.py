from labelflow.jobs import start_job
from labelflow.pipeline import evaluate_index

start_job(snakemake)
evaluate_index(
    predictions_csv=snakemake.input.predictions,
    embeddings_npy=snakemake.input.embeddings,
    transform_npz=snakemake.input.transform,
    index_bin=snakemake.input.index,
    index_json=snakemake.input.info,
    out_json=snakemake.output[0],
    ks=snakemake.params.ks,
    vote_k=snakemake.params.vote_k,
)
