"""Shared fixtures: a tiny, deterministic, easy-to-learn folder-per-class image set.

Other test modules can use the ``tiny_dataset`` fixture or import the plain function
(``from conftest import make_tiny_dataset``) to build one wherever they need it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# One distinct colour per class (cycled past 6 classes) so even a tiny model separates them.
_COLOURS = [
    (220, 40, 40),
    (40, 200, 40),
    (40, 60, 220),
    (220, 200, 40),
    (200, 40, 200),
    (40, 200, 200),
]


def make_tiny_dataset(
    root: Path | str, n_classes: int = 3, per_class: int = 12, size: int = 16, seed: int = 0
) -> Path:
    """Create ``root/class_XX/img_YYY.png`` RGB images and return ``root``.

    Class ``i`` has its own colour and shape (horizontal bar, vertical bar, square,
    cycling), with seeded noise so no two images are byte-identical.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        class_dir = root / f"class_{c:02d}"
        class_dir.mkdir(parents=True)
        colour = np.array(_COLOURS[c % len(_COLOURS)], dtype=np.float64)
        mask = np.zeros((size, size), dtype=bool)
        lo, hi = size // 4, size - size // 4
        shape = c % 3
        if shape == 0:
            mask[lo:hi, :] = True
        elif shape == 1:
            mask[:, lo:hi] = True
        else:
            mask[lo:hi, lo:hi] = True
        for j in range(per_class):
            pixels = np.full((size, size, 3), 30.0)
            pixels[mask] = colour
            pixels += rng.normal(0.0, 12.0, pixels.shape)
            image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(class_dir / f"img_{j:03d}.png")
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """3 classes x 12 RGB 16x16 PNGs under ``tmp_path / "tiny"``."""
    return make_tiny_dataset(tmp_path / "tiny")


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when the 2 CPUs are shared
    with other jobs (spinning OpenMP threads then stall every op)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_SCHEMA = REPO / "config" / "schemas" / "experiment.schema.yaml"


def validated_experiment(experiment: dict) -> dict:
    """A copy of ``experiment`` validated against the schema, which fills every default (the
    one place defaults are stated), as the workflow does before any job runs."""
    import copy

    from snakemake.utils import validate

    experiment = copy.deepcopy(experiment)
    validate(experiment, str(EXPERIMENT_SCHEMA))
    return experiment


def stage_spec(name: str = "stage1", **values):
    """A StageSpec from the given stage keys and the schema's defaults for the rest."""
    from labelflow.training import StageSpec

    experiment = validated_experiment({"heads": [{"name": "class"}], "stages": {name: values}})
    return StageSpec.from_dict(name, experiment["stages"][name])
