from labelflow.dataset import read_dataset_csv, read_tag2cls, split
from labelflow.io import write_csv_atomic
from labelflow.jobs import start_job

log = start_job(snakemake)
dataset = split(
    read_dataset_csv(snakemake.input.dataset, root=None),
    read_tag2cls(snakemake.input.tag2cls),
    snakemake.params.n_folds,
    snakemake.params.seed,
)
write_csv_atomic(dataset, snakemake.output[0])
log.info("images per fold: %s", dataset.groupby("fold").size().to_dict())
