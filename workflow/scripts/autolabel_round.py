from labelflow.autolabel import run_round
from labelflow.jobs import start_job, wants_gpu

start_job(snakemake)
run_round(
    checkpoint=snakemake.input.checkpoint,
    dataset_csv=snakemake.input.dataset,
    raw_csv=snakemake.input.raw,
    labeling_json=snakemake.input.labeling,
    root=snakemake.input.root,
    experiment=snakemake.params.experiment,
    valid_folds=snakemake.params.valid_folds,
    round_=int(snakemake.wildcards.round),
    threshold=snakemake.params.threshold,
    class_thresholds=snakemake.params.class_thresholds,
    min_temperature=snakemake.params.min_temperature,
    max_new_per_class=snakemake.params.max_new_per_class,
    neighbours=snakemake.params.neighbours,
    last_round=snakemake.params.last_round,
    status_json=snakemake.output.status,
    accepted_csv=snakemake.output.accepted,
    predictions_csv=snakemake.output.predictions,
    counts_csv=snakemake.output.counts,
    metrics_json=snakemake.output.metrics,
    batch_size=snakemake.params.batch_size,
    want_gpu=wants_gpu(snakemake),
)
