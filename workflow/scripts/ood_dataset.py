from labelflow.search import holdout_classes
from labelflow.jobs import start_job

start_job(snakemake)
holdout_classes(
    dataset_csv=snakemake.input.dataset,
    tag2cls_json=snakemake.input.labeling,
    held_out=snakemake.params.classes,
    out_dataset_csv=snakemake.output.dataset,
    out_tag2cls_json=snakemake.output.labeling,
    out_heldout_csv=snakemake.output.heldout,
)
