"""MLflowLogger: a run in an MLflow tracking store, on the rule every fitkit logger shares.

``mlflow`` is imported when an ``MLflowLogger`` is built, never by ``import fitkit``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fitkit.callbacks.logger import ExperimentLogger
from fitkit.callbacks.model_checkpoint import ModelCheckpoint

_INSTALL = 'pip install "fitkit[mlflow]"'
#: Seconds the store may take to answer the check before training (MLflow retries for minutes by default).
CHECK_TIMEOUT_S = 10
_BOUNDED = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CHECK_TIMEOUT_S)}


def _mlflow_client_class() -> type:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ImportError(
            f"fitkit.callbacks.MLflowLogger writes to MLflow with the mlflow package, which is not installed: {_INSTALL}"
        ) from exc
    return MlflowClient


class MLflowLogger(ExperimentLogger):
    """Logs a ``fit`` to an MLflow run (through ``mlflow.tracking.MlflowClient``: no global active run, so
    several loggers and your own ``mlflow.start_run()`` do not interfere).

    What is logged when follows [ExperimentLogger][fitkit.callbacks.ExperimentLogger]:

    * parameters, once per run: the trainer's configuration (optimizer, lr, weight_decay, batch_size,
      precision, accumulate_grad_batches, grad clipping, epochs) and ``params``;
    * every epoch's logs as metrics named as in the logs (``loss``, ``val_loss``, ``accuracy``, ``lr``, ...)
      at step = the global step at the epoch's end (the x axis of every fitkit logger);
    * with ``log_every_n_steps=N``, ``step/loss`` and ``step/lr`` every N optimizer steps, and each
      step-level validation as ``step/val_<key>``, at step = the global step;
    * with ``log_checkpoints=True``, when the fit ends, the files the trainer's ``ModelCheckpoint``
      callbacks keep (their top-k and ``last.pt``) as artifacts under ``checkpoints/``;
    * the run's status when the fit ends: ``FINISHED``, ``KILLED`` (Ctrl-C, SIGTERM, a pruned Optuna
      trial) or ``FAILED`` (any other exception).

    The run is created at the first write (so a resumed fit knows its run first). Its id is in the
    callback's state: a run resumed from a checkpoint continues the same MLflow run, and one instance
    used for several ``fit`` calls keeps one run. MLflow cannot delete metric points, so epochs that a
    crashed run logged after its last checkpoint appear twice in the history of a resumed run (the
    resumed run's values come last). Runs on rank 0 only in a distributed run.

    Args:
        experiment_name: the MLflow experiment (created if it does not exist).
        tracking_uri: where runs go, e.g. ``"sqlite:///mlflow.db"`` or ``"http://host:5000"``; None:
            MLflow's default (``MLFLOW_TRACKING_URI``, else a local store).
        run_name: the run's display name (None: MLflow picks one).
        params: extra parameters to log (values are logged as strings).
        log_every_n_steps: optimizer steps between step-level points (None: epoch logs only).
        log_checkpoints: upload ModelCheckpoint's files as artifacts when the fit ends.

    Needs ``pip install "fitkit[mlflow]"``.
    """

    def __init__(
        self,
        experiment_name: str = "fitkit",
        tracking_uri: str | None = None,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        log_every_n_steps: int | None = None,
        log_checkpoints: bool = False,
    ) -> None:
        if not isinstance(experiment_name, str) or not experiment_name:
            raise ValueError(f"experiment_name must be a non-empty string, got {experiment_name!r}")
        for name, value in (("tracking_uri", tracking_uri), ("run_name", run_name)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be None or a string, got {type(value).__name__} {value!r}")
        if params is not None and (not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params)):
            raise TypeError(
                f"params must be None or a dict with string keys, such as {{'model': 'resnet18'}}; got {params!r}"
            )
        if not isinstance(log_checkpoints, bool):
            raise TypeError(f"log_checkpoints must be True or False, got {log_checkpoints!r}")
        super().__init__(log_every_n_steps)
        self._client_class = _mlflow_client_class()  # fail here, not after the first epoch
        self.experiment_name = experiment_name
        self.tracking_uri = tracking_uri
        self.run_name = run_name
        self.params = dict(params or {})
        self.log_checkpoints = log_checkpoints
        self.run_id: str | None = None
        self._params_logged = False
        self._client: Any = None
        self._active = False  # the run is RUNNING for this fit

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` for ``tracking_uri``."""
        if self._client is None:
            self._client = self._client_class(tracking_uri=self.tracking_uri)
        return self._client

    # -- run ------------------------------------------------------------------------------------
    def _run(self) -> str:
        """The run id, creating the run (or marking a resumed one RUNNING again) at the first write."""
        if self._active and self.run_id is not None:
            return self.run_id
        client = self.client
        if self.run_id is None:
            experiment = client.get_experiment_by_name(self.experiment_name)
            experiment_id = (
                experiment.experiment_id if experiment is not None else client.create_experiment(self.experiment_name)
            )
            run = client.create_run(experiment_id, run_name=self.run_name, tags={"fitkit.logger": "MLflowLogger"})
            self.run_id = run.info.run_id
        else:
            client.update_run(self.run_id, status="RUNNING")
        self._active = True
        if not self._params_logged:
            from mlflow.entities import Param

            params = {**self.trainer_params(), **self.params}
            client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])
            self._params_logged = True
        assert self.run_id is not None
        return self.run_id

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        run_id = self._run()
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    # -- writing (ExperimentLogger) -------------------------------------------------------------
    def start_run(self) -> None:
        self._active = False
        self._unusable = False
        self._checked(lambda: self.client.search_experiments(max_results=1))

    def _checked(self, request: Any) -> Any:
        """``request()`` (a call to the store) before training, bounded: no HTTP retries and a
        `CHECK_TIMEOUT_S` timeout, instead of MLflow's minutes of retries; a failure is a RuntimeError that
        names the store, and the run is not touched again at the fit's end."""
        saved = {key: os.environ.get(key) for key in _BOUNDED}
        os.environ.update(_BOUNDED)
        try:
            return request()
        except Exception as exc:
            self._unusable = True
            raise RuntimeError(
                f"MLflowLogger cannot use the MLflow tracking store {self.tracking_uri!r} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); checked before training "
                f"(within {CHECK_TIMEOUT_S} s), so nothing was trained. Start the tracking server, or fix tracking_uri "
                "(e.g. 'sqlite:///mlflow.db', 'http://host:5000'), or leave the logger out"
            ) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._log_metrics(metrics, self.trainer.global_step)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._log_metrics({f"step/{k}": v for k, v in metrics.items()}, step)

    def end_run(self, status: str) -> None:
        if getattr(self, "_unusable", False):  # the store failed its check before training: nothing to end
            return
        run_id = self._run()  # a fit that failed before its first epoch still leaves a FAILED run
        if self.log_checkpoints:  # also after a failure: the files kept are good ones (crash.pt is not kept)
            for path in self._checkpoint_files():
                if path.is_dir():  # a sharded (DCP) checkpoint is a directory
                    self.client.log_artifacts(run_id, str(path), artifact_path=f"checkpoints/{path.name}")
                else:
                    self.client.log_artifact(run_id, str(path), artifact_path="checkpoints")
        self.client.set_terminated(run_id, status=status)
        self._active = False

    def _checkpoint_files(self) -> list[Path]:
        """The files the trainer's ModelCheckpoint callbacks keep now (top-k, ``last.pt``)."""
        files: list[Path] = []
        for callback in self.trainer.active_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            candidates = [Path(path) for _, _, path in callback.kept]
            if callback.save_last:
                candidates.append(Path(callback.checkpoint_dir) / "last.pt")
            files += [p for p in dict.fromkeys(candidates) if p.exists()]
        return files

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "run_id": self.run_id, "params_logged": self._params_logged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.run_id = state["run_id"]
        self._params_logged = bool(state["params_logged"])
        self._active = False
        if self.run_id is not None:  # the resumed run must be in this store: checked now, before training
            self._check_run(self.run_id)

    def _check_run(self, run_id: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._checked(lambda: self.client.get_run(run_id))
        except RuntimeError as exc:
            cause = exc.__context__
            if isinstance(cause, MlflowException) and "RESOURCE_DOES_NOT_EXIST" in str(cause.error_code):
                raise RuntimeError(
                    f"MLflowLogger: the checkpoint continues the MLflow run {run_id}, which the tracking store "
                    f"{self.tracking_uri!r} does not hold; checked before training. Resume with the tracking_uri "
                    "that run was logged to"
                ) from None
            raise


__all__ = ["MLflowLogger"]
