from labelflow.index import IndexSettings, evaluate_index
from labelflow.jobs import start_job

start_job(snakemake)
evaluate_index(
    predictions_csv=snakemake.input.predictions,
    embeddings_npy=snakemake.input.embeddings,
    transform_npz=snakemake.input.transform,
    index_bin=snakemake.input.index,
    index_json=snakemake.input.info,
    out_json=snakemake.output[0],
    settings=IndexSettings.from_config(snakemake.params.index),
)
