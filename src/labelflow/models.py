"""Encoders, the multi-head network and its checkpoints (timm-style small factories)."""

from __future__ import annotations

import os
import urllib.error
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from labelflow.io import atomic_output

ENCODERS = ("resnet18", "resnet34", "resnet50")


class WeightsError(ValueError):
    """Weights that cannot be loaded: the message names the file or key and the fix."""


@dataclass
class HeadSpec:
    name: str
    num_outputs: int
    loss: str = "cross_entropy"
    weight: float = 1.0
    loss_params: dict[str, Any] = field(default_factory=dict)
    decision_threshold: float = 0.5  # multilabel data: a class is predicted from this sigmoid probability


@dataclass
class ModelSpec:
    arch: str
    heads: list[HeadSpec]
    embedding_size: int = 128
    dropout: float = 0.0
    # Small inputs (digits are 32 px) lose everything to ResNet's max-pool; dropping it keeps
    # a usable feature map at 4x the compute of the standard stem.
    small_input: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def heads_by_name(self) -> dict[str, HeadSpec]:
        return {h.name: h for h in self.heads}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        heads = [HeadSpec(**h) for h in data["heads"]]
        return cls(**{**data, "heads": heads})


def _is_weights_file(weights: str) -> bool:
    return weights.endswith((".pt", ".pth")) or os.sep in weights or Path(weights).exists()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict saved by torch.save without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check `model.weights`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad or unsafe files
        raise WeightsError(
            f"cannot read weights file {path}: {exc}. It must be a state dict saved with "
            "torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # one of our own checkpoints
    if not isinstance(obj, dict):
        raise WeightsError(f"weights file {path} does not hold a state dict")
    return obj


def _named_weights_state_dict(arch: str, name: str) -> dict[str, torch.Tensor]:
    enum = torchvision.models.get_model_weights(arch)
    try:
        weights = enum[name]
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise WeightsError(
            f"model.weights={name!r} is not a torchvision weight of {arch}; use one of: "
            f"{names}, 'none', or a path to a .pt/.pth file"
        ) from None
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        filename = weights.url.rsplit("/", 1)[-1]
        cache = Path(torch.hub.get_dir()) / "checkpoints" / filename
        raise WeightsError(
            f"could not download torchvision weights {arch} {name} ({exc}); there may be no "
            f"network. Either copy {weights.url} to {cache} (torchvision's cache, used offline), "
            "or set `model.weights` to the path of a local .pt/.pth state dict"
        ) from exc


def create_encoder(arch: str, weights: str = "none", small_input: bool = False) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier, and the width of its pooled features."""
    if arch not in ENCODERS:
        raise WeightsError(f"model.arch={arch!r} is not supported; choose one of {ENCODERS}")
    encoder = torchvision.models.get_model(arch, weights=None)
    if weights and weights.lower() != "none":
        if _is_weights_file(weights):
            state = load_state_dict_file(weights)
            source = weights
        else:
            state = _named_weights_state_dict(arch, weights)
            source = f"torchvision {weights}"
        state = {k.removeprefix("encoder."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "embedding.", "heads."))}
        try:
            result = encoder.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise WeightsError(f"weights {source} do not fit {arch}: {exc}") from exc
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        if missing or result.unexpected_keys:
            raise WeightsError(
                f"weights {source} do not fit {arch}: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected keys "
                f"(e.g. {result.unexpected_keys[:3]}); was it saved from another architecture?"
            )
    feature_dim = encoder.fc.in_features
    encoder.fc = nn.Identity()
    if small_input:
        encoder.maxpool = nn.Identity()
    return encoder, feature_dim


class MultiHeadNet(nn.Module):
    """Encoder → embedding layer → named heads. forward() returns a dict of tensors."""

    def __init__(self, encoder: nn.Module, feature_dim: int, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.encoder = encoder
        self.embedding = nn.Sequential(
            nn.Linear(feature_dim, spec.embedding_size),
            nn.BatchNorm1d(spec.embedding_size),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(spec.dropout)
        self.heads = nn.ModuleDict(
            {h.name: nn.Linear(spec.embedding_size, h.num_outputs) for h in spec.heads}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.embedding(self.encoder(images))
        features = self.dropout(embedding)
        outputs = {name: head(features) for name, head in self.heads.items()}
        outputs["embedding"] = embedding
        return outputs

    def freeze_encoder(self, frozen: bool) -> None:
        for param in self.encoder.parameters():
            param.requires_grad = not frozen
        self._encoder_frozen = frozen

    def train(self, mode: bool = True) -> "MultiHeadNet":
        super().train(mode)
        # A frozen encoder keeps its BatchNorm statistics: they belong to the pretrained weights.
        if getattr(self, "_encoder_frozen", False):
            self.encoder.eval()
        return self


def create_model(spec: ModelSpec, weights: str = "none") -> MultiHeadNet:
    encoder, feature_dim = create_encoder(spec.arch, weights, small_input=spec.small_input)
    return MultiHeadNet(encoder, feature_dim, spec)


def save_checkpoint(path: str | Path, model: MultiHeadNet, extra: dict[str, Any] | None = None) -> None:
    """Atomically write {"model": state_dict, "spec": ModelSpec dict, ...extra}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "spec": model.spec.to_dict(), **(extra or {})}
    atomic_torch_save(payload, path)


def atomic_torch_save(payload: Any, path: str | Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unsafe (pickled objects) or corrupt files
        raise WeightsError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "spec" not in checkpoint:
        raise WeightsError(f"{path} is not a labelflow checkpoint (no model/spec); was it written by this workflow?")
    return checkpoint


def load_model(path: str | Path) -> MultiHeadNet:
    """Rebuild a MultiHeadNet from one of our checkpoints (architecture from its spec)."""
    checkpoint = load_checkpoint(path)
    spec = ModelSpec.from_dict(checkpoint["spec"])
    model = create_model(spec)
    model.load_state_dict(checkpoint["model"])
    return model


def load_weights_into(model: MultiHeadNet, path: str | Path) -> None:
    """Initialise `model` from a checkpoint of the same architecture and heads (stage1 → stage2)."""
    checkpoint = load_checkpoint(path)
    theirs = ModelSpec.from_dict(checkpoint["spec"])
    ours = model.spec
    describe = lambda s: f"{s.arch} with heads " + ", ".join(f"{h.name}:{h.num_outputs}" for h in s.heads)
    if (theirs.arch, [(h.name, h.num_outputs) for h in theirs.heads], theirs.embedding_size) != (
        ours.arch,
        [(h.name, h.num_outputs) for h in ours.heads],
        ours.embedding_size,
    ):
        raise WeightsError(
            f"checkpoint {path} is {describe(theirs)} (embedding {theirs.embedding_size}) but the "
            f"model is {describe(ours)} (embedding {ours.embedding_size}); delete the stale "
            "checkpoint or make the experiment match"
        )
    model.load_state_dict(checkpoint["model"])
