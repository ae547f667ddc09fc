"""fitkit's built-in callbacks. Optional dependencies (tensorboard) are imported when a callback is built."""

from fitkit.callbacks.backup_and_restore import BackupAndRestore
from fitkit.callbacks.base import Callback
from fitkit.callbacks.history import History
from fitkit.callbacks.model_checkpoint import ModelCheckpoint
from fitkit.callbacks.monitor import MonitorCallback
from fitkit.callbacks.progress import ProgressBar

__all__ = ["BackupAndRestore", "Callback", "History", "ModelCheckpoint", "MonitorCallback", "ProgressBar"]
