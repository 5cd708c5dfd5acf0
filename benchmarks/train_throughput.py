"""Images/s of labelflow's training and inference loops vs bare PyTorch loops, same run.

Ours: the real code the rules run (ImageTableDataset with cached decoded images,
albumentations augmentation, MultiHeadNet with its heads, losses, per-head metrics,
LambdaLR schedule). Bare: the same model, batch size, image size, optimizer and threads
over pre-decoded, pre-normalised tensors with no augmentation and no metrics.
Rounds are interleaved (ours, bare, ours, bare, ...) so machine noise hits both.

    python benchmarks/train_throughput.py                 # digits recipe (32 px, batch 64)
    python benchmarks/train_throughput.py --images 256 --rounds 2   # smoke test
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from labelflow.dataset import tag2label  # noqa: E402
from labelflow.demo import write_digits_dataset  # noqa: E402
from labelflow.experiment import model_spec  # noqa: E402
from labelflow.inference import predict  # noqa: E402
from labelflow.loaders import ImageTableDataset, build_transform, make_loader  # noqa: E402
from labelflow.models import create_model  # noqa: E402
from labelflow.training import StageSpec, build_criteria, build_optimizer, build_scheduler, train_one_epoch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_recipe(name: str) -> dict:
    """The experiment file, validated against the schema (which fills the defaults)."""
    from snakemake.utils import validate

    experiment = yaml.safe_load((REPO / "config/experiments" / f"{name}.yaml").read_text())
    validate(experiment, str(REPO / "config/schemas/experiment.schema.yaml"))
    return experiment


def bare_train_epoch(model, images, targets, optimizer, batch_size, generator):
    model.train()
    order = torch.randperm(len(images), generator=generator)
    for start in range(0, len(images) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        logits = model(images[index])["class"]
        loss = torch.nn.functional.cross_entropy(logits, targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (len(images) // batch_size) * batch_size


@torch.inference_mode()
def bare_infer(model, images, batch_size):
    model.eval()
    for start in range(0, len(images), batch_size):
        model(images[start : start + batch_size])
    return len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="softmax")
    parser.add_argument("--images", type=int, default=1024, help="training images per epoch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of one epoch each")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    experiment = load_recipe(args.experiment)
    data_cfg = experiment["data"]
    stage_cfg = experiment["stages"]["stage2"]
    batch_size = stage_cfg.get("batch_size", 64)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "digits"
        write_digits_dataset(root, image_size=32)
        table = tag2label(root).dataset.iloc[: args.images]
        classes = {t: i for i, t in enumerate(sorted(set(table["tag"])))}
        targets = table["tag"].map(classes).to_numpy()
        norm = {"mean": data_cfg["mean"], "std": data_cfg["std"]}
        train_ds = ImageTableDataset(root, table["path"], targets, data_cfg["image_size"],
                                     build_transform(data_cfg.get("augmentations", []), train=True, **norm))
        eval_ds = ImageTableDataset(root, table["path"], None, data_cfg["image_size"], build_transform(train=False, **norm))
    loader = make_loader(train_ds, batch_size=batch_size, shuffle=True, seed=0, drop_last=True)
    eval_loader = make_loader(eval_ds, batch_size=256, shuffle=False, seed=0)
    # Bare input: the same decoded images, normalised once, as one tensor.
    images = torch.stack([eval_ds[i]["image"] for i in range(len(eval_ds))])
    labels = torch.as_tensor(targets)

    spec = model_spec(experiment, len(classes))
    stage = StageSpec.from_dict("stage2", stage_cfg)
    torch.manual_seed(0)
    ours_model, bare_model = create_model(spec), create_model(spec)
    bare_model.load_state_dict(ours_model.state_dict())
    ours_opt, bare_opt = build_optimizer(ours_model, stage), build_optimizer(bare_model, stage)
    scheduler = build_scheduler(ours_opt, stage, len(loader))
    criteria = build_criteria(ours_model)
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)

    times = {"ours_train": [], "bare_train": [], "ours_infer": [], "bare_infer": []}
    counts = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up caches and allocators
        t = time.perf_counter()
        train_one_epoch(ours_model, loader, criteria, ours_opt, scheduler, device, epoch=1)
        ours = time.perf_counter() - t
        t = time.perf_counter()
        counts["bare_train"] = bare_train_epoch(bare_model, images, labels, bare_opt, batch_size, generator)
        bare = time.perf_counter() - t
        t = time.perf_counter()
        predict(ours_model, eval_loader, device)
        ours_i = time.perf_counter() - t
        t = time.perf_counter()
        counts["bare_infer"] = bare_infer(bare_model, images, 256)
        bare_i = time.perf_counter() - t
        if round_:
            times["ours_train"].append(ours)
            times["bare_train"].append(bare)
            times["ours_infer"].append(ours_i)
            times["bare_infer"].append(bare_i)
    counts["ours_train"] = len(loader) * batch_size
    counts["ours_infer"] = len(eval_ds)

    # where our extra time goes: data (decode cache, augmentation, collation) vs compute
    t = time.perf_counter()
    for _ in loader:
        pass
    data_seconds = time.perf_counter() - t

    rate = {k: counts[k] / np.median(v) for k, v in times.items()}
    print(f"machine: {os.cpu_count()} cpus, torch threads {args.threads}, torch {torch.__version__}")
    print(f"recipe: {args.experiment}, {data_cfg['image_size']} px, batch {batch_size}, {args.images} images, "
          f"median of {args.rounds} interleaved rounds")
    print(f"train  ours {rate['ours_train']:8.1f} img/s   bare {rate['bare_train']:8.1f} img/s   "
          f"ratio {rate['ours_train'] / rate['bare_train']:.3f}")
    print(f"infer  ours {rate['ours_infer']:8.1f} img/s   bare {rate['bare_infer']:8.1f} img/s   "
          f"ratio {rate['ours_infer'] / rate['bare_infer']:.3f}")
    print(f"data loading alone (augment + collate, no model): {counts['ours_train'] / data_seconds:.1f} img/s, "
          f"{100 * data_seconds / np.median(times['ours_train']):.1f}% of an epoch of ours")


if __name__ == "__main__":
    main()
