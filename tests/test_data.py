"""Tests for labelflow.data: loading, checking, tag2label, split and file helpers."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import DUPLICATE_GROUPS, REPO, make_duplicates_dataset, make_tiny_dataset, write_badly_named_image
from labelflow.dataset import (
    DUPLICATE_COLUMNS,
    DuplicateSettings,
    duplicate_folds,
    read_dataset_csv,
    read_duplicates,
    read_image_list,
    read_tag2cls,
    resolve_valid_folds,
    split,
    tag2label,
    tag2label_csv,
    valid_mask,
)
from labelflow.demo import write_digits_dataset
from labelflow.images import IMAGE_EXTENSIONS, check_image, load_image
from labelflow.io import (
    DatasetError,
    atomic_directory,
    atomic_output,
    load_npy,
    save_npy_atomic,
    write_csv_atomic,
    write_json_atomic,
)


def _noise_png(path: Path, size: int = 64, seed: int = 1) -> Path:
    """An incompressible PNG, so cutting it in half leaves the pixel data truncated."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


# --------------------------------------------------------------------------- images


def test_image_extensions_are_lower_case_suffixes() -> None:
    assert {".png", ".jpg", ".jpeg", ".tif", ".webp"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


@pytest.mark.parametrize(
    ("image", "expected_corner"),
    [
        (Image.new("L", (5, 4), 77), [77, 77, 77]),
        (Image.new("1", (5, 4), 1), [255, 255, 255]),
        (Image.new("RGB", (5, 4), (10, 20, 30)), [10, 20, 30]),
        (Image.new("RGBA", (5, 4), (200, 100, 50, 255)), [200, 100, 50]),
        (Image.new("RGBA", (5, 4), (200, 100, 50, 0)), [0, 0, 0]),  # transparent -> black
        (Image.new("RGBA", (5, 4), (200, 100, 50, 128)), [100, 50, 25]),  # half -> half
        (Image.new("LA", (5, 4), (90, 255)), [90, 90, 90]),
        (Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)), [255, 255, 255]),
        (Image.fromarray(np.full((4, 5), 257 * 100, dtype=np.uint16)), [100, 100, 100]),
    ],
)
def test_load_image_modes_give_hxwx3_uint8(
    tmp_path: Path, image: Image.Image, expected_corner: list[int]
) -> None:
    path = tmp_path / "x.png"
    image.save(path)
    array = load_image(path)
    assert array.shape == (4, 5, 3)
    assert array.dtype == np.uint8
    assert array[0, 0].tolist() == expected_corner


def test_load_image_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (3, 2), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # palette entry 0 (red) is transparent
    image.save(tmp_path / "p.png")
    array = load_image(tmp_path / "p.png")
    assert array.shape == (2, 3, 3)
    assert array[0, 0].tolist() == [0, 0, 0]
    assert array[0, 1].tolist() == [0, 255, 0]


def test_load_image_32bit_int_and_float(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert load_image(tmp_path / "i.tif")[..., 0].tolist() == [[0, 255]]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert load_image(tmp_path / "f.tif")[..., 1].tolist() == [[0, 128, 255]]
    Image.fromarray(np.array([[-10.0, 0.0, 30.0]], dtype=np.float32)).save(tmp_path / "g.tif")
    assert load_image(tmp_path / "g.tif")[..., 2].tolist() == [[0, 64, 255]]  # min-max stretched


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    image = Image.new("RGB", (4, 2), (50, 60, 70))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.png", exif=exif)
    assert load_image(tmp_path / "rotated.png").shape == (4, 2, 3)


def test_load_image_raises_on_truncated_file(tmp_path: Path) -> None:
    path = _noise_png(tmp_path / "t.png")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OSError):
        load_image(path)


def test_check_image_reasons(tmp_path: Path) -> None:
    good = _noise_png(tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder.png").mkdir()

    assert check_image(good) is None
    assert check_image(truncated).startswith("corrupt or truncated: ")
    assert check_image(garbage).startswith("not an image: ")
    assert check_image(tmp_path / "notes.txt") == "not an image file (extension .txt)"
    assert check_image(tmp_path / "README") == "not an image file (extension none)"
    assert check_image(tmp_path / "missing.png").startswith("unreadable: ")
    assert check_image(tmp_path / "folder.png") == "not a regular file"
    os.mkfifo(tmp_path / "pipe.png")
    assert check_image(tmp_path / "pipe.png") == "not a regular file"  # and does not hang


# --------------------------------------------------------------------------- tag2label


def test_tag2label_tiny(tiny_dataset: Path) -> None:
    result = tag2label(tiny_dataset)
    assert result.tag2cls == {"class_00": 0, "class_01": 1, "class_02": 2}
    assert list(result.dataset.columns) == ["path", "tag", "sha1", "phash", "group"]
    assert result.dataset["phash"].str.fullmatch("[0-9a-f]{16}").all()
    assert result.dataset["group"].nunique() == 36  # no copies: one group per image
    assert len(result.dataset) == 36
    assert result.dataset["tag"].value_counts().to_dict() == {
        "class_00": 12,
        "class_01": 12,
        "class_02": 12,
    }
    assert result.dataset["path"].iloc[0] == "class_00/img_000.png"
    assert result.dataset["path"].iloc[-1] == "class_02/img_011.png"
    assert result.dataset.equals(result.dataset.sort_values(["tag", "path"], ignore_index=True))
    assert all((tiny_dataset / p).is_file() for p in result.dataset["path"])
    assert result.skipped.empty and list(result.skipped.columns) == ["path", "reason"]
    assert result.duplicates.empty and list(result.duplicates.columns) == DUPLICATE_COLUMNS


def test_tag2label_skips_junk_with_reasons(tiny_dataset: Path) -> None:
    truncated = _noise_png(tiny_dataset / "class_00" / "truncated.png")
    truncated.write_bytes(truncated.read_bytes()[:1000])
    (tiny_dataset / "class_00" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tiny_dataset / "class_00" / "fake.jpg").write_bytes(b"plain text with an image name")
    (tiny_dataset / "class_01" / "notes.txt").write_text("not an image")
    (tiny_dataset / "class_01" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tiny_dataset / "README.md").write_text("top-level file")
    (tiny_dataset / ".snakemake_timestamp").write_text("")
    (tiny_dataset / ".cache").mkdir()
    _noise_png(tiny_dataset / ".cache" / "x.png")
    _noise_png(tiny_dataset / "class_02" / ".thumbs" / "y.png")

    result = tag2label(tiny_dataset)
    reasons = dict(zip(result.skipped["path"], result.skipped["reason"], strict=True))
    assert reasons["class_00/truncated.png"].startswith("corrupt or truncated: ")
    assert reasons["class_00/corrupt.png"].startswith("corrupt or truncated: ")
    assert reasons["class_00/fake.jpg"].startswith("not an image: ")
    assert reasons["class_01/notes.txt"] == "not an image file (extension .txt)"
    assert reasons["class_01/.DS_Store"] == "hidden file"
    assert reasons["README.md"] == "not inside a class folder"
    assert reasons[".cache"] == "hidden folder"
    assert reasons["class_02/.thumbs"] == "hidden folder"
    assert len(reasons) == 8  # the Snakemake marker is ignored silently
    assert result.tag2cls == {"class_00": 0, "class_01": 1, "class_02": 2}  # .cache is no class
    assert len(result.dataset) == 36
    assert not set(result.dataset["path"]) & set(reasons)


def test_tag2label_nested_folders_belong_to_class(tiny_dataset: Path) -> None:
    _noise_png(tiny_dataset / "class_01" / "sub" / "deeper" / "n.png")
    result = tag2label(tiny_dataset)
    row = result.dataset[result.dataset["path"] == "class_01/sub/deeper/n.png"]
    assert row["tag"].tolist() == ["class_01"]
    assert len(result.dataset) == 37


@pytest.mark.parametrize("content", [None, "notes.txt", ".hidden.png"])
def test_tag2label_class_without_images_is_an_error(
    tiny_dataset: Path, content: str | None
) -> None:
    empty = tiny_dataset / "empty class"
    empty.mkdir()
    if content:
        (empty / content).write_text("x")
    with pytest.raises(
        DatasetError, match="class folder 'empty class' has no readable images; remove it"
    ):
        tag2label(tiny_dataset)


def test_tag2label_needs_two_classes(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "one", n_classes=1, per_class=3)
    with pytest.raises(DatasetError, match="1 class folder.*at least 2"):
        tag2label(root)


def test_tag2label_missing_or_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist; set config key `dataset`"):
        tag2label(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="is not a folder"):
        tag2label(tmp_path / "file")


def test_tag2label_follows_symlinks_and_survives_loops(tiny_dataset: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tiny_dataset, target_is_directory=True)
    elsewhere = make_tiny_dataset(tmp_path / "elsewhere", n_classes=1, per_class=4, seed=5)
    (tiny_dataset / "linked_class").symlink_to(elsewhere / "class_00", target_is_directory=True)
    (tiny_dataset / "class_00" / "loop").symlink_to(
        tiny_dataset / "class_00", target_is_directory=True
    )

    result = tag2label(link)
    assert result.tag2cls == {"class_00": 0, "class_01": 1, "class_02": 2, "linked_class": 3}
    assert len(result.dataset) == 40
    assert "linked_class/img_003.png" in set(result.dataset["path"])
    assert not any(p.startswith("class_00/loop") for p in result.dataset["path"])
    assert result.skipped["reason"].tolist() == ["folder already visited (symlink loop)"]
    assert all((link / p).is_file() for p in result.dataset["path"])


def test_tag2label_unicode_and_spaces(tmp_path: Path) -> None:
    root = tmp_path / "my data"
    _noise_png(root / "chat noir" / "é 1.png", size=8, seed=1)
    _noise_png(root / "日本" / "画像 2.png", size=8, seed=2)
    result = tag2label(root)
    assert result.tag2cls == {"chat noir": 0, "日本": 1}
    assert result.dataset[["path", "tag"]].values.tolist() == [
        ["chat noir/é 1.png", "chat noir"],
        ["日本/画像 2.png", "日本"],
    ]


def test_tag2label_refuses_the_label_separator_in_a_class_folder(tmp_path: Path) -> None:
    # `;` joins several labels: corrections, label issues and group reports would split the name
    root = tmp_path / "data"
    _noise_png(root / "cat;dog" / "1.png", size=8, seed=1)
    _noise_png(root / "fox" / "2.png", size=8, seed=2)
    with pytest.raises(DatasetError, match="class folder 'cat;dog' has `;` in its name.*rename the folder"):
        tag2label(root)


def test_tag2label_groups_identical_files_and_drops_label_conflicts(tiny_dataset: Path) -> None:
    shutil.copy(tiny_dataset / "class_00" / "img_000.png", tiny_dataset / "class_01" / "copy.png")
    shutil.copy(tiny_dataset / "class_02" / "img_005.png", tiny_dataset / "class_02" / "again.png")
    result = tag2label(tiny_dataset)
    assert len(result.dataset) == 36  # 38 files; the two copies in different classes are left out
    assert "class_00/img_000.png" not in set(result.dataset["path"])
    kept = result.dataset.set_index("path").loc[["class_02/again.png", "class_02/img_005.png"], "group"]
    assert kept.nunique() == 1
    assert result.duplicates.drop(columns="group").values.tolist() == [
        [2, "class_00/img_000.png;class_01/copy.png", "class_00;class_01", True, "exact"],
        [2, "class_02/again.png;class_02/img_005.png", "class_02", False, "exact"],
    ]
    assert result.skipped.values.tolist() == [
        ["class_00/img_000.png", "label conflict: duplicate of class_01/copy.png in class class_01"],
        ["class_01/copy.png", "label conflict: duplicate of class_00/img_000.png in class class_00"],
    ]

    kept_all = tag2label(tiny_dataset, DuplicateSettings(label_conflicts="keep"))
    assert len(kept_all.dataset) == 38 and kept_all.skipped.empty
    pd.testing.assert_frame_equal(kept_all.duplicates, result.duplicates)


@pytest.fixture
def duplicates_dataset(tmp_path: Path) -> Path:
    """cat/dog/owl photo-like images with exact and near copies (conftest.DUPLICATE_GROUPS)."""
    return make_duplicates_dataset(tmp_path / "dups")


def test_near_copies_are_grouped_and_reported(duplicates_dataset: Path, caplog) -> None:
    with caplog.at_level("WARNING", logger="labelflow.dataset"):
        result = tag2label(duplicates_dataset)
    report = result.duplicates
    assert [tuple(row) for row in report[["members", "classes", "label_conflict", "kind"]].values] == DUPLICATE_GROUPS
    assert report["size"].tolist() == [2, 2, 2, 2, 3, 2, 2]
    # the members of the three cross-class groups are left out, each naming a copy in another class
    reasons = result.skipped.set_index("path")["reason"]
    assert reasons.to_dict() == {
        "cat/cat_05.png": "label conflict: duplicate of owl/from_cat_05.png in class owl",
        "cat/from_dog_06.jpg": "label conflict: duplicate of dog/dog_06.png in class dog",
        "dog/dog_06.png": "label conflict: duplicate of cat/from_dog_06.jpg in class cat",
        "dog/from_owl_07.png": "label conflict: duplicate of owl/owl_07.png in class owl",
        "owl/from_cat_05.png": "label conflict: duplicate of cat/cat_05.png in class cat",
        "owl/owl_07.png": "label conflict: duplicate of dog/from_owl_07.png in class dog",
    }
    assert len(result.dataset) == 32 - 6 and not set(reasons.index) & set(result.dataset["path"])
    conflicts = [r.getMessage() for r in caplog.records if "label conflict" in r.getMessage()]
    assert len(conflicts) == 3
    assert "cat (cat/cat_05.png), owl (owl/from_cat_05.png); dropped" in conflicts[0]

    exact_only = tag2label(duplicates_dataset, DuplicateSettings(max_distance=-1))
    assert exact_only.duplicates[["members", "kind"]].values.tolist() == [
        ["dog/dog_04.png;dog/dog_04_copy.png", "exact"],
        ["dog/from_owl_07.png;owl/owl_07.png", "exact"],
        ["owl/owl_03.png;owl/owl_03_copy.png", "exact"],
    ]
    assert "dog/dog_04_q85.jpg" in set(exact_only.dataset["path"])


def _groups_in_one_fold(table: pd.DataFrame) -> bool:
    return bool((table.groupby("group")["fold"].nunique() == 1).all())


@pytest.mark.parametrize("label_conflicts", ["drop", "keep"])
def test_split_keeps_every_duplicate_group_in_one_fold(duplicates_dataset: Path, label_conflicts: str) -> None:
    from sklearn.model_selection import StratifiedKFold

    result = tag2label(duplicates_dataset, DuplicateSettings(label_conflicts=label_conflicts))
    shared = result.duplicates["group"]
    assert len(result.dataset[result.dataset["group"].isin(shared)]) == (9 if label_conflicts == "drop" else 15)
    for seed in range(5):
        folds = split(result.dataset, result.tag2cls, n_folds=3, seed=seed)
        assert list(folds.columns) == ["path", "tag", "class", "fold", "sha1", "group"]
        assert _groups_in_one_fold(folds)
        assert folds.groupby("fold").size().between(len(folds) // 3 - 2, len(folds) // 3 + 2).all()
        # the data would catch a split that ignores groups: image-level folds break some up
        plain = np.empty(len(folds), dtype=np.int64)
        for k, (_, test) in enumerate(StratifiedKFold(3, shuffle=True, random_state=seed).split(folds, folds["class"])):
            plain[test] = k
        assert not _groups_in_one_fold(folds.assign(fold=plain))


def test_duplicate_folds_table(duplicates_dataset: Path, tmp_path: Path) -> None:
    result = tag2label(duplicates_dataset)
    write_csv_atomic(result.duplicates, tmp_path / "duplicates.csv")
    folds = split(result.dataset, result.tag2cls, n_folds=3, seed=0)
    table = duplicate_folds(read_duplicates(tmp_path / "duplicates.csv"), folds)
    assert list(table.columns) == DUPLICATE_COLUMNS + ["fold"]
    dropped = table["label_conflict"]
    assert (table.loc[dropped, "fold"] == "").all()  # left out of the dataset: no fold
    fold_of = folds.set_index("path")["fold"]
    for members, fold in zip(table.loc[~dropped, "members"], table.loc[~dropped, "fold"]):
        assert {str(fold_of[m]) for m in members.split(";")} == {fold}


def test_split_counts_groups_per_class(duplicates_dataset: Path) -> None:
    result = tag2label(duplicates_dataset)
    # after the conflicts are dropped: cat 8 images in 7 groups, dog 10 in 7, owl 8 in 7
    with pytest.raises(
        DatasetError,
        match=r"'cat' \(7 groups, 8 images\), 'dog' \(7 groups, 10 images\), 'owl' \(7 groups, 8 images\) "
        r"have fewer groups than n_folds=8",
    ):
        split(result.dataset, result.tag2cls, n_folds=8)
    assert split(result.dataset, result.tag2cls, n_folds=7)["fold"].nunique() == 7


def test_split_without_duplicates_is_as_stratified_as_stratified_kfold() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold

    target = load_digits().target  # 1,797 images, 174-183 per class
    table = pd.DataFrame({"path": [f"{y}/{i:04d}.png" for i, y in enumerate(target)], "tag": target.astype(str)})
    tag2cls = {str(d): d for d in range(10)}
    plain = np.zeros((5, 10), dtype=int)
    for k, (_, test) in enumerate(StratifiedKFold(5, shuffle=True, random_state=42).split(table, target)):
        plain[k] = np.bincount(target[test], minlength=10)
    for groups in (np.arange(len(table)), np.arange(len(table)) // 2):  # singletons; pairs (same class: sorted)
        grouped = split(table.sort_values("tag", kind="stable").assign(group=groups), tag2cls, n_folds=5, seed=42)
        counts = grouped.groupby(["fold", "class"]).size().unstack().to_numpy()
        assert np.abs(np.sort(counts, axis=0) - np.sort(plain, axis=0)).max() <= (1 if groups[1] == 1 else 2)
        assert _groups_in_one_fold(grouped)


def test_duplicate_settings_defaults_are_the_schema_defaults() -> None:
    import yaml

    schema = yaml.safe_load((REPO / "config" / "schemas" / "config.schema.yaml").read_text())
    section = schema["properties"]["duplicates"]["properties"]
    defaults = DuplicateSettings()
    assert (section["max_distance"]["default"], section["label_conflicts"]["default"]) == (4, "drop")
    assert (defaults.max_distance, defaults.label_conflicts) == (4, "drop")
    assert section["min_correlation"]["default"] == defaults.min_correlation == 0.99
    assert DuplicateSettings.from_config({"max_distance": -1, "label_conflicts": "keep", "min_correlation": None}) == (
        DuplicateSettings(-1, "keep", None)
    )
    assert DuplicateSettings(min_correlation=None).confirm(["a.png"]) is None
    with pytest.raises(DatasetError, match=r"`duplicates.min_correlation` must be a number in 0..1 or null"):
        DuplicateSettings(min_correlation=1.5)
    with pytest.raises(DatasetError, match="`duplicates.label_conflicts` must be one of"):
        DuplicateSettings(label_conflicts="merge")
    with pytest.raises(DatasetError, match="`duplicates.max_distance` must be an integer in -1..32"):
        DuplicateSettings(max_distance=40)


def test_names_that_are_not_utf8_are_skipped_and_reported(tiny_dataset: Path, tmp_path: Path) -> None:
    shown = write_badly_named_image(tiny_dataset / "class_00")
    assert shown == "\\xff\\xfe.png"
    bad_folder = os.path.join(os.fsencode(tiny_dataset / "class_01"), b"old\xe9zip")
    os.mkdir(bad_folder)
    write_badly_named_image(os.fsdecode(bad_folder), b"ok.png")
    os.mkdir(os.path.join(os.fsencode(tiny_dataset), b"\xfe class"))

    result = tag2label(tiny_dataset)
    assert len(result.dataset) == 36
    assert result.skipped.values.tolist() == [
        ["\\xfe class", "folder name is not valid UTF-8"],
        ["class_00/\\xff\\xfe.png", "file name is not valid UTF-8"],
        ["class_01/old\\xe9zip", "folder name is not valid UTF-8"],
    ]
    write_csv_atomic(result.skipped, tmp_path / "skipped.csv")  # used to fail: surrogates in UTF-8
    assert "class_00/\\xff\\xfe.png,file name is not valid UTF-8" in (tmp_path / "skipped.csv").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- split


def test_split_is_stratified_and_typed(tiny_dataset: Path) -> None:
    labels = tag2label(tiny_dataset)
    result = split(labels.dataset, labels.tag2cls, n_folds=5, seed=42)
    assert list(result.columns) == ["path", "tag", "class", "fold", "sha1", "group"]
    assert len(result) == 36
    assert result["path"].is_monotonic_increasing
    assert (result["class"] == result["tag"].map(labels.tag2cls)).all()
    assert set(result["fold"]) == {0, 1, 2, 3, 4}
    per_fold = result.groupby(["fold", "class"]).size()
    assert per_fold.between(12 / 5 - 1, 12 / 5 + 1).all() and len(per_fold) == 15
    assert result["class"].dtype == np.int64 and result["fold"].dtype == np.int64


def test_split_is_deterministic_per_seed(tiny_dataset: Path) -> None:
    labels = tag2label(tiny_dataset)
    a = split(labels.dataset, labels.tag2cls, seed=7)
    shuffled = labels.dataset.sample(frac=1.0, random_state=3)
    b = split(shuffled, labels.tag2cls, seed=7)
    c = split(labels.dataset, labels.tag2cls, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a["fold"].equals(c["fold"])


def test_split_rejects_small_classes_and_bad_n_folds(tmp_path: Path) -> None:
    dataset = pd.DataFrame(
        {"path": [f"{t}/{i}.png" for t, n in [("a", 6), ("b", 3), ("c", 2)] for i in range(n)]}
    )
    dataset["tag"] = dataset["path"].str[0]
    tag2cls = {"a": 0, "b": 1, "c": 2}
    with pytest.raises(
        DatasetError,
        match=r"'b' \(3 groups, 3 images\), 'c' \(2 groups, 2 images\).*lower config key `n_folds`",
    ):
        split(dataset, tag2cls, n_folds=5)
    assert len(split(dataset, tag2cls, n_folds=2)) == 11
    with pytest.raises(DatasetError, match="`n_folds` must be an integer >= 2"):
        split(dataset, tag2cls, n_folds=1)
    with pytest.raises(DatasetError, match="'z' are not in the tag-to-class mapping"):
        split(dataset.assign(tag="z"), tag2cls, n_folds=2)


def test_resolve_valid_folds_and_mask() -> None:
    assert resolve_valid_folds(5, None) == [4]
    assert resolve_valid_folds(5, [-1, 0]) == [0, 4]
    assert resolve_valid_folds(5, 2) == [2]
    for bad in ([5], [-6]):
        with pytest.raises(DatasetError, match="`valid_folds`"):
            resolve_valid_folds(5, bad)
    with pytest.raises(DatasetError, match="no training data"):
        resolve_valid_folds(2, [0, 1])
    with pytest.raises(DatasetError, match="no validation data"):
        resolve_valid_folds(2, [])
    mask = valid_mask(pd.DataFrame({"fold": [0, 1, 2, 1]}), [1])
    assert mask.tolist() == [False, True, False, True]


# --------------------------------------------------------------------------- files


def test_read_dataset_csv_accepts_good_rows_and_keeps_tags_as_strings(tmp_path: Path) -> None:
    _noise_png(tmp_path / "data" / "0" / "a.png", size=4)
    _noise_png(tmp_path / "data" / "NA" / "b.png", size=4)
    write_csv_atomic(
        pd.DataFrame({"path": ["0/a.png", "NA/b.png"], "tag": ["0", "NA"]}), tmp_path / "d.csv"
    )
    df = read_dataset_csv(tmp_path / "d.csv", tmp_path / "data")
    assert df["tag"].tolist() == ["0", "NA"]
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "data", target_is_directory=True)
    assert len(read_dataset_csv(tmp_path / "d.csv", link)) == 2


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("../outside.png", "escapes the dataset folder"),
        ("a/../../outside.png", "escapes the dataset folder"),
        ("/etc/passwd", "absolute path"),
        ("a/missing.png", "file not found"),
    ],
)
def test_read_dataset_csv_rejects_bad_paths(tmp_path: Path, path: str, problem: str) -> None:
    _noise_png(tmp_path / "data" / "a" / "ok.png", size=4)
    _noise_png(tmp_path / "outside.png", size=4)
    csv = tmp_path / "d.csv"
    write_csv_atomic(pd.DataFrame({"path": ["a/ok.png", path], "tag": ["a", "a"]}), csv)
    with pytest.raises(DatasetError, match=f"1 bad row.*line 3 \\('{path}'\\): {problem}"):
        read_dataset_csv(csv, tmp_path / "data", check_files=True)
    if problem == "file not found":  # model jobs do not stat every file: tag2label checked them
        assert len(read_dataset_csv(csv, tmp_path / "data")) == 2


def test_read_dataset_csv_checks_columns_and_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist; run the tag2label step"):
        read_dataset_csv(tmp_path / "none.csv", tmp_path)
    write_csv_atomic(pd.DataFrame({"file": ["x.png"]}), tmp_path / "d.csv")
    with pytest.raises(DatasetError, match="lacks column\\(s\\) 'path', 'tag'"):
        read_dataset_csv(tmp_path / "d.csv", None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"path,tag\na/1.png,a,x\na/2.png,a,y\n", "line 2 has 3 fields but the header has 2"),  # was: path = a
        (b'path,tag\n"a/1.png,a\n', "is not a readable CSV .*EOF inside string.*regenerate it with tag2label"),
    ],
)
def test_read_dataset_csv_refuses_a_malformed_table_naming_it(tmp_path: Path, content: bytes, message: str) -> None:
    # `labelflow split --in-csv` reads a table a person may have written
    csv = tmp_path / "d.csv"
    csv.write_bytes(content)
    with pytest.raises(DatasetError, match=rf"dataset table .*d\.csv.*{message}"):
        read_dataset_csv(csv, None)


def _labels_dataset(tmp_path: Path, rows: str) -> tuple[Path, Path]:
    for i, name in enumerate(["im0.png", "a/b.png", "c.png"]):
        _noise_png(tmp_path / "images" / name, size=8, seed=i)
    csv = tmp_path / "labels.csv"
    csv.write_text(rows)
    return csv, tmp_path / "images"


def test_tag2label_csv_compares_paths_after_normalising_them(tmp_path: Path) -> None:
    csv, images = _labels_dataset(tmp_path, "path,labels\n./im0.png,x\na//b.png,y\nc.png,x\n")
    assert tag2label_csv(csv, images).dataset["path"].tolist() == ["a/b.png", "c.png", "im0.png"]
    for twice in ("im0.png,x\n./im0.png,y\n", "a//b.png,x\na/b.png,y\n"):
        csv.write_text("path,labels\nc.png,x\n" + twice)
        with pytest.raises(DatasetError, match=r"labels\.csv lists '(im0|a/b)\.png' more than once"):
            tag2label_csv(csv, images)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"path,labels\nim0.png,x,y\nc.png,x,z\n", "line 2 has 3 fields"),  # an unquoted comma
        (b"path,labels\nim0.png,x\nc.png,x,\n", "line 3 has 3 fields"),
        (b'path,labels\n"im0.png,x\n', "not a readable CSV"),
        (b"", "not a readable CSV"),
        (b"path,labels\nim\xe9.png,x\n", "not a readable CSV"),  # Latin-1
    ],
)
def test_malformed_labels_table_or_image_list_is_an_error_naming_it(tmp_path: Path, content: bytes, message: str) -> None:
    csv, images = _labels_dataset(tmp_path, "")
    csv.write_bytes(content)
    with pytest.raises(DatasetError, match=rf"labels table .*labels\.csv.*{message}"):
        tag2label_csv(csv, images)
    with pytest.raises(DatasetError, match=rf"image table .*labels\.csv.*{message}"):
        read_image_list(csv)


def test_read_image_list_names_lines_as_plain_numbers(tmp_path: Path) -> None:
    csv = tmp_path / "images.csv"
    csv.write_text('path,label\n"a,b.png",x\nc.png,\n')
    assert read_image_list(csv).to_dict("list") == {"path": ["a,b.png", "c.png"], "label": ["x", ""]}
    with pytest.raises(DatasetError, match=r"line\(s\) \[3\] have no label"):
        read_image_list(csv, require_labels=True)


def test_atomic_writers_round_trip(tmp_path: Path) -> None:
    df = pd.DataFrame({"path": ["é/1.png"], "tag": ["é"]})
    write_csv_atomic(df, tmp_path / "new" / "dir" / "x.csv")
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "new" / "dir" / "x.csv"), df, check_dtype=False
    )
    write_json_atomic({"é": 0, "b": 1}, tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text(encoding="utf-8") == '{\n  "é": 0,\n  "b": 1\n}\n'
    assert read_tag2cls(tmp_path / "m.json") == {"é": 0, "b": 1}
    write_json_atomic({"a": 0, "b": 0}, tmp_path / "m.json")  # overwrite in place
    with pytest.raises(DatasetError, match="distinct class 0..n-1"):
        read_tag2cls(tmp_path / "m.json")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["m.json", "x.csv"]


def test_atomic_output_keeps_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind

    with atomic_output(target, suffix=".png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and not tmp.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    # the umask decides the mode, as for any file the user's tools write (tempfile: 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_directory_replaces_the_folder_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "tree"
    (out / "old").mkdir(parents=True)
    with pytest.raises(OSError):
        with atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("x")
            raise OSError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["old"]
    with atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_npy_round_trip_refuses_pickled_objects(tmp_path: Path) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_npy_atomic(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(load_npy(tmp_path / "x.npy"), x)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npy(tmp_path / "obj.npy")


# --------------------------------------------------------------------------- digits


def test_write_digits_dataset(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    assert write_digits_dataset(out) == 1797
    files = sorted(out.rglob("*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in out.iterdir()) == [str(d) for d in range(10)]
    assert (out / "0" / "0000.png").is_file()  # image 0 of load_digits() is a zero
    with Image.open(files[0]) as image:
        assert image.size == (32, 32) and image.mode == "L"
    assert os.listdir(tmp_path) == ["digits"]  # no temporary sibling left behind

    with pytest.raises(DatasetError, match="already exists; refusing to overwrite"):
        write_digits_dataset(out)
    assert len(list(out.rglob("*.png"))) == 1797


def test_write_digits_dataset_is_deterministic(tmp_path: Path) -> None:
    def digest(root: Path) -> str:
        h = hashlib.sha1()
        for p in sorted(root.rglob("*.png")):
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
        return h.hexdigest()

    write_digits_dataset(tmp_path / "a", image_size=12)
    write_digits_dataset(tmp_path / "b", image_size=12)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert load_image(tmp_path / "a" / "0" / "0000.png").shape == (12, 12, 3)


def test_very_large_image_is_resized_once(tmp_path):
    from labelflow.loaders import decode_resized

    path = tmp_path / "big.png"
    Image.fromarray(np.full((2000, 3000, 3), 200, dtype=np.uint8)).save(path)
    assert check_image(path) is None
    small = decode_resized(path, 32)
    assert small.shape == (32, 32, 3) and int(small.mean()) == 200


def test_decompression_bomb_is_skipped_with_a_reason(tmp_path, monkeypatch):
    # Pillow refuses images over twice MAX_IMAGE_PIXELS; lower the limit instead of writing GBs
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(path)
    assert check_image(path).startswith("too large")
