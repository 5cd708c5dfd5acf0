"""Tests for labelflow.fashion: the IDX reader, source lookup and the class-folder writer.

All but one test use tiny fake IDX files written here; the last reads the real Debian
package files (with a small ``limit``) when they are installed.
"""

from __future__ import annotations

import os

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelflow.io import DatasetError
from labelflow.fashion import (
    CLASS_FOLDERS,
    DEBIAN_SOURCE_DIRS,
    FASHION_CLASSES,
    PUBLISHED_TEST_ACCURACY,
    find_source,
    read_idx,
    write_fashion_dataset,
)

_TYPE_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as IDX, written independently of the reader under test."""
    header = bytes([0, 0, _TYPE_CODES[array.dtype.type], array.ndim])
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gzipped: bool) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if gzipped else data)
    return path


def fake_split(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random 28x28 images; labels cycle 0..9 so each class has ``n_per_class``."""
    rng = np.random.default_rng(seed)
    n = n_per_class * len(FASHION_CLASSES)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % len(FASHION_CLASSES)).astype(np.uint8)
    return images, labels


@pytest.fixture
def fake_source(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A source folder with 30 train / 20 test images; train gzipped, test plain."""
    folder = tmp_path / "source"
    folder.mkdir()
    splits = {"train": fake_split(3, seed=1), "test": fake_split(2, seed=2)}
    for split, prefix, gzipped in (("train", "train", True), ("test", "t10k", False)):
        images, labels = splits[split]
        suffix = ".gz" if gzipped else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gzipped)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gzipped)
    return folder, splits


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([0, 9, 3, 255], dtype=np.uint8),
        np.array([[-2, 70000], [3, -1]], dtype=np.int32),
        np.array([1.5, -2.25, 1e30], dtype=np.float64),
    ],
    ids=["uint8-3d", "uint8-1d", "int32-2d", "float64-1d"],
)
def test_read_idx_round_trips_exactly(tmp_path: Path, array: np.ndarray, gzipped: bool) -> None:
    path = write_idx(tmp_path / "x-idx", array, gzipped)
    result = read_idx(path)
    assert result.shape == array.shape
    assert result.dtype == array.dtype and result.dtype.isnative
    np.testing.assert_array_equal(result, array)
    result[...] = 0  # a writable copy, not a view of the file's bytes


def test_read_idx_rejects_truncated_file_naming_it(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    cut = tmp_path / "cut-images-idx3-ubyte"
    cut.write_bytes(data[:-100])
    with pytest.raises(DatasetError, match=r"cut-images-idx3-ubyte.*truncated"):
        read_idx(cut)
    cut_gz = tmp_path / "cut-images-idx3-ubyte.gz"
    cut_gz.write_bytes(gzip.compress(data)[:-20])
    with pytest.raises(DatasetError, match=r"cut-images-idx3-ubyte\.gz.*truncated"):
        read_idx(cut_gz)


def test_read_idx_rejects_wrong_magic_and_extra_bytes(tmp_path: Path) -> None:
    png = tmp_path / "really.png"
    Image.new("L", (2, 2)).save(png)
    with pytest.raises(DatasetError, match=r"really\.png.*wrong magic"):
        read_idx(png)
    longer = tmp_path / "longer-idx1-ubyte"
    longer.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\x00")
    with pytest.raises(DatasetError, match=r"longer-idx1-ubyte.*trailing bytes"):
        read_idx(longer)


# --------------------------------------------------------------------------- find_source


def test_missing_files_error_names_folder_and_package(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        find_source(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "apt-get install dataset-fashion-mnist" in message and "--source" in message
    assert "t10k-labels-idx1-ubyte" in message


def test_find_source_prefers_plain_file_over_gz(fake_source) -> None:
    folder, _ = fake_source
    plain = folder / "train-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress((folder / "train-labels-idx1-ubyte.gz").read_bytes()))
    found = find_source(folder)
    assert found.files["train"] == (folder / "train-images-idx3-ubyte.gz", plain)
    assert found.files["test"][1] == folder / "t10k-labels-idx1-ubyte"


# --------------------------------------------------------------------------- writer


def test_writer_tree_counts_names_and_exact_pixels(tmp_path: Path, fake_source) -> None:
    folder, splits = fake_source
    out = tmp_path / "fashion"
    counts = write_fashion_dataset(out, source=folder)

    assert CLASS_FOLDERS[0] == "t-shirt_top" and CLASS_FOLDERS[9] == "ankle_boot"
    assert counts == {
        "train": dict.fromkeys(CLASS_FOLDERS, 3),
        "test": dict.fromkeys(CLASS_FOLDERS, 2),
    }
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folder gone
    for split, (images, labels) in splits.items():
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(CLASS_FOLDERS)
        files = sorted((out / split).glob("*/*.png"))
        assert len(files) == len(images)
        for path in files:
            index = int(path.stem)  # the file name is the index in the source arrays
            assert path.parent.name == CLASS_FOLDERS[labels[index]]
            assert len(path.stem) == 5
            with Image.open(path) as img:
                assert img.mode == "L"
                np.testing.assert_array_equal(np.asarray(img), images[index])


def test_limit_is_stratified_and_seeded(tmp_path: Path) -> None:
    folder = tmp_path / "source"
    folder.mkdir()
    for prefix, seed in (("train", 1), ("t10k", 2)):
        images, labels = fake_split(6, seed)
        images = images[:, :4, :4].copy()  # tiny images keep this test fast
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gzipped=False)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gzipped=False)

    def run(name: str, seed: int) -> dict[str, bytes]:
        counts = write_fashion_dataset(tmp_path / name, source=folder, limit=30, size=4, seed=seed)
        assert counts["train"] == counts["test"] == dict.fromkeys(CLASS_FOLDERS, 3)
        return tree(tmp_path / name)

    first, again, other = run("a", 0), run("b", 0), run("c", 1)
    assert len(first) == 60
    assert first == again  # same seed -> same files, same bytes
    assert set(first) != set(other)  # another seed picks other images


def test_limit_with_remainder_is_spread_over_classes(tmp_path: Path, fake_source) -> None:
    folder, _ = fake_source
    counts = write_fashion_dataset(tmp_path / "out", source=folder, limit=13)
    assert sum(counts["train"].values()) == sum(counts["test"].values()) == 13
    assert sorted(counts["train"].values()) == [1] * 7 + [2] * 3


def test_resize_and_jpg_output(tmp_path: Path, fake_source) -> None:
    folder, _ = fake_source
    out = tmp_path / "big"
    write_fashion_dataset(out, source=folder, size=40, image_format="jpg", limit=10)
    files = sorted(out.glob("*/*/*"))
    assert len(files) == 20 and {p.suffix for p in files} == {".jpg"}
    for path in files:
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "L", (40, 40))
            img.load()
    again = tmp_path / "big2"
    write_fashion_dataset(again, source=folder, size=40, image_format="jpg", limit=10)
    assert tree(out) == tree(again)  # fixed quality -> deterministic bytes


def test_existing_out_dir_is_refused_and_left_alone(tmp_path: Path, fake_source) -> None:
    folder, _ = fake_source
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match=r"out already exists"):
        write_fashion_dataset(out, source=folder)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bad_source_leaves_no_output(tmp_path: Path, fake_source) -> None:
    folder, _ = fake_source
    labels = folder / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.*truncated"):
        write_fashion_dataset(tmp_path / "out", source=folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


@pytest.mark.parametrize(
    ("options", "pattern"),
    [({"size": 0}, "image size"), ({"image_format": "gif"}, "format"), ({"limit": 5}, "limit")],
)
def test_bad_options_are_refused(tmp_path: Path, fake_source, options, pattern) -> None:
    folder, _ = fake_source
    with pytest.raises(DatasetError, match=pattern):
        write_fashion_dataset(tmp_path / "out", source=folder, **options)
    assert not (tmp_path / "out").exists()


def test_published_table_has_the_readme_figures() -> None:
    assert len(FASHION_CLASSES) == 10 and FASHION_CLASSES[0] == "T-shirt/top"
    assert PUBLISHED_TEST_ACCURACY["ResNet18"] == 0.949
    assert PUBLISHED_TEST_ACCURACY["MobileNet"] == 0.950
    assert PUBLISHED_TEST_ACCURACY["WRN-28-10"] == 0.959
    assert PUBLISHED_TEST_ACCURACY["Human (crowd)"] == 0.835


# --------------------------------------------------------------------------- real files


def installed_source():
    """The Debian package's files; skip without them (fail with LABELFLOW_REQUIRE_FASHION=1)."""
    try:
        return find_source()
    except DatasetError:
        if os.environ.get("LABELFLOW_REQUIRE_FASHION") == "1":
            pytest.fail(f"LABELFLOW_REQUIRE_FASHION=1 but no Fashion-MNIST files in {DEBIAN_SOURCE_DIRS[0]}")
        pytest.skip(
            f"dataset-fashion-mnist not installed (no files in {DEBIAN_SOURCE_DIRS[0]}): "
            "apt-get install dataset-fashion-mnist"
        )


def test_real_debian_files_when_installed(tmp_path: Path) -> None:
    found = installed_source()
    labels = read_idx(found.files["test"][1])
    assert labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10
    counts = write_fashion_dataset(tmp_path / "fm", limit=20, seed=3)
    assert counts["train"] == counts["test"] == dict.fromkeys(CLASS_FOLDERS, 2)
    sample = next((tmp_path / "fm" / "train" / "trouser").glob("*.png"))
    with Image.open(sample) as img:
        assert img.size == (28, 28)
    # The first test labels as published (ankle boot, pullover, trouser, ...).
    assert labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def test_near_duplicate_groups_on_real_fashion_photos_need_the_pixel_check(tmp_path: Path) -> None:
    """pHash alone chains Fashion-MNIST's look-alike silhouettes into cross-class groups
    (label conflicts dropped whole); with the default pixel check no look-alike is grouped."""
    from labelflow.dataset import DuplicateSettings, tag2label

    installed_source()
    write_fashion_dataset(tmp_path / "fm", limit=3000, seed=0)
    checked = tag2label(tmp_path / "fm" / "train")
    assert len(checked.dataset) >= 2990 and len(checked.skipped) <= 10
    assert checked.duplicates.empty or checked.duplicates["size"].max() <= 4
    phash_only = tag2label(tmp_path / "fm" / "train", DuplicateSettings(min_correlation=None))
    assert len(phash_only.skipped) >= 60  # measured: 126 of 3,000 dropped as label conflicts
    assert phash_only.duplicates["size"].max() >= 20 and phash_only.duplicates["label_conflict"].sum() >= 5
