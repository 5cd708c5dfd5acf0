from labelflow.corrections import read_corrections
from labelflow.dataset import DuplicateSettings, read_tag2cls
from labelflow.heldout import HeldOutSettings, write_held_out_table
from labelflow.jobs import start_job

start_job(snakemake)
corrections = snakemake.input.get("corrections")  # with config key `corrections` only
write_held_out_table(
    settings=HeldOutSettings.from_config(snakemake.params.test),
    held_out=snakemake.input.held_out,
    raw_csv=snakemake.input.raw,
    tag2cls=read_tag2cls(snakemake.input.tag2cls),
    duplicates=DuplicateSettings.from_config(snakemake.params.duplicates),
    train_root=snakemake.params.train_root,
    out_csv=snakemake.output.table,
    out_skipped=snakemake.output.skipped,
    corrections=read_corrections(corrections) if corrections else None,
    out_report=snakemake.output.report,  # the test set's corrections (header only without any)
)
