"""Shared fixtures: a tiny, deterministic, easy-to-learn folder-per-class image set.

Other test modules can use the ``tiny_dataset`` fixture or import the plain function
(``from conftest import make_tiny_dataset``) to build one wherever they need it.
"""

from __future__ import annotations

import os
import shutil
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


def textured_image(seed: int, size: int = 128) -> np.ndarray:
    """A photo-like RGB image: smooth 1/f clouds plus a few flat-coloured rectangles."""
    rng = np.random.default_rng(seed)
    freq = np.fft.fftfreq(size)
    radius = np.hypot(freq[:, None], freq[None, :])
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / radius
    clouds = np.real(np.fft.ifft2(spectrum))
    clouds = (clouds - clouds.min()) / np.ptp(clouds)
    pixels = clouds[..., None] * rng.uniform(120, 255, 3)
    for _ in range(3):
        top, left = rng.integers(0, size - size // 4, 2)
        height, width = rng.integers(size // 12, size // 4, 2)
        pixels[top : top + height, left : left + width] = rng.uniform(0, 255, 3)
    return np.clip(pixels, 0, 255).astype(np.uint8)


# Copies planted by make_duplicates_dataset: (copy, source, how). Sources are originals.
DUPLICATE_COPIES = [
    ("cat/cat_01_q70.jpg", "cat/cat_01.png", "jpeg70"),  # near, same class
    ("dog/dog_02_half.png", "dog/dog_02.png", "half"),  # near, same class
    ("owl/owl_03_copy.png", "owl/owl_03.png", "exact"),  # exact, same class
    ("dog/dog_04_copy.png", "dog/dog_04.png", "exact"),  # with the next: a mixed group of 3
    ("dog/dog_04_q85.jpg", "dog/dog_04.png", "jpeg85"),
    ("owl/from_cat_05.png", "cat/cat_05.png", "three_quarters"),  # near, across classes
    ("cat/from_dog_06.jpg", "dog/dog_06.png", "jpeg60"),  # near, across classes
    ("dog/from_owl_07.png", "owl/owl_07.png", "exact"),  # exact, across classes
]
# The groups of two or more those copies make: (sorted members, classes, label conflict, kind).
DUPLICATE_GROUPS = [
    ("cat/cat_01.png;cat/cat_01_q70.jpg", "cat", False, "near"),
    ("cat/cat_05.png;owl/from_cat_05.png", "cat;owl", True, "near"),
    ("cat/from_dog_06.jpg;dog/dog_06.png", "cat;dog", True, "near"),
    ("dog/dog_02.png;dog/dog_02_half.png", "dog", False, "near"),
    ("dog/dog_04.png;dog/dog_04_copy.png;dog/dog_04_q85.jpg", "dog", False, "mixed"),
    ("dog/from_owl_07.png;owl/owl_07.png", "dog;owl", True, "exact"),
    ("owl/owl_03.png;owl/owl_03_copy.png", "owl", False, "exact"),
]


def make_duplicates_dataset(root: Path | str, per_class: int = 8, size: int = 64) -> Path:
    """``root/{cat,dog,owl}/<class>_NN.png`` photo-like images (distinct: their pHashes are
    at least 14 bits apart) plus the copies in :data:`DUPLICATE_COPIES`: byte copies, JPEG
    re-compressions and resizes, three of them in another class than their source (label
    conflicts). The resulting groups are :data:`DUPLICATE_GROUPS`. Returns ``root``."""
    from PIL import Image

    root = Path(root)
    for c, name in enumerate(["cat", "dog", "owl"]):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(textured_image(100 * c + j, size)).save(root / name / f"{name}_{j:02d}.png")
    for copy, source, how in DUPLICATE_COPIES:
        if how == "exact":
            shutil.copy(root / source, root / copy)
            continue
        with Image.open(root / source) as image:
            if how.startswith("jpeg"):
                image.convert("RGB").save(root / copy, quality=int(how[4:]))
            else:
                side = size // 2 if how == "half" else size * 3 // 4
                image.resize((side, side), Image.Resampling.BICUBIC).save(root / copy)
    return root


def write_badly_named_image(folder: Path | str, name: bytes = b"\xff\xfe.png") -> str:
    """A real PNG whose file name is bytes that are not UTF-8 (as unpacked from an old zip
    file); returns the name as it will be reported (``\\xff\\xfe.png``)."""
    from PIL import Image

    path = os.path.join(os.fsencode(folder), name)
    with open(path, "wb") as f:
        Image.fromarray(textured_image(999, 32)).save(f, format="PNG")
    return name.decode("utf-8", "backslashreplace")


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
