from labelflow.heldout import split_step
from labelflow.jobs import start_job

start_job(snakemake)
split_step(
    raw_csv=snakemake.input.dataset,
    tag2cls_json=snakemake.input.tag2cls,
    duplicates_csv=snakemake.input.duplicates,
    n_folds=snakemake.params.n_folds,
    seed=snakemake.params.seed,
    test_fraction=snakemake.params.test_fraction,
    out_dataset=snakemake.output.dataset,
    out_duplicate_folds=snakemake.output.duplicate_folds,
    out_held_out=snakemake.output.held_out,
)
