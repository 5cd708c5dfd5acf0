# Input functions and helpers of workflow/rules/embed.smk; no rules here.
OOD_DATA = "results/ood/data"


def embed_experiment():
    """The experiment whose model embeds, projects and answers queries (`embed.experiment`)."""
    name = config["embed"]["experiment"] or EXPERIMENTS[0]
    if name not in EXPERIMENTS:
        raise WorkflowError(
            f"config key `embed.experiment`: {name!r} is not one of `experiments` "
            f"{EXPERIMENTS}; its model must be trained by this workflow"
        )
    return name


def image_set(wildcards):
    """The images of a run's image set: config `embed.sets.<name>` (a folder or a CSV of paths),
    or for an OOD run the held-out images (`heldout`, paths relative to the dataset)."""
    run = run_of(wildcards)
    if run.name.startswith("ood/") and wildcards.imageset == "heldout":
        return {"source": f"{OOD_DATA}/heldout.csv", "root": DATASET}
    sets = config["embed"]["sets"]
    if wildcards.imageset not in sets:
        raise WorkflowError(
            f"no image set {wildcards.imageset!r} in config key `embed.sets` ({sorted(sets)})"
        )
    path = sets[wildcards.imageset]
    if not os.path.exists(path):
        raise WorkflowError(
            f"config key `embed.sets.{wildcards.imageset}`: {path!r} does not exist; give a "
            "folder of images or a CSV with a `path` column"
        )
    return {"source": path}


def image_set_content(wildcards):
    """Digest of a configured set's files (a param: Snakemake does not look inside a folder).
    The OOD held-out list is a workflow output that Snakemake tracks itself; a digest of it taken
    before the run that writes it would differ from one taken after, and rerun the job.
    """
    images = image_set(wildcards)
    return "" if "root" in images else content_of(images["source"])


def embed_targets(what):
    """Per configured set: its embeddings (`what`="embeddings") or query answers ("queries")."""
    sets = config["embed"]["sets"]
    if not sets:
        raise WorkflowError(
            "config key `embed.sets` is empty; name the image sets to embed, e.g. "
            "--config 'embed={sets: {new: data/new_images}}'"
        )
    experiment = embed_experiment()
    if what == "embeddings":
        return [
            f"results/{experiment}/embeddings/{name}/embeddings.npy" for name in sets
        ]
    return [f"results/{experiment}/queries/{name}.csv" for name in sets]
