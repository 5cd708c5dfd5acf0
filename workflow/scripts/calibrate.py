from labelflow.calibration import CalibrationSettings, calibrate_run
from labelflow.jobs import start_job

start_job(snakemake)
calibrate_run(
    predictions_csv=snakemake.input.predictions,
    logits_npy=snakemake.input.logits,
    tag2cls_json=snakemake.input.tag2cls,
    experiment=snakemake.params.run["experiment"],
    settings=CalibrationSettings.from_config(snakemake.params.settings),
    seed=snakemake.params.seed,
    out_json=snakemake.output[0],
)
