from labelflow.embeddings import embed_images
from labelflow.jobs import start_job, wants_gpu

start_job(snakemake)
embed_images(
    checkpoint=snakemake.input.checkpoint,
    source=snakemake.input.source,
    out_dir=snakemake.params.out_dir,
    data_cfg=snakemake.params.run["experiment"]["data"],
    tag2cls_json=snakemake.input.tag2cls,
    root=snakemake.input.get("root"),
    batch_size=snakemake.params.batch_size,
    want_gpu=wants_gpu(snakemake),
)
