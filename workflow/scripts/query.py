from labelflow.search import query_set
from labelflow.jobs import start_job

start_job(snakemake)
query_set(
    rejection_json=snakemake.input.rejection,
    embeddings_npy=snakemake.input.embeddings,
    index_csv=snakemake.input.table,
    out_csv=snakemake.output[0],
    k=snakemake.params.k,
)
