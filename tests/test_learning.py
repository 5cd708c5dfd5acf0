"""Training learns: on a clearly separable dataset the real loop reaches high validation accuracy,
and the same loop with a broken optimizer step does not (so the bound can fail)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_tiny_dataset, stage_spec
from labelflow.loaders import ImageTableDataset, build_transform, make_loader
from labelflow.models import HeadSpec, ModelSpec, create_model
from labelflow.training import StageLoaders, run_stage

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _train(tmp: Path, root: Path, paths, targets) -> float:
    """Best valid accuracy of 5 epochs of the real loop (one stage, whole network)."""
    train = [i for i in range(len(paths)) if i % 4]
    valid = [i for i in range(len(paths)) if not i % 4]
    torch.manual_seed(0)
    model = create_model(ModelSpec("resnet18", [HeadSpec("class", 3)], embedding_size=16, small_input=True))
    loaders = StageLoaders(
        make_loader(ImageTableDataset(root, [paths[i] for i in train], [targets[i] for i in train], 16,
                                      build_transform(train=False)), batch_size=8, shuffle=True, seed=0),
        make_loader(ImageTableDataset(root, [paths[i] for i in valid], [targets[i] for i in valid], 16,
                                      build_transform(train=False)), batch_size=8, shuffle=False, seed=0),
    )  # fmt: skip
    metrics = run_stage(
        model, loaders, stage_spec("stage1", epochs=5, lr=1e-3, batch_size=8), out_dir=tmp / "out",
        state_dir=tmp / "state", device=torch.device("cpu"), seed=0, stage_fingerprint="learning",
    )
    return metrics["best"]["value"]


def test_training_learns_and_a_broken_optimizer_step_does_not(tmp_path, monkeypatch):
    root = make_tiny_dataset(tmp_path / "images", n_classes=3, per_class=16, size=16)
    paths = sorted(str(p.relative_to(root)) for p in root.glob("class_*/*.png"))
    targets = [int(Path(p).parent.name.split("_")[1]) for p in paths]
    assert _train(tmp_path / "ok", root, paths, targets) >= 0.9  # 12 valid images, 3 classes

    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: None)  # weights never move
    assert _train(tmp_path / "broken", root, paths, targets) <= 0.6  # chance is 1/3
