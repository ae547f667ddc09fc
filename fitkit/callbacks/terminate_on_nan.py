"""TerminateOnNaN: stop at the first training batch whose loss is NaN or infinite."""

from __future__ import annotations

import math
import warnings

import torch

from fitkit._warn import user_stacklevel
from fitkit.callbacks.base import Callback, Logs


class TerminateOnNaN(Callback):
    """Stops training after the first batch whose loss is not finite, as Keras's TerminateOnNaN.

    The stop reason (``trainer.state.stop_reason``) and a ``RuntimeWarning`` name the value, the epoch,
    the batch and the optimizer step. Training ends after that batch: the epoch's end hooks still run
    (its logs hold the non-finite loss) and an accumulation group left unfinished is dropped, not applied.

    Without a ``"loss"`` key (a GAN's step logs ``d_loss`` and ``g_loss``), every value the step logs is
    checked (read back together).

    Cost: checking a loss that lives on the GPU reads it back to the host, so this callback adds one
    host-device synchronisation per training batch. That is the price of stopping at the very batch;
    fitkit's loop itself reads values back once per epoch (and when a progress bar refreshes).
    """

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        logs = logs or {}
        loss = logs.get("loss")
        if loss is None:
            self._check_every_value(batch, logs)
            return
        with self.trainer.allow_sync():  # the per-batch host sync this callback pays for (a 0-dim device tensor)
            value = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            self._stop(batch, "the training loss", value)

    def _check_every_value(self, batch: int, logs: Logs) -> None:
        values = {k: v for k, v in logs.items() if isinstance(v, torch.Tensor) and v.ndim == 0}
        if not values:
            return  # nothing to judge
        with self.trainer.allow_sync():  # one read for every value
            read = torch.stack([v.detach().float() for v in values.values()]).tolist()
        for key, value in zip(values, read):
            if not math.isfinite(value):
                self._stop(batch, key, value)
                return

    def _stop(self, batch: int, what: str, value: float) -> None:
        state = self.trainer.state
        total = self.trainer.num_train_batches
        where = (
            f"epoch {state.epoch + 1}, batch {batch + 1}{f'/{total}' if total else ''} (batch index {batch}), "
            f"after {state.global_step} optimizer step(s)"
        )
        reason = f"TerminateOnNaN: {what} is {value} at {where}"
        warnings.warn(f"{reason}; stopping training", RuntimeWarning, stacklevel=user_stacklevel())
        self.trainer.stop(reason)


__all__ = ["TerminateOnNaN"]
