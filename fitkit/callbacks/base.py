"""The Callback base class: documented no-op hooks with Keras's names and signatures."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fitkit.trainer import Trainer

Logs = dict[str, Any]

HOOKS = (
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_batch_begin",
    "on_batch_end",
    "on_validation_begin",
    "on_validation_batch_begin",
    "on_validation_batch_end",
    "on_validation_end",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_exception",
    "on_predict_begin",
    "on_predict_batch_begin",
    "on_predict_batch_end",
    "on_predict_end",
)

#: Keras 3's names for fitkit hooks. A callback may define either name (not both): the alias is called
#: for the same event, with the same arguments, as the fitkit hook, so a Keras callback ports unchanged.
KERAS_ALIASES = {
    "on_train_batch_begin": "on_batch_begin",
    "on_train_batch_end": "on_batch_end",
    "on_test_begin": "on_validation_begin",
    "on_test_end": "on_validation_end",
    "on_test_batch_begin": "on_validation_batch_begin",
    "on_test_batch_end": "on_validation_batch_end",
}

# Names users bring from Lightning, and the fitkit hook that does the same job (a hint, not an alias:
# their signatures differ).
_KNOWN_ALIASES = {
    "on_train_start": "on_train_begin",
    "on_fit_start": "on_train_begin",
    "on_fit_end": "on_train_end",
    "on_train_epoch_start": "on_epoch_begin",
    "on_train_epoch_end": "on_epoch_end",
    "on_epoch_start": "on_epoch_begin",
    "on_batch_start": "on_batch_begin",
    "on_validation_start": "on_validation_begin",
    "on_validation_epoch_start": "on_validation_begin",
    "on_validation_epoch_end": "on_validation_end",
    "on_validation_batch_start": "on_validation_batch_begin",
    "on_before_zero_grad": "on_before_optimizer_step",
    "on_after_backward": "on_before_optimizer_step",
}


class Callback:
    """Base class for callbacks. Override the hooks you need; the others cost nothing.

    The trainer binds itself once with [set_trainer][fitkit.callbacks.Callback.set_trainer] before ``on_train_begin``; a hook reaches it as
    ``self.trainer`` and the (unwrapped) module as ``self.model``. Hooks run in list order and share one
    logs dict per event, so a callback may add keys that a later one reads.

    Per-batch ``logs`` hold detached 0-dim tensors still on the device: reading one as a float
    synchronises with the device, so a callback that does so pays for it. ``on_epoch_end`` logs are
    Python floats: ``loss``, the metrics, ``val_loss`` and ``val_<metric>`` on validated epochs, and ``lr``.

    A callback with state worth keeping across a restart (best value, counters) overrides
    [state_dict][fitkit.callbacks.Callback.state_dict] and [load_state_dict][fitkit.callbacks.Callback.load_state_dict], returning plain Python values and tensors only, and
    resets its per-fit counters in ``on_train_begin`` so that one instance can serve several ``fit`` calls.
    """

    trainer: Trainer
    #: True for callbacks that only write files or draw (progress bars, loggers): in a distributed run
    #: they run on rank 0 only. Callbacks that take decisions run on every rank.
    rank_zero_only: bool = False

    def set_trainer(self, trainer: Trainer) -> None:
        """Binds the trainer (``fit`` calls it before ``on_train_begin``; a unit test may pass a fake).

        Args:
            trainer: the [Trainer][fitkit.Trainer] whose events this callback receives.
        """
        self.trainer = trainer

    @property
    def model(self) -> torch.nn.Module:
        """The trainer's plain module (``trainer.model``: not wrapped by DDP or ``torch.compile``)."""
        return self.trainer.model

    # -- run ------------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        """Called once when ``fit`` starts, after a resumed state has been loaded."""

    def on_train_end(self, logs: Logs | None = None) -> None:
        """Called once when ``fit`` ends, whatever ended it (also after an exception)."""

    def on_exception(self, exception: BaseException) -> None:
        """Called when ``fit`` is ended by an exception (``KeyboardInterrupt`` and signals included),
        before ``on_train_end``."""

    # -- epochs ---------------------------------------------------------------------------------
    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        """Called at the start of each training epoch (0-based ``epoch``)."""

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        """Called after each epoch's training and validation; ``logs`` holds Python floats."""

    # -- training batches -----------------------------------------------------------------------
    def on_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Called before each training batch (``batch``: index within the epoch)."""

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Called after each training batch; ``logs["loss"]`` is the batch's loss as a 0-dim tensor."""

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Called with the (unscaled) loss just before ``backward``."""

    def on_before_optimizer_step(self) -> None:
        """Called when gradients are final (unscaled, accumulated, clipped) just before ``optimizer.step``."""

    # -- validation -----------------------------------------------------------------------------
    def on_validation_begin(self, logs: Logs | None = None) -> None:
        """Called before a validation pass (in ``fit`` and in ``evaluate``)."""

    def on_validation_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Called before each validation batch."""

    def on_validation_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Called after each validation batch; ``logs["loss"]`` is a 0-dim tensor."""

    def on_validation_end(self, logs: Logs | None = None) -> None:
        """Called after a validation pass with its logs (floats): in ``fit``, the ``val_...`` keys (named
        sets: ``val_<name>_...``) plus ``"step"`` (the global step) and ``"epoch"``; in ``evaluate``, the
        keys it returns."""

    # -- prediction -----------------------------------------------------------------------------
    def on_predict_begin(self, logs: Logs | None = None) -> None:
        """Called when ``predict`` starts (only for the callbacks passed to ``predict``)."""

    def on_predict_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Called before each prediction batch."""

    def on_predict_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Called after each prediction batch; ``logs["outputs"]`` holds the batch's outputs (on the
        device, as the model returned them) and ``logs["batch"]`` the batch itself."""

    def on_predict_end(self, logs: Logs | None = None) -> None:
        """Called when ``predict`` has gone through its data."""

    # -- Keras 3's names (aliases: define either name, not both) ------------------------------------
    def on_train_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Keras 3's name for [on_batch_begin][fitkit.callbacks.Callback.on_batch_begin]."""

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Keras 3's name for [on_batch_end][fitkit.callbacks.Callback.on_batch_end]."""

    def on_test_begin(self, logs: Logs | None = None) -> None:
        """Keras 3's name for [on_validation_begin][fitkit.callbacks.Callback.on_validation_begin] (validation in ``fit`` and ``evaluate``)."""

    def on_test_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Keras 3's name for [on_validation_batch_begin][fitkit.callbacks.Callback.on_validation_batch_begin]."""

    def on_test_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Keras 3's name for [on_validation_batch_end][fitkit.callbacks.Callback.on_validation_batch_end]."""

    def on_test_end(self, logs: Logs | None = None) -> None:
        """Keras 3's name for [on_validation_end][fitkit.callbacks.Callback.on_validation_end]."""

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The callback's resumable state: plain Python values and tensors only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what [state_dict][fitkit.callbacks.Callback.state_dict] returned."""


def overrides(callback: Callback, hook: str) -> bool:
    """True when ``callback`` replaces the base no-op for ``hook``: in its class, or as an instance
    attribute (``cb.on_epoch_end = fn``, as Keras's LambdaCallback does)."""
    if hook in getattr(callback, "__dict__", ()):
        return True
    return getattr(type(callback), hook, None) is not getattr(Callback, hook)


def bound_hook(callback: Callback, hook: str) -> Any:
    """The function ``callback`` runs for the event ``hook``: its override of ``hook`` or of the hook's
    Keras 3 alias; None when it overrides neither (the event costs nothing for it)."""
    if overrides(callback, hook):
        return getattr(callback, hook)
    alias = _ALIAS_OF.get(hook)
    if alias is not None and overrides(callback, alias):
        return getattr(callback, alias)
    return None


_ALIAS_OF = {hook: alias for alias, hook in KERAS_ALIASES.items()}


def check_hook_names(callback: Callback) -> None:
    """Raises when a callback defines an ``on_*`` method or instance attribute that is no fitkit hook (a
    typo or a Lightning name), so that it is not silently never called; when an instance attribute named
    like a hook is not callable; and when it defines both a hook and its Keras 3 alias (which one would
    run?)."""
    for alias, hook in KERAS_ALIASES.items():
        if overrides(callback, alias) and overrides(callback, hook):
            raise TypeError(
                f"{type(callback).__name__} defines both {hook} and {alias}, Keras 3's name for the same "
                f"event; keep one of them"
            )
    for name, value in getattr(callback, "__dict__", {}).items():
        if not name.startswith("on_"):
            continue
        if (name in HOOKS or name in KERAS_ALIASES) and not callable(value):
            raise TypeError(
                f"{type(callback).__name__} instance attribute {name} holds a {type(value).__name__} value, not "
                "a function; a hook set on an instance must be callable with the hook's arguments"
            )
        if name not in HOOKS and name not in KERAS_ALIASES and callable(value):
            raise TypeError(
                f"{type(callback).__name__} instance attribute {name} is not a fitkit callback hook and would "
                f"never be called; {hook_hint(name)}."
            )
    for cls in type(callback).__mro__:
        if cls is Callback or cls is object:
            break
        for name in vars(cls):
            if not name.startswith("on_") or name in HOOKS or name in KERAS_ALIASES or not callable(getattr(cls, name)):
                continue
            raise TypeError(
                f"{cls.__name__}.{name} is not a fitkit callback hook and would never be called; "
                f"{hook_hint(name)}. (Name helpers without the 'on_' prefix.)"
            )


def hook_hint(name: str, list_hooks: bool = False) -> str:
    """What to use instead of ``name``, which is no fitkit hook: the fitkit name of a Keras or Lightning
    hook, the closest fitkit hook (and, with ``list_hooks``, every hook), or the list of hooks."""
    if name in _KNOWN_ALIASES:
        return f"fitkit calls this hook {_KNOWN_ALIASES[name]!r}"
    every = f"the hooks are: {', '.join(HOOKS)}"
    close = difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.6)
    if not close:
        return every
    return f"did you mean {close[0]!r}?" + (f" T{every[1:]}" if list_hooks else "")
