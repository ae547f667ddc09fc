"""fitkit's built-in callbacks. Optional dependencies (tensorboard, mlflow, optuna) are imported when a callback is
built."""

from fitkit.callbacks.backup_and_restore import BackupAndRestore
from fitkit.callbacks.base import Callback
from fitkit.callbacks.csv_logger import CSVLogger
from fitkit.callbacks.early_stopping import EarlyStopping
from fitkit.callbacks.history import History
from fitkit.callbacks.lambda_callback import LambdaCallback
from fitkit.callbacks.logger import ExperimentLogger
from fitkit.callbacks.lr_scheduler import LearningRateScheduler, LRScheduler, ReduceLROnPlateau
from fitkit.callbacks.mlflow_logger import MLflowLogger
from fitkit.callbacks.model_checkpoint import ModelCheckpoint
from fitkit.callbacks.monitor import MonitorCallback
from fitkit.callbacks.optuna_pruning import OptunaPruning
from fitkit.callbacks.prediction_writer import PredictionWriter
from fitkit.callbacks.profiler import Profiler
from fitkit.callbacks.progress import ProgressBar
from fitkit.callbacks.spike_detection import SpikeDetection
from fitkit.callbacks.tensorboard import TensorBoard
from fitkit.callbacks.terminate_on_nan import TerminateOnNaN
from fitkit.callbacks.throughput import ThroughputMonitor
from fitkit.callbacks.weight_averaging import EMA, SWA

__all__ = [
    "EMA",
    "SWA",
    "BackupAndRestore",
    "CSVLogger",
    "Callback",
    "EarlyStopping",
    "ExperimentLogger",
    "History",
    "LRScheduler",
    "LambdaCallback",
    "LearningRateScheduler",
    "MLflowLogger",
    "ModelCheckpoint",
    "MonitorCallback",
    "OptunaPruning",
    "PredictionWriter",
    "Profiler",
    "ProgressBar",
    "ReduceLROnPlateau",
    "SpikeDetection",
    "TensorBoard",
    "TerminateOnNaN",
    "ThroughputMonitor",
]
