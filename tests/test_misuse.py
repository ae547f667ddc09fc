"""Misuse as a new user commits it (issue 10): each case is a clear error, raised before any work is lost,
whose message names what was received, what is allowed and the fix; or, where Keras accepts the input and
there is one obvious reading, it simply works (Python lists, float64 arrays, a bare metric name, predict on
a generator) with the same results as the canonical form."""

from __future__ import annotations

import errno
import os
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit import checkpoint
from fitkit.callbacks import (
    BackupAndRestore,
    CSVLogger,
    EarlyStopping,
    LearningRateScheduler,
    LRScheduler,
    ModelCheckpoint,
    ReduceLROnPlateau,
    TensorBoard,
)

X = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()  # 3 classes
DL = DataLoader(TensorDataset(X, Y), batch_size=8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def _trainer(
    model: nn.Module | None = None, optimizer: Any = "sgd", loss: Any = "cross_entropy", **kwargs: Any
) -> fitkit.Trainer:
    return fitkit.Trainer(model or _net(), optimizer, loss, verbose=0, **kwargs)


def _fit(data: Any = DL, val: Any = None, trainer: dict[str, Any] | None = None, **kwargs: Any) -> fitkit.Trainer:
    t = _trainer(**(trainer or {}))
    t.fit(data, val, **{"epochs": 1, **kwargs})
    return t


class _Tuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x


class _Typo(fitkit.Callback):
    def on_epoch_ned(self, epoch: int, logs: Any = None) -> None: ...


STRING = r"a string: Python reads every non-empty string as true"
# (case, action, exception, message): each message is pinned; None for the exception means "works now".
CASES: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    # -- Trainer(...)
    (
        "model is a function",
        lambda: fitkit.Trainer(lambda x: x, "sgd", "mse"),
        TypeError,
        r"model must be a torch\.nn\.Module, got function",
    ),
    (
        "optimizer is a class",
        lambda: _trainer(optimizer=torch.optim.Adam),
        TypeError,
        r"the class Adam \(not an instance\); build one: optimizer=Adam\(model\.parameters\(\)\)",
    ),
    (
        "optimizer unknown name",
        lambda: _trainer(optimizer="adamm"),
        ValueError,
        r"unknown optimizer 'adamm'; names: \['adagrad', 'adam'",
    ),
    (
        "optimizer of another model",
        lambda: _trainer(optimizer=torch.optim.SGD(nn.Linear(4, 3).parameters(), lr=0.1)),
        ValueError,
        r"holds none of the model's parameters",
    ),
    (
        "loss is a class",
        lambda: _trainer(loss=nn.CrossEntropyLoss),
        TypeError,
        r"loss is the class CrossEntropyLoss, not an instance; pass loss=CrossEntropyLoss\(\)",
    ),
    ("loss unknown name", lambda: _trainer(loss="crossentropy"), ValueError, r"unknown loss 'crossentropy'; names:"),
    (
        "loss is an int",
        lambda: _trainer(loss=3),
        TypeError,
        r"loss must be a callable \(outputs, targets\) -> scalar tensor or a name, got int",
    ),
    (
        "metrics as a dict",
        lambda: _trainer(metrics={"acc": "accuracy"}),
        TypeError,
        r"metrics is a dict \(\['acc'\]\): fitkit has no per-output metrics.*metrics=\['accuracy', \.\.\.\]",
    ),
    (
        "metrics holds a class",
        lambda: _trainer(metrics=[nn.CrossEntropyLoss]),
        TypeError,
        r"metrics holds the class CrossEntropyLoss, not an instance; pass CrossEntropyLoss\(\)",
    ),
    (
        "metrics is a class",
        lambda: _trainer(metrics=fitkit.metrics.Accuracy),
        TypeError,
        r"metrics is the class Accuracy, not an instance; pass metrics=\[Accuracy\(\)\]",
    ),
    ("metrics unknown name", lambda: _trainer(metrics=["f1"]), ValueError, r"unknown metric 'f1'; known shortcuts"),
    ("metrics twice", lambda: _trainer(metrics=["accuracy", "accuracy"]), ValueError, r"metric names must be unique"),
    (
        "callbacks not a list",
        lambda: _trainer(callbacks=EarlyStopping()),
        TypeError,
        r"got a single EarlyStopping; wrap it in a list: callbacks=\[EarlyStopping\(\.\.\.\)\]",
    ),
    (
        "callbacks holds a class",
        lambda: _trainer(callbacks=[EarlyStopping]),
        TypeError,
        r"callbacks holds the class EarlyStopping, not an instance",
    ),
    (
        "callbacks holds a function",
        lambda: _trainer(callbacks=[print]),
        TypeError,
        r"callbacks must be fitkit\.Callback instances, got builtin_function_or_method; .*LambdaCallback",
    ),
    (
        "callback hook misspelled",
        lambda: _trainer(callbacks=[_Typo()]),
        TypeError,
        r"_Typo\.on_epoch_ned is not a fitkit callback hook.*did you mean 'on_epoch_end'",
    ),
    ("device='gpu'", lambda: _trainer(device="gpu"), ValueError, r"unknown device 'gpu': use 'auto', 'cpu', 'cuda'"),
    ("precision='half'", lambda: _trainer(precision="half"), ValueError, r"unknown precision 'half'"),
    (
        "precision='fp16' on the CPU",
        lambda: _trainer(precision="fp16", device="cpu"),
        ValueError,
        r"precision='fp16' needs a CUDA or MPS device.*precision='bf16'",
    ),
    (
        "grad_clip_norm='1.0'",
        lambda: _trainer(grad_clip_norm="1.0"),
        ValueError,
        r"grad_clip_norm must be None or a finite number > 0, got '1\.0'",
    ),
    (
        "accumulate_grad_batches=2.0",
        lambda: _trainer(accumulate_grad_batches=2.0),
        ValueError,
        r"accumulate_grad_batches must be an int >= 1 \(batches per optimizer step, or a schedule by epoch\), got "
        r"2\.0",
    ),
    (
        "verbose=3",
        lambda: fitkit.Trainer(_net(), "sgd", "mse", verbose=3),
        ValueError,
        r"verbose must be 0 \(silent\), 1 \(progress bar\) or 2",
    ),
    (
        "compile='False'",
        lambda: _trainer(compile="False"),
        TypeError,
        rf"compile must be True or False, got 'False' \({STRING}.*pass compile=False",
    ),
    (
        "channels_last='no'",
        lambda: _trainer(channels_last="no"),
        TypeError,
        rf"channels_last must be True or False, got 'no' \({STRING}.*pass channels_last=False",
    ),
    (
        "handle_signals='no'",
        lambda: _trainer(handle_signals="no"),
        TypeError,
        r"handle_signals must be True or False, got 'no'.*pass handle_signals=False",
    ),
    (
        "fast_tensor_batches='True'",
        lambda: _trainer(fast_tensor_batches="True"),
        TypeError,
        r"fast_tensor_batches must be True or False, got 'True'",
    ),
    ("strategy='dp'", lambda: _trainer(strategy="dp"), ValueError, r"unknown strategy 'dp'"),
    (
        "debug_sync='yes'",
        lambda: _trainer(debug_sync="yes"),
        ValueError,
        r"debug_sync must be False \(off\), True or 'warn'",
    ),
    (
        "process_group_timeout=-5",
        lambda: _trainer(process_group_timeout=-5),
        ValueError,
        r"process_group_timeout must be a finite number of seconds > 0, got -5",
    ),
    # -- fit(...)
    ("epochs=2.5", lambda: _fit(epochs=2.5), ValueError, r"epochs must be an int >= 0, got 2\.5"),
    ("epochs='10'", lambda: _fit(epochs="10"), ValueError, r"epochs must be an int >= 0, got '10'"),
    ("steps_per_epoch=0", lambda: _fit(steps_per_epoch=0), ValueError, r"steps_per_epoch must be an int >= 1, got 0"),
    (
        "validation_freq=[0, 2]",
        lambda: _fit(val=DL, validation_freq=[0, 2], epochs=2),
        ValueError,
        r"validation_freq=\[0, 2\]: a list names the epochs to validate after, counted from 1 as in Keras, so the first is 1 \(got 0\); e\.g\. validation_freq=\[1, 2\]",
    ),
    (
        "validation_freq=[True]",
        lambda: _fit(val=DL, validation_freq=[True]),
        ValueError,
        r"validation_freq must be an int >= 1 or a list of 1-based epochs, got \[True\]",
    ),
    (
        "validation_freq='2'",
        lambda: _fit(val=DL, validation_freq="2"),
        ValueError,
        r"validation_freq must be an int >= 1 or a list of 1-based epochs, got '2'",
    ),
    (
        "batch_size with a DataLoader",
        lambda: _fit(batch_size=8),
        ValueError,
        r"batch_size is for in-memory data; train_data is a DataLoader with its own batch_size \(8\)",
    ),
    (
        "batch_size='32'",
        lambda: _fit((X, Y), batch_size="32"),
        ValueError,
        r"batch_size must be a positive int, got '32'",
    ),
    (
        "shuffle='True'",
        lambda: _fit((X, Y), shuffle="True"),
        TypeError,
        rf"shuffle must be True or False, got 'True' \({STRING}.*pass shuffle=True",
    ),
    (
        "shuffle='False'",
        lambda: _fit((X, Y), shuffle="False"),
        TypeError,
        r"shuffle must be True or False, got 'False'.*pass shuffle=False",
    ),
    (
        "drop_last='yes'",
        lambda: _fit((X, Y), drop_last="yes"),
        TypeError,
        r"drop_last must be True or False, got 'yes'.*pass drop_last=True",
    ),
    (
        "validation_split='0.2'",
        lambda: _fit((X, Y), validation_split="0.2"),
        TypeError,
        r"validation_split must be a fraction in \[0, 1\) such as 0\.2, got '0\.2'",
    ),
    (
        "validation_split=1.5",
        lambda: _fit((X, Y), validation_split=1.5),
        ValueError,
        r"validation_split must be in \[0, 1\), got 1\.5",
    ),
    (
        "validation_split with a DataLoader",
        lambda: _fit(validation_split=0.2),
        ValueError,
        r"validation_split works with in-memory \(x, y\) data only",
    ),
    (
        "resume=True",
        lambda: _fit(resume=True),
        TypeError,
        r"resume=True is ambiguous: pass resume='auto' .* or resume='path/to/checkpoint\.pt'",
    ),
    (
        "resume=1",
        lambda: _fit(resume=1),
        TypeError,
        r"resume must be None, 'auto', 'restart' or a checkpoint path \(str or pathlib\.Path\), got int 1",
    ),
    ("resume=''", lambda: _fit(resume=""), ValueError, r"resume='' names no checkpoint: pass None to start fresh"),
    (
        "resume='missing.pt'",
        lambda: _fit(resume="missing.pt"),
        checkpoint.CheckpointError,
        r"no checkpoint file at missing\.pt",
    ),
    (
        "resume='auto' without checkpoint callbacks",
        lambda: _fit(resume="auto"),
        ValueError,
        r"resume='auto' looks in the folders of the trainer's checkpoint callbacks.*pass a path instead",
    ),
    (
        "sample_weight with a DataLoader",
        lambda: _fit(sample_weight=torch.ones(40)),
        ValueError,
        r"sample_weight= is for in-memory \(x, y\) data; train_data is a DataLoader",
    ),
    (
        "sample_weight of another length",
        lambda: _fit((X, Y), sample_weight=torch.ones(30)),
        ValueError,
        r"x and sample_weight must have the same number of samples, got 40 and 30",
    ),
    (
        "class_weight as a list",
        lambda: _fit((X, Y), class_weight=[1.0, 2.0]),
        TypeError,
        r"class_weight must be a non-empty dict \{class_index: weight\}",
    ),
    (
        "max_time='1h'",
        lambda: _fit(max_time="1h"),
        TypeError,
        r"max_time must be None, a number of seconds or a datetime\.timedelta, got str",
    ),
    (
        "validate_every_n_steps without val_data",
        lambda: _fit(validate_every_n_steps=2),
        ValueError,
        r"validate_every_n_steps=2 needs validation data",
    ),
    # -- data
    (
        "x and y of different lengths",
        lambda: _fit((X, Y[:30])),
        ValueError,
        r"x and y must have the same number of samples, got 40 and 30",
    ),
    (
        "x as a list of per-sample tensors",
        lambda: _fit((list(X), Y)),
        TypeError,
        r"train_data: x is a list of 40 Tensors; .*stack them with torch\.stack\(\.\.\.\)",
    ),
    (
        "ragged Python lists",
        lambda: _fit(([[1.0, 2.0], [3.0]], [0, 1])),
        ValueError,
        r"train_data\[0\] is a Python list whose rows have different lengths",
    ),
    (
        "Python lists of strings",
        lambda: _fit(([["a", "b"]], [0])),
        TypeError,
        r"train_data\[0\] is a Python list that does not convert to numbers",
    ),
    (
        "a generator as train_data",
        lambda: _fit(b for b in DL),
        TypeError,
        r"train_data is a one-shot iterator \(generator\); fit needs data it can iterate once per epoch",
    ),
    (
        "a Dataset as train_data",
        lambda: _fit(TensorDataset(X, Y)),
        TypeError,
        r"train_data is a Dataset; wrap it in a DataLoader",
    ),
    (
        "a dict as train_data",
        lambda: _fit({"x": X, "y": Y}),
        TypeError,
        r"train_data must be a DataLoader, a re-iterable of \(inputs, targets\) batches.*got dict",
    ),
    ("None as train_data", lambda: _fit(None), TypeError, r"got NoneType"),
    (
        "an empty DataLoader",
        lambda: _fit(DataLoader(TensorDataset(X[:0], Y[:0]), batch_size=8)),
        ValueError,
        r"train_data is an empty DataLoader \(dataset of 0 samples\)",
    ),
    (
        "float64 DataLoader batches, float32 model",
        lambda: _fit(DataLoader(TensorDataset(X.double(), Y), batch_size=8)),
        TypeError,
        r"the inputs are float64 but the model's parameters are float32\. Cast the data once",
    ),
    (
        "predict on float64 DataLoader batches",
        lambda: _trainer().predict(DataLoader(TensorDataset(X.double()), batch_size=8)),
        TypeError,
        r"the inputs are float64 but the model's parameters are float32",
    ),
    (
        "int32 labels in a DataLoader",
        lambda: _fit(DataLoader(TensorDataset(X, Y.int()), batch_size=8)),
        TypeError,
        r"torch\.int32 class labels but needs int64",
    ),
    (
        "float labels for cross_entropy",
        lambda: _fit((X, Y.float())),
        TypeError,
        r"CrossEntropyLoss got a float32 tensor of shape \(32,\) as targets: class labels must be integers",
    ),
    (
        "labels outside [0, classes)",
        lambda: _fit((X, Y + 2)),
        ValueError,
        r"CrossEntropyLoss: the label 4 is outside \[0, 3\): the model outputs 3 classes",
    ),
    (
        "labels (N, 1) for cross_entropy",
        lambda: _fit((X, Y[:, None])),
        ValueError,
        r"targets have shape \(32, 1\) but class labels must be \(32,\).*squeeze\(1\)",
    ),
    (
        "regression (N, 1) outputs vs (N,) targets",
        lambda: _fit((X, X[:, 0]), trainer={"model": nn.Linear(4, 1), "loss": "mse"}),
        ValueError,
        r"MSELoss: the outputs have shape \(32, 1\) but the targets \(32,\); torch would broadcast",
    ),
    (
        "model returns a tuple",
        lambda: _fit(trainer={"model": _Tuple()}),
        TypeError,
        r"the model returned a tuple of 2 \(Tensor, Tensor\).*override Trainer\.compute_loss",
    ),
    (
        "BatchNorm and a last batch of one sample",
        lambda: _fit(
            (X[:33], Y[:33]),
            batch_size=8,
            trainer={"model": nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))},
        ),
        ValueError,
        r"last batch \(batch 4 of each epoch\) holds 1 sample.*fit\(\.\.\., drop_last=True\)",
    ),
    (
        "val_data as a list of loaders",
        lambda: _fit(val=[DL, DL]),
        TypeError,
        r"val_data is a list of 2 loaders; to validate on several sets, name them in a dict",
    ),
    # -- callbacks
    (
        "monitor='val_acc' when val_accuracy exists",
        lambda: _fit(val=DL, trainer={"metrics": ["accuracy"], "callbacks": [EarlyStopping("val_acc")]}),
        ValueError,
        r"'val_acc' will never be in the epoch logs; did you mean 'val_accuracy'",
    ),
    (
        "monitor='val_loss' without validation data",
        lambda: _fit(trainer={"callbacks": [EarlyStopping()]}),
        ValueError,
        r"'val_loss' is a validation key but this fit has no validation data",
    ),
    (
        "EarlyStopping(patience='3')",
        lambda: EarlyStopping(patience="3"),
        ValueError,
        r"patience must be an int >= 0.*got '3'",
    ),
    (
        "EarlyStopping(mode='minimum')",
        lambda: EarlyStopping(mode="minimum"),
        ValueError,
        r"mode must be one of \('auto', 'min', 'max'\)",
    ),
    (
        "EarlyStopping(restore_best_weights='True')",
        lambda: EarlyStopping(restore_best_weights="True"),
        TypeError,
        r"restore_best_weights must be True or False, got 'True'",
    ),
    (
        "ModelCheckpoint template typo",
        lambda: _fit(trainer={"callbacks": [ModelCheckpoint("t/{epcoh}.pt", monitor=None)]}),
        ValueError,
        r"ModelCheckpoint\(filepath='t/\{epcoh\}\.pt'\): 'epcoh' will never be in the epoch logs",
    ),
    (
        "ModelCheckpoint(save_top_k=0)",
        lambda: ModelCheckpoint("k/e.pt", save_top_k=0),
        ValueError,
        r"save_top_k must be None \(keep every file\) or an int >= 1, got 0",
    ),
    (
        "ModelCheckpoint(save_freq='batch')",
        lambda: ModelCheckpoint("k/e.pt", save_freq="batch"),
        ValueError,
        r"save_freq must be 'epoch' or an int >= 1",
    ),
    (
        "ModelCheckpoint(save_best_only='True')",
        lambda: ModelCheckpoint("k/e.pt", save_best_only="True"),
        TypeError,
        r"save_best_only must be True or False, got 'True'.*pass save_best_only=True",
    ),
    (
        "ModelCheckpoint(save_last='no')",
        lambda: ModelCheckpoint("k/e.pt", save_last="no"),
        TypeError,
        r"save_last must be True or False, got 'no'",
    ),
    (
        "ModelCheckpoint(None)",
        lambda: ModelCheckpoint(None),
        TypeError,
        r"filepath must be a path template \(str or pathlib\.Path\) such as 'ckpt/\{epoch:02d\}\.pt', got None",
    ),
    (
        "BackupAndRestore(delete_checkpoint='False')",
        lambda: BackupAndRestore("b", delete_checkpoint="False"),
        TypeError,
        r"delete_checkpoint must be True or False, got 'False'",
    ),
    (
        "ReduceLROnPlateau(factor=2)",
        lambda: ReduceLROnPlateau(factor=2),
        ValueError,
        r"factor must be a number with 0 < factor < 1",
    ),
    (
        "LearningRateScheduler(0.1)",
        lambda: LearningRateScheduler(0.1),
        TypeError,
        r"schedule must be a function \(epoch, lr\) -> new_lr, got float",
    ),
    (
        "LRScheduler over another optimizer",
        lambda: _fit(
            trainer={
                "callbacks": [
                    LRScheduler(
                        torch.optim.lr_scheduler.StepLR(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), 1)
                    )
                ]
            }
        ),
        ValueError,
        r"LRScheduler: the scheduler was built for an optimizer that is not one of the trainer's",
    ),
    # -- files
    (
        "a checkpoint folder that is a file",
        lambda: (
            Path("afile").write_text("x"),
            _fit(trainer={"callbacks": [ModelCheckpoint("afile/e{epoch}.pt", monitor=None)]}),
        ),
        ValueError,
        r"ModelCheckpoint\('afile/e\{epoch\}\.pt'\): afile is a file, so the folder afile cannot be created there.*nothing has been trained yet",
    ),
    (
        "a BackupAndRestore folder that is a file",
        lambda: (Path("bfile").write_text("x"), _fit(trainer={"callbacks": [BackupAndRestore("bfile/sub")]})),
        ValueError,
        r"BackupAndRestore\('bfile/sub'\): bfile is a file",
    ),
    (
        "a TensorBoard log_dir that is a file",
        lambda: (Path("tbfile").write_text("x"), _fit(trainer={"callbacks": [TensorBoard("tbfile")]})),
        ValueError,
        r"TensorBoard\('tbfile'\): tbfile is a file",
    ),
    (
        "a CSVLogger filename that is a directory",
        lambda: (Path("csvdir").mkdir(), _fit(trainer={"callbacks": [CSVLogger("csvdir")]})),
        ValueError,
        r"CSVLogger\('csvdir'\): csvdir is a directory, not a file; name a file in it, e\.g\. csvdir/log\.csv",
    ),
    (
        "resume from a text file",
        lambda: (Path("notes.txt").write_text("hi"), _fit(resume="notes.txt")),
        checkpoint.CheckpointError,
        r"notes\.txt is not listed in .*fitkit\.checkpoint\.trust\('notes\.txt'\)",
    ),
    (
        "trainer.optimizer = 'adam'",
        lambda: setattr(_trainer(), "optimizer", "adam"),
        TypeError,
        r"trainer\.optimizer must be set to a torch\.optim\.Optimizer over the model's parameters, got str 'adam'",
    ),
    (
        "save_checkpoint(None)",
        lambda: _trainer().save_checkpoint(None),
        TypeError,
        r"save_checkpoint needs a file path \(str or pathlib\.Path\) such as 'ckpt/last\.pt', got None",
    ),
    (
        "load_checkpoint(None)",
        lambda: _trainer().load_checkpoint(None),
        TypeError,
        r"load_checkpoint needs a file path \(str or pathlib\.Path\) such as 'ckpt/last\.pt', got None",
    ),
    (
        "trust() a missing file",
        lambda: checkpoint.trust("nope.pt"),
        checkpoint.CheckpointError,
        r"trust: no file at nope\.pt",
    ),
    # -- the model against the data: torch's shape error, in fitkit's words
    (
        "inputs of the wrong width",
        lambda: _fit((torch.randn(8, 5), torch.randint(0, 3, (8,))), batch_size=4),
        ValueError,
        r"^the inputs have 5 features \(shape \(4, 5\)\), but the model, "
        r"Linear\(in_features=4, out_features=3\), takes 4: give it inputs with 4 features",
    ),
    (
        "predict on inputs of the wrong width",
        lambda: _trainer().predict(torch.randn(8, 6)),
        ValueError,
        r"^the inputs have 6 features \(shape \(8, 6\)\), but the model, Linear",
    ),
    (
        "a hidden layer of the wrong width",
        lambda: _fit(trainer={"model": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(6, 3))}),
        ValueError,
        r"^the model's layer '2', Linear\(in_features=6, out_features=3\), received 8 features: the layers before "
        r"it output 8, not 6\. Build it with in_features=8",
    ),
    (
        "grayscale images for an RGB model",
        lambda: _fit(
            (torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))),
            batch_size=4,
            trainer={"model": nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 3))},
        ),
        ValueError,
        r"^the inputs have 1 channels \(shape \(4, 1, 6, 6\)\), but the model's first layer '0', a convolution "
        r"with in_channels=3, out_channels=4, takes 3",
    ),
    (
        "class_weight for a class the model lacks",
        lambda: _fit((X, Y), class_weight={0: 1.0, 7: 2.0}),
        ValueError,
        r"^class_weight lists class 7, but the model's outputs \(\d+, 3\) have 3 classes",
    ),
]


@pytest.mark.parametrize(("action", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_misuse_is_a_clear_early_error(
    action: Callable[[], Any], error: type[BaseException], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=message):
            action()
    assert not list(tmp_path.rglob("crash.pt"))  # failed before training: nothing to inspect, nothing written


# -- what works now, as in Keras, with the canonical form's results -------------------------------------
def _weights(trainer: fitkit.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _same(a: fitkit.Trainer, b: fitkit.Trainer) -> None:
    assert a.history.history == b.history.history
    for key, value in _weights(a).items():
        assert torch.equal(value, _weights(b)[key]), key


def _seeded_fit(data: Any, val: Any = None, **kwargs: Any) -> fitkit.Trainer:
    fitkit.seed_everything(0)
    return _fit(data, val, trainer={"metrics": kwargs.pop("metrics", ["accuracy"])}, epochs=2, batch_size=8, **kwargs)


def test_python_lists_train_like_tensors() -> None:
    _same(_seeded_fit((X.tolist(), Y.tolist()), (X.tolist(), Y.tolist())), _seeded_fit((X, Y), (X, Y)))
    _same(_seeded_fit((X.tolist(), Y.tolist()), validation_split=0.25), _seeded_fit((X, Y), validation_split=0.25))


def test_float64_and_int32_numpy_arrays_are_cast_once_like_keras() -> None:
    x64, y32 = X.double().numpy(), Y.numpy().astype("int32")
    assert x64.dtype == np.float64 and y32.dtype == np.int32
    reference = _seeded_fit((X, Y), (X, Y))
    _same(_seeded_fit((x64, y32), (x64, y32)), reference)
    _same(_seeded_fit((X.double(), Y.int()), (X.double(), Y.int())), reference)
    assert torch.equal(reference.predict(x64, batch_size=8), reference.predict(X, batch_size=8))
    assert reference.evaluate((x64, y32), batch_size=8) == reference.evaluate((X, Y), batch_size=8)


def test_a_bare_metric_name_is_a_list_of_one() -> None:
    _same(_seeded_fit((X, Y), (X, Y), metrics="accuracy"), _seeded_fit((X, Y), (X, Y), metrics=["accuracy"]))
    assert "val_accuracy" in _seeded_fit((X, Y), (X, Y), metrics="accuracy").history.history


def test_predict_and_evaluate_take_a_generator_one_pass() -> None:
    trainer = _trainer()
    expected = trainer.predict(DL)
    assert torch.equal(trainer.predict(x for x, _ in DL), expected)
    assert torch.equal(trainer.predict(X.tolist(), batch_size=8), expected)
    assert trainer.evaluate(b for b in DL) == trainer.evaluate(DL)


def test_resume_false_starts_fresh() -> None:
    _same(_seeded_fit((X, Y), resume=False), _seeded_fit((X, Y)))


def test_validation_epochs_beyond_epochs_warn() -> None:
    with pytest.warns(UserWarning, match=r"validation_freq lists the 1-based epoch\(s\) \[3\], but this fit stops after "
                      r"epoch 2: they are never validated"):  # fmt: skip
        _fit(val=DL, validation_freq=[1, 3], epochs=2)


def test_steps_per_epoch_beyond_the_data_warns_once() -> None:
    with pytest.warns(UserWarning, match=r"steps_per_epoch=50 but train_data holds 5 batches") as seen:
        _fit(steps_per_epoch=50, epochs=3)
    assert sum("steps_per_epoch" in str(w.message) for w in seen) == 1


# -- fit twice, read-only folders, a full disk ----------------------------------------------------------
class _Batches(fitkit.Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_batch_end(self, batch: int, logs: Any = None) -> None:
        self.count += 1


def test_fit_twice_continues_training_and_rewrites_its_own_files(tmp_path: Path) -> None:
    """Issue 19's re-run policy: a second fit of one trainer (Keras users call fit twice) is not refused: the
    files this trainer wrote are its own, and its epochs' names are written again."""
    batches = _Batches()
    trainer = _trainer(callbacks=[batches, ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None, save_last=True)])
    trainer.fit(DL, epochs=2)
    before, done = (tmp_path / "e1.pt").read_bytes(), batches.count
    trainer.fit(DL, epochs=2)
    assert batches.count == 2 * done
    assert (tmp_path / "e1.pt").read_bytes() != before
    trainer.fit(DL, epochs=4, initial_epoch=2)  # continuing the numbering (last.pt: the newest state, replaced)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["e1.pt", "e2.pt", "e3.pt", "e4.pt", "last.pt"]
    assert checkpoint.load(tmp_path / "last.pt")["trainer"]["global_step"] == 30


def test_fit_twice_with_step_names_continues_without_clash(tmp_path: Path) -> None:
    trainer = _trainer(callbacks=[ModelCheckpoint(tmp_path / "s{step}.pt", monitor=None, save_freq=5)])
    trainer.fit(DL, epochs=1)
    trainer.fit(DL, epochs=1)  # global_step goes on: s10.pt is a new name
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["s10.pt", "s5.pt"]


@pytest.mark.parametrize(
    ("callback", "who"),
    [
        (lambda folder: ModelCheckpoint(folder / "e{epoch}.pt", monitor=None), "ModelCheckpoint"),
        (lambda folder: BackupAndRestore(folder), "BackupAndRestore"),
        (lambda folder: CSVLogger(folder / "log.csv"), "CSVLogger"),
        (lambda folder: TensorBoard(folder / "tb"), "TensorBoard"),
    ],
)
def test_a_read_only_folder_is_an_error_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, callback: Callable[[Path], Any], who: str
) -> None:
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real = os.access
    # Tests run as root, for whom every folder is writable: fake the answer a read-only mount gives.
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == readonly else real(p, mode, *a, **k))
    batches = _Batches()
    with pytest.raises(PermissionError, match=rf"{who}\(.*\): cannot write into {readonly} \(read-only, or no write "
                       r"permission for this user\); checked before training"):  # fmt: skip
        _fit(trainer={"callbacks": [batches, callback(readonly)]})
    assert batches.count == 0


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = _trainer(callbacks=[ModelCheckpoint(tmp_path / "last{epoch}.pt", monitor=None, save_top_k=1)])
    trainer.fit(DL, epochs=1)
    good = (tmp_path / "last1.pt").read_bytes()

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(checkpoint.CheckpointError, match=r"could not write the checkpoint .*last2\.pt: No space left on "
                       r"device \(ENOSPC\)\. Nothing was replaced"):  # fmt: skip
        trainer.fit(DL, epochs=2, initial_epoch=1)
    assert (tmp_path / "last1.pt").read_bytes() == good
    checkpoint.verify(tmp_path / "last1.pt")


def test_ctrl_c_inside_validation_saves_and_raises_keyboard_interrupt(tmp_path: Path) -> None:
    class Interrupt(fitkit.Callback):
        def on_validation_batch_end(self, batch: int, logs: Any = None) -> None:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _fit(val=DL, trainer={"callbacks": [Interrupt(), ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None)]})
    assert checkpoint.load(tmp_path / "last.pt")["trainer"]["batch_in_epoch"] == 5


def _slow_job(folder: str, started: str, release: str) -> None:
    class Wait(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            Path(started).touch()
            deadline = time.monotonic() + 30
            while not Path(release).exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    _fit(trainer={"callbacks": [Wait(), ModelCheckpoint(Path(folder) / "e{epoch}.pt", monitor=None)]})


@pytest.mark.parametrize("second", ["ModelCheckpoint", "BackupAndRestore"])
def test_two_jobs_writing_one_folder_at_once_the_second_is_refused(
    tmp_path: Path, second: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused first thing: before the second job prints its summary or runs any callback's on_train_begin (it
    was refused in on_train_begin, after the summary, and the ProgressBar's clean-up then replaced the error)."""
    from resume_utils import run_child

    folder, started, release = tmp_path / "ckpt", tmp_path / "started", tmp_path / "release"
    first = run_child(_slow_job, str(folder), str(started), str(release))
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        callback = ModelCheckpoint(folder / "x{epoch}.pt", monitor=None) if second == "ModelCheckpoint" else (
            BackupAndRestore(folder))  # fmt: skip
        batches, begun = _Batches(), []
        began = fitkit.callbacks.LambdaCallback(on_train_begin=lambda logs: begun.append(True))
        capsys.readouterr()
        with pytest.raises(ValueError, match=rf"{second}\(.*\): another fit is writing checkpoints into {folder} right now "
                           rf"\(pid {first.pid} on .*\); two runs in one folder would overwrite"):  # fmt: skip
            _fit(trainer={"callbacks": [began, batches, callback]}, verbose=1)
        assert batches.count == 0 and begun == []
        assert capsys.readouterr().out == ""  # not even the model's summary
    finally:
        release.touch()
        first.join(30)
    assert first.exitcode == 0
    _fit(trainer={"callbacks": [ModelCheckpoint(folder / "e{epoch}.pt", monitor=None)]}, resume="auto", epochs=2)
    assert sorted(p.name for p in folder.glob("*.pt")) == ["e1.pt", "e2.pt"]


def test_class_weight_for_fewer_classes_than_the_labels_weighs_the_rest_1() -> None:
    """Documented: classes not listed weigh 1.0 (it was an IndexError for labels beyond the largest key)."""
    fitkit.seed_everything(0)
    short = _fit((X, Y), class_weight={0: 2.0}, epochs=2)
    fitkit.seed_everything(0)
    full = _fit((X, Y), class_weight={0: 2.0, 1: 1.0, 2: 1.0}, epochs=2)
    _same(short, full)


def test_a_lock_file_that_cannot_be_created_or_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    real_open = os.open

    def denied(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(".fitkit-run.lock"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)  # what os.access cannot see: ACLs, root squash on NFS
    with pytest.raises(PermissionError, match=r"ModelCheckpoint\(.*\): cannot create .*\.fitkit-run\.lock \(Permission "
                       r"denied\); checked before training"):  # fmt: skip
        _fit(trainer={"callbacks": [ModelCheckpoint(tmp_path / "a" / "e{epoch}.pt", monitor=None)]})
    monkeypatch.setattr(os, "open", real_open)

    def no_locks(*args: Any) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)  # a file system without locks: train, but say so
    with pytest.warns(UserWarning, match=r"cannot lock .* \(No locks available; a file system without locks\?\)"):
        _fit(trainer={"callbacks": [ModelCheckpoint(tmp_path / "b" / "e{epoch}.pt", monitor=None)]})
    assert (tmp_path / "b" / "e1.pt").exists()


# -- a failing fit leaves no DataLoader workers behind -------------------------------------------------
@pytest.mark.parametrize("where", ["training", "validation"])
def test_a_fit_that_fails_shuts_its_dataloader_workers_down_at_once(where: str) -> None:
    """The exception's traceback keeps the loop's frame alive; its DataLoader iterator must not wait for a
    garbage collection, where multiprocessing's finalizers close the queues first (10 s for 2 workers)."""
    import multiprocessing

    class Fail(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if where == "training" and batch == 2:
                raise RuntimeError("boom")

        def on_validation_batch_end(self, batch: int, logs: Any = None) -> None:
            if where == "validation" and batch == 1:
                raise RuntimeError("boom")

    data = TensorDataset(torch.randn(96, 4), torch.randint(0, 3, (96,)))
    loaders = [DataLoader(data, batch_size=8, num_workers=2, shuffle=True) for _ in range(2)]
    trainer = fitkit.Trainer(nn.Linear(4, 3), "sgd", "cross_entropy", callbacks=[Fail()], device="cpu", verbose=0)
    with pytest.raises(RuntimeError, match="boom") as caught:
        trainer.fit(loaders[0], loaders[1], epochs=1)
    assert caught.value.__traceback__ is not None  # still held, with the frames of the loop
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("given", ["folder", "folder/", "s3://bucket/run/"])
def test_model_checkpoint_given_a_folder_says_to_name_the_files(tmp_path: Path, given: str) -> None:
    """An existing folder was read as a file template: the folder itself was then 'a checkpoint this fit did not
    write' in its parent, and fit was refused with a message about the parent folder."""
    (tmp_path / "folder").mkdir()
    filepath = given if given.startswith("s3://") else str(tmp_path / given)
    with pytest.raises(ValueError, match=r"names a folder; give the file name template inside it, e.g. ModelCheckpoint\("
                       r"'.*/\{epoch:02d\}\.pt'\)"):  # fmt: skip
        ModelCheckpoint(filepath)


def test_a_sharded_checkpoint_directory_named_as_the_filepath_is_no_folder(tmp_path: Path) -> None:
    """FSDP writes best.pt as a DCP directory: a resumed job's ModelCheckpoint('ckpt/best.pt') must not read it as
    a folder given by mistake (the full CI run caught that)."""
    sharded = tmp_path / "best.pt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")
    assert ModelCheckpoint(sharded, monitor=None).filepath == str(sharded)
