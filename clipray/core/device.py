"""Where and how computation runs: the one place that decides GPU use, threads and precision.

Training, validation and scoring call these, so they cannot disagree (they once did: scoring ran
in bf16 on a GPU while training was configured for fp32).
"""

from __future__ import annotations

import math

import torch

from clipray.config.errors import ConfigError


def torch_threads(cpus: float) -> int:
    """Threads for a process granted ``cpus`` logical CPUs: at least one, fractions rounded up."""
    return max(1, math.ceil(cpus))


def wants_gpu(use_gpu: str, gpus_available: bool) -> bool:
    """``train.use_gpu`` (auto/yes/no) given whether GPUs exist (here, or in the Ray cluster)."""
    return use_gpu == "yes" or (use_gpu == "auto" and gpus_available)


def local_device(use_gpu: str) -> torch.device:
    """The device of a run in this process; ``yes`` without a visible GPU is a config error."""
    available = torch.cuda.is_available()
    if use_gpu == "yes" and not available:
        raise ConfigError("train.use_gpu: 'yes' but no CUDA device is visible")
    return torch.device("cuda" if wants_gpu(use_gpu, available) else "cpu")


def autocast_dtype(device_type: str, precision: str) -> torch.dtype | None:
    """``train.precision`` on a device: bf16 (auto: on GPU only; bf16 is slow and lossy on the
    CPU), or None for full fp32."""
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context every forward pass runs in (training, validation, scoring)."""
    dtype = autocast_dtype(device.type, precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
