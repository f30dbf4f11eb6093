"""Mixed precision in one place: the autocast context and the fp16 gradient scaler for an ``amp`` setting.

``amp`` is ``off`` (float32), ``bf16`` (bfloat16 autocast, no scaler: its range needs none) or ``fp16`` (float16
autocast with a gradient scaler, CUDA only). Stage 1, meta-training and fine-tuning all take theirs from here.
"""
from __future__ import annotations

import contextlib

import torch

AMP_MODES = ("off", "bf16", "fp16")


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for ``amp`` on ``device`` (a no-op context when ``amp`` is ``off``)."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp mode {amp!r}; choose one of {', '.join(AMP_MODES)}")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(amp: str) -> "torch.amp.GradScaler | None":
    """The gradient scaler fp16 training needs (small gradients underflow in float16); None otherwise."""
    return torch.amp.GradScaler("cuda") if amp == "fp16" else None
