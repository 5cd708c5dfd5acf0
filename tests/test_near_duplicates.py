"""Duplicate groups: exact copies, perceptual near copies, the pair search, the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import textured_image
from labelflow import near_duplicates
from labelflow.near_duplicates import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MIN_CORRELATION,
    PixelCheck,
    duplicate_groups,
    group_report,
    hamming_distance,
    near_pairs,
    perceptual_hash,
)


def flip_bits(value: int, bits: list[int]) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def names(n: int) -> list[str]:
    return [f"img_{i:04d}.png" for i in range(n)]


# --------------------------------------------------------------------------- exact copies


def test_exact_copies_share_a_group_and_others_do_not():
    keys = ["a.png", "b.png", "c.png", "d.png"]
    sha1 = ["s1", "s2", "s1", ""]  # "" = no digest: groups nothing
    groups = duplicate_groups(keys, sha1, phash=None)
    assert groups[0] == groups[2]
    assert len({groups[0], groups[1], groups[3]}) == 3


def test_negative_max_distance_means_exact_only():
    hashes = [0, 1, 0]  # 0 and 1 are one bit apart; the two zeros are the same picture
    groups = duplicate_groups(["a", "b", "c"], ["s1", "s2", "s3"], hashes, max_distance=-1)
    assert len(set(groups.tolist())) == 3


# --------------------------------------------------------------------------- real images


def test_recompressed_and_resized_copies_group_with_the_original(tmp_path: Path):
    original = Image.fromarray(textured_image(seed=1))
    original.save(tmp_path / "original.png")
    original.save(tmp_path / "recompressed.jpg", quality=60)
    original.resize((64, 64), Image.Resampling.BICUBIC).save(tmp_path / "half_size.png")
    files = ["original.png", "recompressed.jpg", "half_size.png"]
    hashes = [perceptual_hash(tmp_path / f) for f in files]

    groups = duplicate_groups(files, ["s1", "s2", "s3"], hashes)

    assert groups.tolist() == [0, 0, 0]


def test_distinct_images_of_one_kind_stay_apart():
    # Same generator, different seeds: the same "class" of picture, not copies.
    hashes = [perceptual_hash(textured_image(seed)) for seed in (1, 2, 3)]
    distances = [int(hamming_distance(hashes[i], hashes[j])) for i, j in [(0, 1), (0, 2), (1, 2)]]
    assert min(distances) > DEFAULT_MAX_DISTANCE
    groups = duplicate_groups(names(3), ["s1", "s2", "s3"], hashes)
    assert len(set(groups.tolist())) == 3


def test_hash_matches_imagehash_and_follows_exif_orientation(tmp_path: Path):
    import imagehash

    upright = Image.fromarray(textured_image(seed=4)[:, :96])  # not square: 96 x 128
    upright.save(tmp_path / "upright.png")
    # A camera stores the sensor image turned and says in EXIF how to turn it back.
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    upright.transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / "camera.jpg", exif=exif, quality=95
    )

    expected = str(imagehash.phash(upright))
    assert f"{perceptual_hash(tmp_path / 'upright.png'):016x}" == expected
    assert hamming_distance(perceptual_hash(tmp_path / "camera.jpg"), int(expected, 16)) <= 2


def test_unreadable_files_hash_to_none_and_group_by_bytes_only(tmp_path: Path):
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    Image.fromarray(textured_image(seed=5)).save(tmp_path / "whole.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:600])
    for name in ["garbage.png", "truncated.jpg", "missing.png"]:
        assert perceptual_hash(tmp_path / name) is None

    hashes = [None, None, 0, 0]
    groups = duplicate_groups(names(4), ["same", "same", "x", "y"], hashes)
    assert groups[0] == groups[1]  # identical bytes still group without a hash
    assert groups[2] == groups[3]
    assert groups[0] != groups[2]


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="uint8"):
        perceptual_hash(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="path or a numpy array"):
        perceptual_hash(12345)
    with pytest.raises(ValueError, match="unique"):
        duplicate_groups(["a", "a"], ["s1", "s2"], None)
    with pytest.raises(ValueError, match="float"):
        duplicate_groups(["a", "b"], ["s1", "s2"], [1.0, 2.0])


# --------------------------------------------------------------------------- grouping rules


def test_near_copies_group_transitively():
    a = 0x0123456789ABCDEF
    b = flip_bits(a, [0, 1, 2, 3, 4, 5])  # 6 bits from a
    c = flip_bits(b, [40, 41, 42, 43, 44, 45])  # 6 bits from b, 12 from a
    far = flip_bits(a, list(range(10, 30)))

    groups = duplicate_groups(
        ["a", "b", "c", "far"], ["s1", "s2", "s3", "s4"], [a, b, c, far], max_distance=8
    )
    assert groups[0] == groups[1] == groups[2]
    assert groups[3] != groups[0]
    without_b = duplicate_groups(["a", "c"], ["s1", "s3"], [a, c], max_distance=8)
    assert without_b[0] != without_b[1]


def _hashes_with_copies_and_equal_buckets(seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, 400).tolist()
    for i in range(0, 120, 3):  # chains of near copies
        hashes[i + 1] = flip_bits(hashes[i], [1, 9])
        hashes[i + 2] = flip_bits(hashes[i + 1], [20, 33])
    for i in range(200, 260, 4):  # buckets of 4 equal hashes, one of them near another bucket
        hashes[i + 1] = hashes[i + 2] = hashes[i + 3] = hashes[i]
    hashes[260] = flip_bits(hashes[200], [5])
    return hashes


@pytest.mark.parametrize("batch", [None, 3])
def test_a_confirm_that_accepts_every_pair_gives_the_plain_groups(monkeypatch, batch):
    hashes = _hashes_with_copies_and_equal_buckets()
    if batch:  # row pairs expanded a few at a time: the same groups
        monkeypatch.setattr(near_duplicates, "_MAX_CANDIDATES_PER_BATCH", batch)
    keys, sha1 = names(len(hashes)), [f"s{i}" for i in range(len(hashes))]
    seen = []
    accept_all = lambda a, b: seen.append(len(a)) or np.ones(len(a), dtype=bool)  # noqa: E731
    plain = duplicate_groups(keys, sha1, hashes, max_distance=4)
    checked = duplicate_groups(keys, sha1, hashes, max_distance=4, confirm=accept_all)
    assert (plain == checked).all()
    assert len(np.unique(plain)) < len(hashes)
    # every row pair is offered once: 40 chains x 3 pairs, 15 buckets x 6 pairs, 4 x 1 across buckets
    assert sum(seen) == 40 * 3 + 15 * 6 + 4
    if batch:
        assert max(seen) <= 2 * batch + 4


def test_a_rejected_pair_breaks_the_chain_and_equal_hashes_are_checked_too():
    a = 0x0123456789ABCDEF
    b = flip_bits(a, [0, 1, 2])
    c = flip_bits(b, [40, 41, 42])  # b~c, 6 bits from a
    keys, sha1 = ["a", "b", "c", "d", "e"], ["s1", "s2", "s3", "s4", "s5"]
    hashes = [a, b, c, 0x7777, 0x7777]  # d and e: the same pHash
    rejected = {frozenset("bc"), frozenset("de")}

    def confirm(first, second):  # pairs come in either order
        return np.array([frozenset(keys[i] + keys[j]) not in rejected for i, j in zip(first, second)])

    groups = duplicate_groups(keys, sha1, hashes, max_distance=4, confirm=confirm)
    assert groups[0] == groups[1] and groups[2] != groups[1]
    assert groups[3] != groups[4]
    same_file = duplicate_groups(keys, ["s1", "s2", "s3", "s4", "s4"], hashes, max_distance=4, confirm=confirm)
    assert same_file[3] == same_file[4]  # byte-identical files group without any pixel check


def _with_fine_texture(pixels: np.ndarray, amplitude: int) -> np.ndarray:
    """A different picture with the same coarse layout: a strong checkerboard whose cells are
    one pixel of the 32 px thumbnail (pHash keeps only its 8x8 lowest frequencies)."""
    cell = pixels.shape[0] // 32
    yy, xx = np.indices(pixels.shape[:2]) // cell
    texture = np.where((yy + xx) % 2 == 0, amplitude, -amplitude)[..., None]
    return np.clip(pixels.astype(np.int16) + texture, 0, 255).astype(np.uint8)


def test_pixel_check_keeps_real_copies_and_rejects_look_alikes_that_share_a_phash(tmp_path: Path):
    base = textured_image(seed=7, size=96)
    Image.fromarray(base).save(tmp_path / "photo.png")
    Image.fromarray(base).save(tmp_path / "photo_q75.jpg", quality=75)
    Image.fromarray(base).resize((48, 48)).save(tmp_path / "photo_half.png")
    Image.fromarray(_with_fine_texture(base, 80)).save(tmp_path / "look_alike.png")
    Image.fromarray(np.full((96, 96, 3), 40, np.uint8)).save(tmp_path / "flat_dark.png")
    Image.fromarray(np.full((96, 96, 3), 45, np.uint8)).save(tmp_path / "flat_light.png")
    keys = ["photo.png", "photo_q75.jpg", "photo_half.png", "look_alike.png", "flat_dark.png", "flat_light.png"]
    files = [tmp_path / k for k in keys]
    hashes = [perceptual_hash(f) for f in files]
    # the look-alike is a pHash near copy (the premise), and the two flat images share a hash
    assert hamming_distance(hashes[0], hashes[3]) <= DEFAULT_MAX_DISTANCE
    assert hashes[4] == hashes[5]
    check = PixelCheck(files, DEFAULT_MIN_CORRELATION)
    correlation = check.correlation(np.array([0, 0, 0, 4]), np.array([1, 2, 3, 5]))
    assert correlation[0] > 0.995 and correlation[1] > 0.99  # JPEG q75, half size
    assert correlation[2] < 0.95 and correlation[3] == 0.0  # look-alike; flat images correlate with nothing
    sha1 = [f"s{i}" for i in range(len(keys))]
    groups = duplicate_groups(keys, sha1, hashes, confirm=check)
    assert groups[0] == groups[1] == groups[2]
    assert len({groups[0], groups[3], groups[4], groups[5]}) == 4
    assert check.decoded == len(keys)  # each candidate decoded once
    unchecked = duplicate_groups(keys, sha1, hashes)
    assert unchecked[3] == unchecked[0] and unchecked[4] == unchecked[5]


def test_pixel_check_of_an_unreadable_file_confirms_nothing(tmp_path: Path):
    Image.fromarray(textured_image(seed=3, size=64)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    check = PixelCheck([tmp_path / "ok.png", tmp_path / "broken.png"], 0.5)
    assert check(np.array([0]), np.array([1])).tolist() == [False]


def test_group_ids_depend_on_keys_not_on_row_order():
    rng = np.random.default_rng(0)
    n = 300
    hashes = rng.integers(0, 2**63, n).tolist()
    for i in range(0, 60, 2):  # near pairs
        hashes[i + 1] = flip_bits(hashes[i], [3, 17, 50])
    sha1 = [f"s{i}" for i in range(n)]
    sha1[100] = sha1[200]  # an exact pair
    keys = names(n)
    groups = duplicate_groups(keys, sha1, hashes)

    order = rng.permutation(n)
    shuffled = duplicate_groups(
        [keys[i] for i in order], [sha1[i] for i in order], [hashes[i] for i in order]
    )
    assert shuffled.tolist() == groups[order].tolist()
    # Ids are numbered by each group's smallest key: img_0000's group is 0, and so on.
    assert groups[0] == 0 and groups[1] == 0 and groups[2] == 1
    assert groups[100] == groups[200]


def test_hash_forms_give_the_same_groups():
    hashes = [0xFFFF_0000_0000_0001, 0xFFFF_0000_0000_0003, 5]
    as_int = duplicate_groups(names(3), ["a", "b", "c"], hashes)
    as_hex = duplicate_groups(names(3), ["a", "b", "c"], [f"{h:016x}" for h in hashes])
    as_signed = duplicate_groups(
        names(3), ["a", "b", "c"], np.array(hashes, dtype=np.uint64).view(np.int64)
    )
    assert as_int.tolist() == as_hex.tolist() == as_signed.tolist() == [0, 0, 1]


# --------------------------------------------------------------------------- pair search


# None: the chunk count the planner picks (mostly exact-match chunks at n=2000); the
# forced counts make chunks searched within 1-2 bits, through both bucket lookups.
@pytest.mark.parametrize(
    "max_distance, n_chunks",
    [
        (0, None),
        (2, None),
        (5, None),
        (DEFAULT_MAX_DISTANCE, None),
        (11, None),
        (6, 3),
        (8, 3),
        (7, 4),
    ],
)
def test_multi_index_search_finds_exactly_the_brute_force_pairs(
    max_distance: int, n_chunks: int | None
):
    rng = np.random.default_rng(max_distance)
    hashes = rng.integers(0, np.iinfo(np.uint64).max, 2000, dtype=np.uint64, endpoint=True)
    # Planted copies at every distance 0 .. max_distance + 2, so pairs sit on both sides
    # of the threshold (and exactly on it).
    for n_flips in range(max_distance + 3):
        for _ in range(10):
            source, target = rng.choice(len(hashes), 2, replace=False)
            bits = rng.choice(64, n_flips, replace=False).tolist()
            hashes[target] = np.uint64(flip_bits(int(hashes[source]), bits))

    first, second = np.triu_indices(len(hashes), k=1)
    close = hamming_distance(hashes[first], hashes[second]) <= max_distance
    brute_force = np.stack([first[close], second[close]], axis=1)

    found = near_pairs(hashes, max_distance, n_chunks=n_chunks)
    assert len(brute_force) >= 10  # the planted pairs are there to be found
    np.testing.assert_array_equal(found, brute_force)


# --------------------------------------------------------------------------- report


def test_report_lists_shared_groups_and_flags_label_conflicts():
    keys = ["cat/1.png", "dog/1.png", "cat/2.png", "cat/3.png", "cat/4.png", "dog/2.png"]
    labels = ["cat", "dog", "cat", "cat", "cat", "dog"]
    sha1 = ["s1", "s1", "s2", "s3", "s3", "s9"]
    groups = [0, 0, 1, 1, 1, 2]  # group 2 is a singleton: not reported

    report = group_report(keys, labels, groups, sha1)

    assert report["group"].tolist() == [0, 1]
    assert report["size"].tolist() == [2, 3]
    assert report["members"].tolist() == ["cat/1.png;dog/1.png", "cat/2.png;cat/3.png;cat/4.png"]
    assert report["classes"].tolist() == ["cat;dog", "cat"]
    assert report["label_conflict"].tolist() == [True, False]
    assert report["kind"].tolist() == ["exact", "mixed"]


def test_report_kind_near_and_empty_report():
    near = group_report(["a", "b"], ["x", "x"], [0, 0], ["s1", "s2"])
    assert near["kind"].tolist() == ["near"]
    empty = group_report(["a", "b"], ["x", "y"], [0, 1], ["s1", "s2"])
    assert empty.empty and list(empty.columns) == list(near.columns)


def test_a_test_folder_leaves_out_copies_of_training_images_but_not_look_alikes(tmp_path: Path):
    import pandas as pd

    from labelflow.dataset import DEFAULT_DUPLICATES, tag2label
    from labelflow.heldout import held_out_from_folder

    train, test = tmp_path / "train", tmp_path / "test"
    for seed, tag in enumerate(["cat", "dog"]):
        for root in (train / tag, test / tag):
            root.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(textured_image(seed=10 * seed + i, size=96)).save(train / tag / f"{tag}_{i}.png")
        Image.fromarray(textured_image(seed=10 * seed + 5, size=96)).save(test / tag / f"new_{tag}.png")
    photo = textured_image(seed=0, size=96)  # train/cat/cat_0.png
    Image.fromarray(photo).save(test / "cat" / "resaved.jpg", quality=75)
    Image.fromarray(_with_fine_texture(photo, 80)).save(test / "cat" / "look_alike.png")
    found = tag2label(train)
    rows, skipped = held_out_from_folder(test, found.tag2cls, found.dataset, DEFAULT_DUPLICATES, train)
    assert sorted(rows["path"]) == ["cat/look_alike.png", "cat/new_cat.png", "dog/new_dog.png"]
    assert skipped.to_dict("records") == [{"path": "cat/resaved.jpg", "reason": "copy of a training image"}]
    assert isinstance(rows, pd.DataFrame) and rows["class"].tolist() == [found.tag2cls[p.split("/")[0]] for p in rows["path"]]
