from labelflow.cleaning import find_issues
from labelflow.jobs import start_job

start_job(snakemake)
keys = ("predictions_csv", "embeddings_npy", "transform_npz", "index_bin", "index_json")
columns = [snakemake.input.get(key, []) for key in keys]
find_issues(
    oof_csv=snakemake.input.oof,
    oof_probabilities_npy=snakemake.input.oof_probabilities,
    tag2cls_json=snakemake.input.tag2cls,
    folds=[dict(zip(keys, files)) for files in zip(*columns)],
    neighbours=snakemake.params.neighbours,
    experiment=snakemake.params.experiment,
    scores_csv=snakemake.output.scores,
    issues_csv=snakemake.output.issues,
    summary_json=snakemake.output.summary,
)
