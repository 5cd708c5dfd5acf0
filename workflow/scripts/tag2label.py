from labelflow.dataset import tag2label, tag2label_csv
from labelflow.io import write_csv_atomic, write_json_atomic
from labelflow.jobs import start_job

log = start_job(snakemake)
labels_csv = snakemake.input.get("labels_csv")
if labels_csv:
    result = tag2label_csv(labels_csv, snakemake.input.dataset)
else:
    result = tag2label(snakemake.input.dataset)
write_csv_atomic(result.dataset, snakemake.output.dataset)
write_json_atomic(result.tag2cls, snakemake.output.tag2cls)
write_csv_atomic(result.skipped, snakemake.output.skipped)
write_csv_atomic(result.duplicates, snakemake.output.duplicates)
log.info(
    "%d images, %d classes; images per (first) label: %s",
    len(result.dataset),
    len(result.tag2cls),
    result.dataset["tag"].value_counts().sort_index().to_dict(),
)
for row in result.skipped.itertuples():
    log.warning("skipped %s: %s", row.path, row.reason)
for row in result.duplicates.itertuples():
    log.warning("duplicate %s (same bytes as %s)", row.path, row.duplicate_of)
