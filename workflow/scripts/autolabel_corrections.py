from labelflow.corrections import apply_autolabel_corrections, read_corrections
from labelflow.dataset import read_tag2cls
from labelflow.io import read_table, write_csv_atomic
from labelflow.jobs import start_job

log = start_job(snakemake)
human, raw, report = apply_autolabel_corrections(
    read_table(snakemake.input.human),
    read_table(snakemake.input.raw),
    read_corrections(snakemake.input.corrections),
    read_tag2cls(snakemake.input.tag2cls),
)
write_csv_atomic(human, snakemake.output.human)
write_csv_atomic(raw, snakemake.output.raw)
write_csv_atomic(report, snakemake.output.report)
log.info("autolabel corrections: %s", report["action"].value_counts().to_dict())
