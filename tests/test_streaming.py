"""Memory bounded by design: inference streams its images; training caches them only when they
fit the budget, filling the cache as it goes (the first batch comes at once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import labelflow.images as images
from conftest import make_tiny_dataset
from labelflow.loaders import ImageTableDataset, build_transform, eval_loader, make_loader, plan_loading

DATA = {"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "cache": "auto", "num_workers": "auto"}


def _table(root: Path):
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    return paths, [int(p.split("/")[0][-2:]) for p in paths]


def test_cache_auto_streams_over_a_tiny_budget_and_caches_under_a_big_one():
    big = plan_loading(DATA, 1000, threads=2, memory=10 * 2**30)
    assert big.cache and big.num_workers == 0 and "<=" in big.reason
    small = plan_loading(DATA, 1000, threads=2, memory=2**20)  # 1000 x 16 x 16 x 3 = 768 kB > 256 kB
    # streams; on 2 threads no worker: it would preempt one of torch's 2 OpenMP threads
    assert not small.cache and (small.num_workers, small.compute_threads) == (0, 2) and ">" in small.reason
    assert plan_loading({**DATA, "cache": True, "num_workers": 0}, 10**9, threads=4).cache  # forced
    forced = plan_loading({**DATA, "cache": True, "num_workers": 2}, 10, threads=4)
    assert not forced.cache and forced.num_workers == 2 and "worker" in forced.reason
    assert forced.compute_threads == 2  # the workers' threads come out of the job's budget
    eight = plan_loading({**DATA, "cache": False}, 10, threads=8)
    assert (eight.num_workers, eight.compute_threads) == (4, 4)  # half the threads decode, half compute
    assert plan_loading({**DATA, "cache": False}, 10, threads=3).num_workers == 1
    on_gpu = plan_loading({**DATA, "cache": False}, 10, threads=2, device=torch.device("cuda"))
    assert on_gpu.num_workers >= 1 and on_gpu.compute_threads == 2  # the GPU computes: workers cost no torch thread
    # on a GPU auto streams through workers even when the images fit the cache (gpu_check)
    gpu_auto = plan_loading(DATA, 1000, threads=2, device=torch.device("cuda"), memory=10 * 2**30)
    assert not gpu_auto.cache and gpu_auto.num_workers >= 1 and "GPU" in gpu_auto.reason
    gpu_cache = plan_loading({**DATA, "cache": True}, 1000, threads=2, device=torch.device("cuda"))
    assert gpu_cache.cache and gpu_cache.num_workers == 0  # asked for: the cache, in one process
    gpu_no_workers = plan_loading({**DATA, "num_workers": 0}, 1000, threads=2, device=torch.device("cuda"), memory=10 * 2**30)
    assert gpu_no_workers.cache and gpu_no_workers.num_workers == 0


def test_a_resumed_stage_keeps_the_batch_order_its_saved_epochs_had():
    """training.saved_batch_order: 'sampler' (saved without workers) plans no workers, 'seeded'
    (saved with workers) draws seeded batches even where no worker is planned now."""
    streamed = {**DATA, "cache": False}
    assert plan_loading(streamed, 10, threads=8).seeded_batches  # workers: seeded
    assert not plan_loading(streamed, 10, threads=2).seeded_batches  # no workers: torch's sampler
    saved_without = plan_loading(streamed, 10, threads=8, batch_order="sampler")
    assert (saved_without.num_workers, saved_without.compute_threads, saved_without.seeded_batches) == (0, 8, False)
    assert "saved epochs of the resumed stage had none" in saved_without.reason
    saved_with = plan_loading(streamed, 10, threads=2, batch_order="seeded")
    assert (saved_with.num_workers, saved_with.seeded_batches) == (0, True) and "seeded batches" in saved_with.reason
    cached = plan_loading(DATA, 1000, threads=2, memory=10 * 2**30, batch_order="seeded")
    assert cached.cache and cached.seeded_batches  # the cache does not change the batches
    on_gpu = plan_loading(DATA, 1000, threads=2, device=torch.device("cuda"), batch_order="sampler")
    assert on_gpu.num_workers == 0 and not on_gpu.seeded_batches


def test_a_loading_plan_shares_the_job_budget_and_a_later_plan_sees_all_of_it(monkeypatch):
    from labelflow import device

    import cv2

    before, before_cv2 = torch.get_num_threads(), cv2.getNumThreads()
    monkeypatch.setattr(device, "_job_threads", None)
    try:
        device.set_job_threads(4)
        first = plan_loading({**DATA, "cache": False}, 10, device.job_threads())
        first.apply()
        assert torch.get_num_threads() == 2 and device.job_threads() == 4
        assert cv2.getNumThreads() == 1  # OpenCV runs sequentially (its default pool is every core)
        again = plan_loading({**DATA, "cache": False}, 10, device.job_threads())
        assert (again.num_workers, again.compute_threads) == (2, 2)  # not planned from the shrunk pool
    finally:
        torch.set_num_threads(before)
        cv2.setNumThreads(before_cv2)


def test_cache_fills_lazily_during_the_first_epoch(tmp_path, monkeypatch):
    root = make_tiny_dataset(tmp_path / "tiny", n_classes=2, per_class=6)
    paths, targets = _table(root)
    decoded = []
    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda p: decoded.append(p) or real(p))
    dataset = ImageTableDataset(root, paths, targets, 16, build_transform(train=False), cache=True)
    assert decoded == []  # nothing decoded before the first batch
    loader = make_loader(dataset, batch_size=4, shuffle=True, seed=0)
    first = next(iter(loader))
    assert len(first["index"]) == 4 and len(decoded) == 4
    for _ in range(2):
        for _batch in loader:
            pass
    assert sorted(map(str, decoded)) == sorted(str(root / p) for p in paths)  # each image once


def test_inference_streams_one_batch_at_a_time(tmp_path, monkeypatch):
    root = make_tiny_dataset(tmp_path / "tiny", n_classes=2, per_class=10)
    paths, _ = _table(root)
    decoded = []
    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda p: decoded.append(p) or real(p))
    loader = eval_loader(root, paths, {**DATA, "num_workers": 0}, batch_size=5, device=torch.device("cpu"))
    assert loader.dataset.images is None  # no cache: memory does not grow with the set
    seen = []
    for batch in loader:
        seen.append(len(decoded))  # decoded so far when each batch arrives
        assert batch["image"].shape == (5, 3, 16, 16)
    assert seen == [5, 10, 15, 20]  # one batch decoded per batch consumed, never the whole set ahead
    assert np.isclose(len(decoded), len(paths))
