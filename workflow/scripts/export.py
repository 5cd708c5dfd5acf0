from labelflow.export import export_model
from labelflow.jobs import start_job
from labelflow.trained import ModelFiles, load_trained

start_job(snakemake)
files = ModelFiles(snakemake.input.rejection, snakemake.input.calibration, snakemake.input.summary)
export_model(load_trained(files), snakemake.output[0], snakemake.params.format)
