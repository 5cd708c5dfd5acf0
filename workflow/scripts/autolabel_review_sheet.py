from labelflow.autolabel.review import write_queue_sheet
from labelflow.jobs import start_job

log = start_job(snakemake)
shown = write_queue_sheet(
    queue_csv=snakemake.input.queue, root=snakemake.input.root, out_dir=snakemake.output[0]
)
log.info("contact sheet: %s", shown)
