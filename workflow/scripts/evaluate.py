from labelflow.device import select_device
from labelflow.evaluate import evaluate_images
from labelflow.jobs import start_job, wants_gpu
from labelflow.trained import ModelFiles, load_trained

start_job(snakemake)
files = ModelFiles(snakemake.input.rejection, snakemake.input.calibration, snakemake.input.summary)
evaluate_images(
    snakemake.input.source,
    load_trained(files),
    snakemake.params.out_dir,
    batch_size=snakemake.params.batch_size,
    device=select_device(wants_gpu(snakemake)),
)
