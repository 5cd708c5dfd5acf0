from labelflow.autolabel.prepare import prepare
from labelflow.dataset import DuplicateSettings
from labelflow.jobs import start_job

start_job(snakemake)
prepare(
    clean=snakemake.input.clean,
    raw=snakemake.input.raw,
    root_dir=snakemake.output.root,
    human_csv=snakemake.output.human,
    tag2cls_json=snakemake.output.tag2cls,
    raw_csv=snakemake.output.raw,
    skipped_csv=snakemake.output.skipped,
    n_folds=snakemake.params.n_folds,
    seed=snakemake.params.seed,
    duplicates=DuplicateSettings.from_config(snakemake.params.duplicates),
)
