"""fitkit's built-in callbacks. Optional dependencies (tensorboard) are imported when a callback is built."""

from fitkit.callbacks.base import Callback
from fitkit.callbacks.history import History
from fitkit.callbacks.progress import ProgressBar

__all__ = ["Callback", "History", "ProgressBar"]
