"""Tests for labelflow.models: the multi-head net, frozen encoders, weights and checkpoints.

Everything runs offline: named torchvision weights are only exercised through their error
paths, with the download monkeypatched to fail.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from labelflow.models import (
    HeadSpec,
    ModelSpec,
    WeightsError,
    create_encoder,
    create_model,
    load_checkpoint,
    load_model,
    load_state_dict_file,
    load_weights_into,
    save_checkpoint,
)


class NotATensor:
    """A custom class: pickling it into a checkpoint must make weights_only loading refuse it."""

    def __init__(self, value: int = 1):
        self.value = value


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _spec(num_classes: int = 3, embedding_size: int = 16, extra_head: bool = True) -> ModelSpec:
    heads = [HeadSpec("class", num_classes)]
    if extra_head:
        heads.append(HeadSpec("tags", 5, loss="bce"))
    return ModelSpec(arch="resnet18", heads=heads, embedding_size=embedding_size, small_input=True)


def _randomise(module: nn.Module, seed: int) -> None:
    """Give every float tensor (parameters and BN buffers) a distinctive non-default value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_create_model_output_shapes():
    torch.manual_seed(0)
    model = create_model(_spec())
    model.eval()
    with torch.no_grad():
        out = model(_images(4))
    assert set(out) == {"class", "tags", "embedding"}
    assert out["embedding"].shape == (4, 16)
    assert out["class"].shape == (4, 3)
    assert out["tags"].shape == (4, 5)
    # The embedding follows a ReLU: never negative.
    assert float(out["embedding"].min()) >= 0.0


def test_small_input_drops_the_maxpool():
    small, _ = create_encoder("resnet18", small_input=True)
    standard, dim = create_encoder("resnet18", small_input=False)
    assert isinstance(small.maxpool, nn.Identity)
    assert isinstance(standard.maxpool, nn.MaxPool2d)
    assert isinstance(standard.fc, nn.Identity)
    assert dim == 512
    assert create_encoder("resnet50")[1] == 2048


def test_unsupported_arch():
    with pytest.raises(WeightsError, match="vgg16"):
        create_encoder("vgg16")


def test_freeze_encoder_keeps_encoder_batchnorm_in_eval():
    torch.manual_seed(0)
    model = create_model(_spec())
    model.freeze_encoder(True)
    model.train()
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.embedding.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    encoder_bns = [m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert encoder_bns and all(not bn.training for bn in encoder_bns)
    assert model.training and model.embedding[1].training and model.heads.training
    # A training-mode forward pass leaves the encoder's running statistics untouched.
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    model(_images(4))
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ...while the embedding's BatchNorm1d does update.
    assert int(model.embedding[1].num_batches_tracked) == 1

    model.freeze_encoder(False)
    model.train()
    assert all(p.requires_grad for p in model.encoder.parameters())
    assert all(bn.training for bn in encoder_bns)


def test_encoder_weights_from_local_torchvision_state_dict(tmp_path: Path):
    reference = torchvision.models.resnet18(weights=None)
    _randomise(reference, seed=1)
    path = tmp_path / "resnet18_random.pth"
    torch.save(reference.state_dict(), path)

    encoder, dim = create_encoder("resnet18", str(path))
    assert dim == 512
    ours = encoder.state_dict()
    theirs = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_encoder_weights_from_our_own_checkpoint(tmp_path: Path):
    torch.manual_seed(0)
    source = create_model(_spec())
    _randomise(source, seed=2)
    path = tmp_path / "stage1" / "best.pt"
    save_checkpoint(path, source, {"epoch": 3})

    encoder, _ = create_encoder("resnet18", str(path), small_input=True)
    expected = source.encoder.state_dict()
    got = encoder.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # create_model with the checkpoint as weights initialises its encoder the same way.
    model = create_model(_spec(num_classes=7), weights=str(path))
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)


def test_resnet34_weights_into_resnet18_name_the_file(tmp_path: Path):
    path = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(WeightsError) as info:
        create_encoder("resnet18", str(path))
    message = str(info.value)
    assert str(path) in message
    assert "resnet18" in message
    assert "unexpected" in message


def test_wrong_tensor_shape_in_weights_names_the_file(tmp_path: Path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # e.g. a greyscale stem
    path = tmp_path / "grey.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="do not fit resnet18") as info:
        create_encoder("resnet18", str(path))
    assert str(path) in str(info.value) and "conv1.weight" in str(info.value)


def test_missing_weights_file(tmp_path: Path):
    path = tmp_path / "nope.pt"
    with pytest.raises(WeightsError, match="does not exist") as info:
        create_encoder("resnet18", str(path))
    assert str(path) in str(info.value)


def test_bogus_named_weight_lists_valid_names():
    with pytest.raises(WeightsError) as info:
        create_encoder("resnet18", "NOT_A_WEIGHT")
    message = str(info.value)
    assert "NOT_A_WEIGHT" in message
    assert "IMAGENET1K_V1" in message
    assert ".pt/.pth" in message


def test_named_weights_download_failure_explains_local_fix(monkeypatch, tmp_path: Path):
    from torchvision.models._api import WeightsEnum

    calls = []

    def offline(self, *args, **kwargs):
        calls.append(self.name)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(WeightsError) as info:
        create_encoder("resnet18", "IMAGENET1K_V1")
    assert calls == ["IMAGENET1K_V1"]
    message = str(info.value)
    assert "could not download" in message
    assert "no network in tests" in message
    assert "model.weights" in message and ".pt/.pth" in message
    assert "resnet18-" in message  # the file to copy into torchvision's cache is named
    assert str(tmp_path / "torch_home") in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_checkpoint_roundtrip_gives_identical_outputs(tmp_path: Path):
    torch.manual_seed(0)
    model = create_model(_spec())
    model.train()
    model(_images(8, seed=1))  # moves BN running statistics off their defaults
    model.eval()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, {"epoch": 5, "accuracy": 0.75})

    loaded = load_model(path)
    loaded.eval()
    assert loaded.spec == model.spec
    images = _images(4, seed=2)
    with torch.no_grad():
        a, b = model(images), loaded(images)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 5 and checkpoint["accuracy"] == 0.75
    assert not list(tmp_path.glob(".*"))  # the atomic write left no temporary behind


def test_load_weights_into_same_spec_copies_everything(tmp_path: Path):
    torch.manual_seed(0)
    source = create_model(_spec())
    _randomise(source, seed=3)
    path = tmp_path / "stage1.pt"
    save_checkpoint(path, source)
    target = create_model(_spec())
    load_weights_into(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_weights_into_different_class_count_names_both(tmp_path: Path):
    path = tmp_path / "stage1.pt"
    save_checkpoint(path, create_model(_spec(num_classes=3, extra_head=False)))
    model = create_model(_spec(num_classes=5, extra_head=False))
    with pytest.raises(WeightsError) as info:
        load_weights_into(model, path)
    message = str(info.value)
    assert "class:3" in message and "class:5" in message
    assert str(path) in message


def test_load_model_missing_checkpoint(tmp_path: Path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_checkpoints_load_with_weights_only(tmp_path: Path):
    path = tmp_path / "ckpt.pt"
    model = create_model(_spec())
    save_checkpoint(path, model, {"epoch": 1})
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model", "spec", "epoch"}
    assert checkpoint["spec"] == model.spec.to_dict()
    state = load_state_dict_file(path)  # unwraps our checkpoint's "model"
    assert set(state) == set(model.state_dict())


def test_pickled_custom_object_is_refused(tmp_path: Path):
    path = tmp_path / "unsafe.pt"
    model = create_model(_spec())
    torch.save({"model": model.state_dict(), "extra": NotATensor(3)}, path)
    with pytest.raises(WeightsError, match="cannot read weights file") as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(WeightsError):
        create_encoder("resnet18", str(path))


def test_non_dict_weights_file_is_refused(tmp_path: Path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        load_state_dict_file(path)
