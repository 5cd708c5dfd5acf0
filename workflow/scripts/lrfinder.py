from labelflow.jobs import start_job, wants_gpu
from labelflow.pipeline import lr_finder

start_job(snakemake)
lr_finder(
    dataset_csv=snakemake.input.dataset,
    tag2cls_json=snakemake.input.labeling,
    root=snakemake.input.root,
    experiment=snakemake.params.experiment,
    stage=snakemake.wildcards.stage,
    valid_folds=snakemake.params.valid_folds,
    seed=snakemake.params.seed,
    init_checkpoint=snakemake.input.get("init"),
    want_gpu=wants_gpu(snakemake),
    experiment_name=snakemake.wildcards.experiment,
    out_csv=snakemake.output.table,
    out_json=snakemake.output.suggestion,
    out_png=snakemake.output.plot,
    tensorboard_dir=snakemake.output.tensorboard,
    **snakemake.params.finder,
)
