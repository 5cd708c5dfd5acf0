from labelflow.jobs import start_job
from labelflow.search import RejectionSettings, calibrate_rejection

start_job(snakemake)
calibrate_rejection(
    index_files={
        name: snakemake.input[name] for name in ("transform", "index", "info", "predictions")
    },
    embeddings_npy=snakemake.input.embeddings,
    tag2cls_json=snakemake.input.tag2cls,
    checkpoint=snakemake.input.checkpoint,
    data_cfg=snakemake.params.run["experiment"]["data"],
    out_json=snakemake.output[0],
    settings=RejectionSettings.from_config(snakemake.params.settings),
)
