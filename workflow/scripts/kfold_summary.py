from labelflow.jobs import start_job
from labelflow.reports import kfold_summary

start_job(snakemake)
n = len(snakemake.input.metrics)
kfold_summary(
    experiment=snakemake.wildcards.name,
    folds={
        k: {
            "metrics": snakemake.input.metrics[k],
            "summary": snakemake.input.summaries[k],
            "predictions": snakemake.input.predictions[k],
        }
        for k in range(n)
    },
    out_csv=snakemake.output.table,
    out_json=snakemake.output.summary,
    out_png=snakemake.output.plot,
    out_oof=snakemake.output.oof,
)
