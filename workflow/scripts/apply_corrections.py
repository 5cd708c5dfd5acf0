from labelflow.corrections import NOT_FOUND, apply_corrections, held_out_paths, read_corrections
from labelflow.dataset import read_dataset_csv, read_tag2cls
from labelflow.io import write_csv_atomic
from labelflow.jobs import start_job

log = start_job(snakemake)
corrected, report = apply_corrections(
    read_dataset_csv(snakemake.input.dataset, root=None),
    read_corrections(snakemake.input.corrections),
    read_tag2cls(snakemake.input.tag2cls),
    # held-out images: the test table (rule test_table) applies their corrections
    test_paths=held_out_paths(snakemake.input.held_out),
)
write_csv_atomic(corrected, snakemake.output.dataset)
write_csv_atomic(report, snakemake.output.report)
log.info(
    "corrections: %s; %d images in the corrected table",
    report["action"].value_counts().to_dict(),
    len(corrected),
)
if (report["action"] == NOT_FOUND).any():
    log.warning(
        "%d corrections name images not in the dataset table (autolabel paths, skipped images, or typos): %s",
        int((report["action"] == NOT_FOUND).sum()),
        report.loc[report["action"] == NOT_FOUND, "path"].head(5).tolist(),
    )
