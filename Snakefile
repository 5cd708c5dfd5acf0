# Transfer-learning image classification, embedding index and recall evaluation.
# Run: snakemake --cores 4 --resources gpu=1   (see README.md)
import os

from snakemake.utils import min_version, validate

min_version("8.0")


configfile: os.path.join(workflow.basedir, "config/config.yaml")


validate(config, "config/schemas/config.schema.yaml")

# Jobs import the labelflow package from this checkout, also in conda envs and on cluster
# nodes (we set the variable for the jobs; nothing is required from the user's environment).
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        p
        for p in (os.path.join(workflow.basedir, "src"), os.environ.get("PYTHONPATH"))
        if p
    )
)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/index.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/autolabel_inputs.smk"
include: "workflow/rules/autolabel.smk"
include: "workflow/rules/embed_inputs.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/use_inputs.smk"
include: "workflow/rules/use.smk"
include: "workflow/rules/label_issues_inputs.smk"
include: "workflow/rules/label_issues.smk"


rule all:
    default_target: True
    input:
        "results/experiments.csv",


onsuccess:
    print_results_table("results/experiments.csv")
