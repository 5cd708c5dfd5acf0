from labelflow.jobs import start_job, wants_gpu
from labelflow.pipeline import train_stage

start_job(snakemake)
train_stage(
    dataset_csv=snakemake.input.dataset,
    tag2cls_json=snakemake.input.labeling,
    root=snakemake.input.root,
    experiment=snakemake.params.experiment,
    stage=snakemake.wildcards.stage,
    valid_folds=snakemake.params.valid_folds,
    seed=snakemake.params.seed,
    out_dir=snakemake.params.out_dir,
    state_dir=snakemake.params.state_dir,
    init_checkpoint=snakemake.input.get("init"),
    lr_json=snakemake.input.get("lr_json"),
    want_gpu=wants_gpu(snakemake),
    # rules whose runs are not named by an {experiment} wildcard (autolabel rounds) name them
    experiment_name=snakemake.params.get("experiment_name") or snakemake.wildcards.get("experiment"),
)
