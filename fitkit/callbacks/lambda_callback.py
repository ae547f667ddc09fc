"""LambdaCallback: a callback made of plain functions, as in Keras."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fitkit.callbacks.base import HOOKS, KERAS_ALIASES, Callback, hook_hint


class LambdaCallback(Callback):
    """Builds a callback from functions passed by hook name, e.g. ``LambdaCallback(on_epoch_end=fn)``.

    Any fitkit hook name is accepted (``on_train_begin``, ``on_epoch_end``, ``on_batch_end``,
    ``on_before_optimizer_step``, ... : ``fitkit.callbacks.base.HOOKS``); each function is called with the
    hook's arguments, positionally, as in Keras: ``on_epoch_end(epoch, logs)``, ``on_batch_end(batch,
    logs)``, ``on_train_begin(logs)``, ``on_before_backward(loss)``, ``on_before_optimizer_step()``.
    Keras 3's names (``on_train_batch_end``, ``on_test_end``, ...: ``fitkit.callbacks.base.KERAS_ALIASES``)
    work as aliases. A keyword that is no fitkit hook (a Lightning name, a typo) is a TypeError that names
    the fitkit hook to use; None is ignored.

    The functions become instance attributes, as in Keras; the trainer calls a hook set on an instance
    like one defined in a class, and hooks that were not given stay the base class's no-ops, which it
    skips at no cost.

    Example::

        losses = []
        LambdaCallback(on_epoch_end=lambda epoch, logs: losses.append(logs["loss"]))

    Args:
        **hooks: functions by hook name (fitkit's or Keras 3's), each called with that hook's arguments.
    """

    def __init__(self, **hooks: Callable[..., Any] | None) -> None:
        for name, fn in hooks.items():
            if name not in HOOKS and name not in KERAS_ALIASES:
                raise TypeError(f"LambdaCallback() got an unknown hook {name!r}: {hook_hint(name, list_hooks=True)}")
            if fn is not None and not callable(fn):
                raise TypeError(f"LambdaCallback({name}=...) must be a function, got {type(fn).__name__}")
        self.hooks: dict[str, Callable[..., Any]] = {name: fn for name, fn in hooks.items() if fn is not None}
        for name, fn in self.hooks.items():
            setattr(self, name, fn)

    def __repr__(self) -> str:
        return f"LambdaCallback({', '.join(f'{name}=...' for name in self.hooks)})"


__all__ = ["LambdaCallback"]
