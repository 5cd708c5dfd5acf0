from labelflow.jobs import start_job
from labelflow.reports import kfold_summary

start_job(snakemake)
files = zip(
    snakemake.input.metrics,
    snakemake.input.summaries,
    snakemake.input.predictions,
    snakemake.input.probabilities,
)
kfold_summary(
    experiment=snakemake.wildcards.experiment,
    folds={
        k: {
            "metrics": metrics,
            "summary": summary,
            "predictions": predictions,
            "probabilities": probabilities,
        }
        for k, (metrics, summary, predictions, probabilities) in enumerate(files)
    },
    out_csv=snakemake.output.table,
    out_json=snakemake.output.summary,
    out_png=snakemake.output.plot,
    out_oof=snakemake.output.oof,
    out_oof_probabilities=snakemake.output.oof_probabilities,
)
