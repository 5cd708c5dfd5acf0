from labelflow.cleaning import write_issue_sheet
from labelflow.jobs import start_job

log = start_job(snakemake)
shown = write_issue_sheet(
    issues_csv=snakemake.input.issues,
    image_root=snakemake.input.root,
    out_dir=snakemake.output[0],
    max_rows=snakemake.params.max_rows,
)
log.info("contact sheet: %s", shown)
