from labelflow.device import select_device
from labelflow.jobs import start_job, wants_gpu
from labelflow.predict import collect_inputs, predict_to_csv
from labelflow.trained import ModelFiles, load_trained

log = start_job(snakemake)
files = ModelFiles(snakemake.input.rejection, snakemake.input.calibration, snakemake.input.summary)
counts = predict_to_csv(
    load_trained(files),
    collect_inputs([snakemake.input.source]),
    snakemake.output[0],
    top_k=snakemake.params.top_k,
    batch_size=snakemake.params.batch_size,
    device=select_device(wants_gpu(snakemake)),
)
log.info("%s", counts)
