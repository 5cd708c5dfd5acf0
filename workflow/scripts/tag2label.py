from labelflow.dataset import DuplicateSettings, tag2label, tag2label_csv
from labelflow.io import write_csv_atomic, write_json_atomic
from labelflow.jobs import start_job

log = start_job(snakemake)
duplicates = DuplicateSettings.from_config(snakemake.params.duplicates)
labels_csv = snakemake.input.get("labels_csv")
if labels_csv:
    result = tag2label_csv(labels_csv, snakemake.input.dataset, duplicates)
else:
    result = tag2label(snakemake.input.dataset, duplicates)
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
groups = result.duplicates
log.info(
    "%d duplicate groups (max_distance %d, min_correlation %s): %d images, largest %d, kinds %s; %d label conflicts (%s)",
    len(groups),
    duplicates.max_distance,
    duplicates.min_correlation,
    int(groups["size"].sum()),
    int(groups["size"].max()) if len(groups) else 0,
    groups["kind"].value_counts().sort_index().to_dict(),
    int(groups["label_conflict"].sum()),
    duplicates.label_conflicts,
)
for row in result.skipped.itertuples():
    log.warning("skipped %s: %s", row.path, row.reason)
