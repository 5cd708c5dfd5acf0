from labelflow.autolabel.policy import RoundSettings
from labelflow.calibration import CalibrationSettings
from labelflow.autolabel.round import RoundInputs, RoundOutputs, run_round
from labelflow.jobs import start_job, wants_gpu

start_job(snakemake)
run_round(
    RoundInputs(
        checkpoint=snakemake.input.checkpoint,
        dataset_csv=snakemake.input.dataset,
        raw_csv=snakemake.input.raw,
        tag2cls_json=snakemake.input.tag2cls,
        root=snakemake.input.root,
    ),
    RoundOutputs(
        status_json=snakemake.output.status,
        accepted_csv=snakemake.output.accepted,
        predictions_csv=snakemake.output.predictions,
        counts_csv=snakemake.output.counts,
        metrics_json=snakemake.output.metrics,
    ),
    RoundSettings.from_config(snakemake.params.settings),
    CalibrationSettings.from_config(snakemake.params.calibration),
    experiment=snakemake.params.run["experiment"],
    valid_folds=snakemake.params.run["valid_folds"],
    seed=snakemake.params.seed,
    round_=int(snakemake.wildcards.round),
    last_round=snakemake.params.last_round,
    batch_size=snakemake.params.batch_size,
    want_gpu=wants_gpu(snakemake),
)
