from labelflow.cleaning import cleaned_dataset
from labelflow.dataset import read_dataset_csv, read_tag2cls
from labelflow.io import read_table, write_csv_atomic
from labelflow.jobs import start_job

start_job(snakemake)
table = cleaned_dataset(
    read_dataset_csv(snakemake.input.dataset, root=None),
    read_table(snakemake.input.scores, text_columns=("given_label", "suggested_label")),
    read_tag2cls(snakemake.input.tag2cls),
    action=snakemake.params.action,
    relabel_threshold=snakemake.params.relabel_threshold,
)
write_csv_atomic(table, snakemake.output[0])
