"""LambdaCallback: a callback made of plain functions, as in Keras."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from fitkit.callbacks.base import _KNOWN_ALIASES, HOOKS, Callback


class LambdaCallback(Callback):
    """Builds a callback from functions passed by hook name, e.g. ``LambdaCallback(on_epoch_end=fn)``.

    Any fitkit hook name is accepted (``on_train_begin``, ``on_epoch_end``, ``on_batch_end``,
    ``on_before_optimizer_step``, ... : ``fitkit.callbacks.base.HOOKS``); each function is called with the
    hook's arguments, positionally, as in Keras: ``on_epoch_end(epoch, logs)``, ``on_batch_end(batch,
    logs)``, ``on_train_begin(logs)``, ``on_before_backward(loss)``, ``on_before_optimizer_step()``.
    A keyword that is no fitkit hook (Keras's ``on_train_batch_end``, a typo) is a TypeError that names
    the fitkit hook to use; None is ignored.

    How the functions become hooks: the trainer calls only the hooks a callback's class overrides, and
    skips the rest at no cost. So each instance gets its own subclass (also named ``LambdaCallback``)
    holding exactly the functions it was given; hooks it was not given stay the base class's no-ops
    and are never called. (Defining every hook and dispatching would put a call on every batch of
    every ``fit`` for hooks nobody asked for.)

    Example::

        losses = []
        LambdaCallback(on_epoch_end=lambda epoch, logs: losses.append(logs["loss"]))
    """

    def __init__(self, **hooks: Callable[..., Any] | None) -> None:
        for name, fn in hooks.items():
            if name not in HOOKS:
                raise TypeError(f"LambdaCallback() got an unknown hook {name!r}: {_hint(name)}")
            if fn is not None and not callable(fn):
                raise TypeError(f"LambdaCallback({name}=...) must be a function, got {type(fn).__name__}")
        given = {name: staticmethod(fn) for name, fn in hooks.items() if fn is not None}
        # A per-instance subclass: the trainer sees exactly these hooks as overridden.
        cls = type(self)
        self.__class__ = type(
            cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__, **given}
        )
        self.hooks: dict[str, Callable[..., Any]] = {name: fn for name, fn in hooks.items() if fn is not None}

    def __repr__(self) -> str:
        return f"LambdaCallback({', '.join(f'{name}=...' for name in self.hooks)})"


def _hint(name: str) -> str:
    if name in _KNOWN_ALIASES:
        return f"fitkit calls this hook {_KNOWN_ALIASES[name]!r}"
    close = difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}? The hooks are: {', '.join(HOOKS)}"
    return f"the hooks are: {', '.join(HOOKS)}"
