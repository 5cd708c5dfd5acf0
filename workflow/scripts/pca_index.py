from labelflow.index import IndexSettings, pca_index
from labelflow.jobs import start_job

start_job(snakemake)
pca_index(
    predictions_csv=snakemake.input.predictions,
    embeddings_npy=snakemake.input.embeddings,
    transform_npz=snakemake.output.transform,
    index_bin=snakemake.output.index,
    index_json=snakemake.output.info,
    settings=IndexSettings.from_config(snakemake.params.index),
    seed=snakemake.params.seed,
)
