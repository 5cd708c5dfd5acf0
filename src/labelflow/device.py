"""Where a model runs: CUDA when the job asked for a GPU and one is visible, else the CPU.

On CUDA: bf16 autocast, ``channels_last`` and non-blocking copies from pinned memory.
CPU runs stay in float32 and bit-reproducible, unless a stage trains with ``precision: bf16``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_job_threads: int | None = None


def set_job_threads(threads: int) -> None:
    """The job's CPU threads (Snakemake ``threads:``): torch's pool, and what loading plans share
    between decoding workers and compute (:func:`labelflow.loaders.plan_loading`)."""
    global _job_threads
    _job_threads = int(threads)
    torch.set_num_threads(_job_threads)


def job_threads() -> int:
    """The job's thread budget: what set_job_threads set (a Snakemake job, a benchmark), else
    torch's pool now. Kept apart from torch's pool because a loading plan that gives threads to
    decoding workers shrinks the pool, and a later plan in the same job must see the whole budget."""
    return torch.get_num_threads() if _job_threads is None else _job_threads


def select_device(want_gpu: bool) -> torch.device:
    """CUDA only when the job asked for a GPU and one is visible; CPU otherwise."""
    if want_gpu and torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        log.info("device: cuda (%s)", torch.cuda.get_device_name(device))
    else:
        device = torch.device("cpu")
        why = "no GPU requested (resources gpu=0)" if not want_gpu else "CUDA is not available"
        log.info("device: cpu (%s), %d threads, CPU kernels %s", why, torch.get_num_threads(),
                 torch.backends.cpu.get_cpu_capability())
    return device


def compute_platform(device: torch.device) -> dict[str, str]:
    """What a run's numbers depend on beyond its config, data, code and seed: torch's version
    and the kernels it picks. On the CPU torch dispatches by the vector units it finds (AVX2,
    AVX512, ...), and these round differently, so the same seed trains to other weights on
    another kind of CPU (README, Reproducibility); on a GPU, the GPU and CUDA too."""
    found = {"torch": str(torch.__version__), "device": device.type,  # str: TorchVersion is not a plain str
             "cpu_capability": str(torch.backends.cpu.get_cpu_capability())}
    if device.type == "cuda":
        found.update(gpu=torch.cuda.get_device_name(device), cuda=str(torch.version.cuda))
    return found


PRECISIONS = ("auto", "bf16", "fp32")


def autocast(device: torch.device, precision: str = "auto"):
    """The forward pass's precision: ``auto`` is bf16 autocast on CUDA and float32 on the CPU
    (CPU runs bit-reproducible); ``bf16`` also on the CPU (a training stage's ``precision: bf16``:
    about 1.6x faster steps on CPUs with AVX512-BF16, benchmarks/cpu_precision.py); ``fp32``
    never autocasts. Weights, gradients and optimizer state stay float32 in every mode."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


def uses_bf16(device: torch.device, precision: str) -> bool:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {PRECISIONS}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def cpu_bf16_units() -> list[str]:
    """The CPU's bf16 instruction sets (Linux /proc/cpuinfo flags); empty: bf16 is emulated."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return [unit for unit in ("avx512_bf16", "amx_bf16") if unit in flags]


def describe_precision(device: torch.device, precision: str) -> str:
    """For the job log: what the training forward pass runs in, and a warning where bf16 on
    this CPU is emulated (no AVX512-BF16 or AMX: slower than float32, not faster)."""
    if not uses_bf16(device, precision):
        return "float32"
    if device.type == "cpu" and not cpu_bf16_units():
        return "bf16 autocast (WARNING: this CPU has no bf16 units; expect it slower than float32)"
    return "bf16 autocast"


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (non-blocking from pinned memory on CUDA)."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def images_for(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of images in the layout the device is fastest with (channels_last on CUDA)."""
    if device.type == "cuda":
        return images.contiguous(memory_format=torch.channels_last)
    return images


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model
