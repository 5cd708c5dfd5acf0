"""Our training and inference loops and a bare PyTorch reference, set up on the digits images.

Shared by train_throughput.py, train_phases.py and gpu_check.py, so all three time the same
two things:

ours       the package's real code: ImageTableDataset (decoded images cached, the recipe's
           albumentations augmentation for training), make_loader, MultiHeadNet with its heads,
           labelflow.device (placement; on CUDA bf16 autocast, channels_last, pinned memory and
           non-blocking copies), training.train_one_epoch (losses, per-head metrics, per-batch
           LambdaLR schedule) and inference.predict (logits, probabilities, embeddings to host).
reference  the same model architecture, initial weights, optimizer, batch size and threads over
           pre-decoded, pre-normalised image tensors that already sit on the device, with no
           augmentation, no metrics and no outputs kept: an upper bound for any loop.

With ``fast=True`` (the default) the reference also uses bf16 autocast and channels_last on
CUDA, as ours does, so the ratio measures the loop and not the numeric format. On the CPU both
stay float32 (labelflow.device's rule).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from labelflow.dataset import tag2label  # noqa: E402
from labelflow.demo import write_digits_dataset  # noqa: E402
from labelflow.device import place_model  # noqa: E402
from labelflow.experiment import model_spec  # noqa: E402
from labelflow.inference import predict  # noqa: E402
from labelflow.loaders import ImageTableDataset, build_transform, make_loader  # noqa: E402
from labelflow.models import MultiHeadNet, create_model  # noqa: E402
from labelflow.training import StageSpec, build_criteria, build_optimizer, build_scheduler, train_one_epoch  # noqa: E402
from spread import Comparison  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIGITS_PNG_SIZE = 32  # the PNGs are written once at 32 px; loaders resize to the loop's size


def load_recipe(name: str) -> dict[str, Any]:
    """The experiment file, validated against the schema (which fills the defaults)."""
    from snakemake.utils import validate

    experiment = yaml.safe_load((REPO / "config/experiments" / f"{name}.yaml").read_text())
    validate(experiment, str(REPO / "config/schemas/experiment.schema.yaml"))
    return experiment


@dataclass(frozen=True)
class DigitsImages:
    """The digits PNGs (written once) and a table of ``count`` rows cycling over them."""

    root: Path
    paths: np.ndarray
    targets: np.ndarray
    num_classes: int

    @classmethod
    def write(cls, workdir: str | Path, count: int) -> DigitsImages:
        root = Path(workdir) / "digits"
        if not root.exists():
            write_digits_dataset(root, image_size=DIGITS_PNG_SIZE)
        table = tag2label(root).dataset
        classes = {tag: i for i, tag in enumerate(sorted(set(table["tag"])))}
        # more rows than the 1,797 digits repeat them: the loops cost the same per image
        rows = table.iloc[np.arange(count) % len(table)]
        return cls(root, rows["path"].to_numpy(), rows["tag"].map(classes).to_numpy(), len(classes))


@dataclass(frozen=True)
class LoopSettings:
    """What both loops share. ``image_size``/``small_input`` None: the recipe's values."""

    experiment: str = "softmax"
    batch_size: int | None = None  # None: the recipe's stage2 batch size
    infer_batch_size: int = 256
    image_size: int | None = None
    small_input: bool | None = None
    fast: bool = True  # the reference uses bf16 autocast + channels_last on CUDA, like ours


def reference_autocast(device: torch.device, fast: bool):
    """The reference's numeric format: labelflow.device's rule (bf16 on CUDA) when ``fast``."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=fast and device.type == "cuda")


def reference_layout(images: torch.Tensor, device: torch.device, fast: bool) -> torch.Tensor:
    if fast and device.type == "cuda":
        return images.contiguous(memory_format=torch.channels_last)
    return images


class ReferenceLoop:
    """The bare PyTorch loop over images already on the device (no augmentation, no metrics)."""

    def __init__(self, model: MultiHeadNet, images: torch.Tensor, labels: torch.Tensor, optimizer,
                 batch_size: int, infer_batch_size: int, device: torch.device, fast: bool):
        self.model, self.optimizer = model, optimizer
        self.images, self.labels = images, labels
        self.batch_size, self.infer_batch_size = batch_size, infer_batch_size
        self.device, self.fast = device, fast
        self.generator = torch.Generator().manual_seed(0)

    def train_epoch(self) -> int:
        """One shuffled epoch (last partial batch dropped, as ours drops it); images trained."""
        self.model.train()
        order = torch.randperm(len(self.images), generator=self.generator).to(self.device)
        steps = len(self.images) // self.batch_size
        for start in range(0, steps * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            with reference_autocast(self.device, self.fast):
                logits = self.model(reference_layout(self.images[index], self.device, self.fast))["class"]
            loss = torch.nn.functional.cross_entropy(logits.float(), self.labels[index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return steps * self.batch_size

    @torch.inference_mode()
    def infer(self) -> int:
        """Forward passes over every image; the outputs are dropped."""
        self.model.eval()
        for start in range(0, len(self.images), self.infer_batch_size):
            batch = reference_layout(self.images[start : start + self.infer_batch_size], self.device, self.fast)
            with reference_autocast(self.device, self.fast):
                self.model(batch)
        return len(self.images)


@dataclass
class OurLoop:
    """The package's loop objects, as run_stage and experiment.infer build them."""

    model: MultiHeadNet
    train_loader: DataLoader
    eval_loader: DataLoader
    criteria: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    stage: StageSpec

    def train_epoch(self) -> int:
        train_one_epoch(self.model, self.train_loader, self.criteria, self.optimizer, self.scheduler, self.device, epoch=1)
        return len(self.train_loader) * self.train_loader.batch_sampler.batch_size

    def infer(self) -> int:
        predict(self.model, self.eval_loader, self.device)
        return len(self.eval_loader.dataset)


@dataclass
class Bench:
    """Ours and the reference, ready to time."""

    ours: OurLoop
    reference: ReferenceLoop
    data_cfg: dict[str, Any]
    batch_size: int

    def comparisons(self) -> list[Comparison]:
        return [
            Comparison("train", self.ours.train_epoch, self.reference.train_epoch),
            Comparison("infer", self.ours.infer, self.reference.infer),
        ]


def our_datasets(images: DigitsImages, data_cfg: dict[str, Any]) -> tuple[ImageTableDataset, ImageTableDataset]:
    """Training (augmenting) and evaluation (deterministic) datasets. Both keep decoded images
    (cache=True, said explicitly because the default may change), so ours and the reference
    both start from decoded pixels: the ratio compares the loops, not PNG decoding."""
    norm = {"mean": data_cfg["mean"], "std": data_cfg["std"]}
    train = ImageTableDataset(images.root, images.paths, images.targets, data_cfg["image_size"],
                              build_transform(data_cfg["augmentations"], train=True, **norm), cache=True)
    evaluation = ImageTableDataset(images.root, images.paths, images.targets, data_cfg["image_size"],
                                   build_transform(train=False, **norm), cache=True)
    return train, evaluation


def build_bench(images: DigitsImages, settings: LoopSettings, device: torch.device) -> Bench:
    """Both loops on ``images`` with the recipe's model, optimizer and schedule (stage2),
    the same initial weights, and the settings' overrides."""
    experiment = load_recipe(settings.experiment)
    data_cfg = dict(experiment["data"], image_size=settings.image_size or experiment["data"]["image_size"])
    if settings.small_input is not None:
        experiment["model"]["small_input"] = settings.small_input
    stage = StageSpec.from_dict("stage2", experiment["stages"]["stage2"])
    batch_size = settings.batch_size or stage.batch_size
    stage = replace(stage, batch_size=batch_size)
    train_ds, eval_ds = our_datasets(images, data_cfg)
    pin = device.type == "cuda"  # as experiment.stage_loaders and loaders.eval_loader do
    train_loader = make_loader(train_ds, batch_size=batch_size, shuffle=True, seed=0, drop_last=True, pin_memory=pin)
    eval_loader = make_loader(eval_ds, batch_size=settings.infer_batch_size, shuffle=False, seed=0, pin_memory=pin)

    spec = model_spec(experiment, images.num_classes)
    torch.manual_seed(0)
    ours_model, reference_model = create_model(spec), create_model(spec)
    reference_model.load_state_dict(ours_model.state_dict())
    place_model(ours_model, device)  # run_stage's placement (channels_last on CUDA)
    reference_model.to(device)
    if settings.fast and device.type == "cuda":
        reference_model.to(memory_format=torch.channels_last)
    ours_optimizer, reference_optimizer = build_optimizer(ours_model, stage), build_optimizer(reference_model, stage)
    ours = OurLoop(ours_model, train_loader, eval_loader, build_criteria(ours_model), ours_optimizer,
                   build_scheduler(ours_optimizer, stage, len(train_loader)), device, stage)

    # the reference's input: the same decoded images, normalised once, resident on the device
    tensors = torch.stack([eval_ds[i]["image"] for i in range(len(eval_ds))]).to(device)
    labels = torch.tensor(images.targets, dtype=torch.int64).to(device)
    reference = ReferenceLoop(reference_model, tensors, labels, reference_optimizer, batch_size,
                              settings.infer_batch_size, device, settings.fast)
    return Bench(ours, reference, data_cfg, batch_size)


def data_only_rate(loader: DataLoader) -> float:
    """Images/s of our training loader alone (decode cache, augmentation, collation; no model)."""
    started = time.perf_counter()
    count = sum(len(batch["index"]) for batch in loader)
    return count / (time.perf_counter() - started)

