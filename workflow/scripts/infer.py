from labelflow.experiment import infer
from labelflow.jobs import start_job, wants_gpu

start_job(snakemake)
infer(
    checkpoint=snakemake.input.checkpoint,
    dataset_csv=snakemake.input.dataset,
    tag2cls_json=snakemake.input.tag2cls,
    root=snakemake.input.root,
    experiment=snakemake.params.run["experiment"],
    valid_folds=snakemake.params.run["valid_folds"],
    calibration_share=snakemake.params.run["calibration_share"],
    seed=snakemake.params.seed,
    out_dir=snakemake.params.out_dir,
    batch_size=snakemake.params.batch_size,
    want_gpu=wants_gpu(snakemake),
)
