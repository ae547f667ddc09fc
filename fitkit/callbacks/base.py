"""The Callback base class: documented no-op hooks with Keras's names and signatures."""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterable
from typing import Any

import torch

from fitkit.callbacks._contract import TrainerLike

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
    resets its per-fit counters in ``on_train_begin`` so that one instance can serve several ``fit`` calls (a
    resumed fit loads the saved state after ``on_train_begin``, over the reset, as Keras does).

    ``self.trainer`` is typed as ``TrainerLike`` (this module): the public members of the Trainer that a hook may
    use; a unit test's fake trainer provides the same members.

    Two class attributes matter under torchrun: ``rank_zero_only = True`` for a callback that only writes files
    or draws (it then exists on rank 0 only), and ``stops_mid_epoch = False`` for one whose batch-level hooks
    never stop training (the ranks then need not vote after every batch on whether any rank stopped; see
    [Writing callbacks](../writing-callbacks.md#under-torchrun-which-rank-runs-what)).
    """

    trainer: TrainerLike
    #: True for callbacks that only write files or draw (progress bars, loggers): in a distributed run
    #: they run on rank 0 only. Callbacks that take decisions run on every rank.
    rank_zero_only: bool = False
    #: False when the batch-level hooks this class defines (``on_batch_begin``, ``on_batch_end``,
    #: ``on_before_backward``, ``on_before_optimizer_step``) never stop training. Under torchrun the ranks
    #: then skip their per-batch vote on "did any rank stop?" (see Scaling out). It covers the hooks defined
    #: in the class that sets it: a subclass that overrides one counts as able to stop until it sets it too.
    stops_mid_epoch: bool = True
    #: True makes ``fit`` time its loop's phases for this callback (``trainer.loop_times``: the data, the step,
    #: the callbacks, validation; a clock read per phase, no device sync). False (the default): not timed.
    wants_loop_times: bool = False

    def set_trainer(self, trainer: TrainerLike) -> None:
        """Binds the trainer (``fit`` calls it before ``on_train_begin``; a unit test may pass a fake).

        Args:
            trainer: the [Trainer][fitkit.Trainer] whose events this callback receives, or anything else with
                the members of ``fitkit.callbacks.base.TrainerLike`` (what a hook may use).
        """
        self.trainer = trainer

    @property
    def model(self) -> torch.nn.Module:
        """The trainer's plain module (``trainer.model``: not wrapped by DDP or ``torch.compile``)."""
        return self.trainer.model

    # -- run ------------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        """Called once when ``fit`` starts, before a resumed checkpoint is loaded (Keras's order): a resumed
        fit then calls each callback's [load_state_dict][fitkit.callbacks.Callback.load_state_dict], then
        ``on_epoch_begin``.

        Args:
            logs: an empty dict (Keras's signature). ``self.trainer.state`` is not yet the resumed run's: the
                epoch and step that training continues from are known from ``on_epoch_begin`` on (from
                ``on_batch_begin`` for an epoch resumed mid-way).
        """

    def on_train_end(self, logs: Logs | None = None) -> None:
        """Called once when ``fit`` ends, whatever ended it (also after an exception).

        Every callback's ``on_train_end`` runs even when one of them raises (the first error is raised after
        all of them): close files and writers here.

        Args:
            logs: an empty dict (Keras's signature); the last epoch's logs are in ``History``.
        """

    def on_exception(self, exception: BaseException) -> None:
        """Called when ``fit`` is ended by an exception (``KeyboardInterrupt`` and signals included),
        before ``on_train_end``.

        Args:
            exception: what ended ``fit``: a [TrainingInterrupted][fitkit.TrainingInterrupted] for SIGINT or
                SIGTERM (the state is then at a batch boundary, consistent enough to checkpoint), any other
                exception as raised. ``fit`` raises it after the hooks (a signal as the usual exit:
                ``KeyboardInterrupt``, or status 143 for SIGTERM); a hook need not raise it.
        """

    # -- epochs ---------------------------------------------------------------------------------
    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        """Called at the start of each training epoch; not called again for an epoch resumed mid-way.

        Args:
            epoch: the epoch's index, 0-based (messages print ``epoch + 1``).
            logs: an empty dict (Keras's signature).
        """

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        """Called after each epoch's training and validation.

        Args:
            epoch: the epoch's index, 0-based.
            logs: the epoch's results as Python floats: ``loss``, each metric, ``val_loss`` and ``val_<metric>``
                on epochs that were validated (``val_<name>_...`` for named validation sets), and ``lr``. A
                callback may add keys; later callbacks (and ``History``) see them.
        """

    # -- training batches -----------------------------------------------------------------------
    def on_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Called before each training batch, before it is moved to the device.

        Args:
            batch: the batch's index within the epoch, 0-based (a resumed epoch continues its count).
            logs: an empty dict (Keras's signature).
        """

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Called after each training batch (after the optimizer step when the batch completes an
        accumulation group).

        Args:
            batch: the batch's index within the epoch, 0-based.
            logs: what ``train_step`` returned: ``"loss"`` (the batch's mean loss) and any other values, as
                detached 0-dim tensors still on the device. Reading one as a float (``float``, ``.item()``,
                printing) waits for the device; do it every N batches under ``self.trainer.allow_sync()``.
        """

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Called with the loss just before ``backward``.

        Args:
            loss: the batch's mean loss, a 0-dim tensor on the device that still requires grad; before
                gradient-accumulation weighting and fp16 loss scaling. Do not call ``backward`` on it.
        """

    def on_before_optimizer_step(self) -> None:
        """Called when gradients are final (unscaled, accumulated, clipped) just before ``optimizer.step``."""

    # -- validation -----------------------------------------------------------------------------
    def on_validation_begin(self, logs: Logs | None = None) -> None:
        """Called before a validation pass (in ``fit``, per epoch or per step, and in ``evaluate``).

        Args:
            logs: an empty dict (Keras's signature).
        """

    def on_validation_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Called before each validation batch.

        Args:
            batch: the batch's index within this validation pass, 0-based.
            logs: an empty dict (Keras's signature).
        """

    def on_validation_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Called after each validation batch.

        Args:
            batch: the batch's index within this validation pass, 0-based.
            logs: what ``eval_step`` returned: ``"loss"`` and any other values, as detached 0-dim tensors on
                the device (reading one waits for the device).
        """

    def on_validation_end(self, logs: Logs | None = None) -> None:
        """Called after a validation pass with its results.

        Args:
            logs: Python floats. In ``fit``: the ``val_...`` keys (named sets: ``val_<name>_...``) plus
                ``"step"`` (the global step) and ``"epoch"`` (0-based); in ``evaluate``: the keys it returns.
        """

    # -- prediction -----------------------------------------------------------------------------
    def on_predict_begin(self, logs: Logs | None = None) -> None:
        """Called when ``predict`` starts (only for the callbacks passed to ``predict``).

        Args:
            logs: an empty dict (Keras's signature).
        """

    def on_predict_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Called before each prediction batch.

        Args:
            batch: the batch's index within this rank's share of the data, 0-based.
            logs: an empty dict (Keras's signature).
        """

    def on_predict_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Called after each prediction batch.

        Args:
            batch: the batch's index within this rank's share of the data, 0-based.
            logs: ``"outputs"``, the batch's outputs as ``predict_step`` returned them (on the device), and
                ``"indices"``, a CPU LongTensor with each output row's position in what ``predict`` returns
                (under torchrun, where ranks predict interleaved shares).
        """

    def on_predict_end(self, logs: Logs | None = None) -> None:
        """Called when ``predict`` has gone through its data.

        Args:
            logs: an empty dict (Keras's signature).
        """

    # -- Keras 3's names (aliases: define either name, not both) ------------------------------------
    def on_train_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Keras 3's name for [on_batch_begin][fitkit.callbacks.Callback.on_batch_begin].

        Args:
            batch: the batch's index within the epoch, 0-based.
            logs: an empty dict (Keras's signature).
        """

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Keras 3's name for [on_batch_end][fitkit.callbacks.Callback.on_batch_end].

        Args:
            batch: the batch's index within the epoch, 0-based.
            logs: the step's values as detached 0-dim tensors on the device (``"loss"`` and what
                ``train_step`` returned).
        """

    def on_test_begin(self, logs: Logs | None = None) -> None:
        """Keras 3's name for [on_validation_begin][fitkit.callbacks.Callback.on_validation_begin] (validation in ``fit`` and
        ``evaluate``).

        Args:
            logs: an empty dict (Keras's signature).
        """

    def on_test_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        """Keras 3's name for [on_validation_batch_begin][fitkit.callbacks.Callback.on_validation_batch_begin].

        Args:
            batch: the batch's index within this validation pass, 0-based.
            logs: an empty dict (Keras's signature).
        """

    def on_test_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """Keras 3's name for [on_validation_batch_end][fitkit.callbacks.Callback.on_validation_batch_end].

        Args:
            batch: the batch's index within this validation pass, 0-based.
            logs: the step's values as detached 0-dim tensors on the device.
        """

    def on_test_end(self, logs: Logs | None = None) -> None:
        """Keras 3's name for [on_validation_end][fitkit.callbacks.Callback.on_validation_end].

        Args:
            logs: the pass's results as Python floats (the ``val_...`` keys in ``fit``).
        """

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The callback's resumable state: plain Python values and tensors only.

        Returns:
            What a checkpoint stores for this callback (the base class: an empty dict); it must load with
            ``torch.load(weights_only=True)``, so no custom objects.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what [state_dict][fitkit.callbacks.Callback.state_dict] returned (on resume: after ``on_train_begin``,
        before the first epoch's or batch's hooks).

        Args:
            state: a dict that this callback's ``state_dict`` returned, read back from a checkpoint.
        """


def overrides(callback: Callback, hook: str) -> bool:
    """True when ``callback`` replaces the base no-op for ``hook``: in its class, or as an instance
    attribute (``cb.on_epoch_end = fn``, as Keras's LambdaCallback does)."""
    if hook in getattr(callback, "__dict__", ()):
        return True
    return getattr(type(callback), hook, None) is not getattr(Callback, hook)


MID_EPOCH_HOOKS = ("on_batch_begin", "on_batch_end", "on_before_backward", "on_before_optimizer_step")


def may_stop_mid_epoch(fn: Any) -> bool:
    """Whether a bound batch-level hook may stop training: unless the class that defines it declares
    ``stops_mid_epoch = False`` itself (a plain function or a callable attribute: it may)."""
    while hasattr(fn, "__wrapped__"):  # fitkit's hook timer
        fn = fn.__wrapped__
    owner, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
    if owner is None or func is None:
        return True
    for cls in type(owner).__mro__:
        if cls.__dict__.get(func.__name__) is func:
            return bool(cls.__dict__.get("stops_mid_epoch", True))
    return True


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
    check_hook_methods(itertools.takewhile(lambda cls: cls not in (Callback, object), type(callback).__mro__))


def check_hook_methods(classes: Iterable[type]) -> None:
    """Raises when one of ``classes`` (a callback's or a Trainer subclass's own classes) defines an ``on_*``
    method that is neither a fitkit hook nor a Keras 3 alias of one: it would never be called.

    Args:
        classes: the classes to check, e.g. the part of an MRO above the base class.

    Raises:
        TypeError: naming the class and method, and the hook meant (see `hook_hint`).
    """
    for cls in classes:
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


__all__ = [
    "Callback",
    "HOOKS",
    "KERAS_ALIASES",
    "Logs",
    "MID_EPOCH_HOOKS",
    "bound_hook",
    "check_hook_methods",
    "check_hook_names",
    "hook_hint",
    "may_stop_mid_epoch",
    "overrides",
]
