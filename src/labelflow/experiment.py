"""An experiment's model jobs on one run: train a stage, run the LR finder on a stage, predict
every image of the run (infer).

A run (see :mod:`labelflow.runs`) gives each job the same inputs: a dataset table, its class
map, the image root, the experiment dict, the validation folds and the seed; :class:`StageSetup`
carries them. Outputs are written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from labelflow.dataset import class_names, class_targets, is_multilabel, read_dataset_csv, read_tag2cls, split_names
from labelflow.device import job_threads, select_device
from labelflow.heads import check_experiment, get_head, uses_rotation
from labelflow.inference import predict
from labelflow.io import DatasetError, PathLike, read_json, save_npy_atomic, write_csv_atomic, write_json_atomic
from labelflow.loaders import ImageTableDataset, build_transform, eval_loader, make_loader, plan_loading
from labelflow.losses import get_loss
from labelflow.metrics import predict_labels
from labelflow.models import HeadSpec, ModelSpec, create_model, load_model, load_weights_into
from labelflow import __version__
from labelflow.io import file_digest
from labelflow.manifest import modules_digest
from labelflow.training import Fingerprint, StageLoaders, StageSpec, digest, run_stage, saved_batch_order

log = logging.getLogger(__name__)


def model_spec(experiment: dict[str, Any], num_classes: int) -> ModelSpec:
    """The experiment's model section with head sizes filled in from the data (the heads
    registry knows each head's output size)."""
    check_experiment(experiment)
    heads = [
        HeadSpec(
            h["name"], get_head(h["name"]).output_size(num_classes), h["loss"], h["weight"], h.get("params", {}),
            h["decision_threshold"],
        )
        for h in experiment["heads"]
    ]
    m = experiment["model"]
    return ModelSpec(
        arch=m["arch"], heads=heads, embedding_size=m["embedding_size"], dropout=m["dropout"],
        small_input=m["small_input"],
    )


def head_names(spec: ModelSpec) -> list[str]:
    return [h.name for h in spec.heads]


def check_heads_fit_data(spec: ModelSpec, multilabel: bool, experiment_name: str = "") -> None:
    if not multilabel:
        return
    for head in spec.heads:
        if head.name == "class" and get_loss(head.loss).activation == "softmax":
            raise DatasetError(
                f"experiment {experiment_name or ''} trains its class head with {head.loss} (one class per "
                "image) but the dataset is multilabel; use an experiment with loss bce or focal"
            )
        if get_head(head.name).single_label_only:
            raise DatasetError(f"a {head.name} head needs single-label data; remove it for multilabel datasets")


@dataclass(frozen=True)
class StageSetup:
    """What a training-like job (a stage, the LR finder) starts from: the run's data and recipe."""

    dataset_csv: PathLike
    tag2cls_json: PathLike
    root: PathLike
    experiment: dict[str, Any]
    stage: str
    valid_folds: Sequence[int]
    seed: int
    calibration_share: float = 0.0  # of the validation fold, held out from checkpoint selection
    init_checkpoint: PathLike | None = None
    want_gpu: bool = False
    run_name: str = ""


def stage_setup(smk: Any) -> StageSetup:
    """The StageSetup of a training-like job (rules train_stage and lrfinder_stage)."""
    from labelflow.jobs import wants_gpu

    run = smk.params.run
    return StageSetup(
        dataset_csv=smk.input.dataset,
        tag2cls_json=smk.input.tag2cls,
        root=smk.input.root,
        experiment=run["experiment"],
        stage=smk.wildcards.stage,
        valid_folds=run["valid_folds"],
        calibration_share=run["calibration_share"],
        seed=smk.params.seed,
        init_checkpoint=smk.input.get("init"),
        want_gpu=wants_gpu(smk),
        run_name=run["name"],
    )


@dataclass
class PreparedStage:
    model: Any
    stage_spec: StageSpec
    device: torch.device
    loaders: StageLoaders
    fingerprint: Fingerprint


def stage_loaders(
    root: PathLike,
    dataset: pd.DataFrame,
    targets: np.ndarray,
    is_valid: np.ndarray,
    data_cfg: dict[str, Any],
    *,
    batch_size: int,
    heads: Sequence[str],
    seed: int,
    device: torch.device,
    batch_order: str | None = None,
) -> StageLoaders:
    """Only training augments. With a rotation head the train images get random rotations, the
    valid ones a fixed seeded set, and the upright loader scores the class head on upright images.
    ``batch_order``: a resumed stage's (see :func:`labelflow.loaders.plan_loading`)."""
    norm = {"mean": data_cfg["mean"], "std": data_cfg["std"]}
    train_tf = build_transform(data_cfg["augmentations"], train=True, seed=seed, **norm)
    eval_tf = build_transform(train=False, **norm)
    rotation = uses_rotation(heads)
    paths = dataset["path"].to_numpy()
    plan = plan_loading(data_cfg, len(paths), job_threads(), device, batch_order=batch_order)
    plan.apply()
    log.info("loading: %s, %d worker process(es), %d compute thread(s) (%s)",
             "cache in memory" if plan.cache else "streaming", plan.num_workers, plan.compute_threads, plan.reason)  # fmt: skip
    common = {"image_size": data_cfg["image_size"], "cache": plan.cache, "heads": heads}
    train_ds = ImageTableDataset(
        root, paths[~is_valid], targets[~is_valid], transform=train_tf,
        rotation="random" if rotation else "none", rotation_p=data_cfg["rotation_p"], **common,
    )
    valid_ds = ImageTableDataset(
        root, paths[is_valid], targets[is_valid], transform=eval_tf,
        rotation="seeded" if rotation else "none", rotation_seed=seed, rotation_p=data_cfg["rotation_p"], **common,
    )
    options = {"num_workers": plan.num_workers, "pin_memory": device.type == "cuda", "seed": seed,
               "seeded_batches": plan.seeded_batches}
    # drop_last avoids a 1-image BatchNorm batch at the end of an epoch
    train = make_loader(train_ds, batch_size=batch_size, shuffle=True, drop_last=len(train_ds) > batch_size, **options)
    valid = make_loader(valid_ds, batch_size=batch_size, shuffle=False, **options)
    upright = None
    if rotation:
        upright_ds = ImageTableDataset(root, paths[is_valid], targets[is_valid], transform=eval_tf, **common)
        upright = make_loader(upright_ds, batch_size=batch_size, shuffle=False, **options)
    return StageLoaders(train, valid, upright)


def stage_model(spec: ModelSpec, weights: str, init_checkpoint: PathLike | None, seed: int):
    """A fresh model (seeded init, encoder ``weights``), or the previous stage's weights."""
    torch.manual_seed(seed)
    model = create_model(spec, weights if init_checkpoint is None else "none")
    if init_checkpoint is not None:
        load_weights_into(model, init_checkpoint)
        log.info("initialised from %s", init_checkpoint)
    return model


def prepare_stage(setup: StageSetup, lr: float | None = None, state_dir: PathLike | None = None) -> PreparedStage:
    """Model, loaders and spec of one stage: what both training and the LR finder start from.
    With the ``state_dir`` of a stage to resume, the loaders draw their batches as its saved
    epochs did (:func:`labelflow.training.saved_batch_order`)."""
    dataset = read_dataset_csv(setup.dataset_csv, setup.root)
    tag2cls = read_tag2cls(setup.tag2cls_json)
    experiment = setup.experiment
    spec = model_spec(experiment, len(tag2cls))
    check_heads_fit_data(spec, is_multilabel(dataset), setup.run_name)
    stage_cfg = dict(experiment["stages"][setup.stage])
    if lr is not None:
        stage_cfg["lr"] = lr
    if stage_cfg["lr"] == "auto":
        raise ValueError(f"stages.{setup.stage}.lr is 'auto' but no LR finder suggestion was given")
    stage_spec = StageSpec.from_dict(setup.stage, stage_cfg)
    device = select_device(setup.want_gpu)
    roles = split_names(dataset, setup.valid_folds, setup.seed, setup.calibration_share)
    if (roles == "train").all() or not (roles == "valid").any():
        raise DatasetError(f"{setup.dataset_csv}: valid_folds {list(setup.valid_folds)} leave no train or no valid images")
    data_cfg = experiment["data"]
    # calibration rows neither train nor choose the checkpoint: the temperature is fitted on them
    keep = roles != "calibration"
    fingerprint = stage_fingerprint(setup, spec, stage_cfg)
    loaders = stage_loaders(
        setup.root, dataset[keep].reset_index(drop=True), class_targets(dataset, tag2cls)[keep], roles[keep] == "valid", data_cfg,
        batch_size=stage_spec.batch_size, heads=head_names(spec), seed=setup.seed, device=device,
        batch_order=saved_batch_order(Path(state_dir), fingerprint) if state_dir is not None else None,
    )
    model = stage_model(spec, experiment["model"]["weights"], setup.init_checkpoint, setup.seed)
    return PreparedStage(model, stage_spec, device, loaders, fingerprint)


def stage_fingerprint(setup: StageSetup, spec: ModelSpec, stage_cfg: dict[str, Any]) -> Fingerprint:
    """What a saved state must share with this stage to be resumed, as named parts (the log
    names those that differ): ``recipe`` (model spec, stage config as trained, data config),
    ``data`` (the dataset table's bytes, sha1 of each image included when the table has them),
    ``init`` (the initial weights' bytes), ``folds`` (the validation folds and the share held out
    for calibration), ``seed``, ``weights`` (the encoder's
    pretrained weights: the name, and the bytes when it is a file) and ``code``
    (labelflow's version and :func:`labelflow.manifest.modules_digest` of this module: the code
    that trains a stage, docstrings and comments aside, the same digest that makes Snakemake
    rerun the rule))."""
    experiment = setup.experiment
    weights = experiment["model"]["weights"]
    return {
        "recipe": digest(spec.to_dict(), stage_cfg, experiment["data"]),
        "data": file_digest(setup.dataset_csv)[:16],
        "init": file_digest(setup.init_checkpoint)[:16] if setup.init_checkpoint else None,
        "folds": {"valid": sorted(int(f) for f in setup.valid_folds), "calibration_share": setup.calibration_share},
        "seed": setup.seed,
        "weights": f"{weights} {file_digest(weights)[:16]}" if Path(weights).is_file() else weights,
        "code": f"{__version__}+{modules_digest(['labelflow.experiment'])}",
    }


def read_lr_suggestion(path: PathLike) -> float:
    suggestion = read_json(path)
    return float(suggestion["suggestions"][suggestion["used"]])


def train_stage(
    setup: StageSetup, *, out_dir: PathLike, state_dir: PathLike, lr_json: PathLike | None = None,
    state_every_seconds: float = 0.0,
) -> dict[str, Any]:
    """Train one stage of a run; a later stage starts from the previous stage's best weights.
    With ``lr_json`` (stage ``lr: auto``) the LR finder's suggestion is the learning rate."""
    lr = None
    if lr_json is not None:
        lr = read_lr_suggestion(lr_json)
        log.info("lr %.3g from the LR finder (%s)", lr, lr_json)
    prepared = prepare_stage(setup, lr=lr, state_dir=state_dir)
    return run_stage(
        prepared.model, prepared.loaders, prepared.stage_spec,
        out_dir=out_dir, state_dir=state_dir, device=prepared.device, seed=setup.seed,
        stage_fingerprint=prepared.fingerprint, state_every_seconds=state_every_seconds,
    )


@dataclass(frozen=True)
class LRFinderSettings:
    """Config section ``lrfinder`` (defaults in config/schemas/config.schema.yaml)."""

    start_lr: float
    final_lr: float
    num_steps: int
    scale: str
    smoothing: float
    diverge_factor: float
    suggestion: str

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> LRFinderSettings:
        return cls(**{name: section[name] for name in cls.__dataclass_fields__})


def lr_finder(
    setup: StageSetup,
    settings: LRFinderSettings,
    *,
    out_csv: PathLike,
    out_json: PathLike,
    out_png: PathLike,
    tensorboard_dir: PathLike,
) -> dict[str, Any]:
    """LR range test for one stage (its model, data and optimizer); the model is then discarded."""
    from torch.utils.tensorboard import SummaryWriter

    from labelflow.lrfinder import find_lr, suggest
    from labelflow.plots import plot_lr_finder

    prepared = prepare_stage(setup, lr=settings.start_lr)
    records = find_lr(
        prepared.model, prepared.loaders.train, prepared.stage_spec, prepared.device,
        start_lr=settings.start_lr, final_lr=settings.final_lr, num_steps=settings.num_steps, scale=settings.scale,
        smoothing=settings.smoothing, diverge_factor=settings.diverge_factor, seed=setup.seed,
    )
    suggestions = suggest(records)
    result = {
        "suggestions": suggestions,
        "used": settings.suggestion,
        "lr": suggestions[settings.suggestion],
        "steps": int(len(records)),
        "diverged": bool(len(records) < settings.num_steps),
        "scale": settings.scale,
        "start_lr": settings.start_lr,
        "final_lr": settings.final_lr,
    }
    write_csv_atomic(records, out_csv)
    plot_lr_finder(records, suggestions, settings.suggestion, out_png)
    with SummaryWriter(log_dir=str(tensorboard_dir)) as writer:
        for row in records.itertuples():
            writer.add_scalar("lrfinder/loss", row.loss, row.step)
            writer.add_scalar("lrfinder/smoothed_loss", row.smoothed_loss, row.step)
            writer.add_scalar("lrfinder/lr", row.lr, row.step)
    write_json_atomic(result, out_json)
    log.info("lrfinder: %d steps, suggestions %s, using %s", len(records), suggestions, settings.suggestion)
    return result


def infer(
    *,
    checkpoint: PathLike,
    dataset_csv: PathLike,
    tag2cls_json: PathLike,
    root: PathLike,
    experiment: dict[str, Any],
    valid_folds: Sequence[int],
    seed: int,
    out_dir: PathLike,
    calibration_share: float = 0.0,
    batch_size: int = 256,
    want_gpu: bool = False,
) -> pd.DataFrame:
    """The final model over train and valid images → logits/probabilities/embeddings .npy and
    predictions.csv (see :func:`labelflow.dataset.read_predictions`); heads.csv holds the
    rotation heads' predictions on the valid images under their seeded rotation codes.
    Images are un-rotated and un-augmented for the class head."""
    dataset = read_dataset_csv(dataset_csv, root)
    tag2cls = read_tag2cls(tag2cls_json)
    device = select_device(want_gpu)
    model = load_model(checkpoint)
    data_cfg = experiment["data"]
    paths = dataset["path"].to_numpy()
    outputs = predict(model, eval_loader(root, paths, data_cfg, batch_size=batch_size, device=device), device)
    out_dir = Path(out_dir)
    for name, array in outputs.items():
        save_npy_atomic(out_dir / f"{name}.npy", array.astype(np.float32))
    roles = split_names(dataset, valid_folds, seed, calibration_share)
    predictions = prediction_rows(dataset, class_names(tag2cls), outputs["probabilities"], roles, model.spec.heads[0])
    # the valid rows alone, in table order: training validation drew each image's rotation code
    # from its position among them (calibration rows shift those positions)
    is_valid = roles == "valid"
    write_csv_atomic(predictions, out_dir / "predictions.csv")
    targets = class_targets(dataset, tag2cls)[is_valid]
    heads = rotated_head_predictions(model, root, paths[is_valid], targets, data_cfg, seed, batch_size, device)
    write_csv_atomic(heads, out_dir / "heads.csv")
    return predictions


def prediction_rows(
    dataset: pd.DataFrame, classes: Sequence[str], probs: np.ndarray, roles: np.ndarray, head: HeadSpec
) -> pd.DataFrame:
    """predictions.csv: path, split (train, valid or calibration), class (index of the (first)
    label: what recall@k counts), label and predicted (class names; ';'-joined for multilabel
    data), confidence."""
    names = np.asarray(classes, dtype=object)
    table = pd.DataFrame({"path": dataset["path"].to_numpy(), "split": roles, "class": dataset["class"].to_numpy()})
    if is_multilabel(dataset):
        predicted = predict_labels(probs, True, head.decision_threshold)
        table["label"] = dataset["labels"].to_numpy()
        table["predicted"] = [";".join(names[np.flatnonzero(row)]) for row in predicted]
    else:
        table["label"] = names[dataset["class"].to_numpy()]
        table["predicted"] = names[probs.argmax(axis=1)]
    table["confidence"] = probs.max(axis=1)
    return table


def rotated_head_predictions(model, root, paths, targets, data_cfg, seed, batch_size, device) -> pd.DataFrame:
    """path, head, true, predicted (codes) of every rotation head on the valid images, each under
    its seeded rotation code (the same images and codes as validation during training)."""
    names = [h.name for h in model.spec.heads if get_head(h.name).rotated]
    rows = []
    if names:
        loader = eval_loader(
            root, paths, data_cfg, batch_size=batch_size, device=device, targets=targets,
            rotation="seeded", rotation_seed=seed, rotation_p=data_cfg["rotation_p"], heads=head_names(model.spec),
        )
        for name in names:
            out = predict(model, loader, device, head=name, with_targets=True)
            rows += [(p, name, int(t), int(q)) for p, t, q in zip(paths, out["targets"], out["logits"].argmax(axis=1))]
    return pd.DataFrame(rows, columns=["path", "head", "true", "predicted"])
