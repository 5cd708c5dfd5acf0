from labelflow.autolabel.review import ReviewSettings, review_queue
from labelflow.jobs import start_job, wants_gpu

start_job(snakemake)
review_queue(
    inputs=dict(snakemake.input.items()),
    outputs=dict(snakemake.output.items()),
    data_cfg=snakemake.params.data,
    settings=ReviewSettings.from_config(snakemake.params.settings),
    batch_size=snakemake.params.batch_size,
    want_gpu=wants_gpu(snakemake),
)
