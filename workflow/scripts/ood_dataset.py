from labelflow.jobs import start_job
from labelflow.search import holdout_classes

start_job(snakemake)
holdout_classes(
    dataset_csv=snakemake.input.dataset,
    tag2cls_json=snakemake.input.tag2cls,
    held_out=snakemake.params.classes,
    out_dataset_csv=snakemake.output.dataset,
    out_tag2cls_json=snakemake.output.tag2cls,
    out_heldout_csv=snakemake.output.heldout,
)
