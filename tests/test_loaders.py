"""Tests for labelflow.loaders: transforms, augmentation seeding, the dataset and its cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import labelflow.images as images
from conftest import REPO, make_tiny_dataset, validated_experiment
from labelflow.loaders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTableDataset,
    build_augmentations,
    build_transform,
    make_loader,
)
from labelflow.predict import _ImagesOrErrors

AFFINE = [{"name": "Affine", "params": {"rotate": (15, 40), "translate_px": (2, 4), "p": 1.0}}]


def _image(seed: int = 0, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _normalised(image: np.ndarray) -> torch.Tensor:
    """Normalize + ToTensorV2 written out by hand: CHW float32 of (x/255 - mean) / std."""
    x = image.astype(np.float32) / 255.0
    x = (x - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def _table(root: Path) -> tuple[list[str], list[int]]:
    paths = sorted(str(p.relative_to(root)) for p in root.glob("class_*/*.png"))
    targets = [int(Path(p).parent.name.split("_")[1]) for p in paths]
    return paths, targets


def test_validation_transform_is_deterministic_and_unaugmented():
    image = _image()
    transform = build_transform(AFFINE, train=False)
    a = transform(image=image)["image"]
    b = transform(image=image)["image"]
    assert a.dtype == torch.float32 and a.shape == (3, 16, 16)
    assert torch.equal(a, b)
    # Augmentations are ignored when train=False: the output is the plain normalisation.
    assert torch.allclose(a, _normalised(image), atol=1e-5)
    assert torch.equal(a, build_transform([], train=False)(image=image)["image"])


def test_train_transform_augments_and_reseed_reproduces(tmp_path: Path):
    image = _image()
    transform = build_transform(AFFINE, train=True, seed=3)
    first = transform(image=image)["image"]
    second = transform(image=image)["image"]
    plain = _normalised(image)
    assert not torch.allclose(first, plain, atol=1e-3)  # Affine with p=1 changed the image
    assert not torch.equal(first, second)  # the random stream moves on

    root = make_tiny_dataset(tmp_path / "tiny", n_classes=1, per_class=2)
    paths, targets = _table(root)
    dataset = ImageTableDataset(root, paths, targets, image_size=16, transform=transform)
    dataset.reseed(11)
    run1 = [dataset[i % 2]["image"] for i in range(4)]
    dataset.reseed(11)
    run2 = [dataset[i % 2]["image"] for i in range(4)]
    for x, y in zip(run1, run2):
        assert torch.equal(x, y)
    assert not torch.equal(run1[0], run1[2])  # same image, later draw: different augmentation
    dataset.reseed(12)
    assert not torch.equal(dataset[0]["image"], run1[0])


def test_build_augmentations_unknown_name():
    with pytest.raises(ValueError, match=r"data\.augmentations\[0\]") as info:
        build_augmentations([{"name": "NotATransform"}])
    assert "NotATransform" in str(info.value)


def test_build_augmentations_errors_name_the_index():
    good = {"name": "HorizontalFlip", "params": {"p": 0.5}}
    with pytest.raises(ValueError, match=r"data\.augmentations\[1\] \(Affine\)"):
        build_augmentations([good, {"name": "Affine", "params": {"p": 5}}])
    with pytest.raises(ValueError, match=r"data\.augmentations\[1\]"):
        build_augmentations([good, {"name": "__version__"}])  # an attribute, not a transform


def test_build_augmentations_builds_with_params():
    (flip,) = build_augmentations([{"name": "HorizontalFlip", "params": {"p": 1.0}}])
    image = _image()
    assert np.array_equal(flip(image=image)["image"], image[:, ::-1])


@pytest.mark.parametrize("recipe", sorted((REPO / "config/experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates_and_its_training_transform_runs(recipe: Path):
    """A misspelt key or augmentation in a shipped recipe fails here, not an hour into a run."""
    import yaml

    experiment = validated_experiment(yaml.safe_load(recipe.read_text()))
    data = experiment["data"]
    transform = build_transform(data["augmentations"], train=True, mean=data["mean"], std=data["std"], seed=0)
    size = data["image_size"]
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    assert tuple(transform(image=image)["image"].shape) == (3, size, size)


def test_dataset_resizes_and_returns_targets(tmp_path: Path):
    root = make_tiny_dataset(tmp_path / "tiny", n_classes=3, per_class=2, size=16)
    # One larger and one smaller extra image, both must come out at image_size.
    Image.fromarray(_image(1, size=40)).save(root / "class_00" / "big.png")
    Image.fromarray(_image(2, size=5)).save(root / "class_01" / "small.png")
    paths, targets = _table(root)
    dataset = ImageTableDataset(root, paths, targets, image_size=12, transform=build_transform(train=False))
    assert len(dataset) == 8
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["image"].shape == (3, 12, 12)
        assert item["index"] == i
        assert item["class"].dtype == torch.int64
        assert int(item["class"]) == targets[i]
    assert sorted(set(targets)) == [0, 1, 2]

    loader = make_loader(dataset, batch_size=4, shuffle=False, seed=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 12, 12)
    assert torch.equal(batch["class"], torch.tensor(targets[:4]))
    assert torch.equal(batch["index"], torch.arange(4))


def test_dataset_multi_hot_targets_are_float_rows(tmp_path: Path):
    root = make_tiny_dataset(tmp_path / "tiny", n_classes=1, per_class=2)
    paths, _ = _table(root)
    rows = [[1, 0, 1], [0, 1, 0]]
    dataset = ImageTableDataset(root, paths, rows, image_size=16, transform=build_transform(train=False))
    batch = next(iter(make_loader(dataset, batch_size=2, shuffle=False, seed=0)))
    assert batch["class"].dtype == torch.float32
    assert torch.equal(batch["class"], torch.tensor(rows, dtype=torch.float32))


def test_dataset_without_targets_has_no_class(tmp_path: Path):
    root = make_tiny_dataset(tmp_path / "tiny", n_classes=1, per_class=2)
    paths, _ = _table(root)
    dataset = ImageTableDataset(root, paths, None, image_size=16, transform=build_transform(train=False))
    assert set(dataset[0]) == {"image", "index"}


@pytest.mark.parametrize("cache", [True, False])
def test_cache_decodes_once(tmp_path: Path, monkeypatch, cache: bool):
    root = make_tiny_dataset(tmp_path / "tiny", n_classes=2, per_class=3)
    paths, targets = _table(root)
    calls: list[str] = []
    real = images.load_image

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(images, "load_image", counting)
    dataset = ImageTableDataset(root, paths, targets, image_size=16, transform=build_transform(train=False), cache=cache)
    loader = make_loader(dataset, batch_size=4, shuffle=True, seed=0)
    for _epoch in range(2):
        seen = sum(len(batch["index"]) for batch in loader)
        assert seen == 6
    if cache:
        assert sorted(calls) == sorted(str(root / p) for p in paths)  # each image exactly once
    else:
        assert len(calls) == 12  # decoded again in every epoch


def test_make_loader_shuffle_is_seeded(tmp_path: Path):
    root = make_tiny_dataset(tmp_path / "tiny", n_classes=2, per_class=6)
    paths, targets = _table(root)
    dataset = ImageTableDataset(root, paths, targets, image_size=16, transform=build_transform(train=False))

    def order(seed: int) -> list[int]:
        return [int(i) for batch in make_loader(dataset, batch_size=5, shuffle=True, seed=seed) for i in batch["index"]]

    assert order(7) == order(7)
    assert sorted(order(7)) == list(range(12))
    assert order(7) != list(range(12))


def test_unaugmented_batches_are_normalised_at_once_with_the_same_values(tmp_path: Path, monkeypatch):
    root = make_tiny_dataset(tmp_path / "tiny", n_classes=3, per_class=4, size=16)
    paths, targets = _table(root)
    dataset = ImageTableDataset(root, paths, targets, image_size=12, transform=build_transform(train=False, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3)))
    assert dataset.per_pixel
    calls = []
    real_call = type(dataset.transform).__call__
    monkeypatch.setattr(type(dataset.transform), "__call__", lambda self, **kw: calls.append(kw["image"].shape) or real_call(self, **kw))
    batches = list(make_loader(dataset, batch_size=5, shuffle=True, seed=3))
    assert calls == [(5 * 12, 12, 3), (5 * 12, 12, 3), (2 * 12, 12, 3)]  # one call per batch, one tall image
    calls.clear()
    for batch in batches:  # bit-identical to the transform image by image, targets and indices aligned
        expected = torch.stack([dataset[int(i)]["image"] for i in batch["index"]])
        assert batch["image"].shape == expected.shape and torch.equal(batch["image"], expected)
        assert batch["image"].is_contiguous()
        assert torch.equal(batch["class"], torch.tensor([targets[int(i)] for i in batch["index"]]))
    assert len(calls) == 12  # the per-image path above


def test_augmented_or_rotated_datasets_keep_the_per_image_path(tmp_path: Path):
    root = make_tiny_dataset(tmp_path / "tiny", n_classes=2, per_class=3)
    paths, targets = _table(root)
    augmented = ImageTableDataset(root, paths, targets, image_size=16, transform=build_transform(AFFINE, train=True, seed=1))
    rotated = ImageTableDataset(root, paths, targets, image_size=16, transform=build_transform(train=False), rotation="seeded",
                                heads=("class", "rotation"))  # fmt: skip
    for dataset in (augmented, rotated):
        assert not dataset.per_pixel
        assert isinstance(dataset.__getitems__([0, 1]), list)
        batch = next(iter(make_loader(dataset, batch_size=6, shuffle=False, seed=0)))
        assert batch["image"].shape == (6, 3, 16, 16)
    batch = next(iter(make_loader(rotated, batch_size=6, shuffle=False, seed=0)))
    assert torch.equal(batch["image"], torch.stack([rotated[i]["image"] for i in range(6)]))  # seeded rotations
    with pytest.raises(ValueError, match="un-augmented"):  # prediction's batches are normalised at once
        _ImagesOrErrors(augmented)
    # a normalisation with per-image statistics, or one applied at random, is not per pixel
    import albumentations as A

    for step in (A.Normalize(normalization="image"), A.Normalize(p=0.5)):
        transform = A.Compose([step, A.pytorch.ToTensorV2()])
        assert not ImageTableDataset(root, paths, targets, image_size=16, transform=transform).per_pixel


def test_batched_loading_in_worker_processes_gives_the_same_batches(tmp_path: Path):
    root = make_tiny_dataset(tmp_path / "tiny", n_classes=2, per_class=5)
    paths, targets = _table(root)
    dataset = ImageTableDataset(root, paths, targets, image_size=16, transform=build_transform(train=False))
    here = list(make_loader(dataset, batch_size=4, shuffle=False, seed=0))
    workers = list(make_loader(dataset, batch_size=4, shuffle=False, seed=0, num_workers=2))
    assert [len(b["index"]) for b in workers] == [4, 4, 2]
    for a, b in zip(here, workers):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["class"], b["class"]) and torch.equal(a["index"], b["index"])


def _epoch(loader, epoch: int) -> list[dict]:
    from labelflow.training import seed_epoch

    seed_epoch(loader, seed=7, epoch=epoch)
    return list(loader)


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"]) and torch.equal(x["class"], y["class"])
        for x, y in zip(a, b))  # fmt: skip


def test_dataset_paths_are_one_bytes_array_and_odd_names_round_trip():
    """No Python object per path (forked workers would copy a list of str page by page), and
    every name comes back as given: spaces, non-ASCII, bytes that are not UTF-8."""
    from labelflow.loaders import PathColumn

    names = ["a/1.png", "caf\u00e9 au lait/\u732b 2.jpg", "odd/\udcff\udcfe.png", "x/" + "long" * 50 + ".png", ""]
    column = PathColumn(names)
    assert column._buffer.dtype == np.uint8 and column._buffer.nbytes == sum(len(n.encode("utf-8", "surrogateescape")) for n in names)
    assert len(column) == 5 and [column[i] for i in range(5)] == names and list(column) == names
    assert column[1:3] == names[1:3] and column[::-2] == names[::-2] and column[-1] == "" and column[-2] == names[-2]
    assert column[np.int64(1)] == names[1] and len(PathColumn([])) == 0 and list(PathColumn([])) == []
    with pytest.raises(IndexError):
        column[5]
    dataset = ImageTableDataset("root", names, None, image_size=8, transform=build_transform(train=False))
    assert dataset.paths[2] == names[2]
    assert PathColumn([Path("a") / "b.png"])[0] == "a/b.png"
    with pytest.raises(TypeError, match=r"row 1 is nan \(float\).*missing or non-text"):
        PathColumn(["a.png", float("nan")])


def test_workers_persist_and_augmented_batches_depend_on_the_epoch_not_on_the_workers(tmp_path: Path):
    """With worker processes the batch sampler seeds every batch's augmentation in the main
    process: one worker or two load the same shuffled, augmented batches; the workers live
    across epochs; a fresh loader seeded for epoch 1 (a resumed run) replays epoch 1 exactly."""
    root = make_tiny_dataset(tmp_path / "tiny", n_classes=2, per_class=9)
    paths, targets = _table(root)

    def loader(workers: int):
        dataset = ImageTableDataset(root, paths, targets, image_size=16, transform=build_transform(AFFINE, train=True))
        return make_loader(dataset, batch_size=4, shuffle=True, seed=0, num_workers=workers, drop_last=True)

    one, two = loader(1), loader(2)
    here = ImageTableDataset(root, paths, targets, image_size=16, transform=build_transform(AFFINE, train=True))
    seeded_here = make_loader(here, batch_size=4, shuffle=True, seed=0, drop_last=True, seeded_batches=True)
    assert _same_batches(_epoch(seeded_here, 0), _epoch(two, 0))  # no worker, seeded: the same batches
    with pytest.raises(ValueError, match="worker processes need seeded batches"):
        make_loader(here, batch_size=4, shuffle=True, seed=0, num_workers=1, seeded_batches=False)
    assert len(one) == 4 and one.persistent_workers
    epoch0, epoch0_two = _epoch(one, 0), _epoch(two, 0)
    assert _same_batches(epoch0, epoch0_two) and [len(b["index"]) for b in epoch0] == [4, 4, 4, 4]
    workers = one._iterator  # torch keeps a persistent loader's iterator, and its processes, between passes
    epoch1 = _epoch(one, 1)
    assert one._iterator is workers
    assert not torch.equal(torch.cat([b["index"] for b in epoch0]), torch.cat([b["index"] for b in epoch1]))
    resumed = loader(2)
    assert _same_batches(epoch1, _epoch(resumed, 1))
    # the augmentation is drawn per batch: the same image gets another affine in another epoch
    position = {int(i): (b, k) for b, batch in enumerate(epoch1) for k, i in enumerate(batch["index"])}
    k0 = next(k for k, i in enumerate(epoch0[0]["index"]) if int(i) in position)  # drop_last may skip one
    b, k = position[int(epoch0[0]["index"][k0])]
    assert not torch.equal(epoch0[0]["image"][k0], epoch1[b]["image"][k])
    # without seed_epoch a pass draws afresh
    assert not _same_batches(list(one), epoch1)


def test_a_worker_forked_after_opencv_ran_threads_in_the_main_process_still_loads(tmp_path: Path):
    """OpenCV splits a LUT over more than 2**18 pixels (a batch normalised at once) across its
    pool. A worker forked after that pool ran hung when it reconfigured OpenCV's threads
    (cv2.setNumThreads in the worker: gpu_check's worker comparison never got a batch). Workers
    now leave OpenCV as they inherit it, and the plan runs OpenCV sequentially."""
    import cv2
    from torch.utils.data import DataLoader

    from labelflow.loaders import _seed_worker, collate_items, plan_loading

    root = make_tiny_dataset(tmp_path / "tiny", n_classes=2, per_class=60, size=64)
    paths, targets = _table(root)
    dataset = ImageTableDataset(root, paths, targets, image_size=64, transform=build_transform(train=False))
    before, before_cv2 = torch.get_num_threads(), cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)  # as OpenCV starts on 2 cores, before any plan
        assert len(list(make_loader(dataset, batch_size=120, shuffle=False, seed=0))) == 1  # 491,520 pixels at once
        # timeout: a hung worker fails the test instead of blocking the suite
        loader = DataLoader(dataset, batch_size=60, num_workers=1, collate_fn=collate_items, timeout=60,
                            worker_init_fn=_seed_worker)  # fmt: skip
        assert sum(len(batch["index"]) for batch in loader) == 120
        plan = plan_loading({"image_size": 64, "cache": False, "num_workers": 1}, len(dataset), 2)
        plan.apply()
        assert cv2.getNumThreads() == 1
        loader = DataLoader(dataset, batch_size=60, num_workers=plan.num_workers, collate_fn=collate_items, timeout=60)
        assert sum(len(batch["index"]) for batch in loader) == 120
    finally:
        torch.set_num_threads(before)
        cv2.setNumThreads(before_cv2)
