from labelflow.autolabel.results import plot_progress
from labelflow.jobs import start_job

start_job(snakemake)
plot_progress(rounds_csv=snakemake.input[0], out_png=snakemake.output[0])
