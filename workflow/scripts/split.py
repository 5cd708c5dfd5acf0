from labelflow.dataset import (
    duplicate_folds,
    read_dataset_csv,
    read_duplicates,
    read_tag2cls,
    split,
)
from labelflow.io import write_csv_atomic
from labelflow.jobs import start_job

log = start_job(snakemake)
dataset = split(
    read_dataset_csv(snakemake.input.dataset, root=None),
    read_tag2cls(snakemake.input.tag2cls),
    snakemake.params.n_folds,
    snakemake.params.seed,
)
write_csv_atomic(dataset, snakemake.output.dataset)
groups = duplicate_folds(read_duplicates(snakemake.input.duplicates), dataset)
write_csv_atomic(groups, snakemake.output.duplicate_folds)
log.info("images per fold: %s", dataset.groupby("fold").size().to_dict())
log.info(
    "%d duplicate groups kept, each inside one fold: %s",
    int((groups["fold"] != "").sum()),
    groups.loc[groups["fold"] != "", "fold"].value_counts().sort_index().to_dict(),
)
