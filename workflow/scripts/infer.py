from labelflow.jobs import start_job, wants_gpu
from labelflow.pipeline import infer

start_job(snakemake)
infer(
    checkpoint=snakemake.input.checkpoint,
    dataset_csv=snakemake.input.dataset,
    root=snakemake.input.root,
    experiment=snakemake.params.experiment,
    valid_folds=snakemake.params.valid_folds,
    out_dir=snakemake.params.out_dir,
    batch_size=snakemake.params.batch_size,
    want_gpu=wants_gpu(snakemake),
)
