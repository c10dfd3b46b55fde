"""Device, precision and seeding: the one place that decides where tensors live and in what precision.

`device=auto` picks CUDA when present, else CPU. `dtype=auto` is fp32 on CPU and bf16 on a GPU that
supports it. Base weights are loaded in that dtype; adapter parameters and optimizer state stay fp32,
and `precision_context` (entered by `Session.precision()` around every forward) autocasts to the half
precision so matmuls run in it while losses and attribution accumulators stay fp32. Every other module
asks here instead of probing the hardware itself.
"""

from __future__ import annotations

import random
from contextlib import nullcontext

import numpy as np
import torch

from ..errors import UserError

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` → cuda if available, else cpu; otherwise any torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device '{name}'; use device=auto, device=cpu or device=cuda") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bf16 on a CUDA device that supports it, fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise UserError(f"unknown dtype '{name}'; use dtype=auto, fp32, bf16, fp16 or fp64")
    return _DTYPES[name]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so a round is a function of its seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator(seed: int) -> torch.Generator:
    """A CPU generator for seeded sampling that must not disturb the global RNG."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def precision_context(device: torch.device, dtype: torch.dtype):
    """The context of every forward pass: autocast to half-precision weights' dtype, nothing for fp32/fp64."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return nullcontext()
