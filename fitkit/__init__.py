"""fitkit: a Keras-style, fast and trustworthy Trainer for PyTorch."""

from fitkit import callbacks, metrics
from fitkit._warn import FitkitWarning
from fitkit.callbacks.base import Callback
from fitkit.callbacks.history import History
from fitkit.checkpoint import CheckpointError
from fitkit.rng import seed_everything
from fitkit.signals import TrainingInterrupted
from fitkit.state import TrainerState
from fitkit.strategies import DDPStrategy, FSDPStrategy
from fitkit.trainer import Trainer

# The one place the version is set: pyproject.toml reads it ([tool.setuptools.dynamic]) without importing
# fitkit, so it stays a plain string literal.
__version__ = "0.1.0"

__all__ = [
    "Callback",
    "CheckpointError",
    "DDPStrategy",
    "FSDPStrategy",
    "FitkitWarning",
    "History",
    "Trainer",
    "TrainerState",
    "TrainingInterrupted",
    "callbacks",
    "metrics",
    "seed_everything",
]
