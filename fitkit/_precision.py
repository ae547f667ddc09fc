"""Mixed precision: the autocast context and fp16's GradScaler, as one object the Trainer holds."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from fitkit import _compat

NO_CONTEXT = contextlib.nullcontext()  # reusable: the fp32 autocast and allow_sync() outside debug_sync

_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``precision="32" | "bf16" | "fp16"`` at work: `autocast` for the forward pass and, at fp16 only, a
    ``GradScaler`` (``scaler``) whose scale before each step is kept on the device (`last_step_skipped`)."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.name = precision
        self.device_type = device.type
        self.dtype = _DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self._last_scale: torch.Tensor | None = None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The mixed-precision context (a no-op at ``"32"``)."""
        if self.dtype is None:
            return NO_CONTEXT
        return torch.autocast(self.device_type, dtype=self.dtype)

    def record_scale(self) -> None:
        """Keeps the scale the next step uses, on the device (fp16 only; read by `last_step_skipped`)."""
        assert self.scaler is not None
        scale = _compat.grad_scaler_scale(self.scaler)
        self._last_scale = None if scale is None else scale.detach().clone()

    def last_step_skipped(self) -> bool:
        """True when fp16's GradScaler skipped the last step (its scale went down): a host read."""
        scale = None if self.scaler is None else _compat.grad_scaler_scale(self.scaler)
        if scale is None or self._last_scale is None:
            return False
        return bool((scale < self._last_scale).item())

    def update(self) -> None:
        """fp16's one ``GradScaler.update`` per iteration in which optimizers stepped."""
        if self.scaler is not None:
            self.scaler.update()
