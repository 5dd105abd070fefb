"""Mixed precision of a training run (recipe key ``precision``).

``fp32``: everything in float32. ``bf16`` / ``fp16``: torch autocast around the student's and the
teacher's forward passes and around the contraction of the MPO cores, so matrix products run in
the low precision while the parameters (cores, dense weights), their gradients, the optimizer
states, the loss terms and ``merge`` stay in float32 (float64 for merge). ``fp16`` adds dynamic
loss scaling (``torch.amp.GradScaler``): a step whose scaled gradients overflow is skipped and the
scale halves, as usual; it is meant for CUDA (bf16 needs no scaling and is the choice on CPUs with
bf16 support, e.g. AVX512-bf16). Evaluation runs in float32: the dev metric is that of the model as
merged and deployed.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: str, precision: str):
    """A fresh context manager for one region of low-precision compute (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision])


def scaler(device: str, precision: str) -> torch.amp.GradScaler | None:
    """Loss scaling for fp16 (None otherwise)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)
