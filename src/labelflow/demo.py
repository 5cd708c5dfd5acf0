"""Bundled demo datasets written as folder-per-class image trees (the digits of `make run`)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from labelflow.io import DatasetError, PathLike


def write_digits_dataset(out_dir: PathLike, image_size: int = 32) -> int:
    """Write scikit-learn's bundled 8x8 digits as ``out_dir/<digit>/<n:04d>.png``.

    ``n`` is the image's index in ``load_digits()``, so files trace back to the source.
    Values 0..16 are scaled to 0..255 grayscale and upscaled bilinearly to
    ``image_size``. The set is written to a hidden temporary sibling and renamed into
    place, so an interrupted run never leaves a half-written dataset; an existing
    ``out_dir`` is refused rather than overwritten. Returns the number of images.
    """
    from sklearn.datasets import load_digits  # only this step needs it; keep import cheap

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image size must be a positive integer, got {image_size!r}")
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        raise DatasetError(
            f"output folder {out} already exists; refusing to overwrite it - "
            "remove it or choose another folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        digits = load_digits()
        pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        for n, (image, target) in enumerate(zip(pixels, digits.target, strict=True)):
            class_dir = tmp / str(int(target))
            class_dir.mkdir(exist_ok=True)
            big = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR)
            # Pillow's PNG writer adds no timestamps, so every run gives the same bytes.
            big.save(class_dir / f"{n:04d}.png")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(pixels)
