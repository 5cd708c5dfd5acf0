from labelflow.embeddings import plot_embeddings_2d
from labelflow.jobs import start_job

start_job(snakemake)
plot_embeddings_2d(
    predictions_csv=snakemake.input.predictions,
    embeddings_npy=snakemake.input.embeddings,
    tag2cls_json=snakemake.input.tag2cls,
    out_png=snakemake.output[0],
    title=f"{snakemake.wildcards.run}: train+valid embeddings (PCA)",
    seed=snakemake.params.seed,
)
