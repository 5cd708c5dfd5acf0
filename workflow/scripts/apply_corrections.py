from labelflow.corrections import apply_corrections, read_corrections
from labelflow.dataset import read_dataset_csv, read_tag2cls
from labelflow.io import write_csv_atomic
from labelflow.jobs import start_job

log = start_job(snakemake)
corrected, report = apply_corrections(
    read_dataset_csv(snakemake.input.dataset, root=None),
    read_corrections(snakemake.input.corrections),
    read_tag2cls(snakemake.input.tag2cls),
)
write_csv_atomic(corrected, snakemake.output.dataset)
write_csv_atomic(report, snakemake.output.report)
log.info(
    "corrections: %s; %d images in the corrected table",
    report["action"].value_counts().to_dict(),
    len(corrected),
)
if (report["action"] == "not found").any():
    log.warning(
        "%d corrections name images not in the dataset table (autolabel paths, or typos): %s",
        int((report["action"] == "not found").sum()),
        report.loc[report["action"] == "not found", "path"].head(5).tolist(),
    )
