from labelflow.autolabel import prepare
from labelflow.jobs import start_job

start_job(snakemake)
prepare(
    clean=snakemake.input.clean,
    raw=snakemake.input.raw,
    root_dir=snakemake.output.root,
    human_csv=snakemake.output.human,
    labeling_json=snakemake.output.labeling,
    raw_csv=snakemake.output.raw,
    skipped_csv=snakemake.output.skipped,
    n_folds=snakemake.params.n_folds,
    seed=snakemake.params.seed,
)
