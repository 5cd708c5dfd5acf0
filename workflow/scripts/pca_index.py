from labelflow.jobs import start_job
from labelflow.pipeline import pca_index

start_job(snakemake)
pca_index(
    predictions_csv=snakemake.input.predictions,
    embeddings_npy=snakemake.input.embeddings,
    transform_npz=snakemake.output.transform,
    index_bin=snakemake.output.index,
    index_json=snakemake.output.info,
    seed=snakemake.params.seed,
    **snakemake.params.index,
)
