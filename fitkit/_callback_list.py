"""The callbacks of one ``fit`` (or ``evaluate``): hooks bound once, fired in list order, timed once.

`CallbackList` binds the trainer to each callback, checks hook names, and keeps, for every
hook, the bound methods of the callbacks that override it: a hook nobody overrides is an empty list
and costs the loop nothing. `HookTimer` finds a callback that slows training down.
"""

from __future__ import annotations

import itertools
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fitkit._warn import FitkitWarning, user_stacklevel
from fitkit.callbacks.base import (
    HOOKS,
    KERAS_ALIASES,
    Callback,
    Logs,
    bound_hook,
    check_hook_methods,
    check_hook_names,
)

if TYPE_CHECKING:
    from fitkit.trainer import Trainer

Hook = Callable[..., Any]
_FITKIT_TRAINER = ("fitkit.trainer", "fitkit._steps")  # the modules of Trainer and its base class


class CallbackList:
    """The active callbacks in order, each bound to ``trainer``, with their overridden hooks.

    ``hooks[name]`` lists the bound hooks to call for the event ``name`` (see
    `fitkit.callbacks.base.HOOKS`); the loop reads those lists directly on its per-batch path.
    Callbacks are keyed by class name (``EarlyStopping``, ``EarlyStopping_2``, ...) in checkpoints.
    """

    def __init__(self, callbacks: Sequence[Callback], trainer: Trainer) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            check_hook_names(callback)
            callback.set_trainer(trainer)
        # A Keras 3 name (on_train_batch_end, on_test_end, ...) is bound in the list of the fitkit hook it aliases.
        self.hooks: dict[str, list[Hook]] = {
            name: [fn for cb in self.callbacks if (fn := bound_hook(cb, name)) is not None] for name in HOOKS
        }
        for name, fn in trainer_hooks(trainer).items():  # a Trainer subclass's own hooks run first
            self.hooks[name].insert(0, fn)

    def fire(self, hook: str, *args: Any) -> None:
        """Calls ``hook`` on every callback that overrides it, in list order."""
        for fn in self.hooks[hook]:
            fn(*args)

    def fire_all(self, hook: str, *args: Any) -> None:
        """Calls ``hook`` on every callback even when one raises, then raises the first error.

        For the events that release resources (``on_train_end``): one failing callback must not leave
        another's files or writers open. Fired while an error is already on its way out of ``fit`` (a
        ``finally``), a callback's failure here is a warning: the error that ended the fit stays the one raised.
        """
        first: BaseException | None = None
        failed = hook
        for fn in self.hooks[hook]:
            try:
                fn(*args)
            except BaseException as exc:
                if first is None:
                    first, failed = exc, getattr(fn, "__qualname__", hook)
        if first is None:
            return
        ending = sys.exc_info()[1]
        if ending is None:
            raise first
        warnings.warn(
            f"{failed} failed ({type(first).__name__}: {first}) while fit was ending on "
            f"{type(ending).__name__}: that error is the one raised",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )

    def keyed(self) -> list[tuple[str, Callback]]:
        """``(key, callback)`` pairs: the class name, with ``_2``, ``_3``, ... for repeats."""
        seen: dict[str, int] = {}
        keyed = []
        for callback in self.callbacks:
            name = type(callback).__name__
            seen[name] = seen.get(name, 0) + 1
            keyed.append((name if seen[name] == 1 else f"{name}_{seen[name]}", callback))
        return keyed

    def state_dict(self) -> dict[str, Any]:
        """Every callback's [state_dict][fitkit.callbacks.Callback.state_dict], by key."""
        return {key: cb.state_dict() for key, cb in self.keyed()}

    def load_state_dict(self, states: dict[str, Any], strict: bool = True) -> None:
        """Restores each callback's state; with ``strict``, warns about a stateful callback the
        checkpoint has no state for (it starts fresh)."""
        for key, callback in self.keyed():
            if key in states:
                callback.load_state_dict(states[key])
            elif strict and callback.state_dict():
                warnings.warn(
                    f"the checkpoint holds no state for callback {key}; it starts fresh",
                    FitkitWarning,
                    stacklevel=user_stacklevel(),
                )


def trainer_hooks(trainer: Trainer) -> dict[str, Hook]:
    """The callback hooks a Trainer subclass defines (same names and signatures as [Callback][fitkit.callbacks.Callback]'s),
    bound to it: they run before the callbacks' in ``fit``, ``evaluate`` and ``predict``, so state such
    as an RNN's hidden state is reset wherever batches run. An ``on_*`` method that is no hook is an error,
    as in a callback."""
    own = list(itertools.takewhile(lambda cls: cls.__module__ not in _FITKIT_TRAINER, type(trainer).__mro__))
    check_hook_methods(own)
    hooks: dict[str, Hook] = {}
    for cls in own:
        defined: dict[str, str] = {}
        for name, value in vars(cls).items():
            if not name.startswith("on_") or not callable(value):
                continue
            event = KERAS_ALIASES.get(name, name)  # a Keras 3 name runs as the fitkit hook it aliases
            if event in defined:
                raise TypeError(f"{cls.__name__} defines both {defined[event]} and {name}: one event; keep one")
            defined[event] = name
            hooks.setdefault(event, getattr(trainer, name))  # the most derived class's wins
    return hooks


class HookTimer:
    """Finds a callback that slows training down, as Keras 2 did, at next to no cost.

    Wraps the per-batch training hooks (``on_batch_begin``/``on_batch_end``) in timers for the first
    ``STOP`` batches of a fit's first epoch, times each callback's hooks and the whole batch (hooks
    included) on batches ``FIRST`` to ``STOP - 1`` (the first ones warm up caches and allocators), then
    puts the plain hooks back in the same lists and warns, naming a callback that takes ``SHARE`` of
    the batch time or more; ``on_measured`` is called once it has measured (the trainer then times no
    later fit). Other batches call the plain hooks; a run with no per-batch hooks never builds one.
    """

    FIRST, STOP = 5, 25
    SHARE = 0.25  # of the batch time, hooks included: the callback slows training by 1/(1 - SHARE) or more
    MIN_SECONDS = 50e-6  # per batch: below this a share is timer noise on tiny steps

    def __init__(self, callbacks: CallbackList, on_measured: Callable[[], None]) -> None:
        hooks = callbacks.hooks
        self.on_measured = on_measured
        self.lists = [hooks["on_batch_begin"], hooks["on_batch_end"]]
        self.originals = [list(hook_list) for hook_list in self.lists]
        names = {id(cb): name for name, cb in callbacks.keyed()}
        self.spent: dict[str, list[float]] = {}  # callback name -> seconds in each timed batch
        self.hook_names: dict[str, list[str]] = {}
        self.marks: list[float] = []  # the clock at the start of batches FIRST..STOP
        clock_set = False
        for hook_name, hook_list in zip(("on_batch_begin", "on_batch_end"), self.lists):
            for i, fn in enumerate(hook_list):
                owner = getattr(fn, "__self__", fn)
                name = names.get(id(owner), type(owner).__name__)
                self.spent.setdefault(name, [0.0] * (self.STOP - self.FIRST))
                self.hook_names.setdefault(name, []).append(hook_name)
                hook_list[i] = self._wrap(fn, name, is_clock=not clock_set)
                clock_set = True

    def _wrap(self, fn: Hook, name: str, is_clock: bool) -> Hook:
        spent = self.spent[name]
        first, stop = self.FIRST, self.STOP

        def timed(batch: int, logs: Logs | None = None) -> None:
            if is_clock and first <= batch <= stop:
                self.marks.append(time.perf_counter())
                if batch == stop:
                    self._finish()
            if not first <= batch < stop:
                if batch > stop:  # resumed past the window: nothing to measure
                    self._restore()
                fn(batch, logs)
                return
            start = time.perf_counter()
            fn(batch, logs)
            spent[batch - first] += time.perf_counter() - start

        timed.__wrapped__ = fn  # type: ignore[attr-defined]  # what it times (read by may_stop_mid_epoch)
        return timed

    def _restore(self) -> None:
        for hook_list, original in zip(self.lists, self.originals):
            hook_list[:] = original

    def _finish(self) -> None:
        self._restore()
        if len(self.marks) != self.STOP - self.FIRST + 1:  # a resumed epoch started inside the window
            return
        self.on_measured()
        periods = [b - a for a, b in zip(self.marks, self.marks[1:])]
        batch_time = sorted(periods)[len(periods) // 2]  # medians: a preemption spoils one batch, not all
        name, seconds = max(
            ((name, sorted(times)[len(times) // 2]) for name, times in self.spent.items()), key=lambda item: item[1]
        )
        share = seconds / batch_time if batch_time > 0 else 0.0
        if share >= self.SHARE and seconds >= self.MIN_SECONDS:
            hooks = "/".join(dict.fromkeys(self.hook_names[name]))
            warnings.warn(
                f"callback {name} is slow: its {hooks} takes {seconds * 1e3:.3g} ms per training batch, "
                f"{min(share, 1.0):.0%} of the {batch_time * 1e3:.3g} ms each batch takes (medians over batches "
                f"{self.FIRST}-{self.STOP - 1}). Do its work less often (every N batches, or in on_epoch_end), "
                "and avoid reading tensor values per batch (.item(), float(), .tolist()): that waits for the "
                "device.",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
