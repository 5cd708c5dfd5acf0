from labelflow.embeddings import write_projector
from labelflow.jobs import start_job

start_job(snakemake)
write_projector(
    predictions_csv=snakemake.input.predictions,
    embeddings_npy=snakemake.input.embeddings,
    root=snakemake.input.root,
    out_dir=snakemake.output[0],
    max_images=snakemake.params.max_images,
    thumbnail_size=snakemake.params.thumbnail_size,
    seed=snakemake.params.seed,
)
