from labelflow.demo import write_digits_dataset
from labelflow.jobs import start_job

log = start_job(snakemake)
n = write_digits_dataset(snakemake.output[0], image_size=snakemake.params.image_size)
log.info("wrote %d digit images to %s", n, snakemake.output[0])
