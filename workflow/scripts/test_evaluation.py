from labelflow.device import select_device
from labelflow.evaluate import evaluate_images
from labelflow.io import write_json_atomic
from labelflow.jobs import start_job, wants_gpu
from labelflow.trained import ModelFiles, load_trained

start_job(snakemake)
files = ModelFiles(snakemake.input.rejection, snakemake.input.calibration, snakemake.input.summary)
metrics = evaluate_images(
    snakemake.input.table,
    load_trained(files),
    snakemake.output.details,
    batch_size=snakemake.params.batch_size,
    device=select_device(wants_gpu(snakemake)),
    root=snakemake.params.root,
)
write_json_atomic({"set": "test: held out, never trained on or used to choose anything", **metrics}, snakemake.output.metrics)
