from labelflow.search import calibrate_rejection
from labelflow.jobs import start_job

start_job(snakemake)
calibrate_rejection(
    predictions_csv=snakemake.input.predictions,
    embeddings_npy=snakemake.input.embeddings,
    transform_npz=snakemake.input.transform,
    index_bin=snakemake.input.index,
    index_json=snakemake.input.info,
    tag2cls_json=snakemake.input.labeling,
    checkpoint=snakemake.input.checkpoint,
    data_cfg=snakemake.params.data,
    out_json=snakemake.output[0],
    quantile=snakemake.params.quantile,
    k=snakemake.params.k,
    vote_k=snakemake.params.vote_k,
)
