"""TensorBoard: event files for the epoch logs, per-step loss and lr, weight histograms, the model graph
and the run's hyperparameters.

``tensorboard`` is imported when a ``TensorBoard`` callback is built, never by ``import fitkit``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from fitkit._warn import FitkitWarning, user_stacklevel
from fitkit.callbacks._files import check_writable
from fitkit.callbacks.base import Logs
from fitkit.callbacks.logger import FINISHED, ExperimentLogger


def _summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(
            "fitkit.callbacks.TensorBoard writes event files with the tensorboard package, which "
            "is not installed: pip install tensorboard"
        ) from exc
    return SummaryWriter


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


class TensorBoard(ExperimentLogger):
    """Writes TensorBoard event files with ``torch.utils.tensorboard.SummaryWriter``.

    What is written when follows the rule all loggers share ([ExperimentLogger][fitkit.callbacks.ExperimentLogger]),
    all in one run folder ``log_dir``:

    * ``epoch/<key>`` for every number in the epoch logs (``loss``, metrics, ``val_*``, ``lr``);
    * with ``update_freq=N``, ``step/<key>`` every N optimizer steps for the batch logs (``loss``: the
      loss of the batch that completed the step) and ``step/lr``, the learning rate of param group 0
      that step used. Reading the loss is a host sync, made on those steps only;
    * ``step/val_<key>`` for each step-level validation (``fit(validate_every_n_steps=N)``) at its step;
    * ``weights/<parameter name>`` histograms every ``histogram_freq`` epochs;
    * the model graph (``write_graph=True``): a forward pre-hook captures the first real input of the
      first training batch and removes itself; the graph is traced from that input, in eval mode, without
      gradients and with the random state restored, so training is unchanged and no data is read twice.
      A model that cannot be traced gives a warning, not an error;
    * the run's hyperparameters for the HParams dashboard (optimizer, lr, weight_decay, batch_size,
      precision, accumulate_grad_batches, grad clipping, epochs), with the final ``epoch/*`` values as
      its metrics, when ``fit`` ends without an exception.

    The x axis (TensorBoard's "step") is ``global_step``, the optimizer steps done: a per-step point at the
    step it follows (1 for the first), an epoch's points at the global step at the epoch's end, a step-level
    validation at its step; CSVLogger's ``step`` column and MLflowLogger's steps are the same numbers, so one
    point has one x everywhere. A resumed run opens its writer with ``purge_step=global_step + 1`` so that
    TensorBoard hides what the crashed run wrote after the checkpoint (epochs and steps the resumed run trains
    again).

    Args:
        log_dir: the run's folder (created if needed).
        update_freq: ``"epoch"`` (epoch logs only), or an int N >= 1 to also write the per-step values
            every N optimizer steps (``"batch"`` is N=1, as in Keras).
        histogram_freq: write weight histograms every this many epochs (0: never).
        write_graph: write the model graph once (see above).

    Runs on rank 0 only in a distributed run.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] = "runs",
        update_freq: str | int = "epoch",
        histogram_freq: int = 0,
        write_graph: bool = False,
    ) -> None:
        if update_freq == "batch":
            update_freq = 1
        if update_freq != "epoch" and (
            isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1
        ):
            raise ValueError(
                f"update_freq must be 'epoch', 'batch' or an int >= 1 (optimizer steps between "
                f"per-step points), got {update_freq!r}"
            )
        if isinstance(histogram_freq, bool) or not isinstance(histogram_freq, int) or histogram_freq < 0:
            raise ValueError(
                f"histogram_freq must be an int >= 0 (epochs between weight histograms; 0: never), "
                f"got {histogram_freq!r}"
            )
        if not isinstance(write_graph, bool):
            raise TypeError(f"write_graph must be True or False, got {write_graph!r}")
        super().__init__(None if update_freq == "epoch" else int(update_freq))
        self._summary_writer = _summary_writer_class()  # fail here, not after the first epoch
        self.log_dir = Path(log_dir)
        self.update_freq = update_freq
        self.histogram_freq = histogram_freq
        self.write_graph = write_graph
        self._step_freq = self.log_every_n_steps
        self._writer: Any = None
        self._purge_step: int | None = None
        self._graph_written = False
        self._graph_hook: Any = None
        self._graph_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._hparams: dict[str, Any] = {}

    # -- writer ---------------------------------------------------------------------------------
    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``, opened at the first write (after a resumed state has been loaded)."""
        if self._writer is None:
            self._writer = self._summary_writer(log_dir=str(self.log_dir), purge_step=self._purge_step)
        return self._writer

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        check_writable(self.log_dir, f"TensorBoard({str(self.log_dir)!r})")  # not at the first write
        self._close()
        self._purge_step = None
        super().on_train_begin(logs)
        self._hparams = self.trainer_params()
        if self.write_graph and not self._graph_written and self._graph_hook is None:
            self._graph_hook = self.model.register_forward_pre_hook(self._capture_input, with_kwargs=True)

    stops_mid_epoch = False  # on_batch_end only logs: under torchrun, no per-batch stop vote for it

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self._graph_inputs is not None:
            with self.trainer.allow_sync():  # tracing the graph runs the model once, on purpose
                self._add_graph()
        if self._step_freq is not None:
            self.log_batch_steps(batch, logs)

    def on_train_end(self, logs: Logs | None = None) -> None:
        self._remove_graph_hook()
        self._graph_inputs = None
        super().on_train_end(logs)

    # -- writing (ExperimentLogger) -------------------------------------------------------------
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        x = self.trainer.state.global_step
        for key, value in metrics.items():
            self.writer.add_scalar(f"epoch/{key}", value, x)
        if self.histogram_freq and (epoch + 1) % self.histogram_freq == 0:
            for name, param in self.model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", param.detach().float().cpu(), x)
        self.writer.flush()  # an epoch is worth seeing now, not in flush_secs

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"step/{key}", value, step)

    def end_run(self, status: str) -> None:
        if status == FINISHED and self.final_logs:
            self._add_hparams(self.final_logs)
        self._close()

    # -- graph ----------------------------------------------------------------------------------
    def _capture_input(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._remove_graph_hook()  # one-shot: the next forward passes run without it
        self._graph_inputs = (tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()})

    def _remove_graph_hook(self) -> None:
        if self._graph_hook is not None:
            self._graph_hook.remove()
            self._graph_hook = None

    def _add_graph(self) -> None:
        assert self._graph_inputs is not None
        args, kwargs = self._graph_inputs
        self._graph_inputs = None
        self._graph_written = True
        if kwargs:
            warnings.warn(
                "TensorBoard(write_graph=True): the model takes keyword inputs, which the graph tracer "
                "cannot feed; no graph written",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
            return
        model = self.model
        was_training = model.training
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        devices = [device.index or 0] if device.type == "cuda" else []
        try:
            # Eval mode and no_grad: BatchNorm statistics and gradients stay as training left them; the
            # forked random state keeps the run's random stream (dropout, data order) unchanged.
            with torch.random.fork_rng(devices=devices), torch.no_grad(), warnings.catch_warnings():
                # SummaryWriter.add_graph traces with torch.jit, which newer torch marks deprecated: that is
                # torch's business, not the user's, so its FutureWarning is not passed on.
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=FutureWarning)
                model.eval()
                self.writer.add_graph(model, args[0] if len(args) == 1 else args)
        except Exception as exc:  # a model the tracer cannot handle must not stop training
            warnings.warn(
                f"TensorBoard(write_graph=True): could not trace {type(model).__name__} "
                f"({type(exc).__name__}: {exc}); no graph written",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
        finally:
            model.train(was_training)

    # -- hyperparameters ------------------------------------------------------------------------
    def _add_hparams(self, final_logs: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # The metrics name the epoch/* scalars already in this run: the dashboard shows their last value.
        experiment, start, end = hparams(self._hparams, {f"epoch/{k}": v for k, v in final_logs.items()})
        file_writer = self.writer.file_writer
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),  # seen_step
            "global_step": self.trainer.state.global_step,
            "graph_written": self._graph_written,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._close()
        super().load_state_dict(state)
        self._purge_step = int(state["global_step"]) + 1  # the points at the checkpoint's step are the run's
        if state["graph_written"]:
            self._graph_written = True
            self._remove_graph_hook()


__all__ = ["TensorBoard"]
