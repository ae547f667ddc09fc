"""The custom-training examples (examples/gan.py, vae.py, lstm_lm.py, lbfgs.py) against the loops they replace.

For each example: (a) the hand-written PyTorch tutorial loop, written out here, gives the same per-batch
losses and final weights bit for bit on the CPU for the same seed; (b) a run interrupted in the middle of
an epoch and resumed from its BackupAndRestore backup ends exactly where the uninterrupted run ends (every
optimizer, scheduler and the subclass's own state restored); (c) the script runs with ``--fast`` in a
subprocess and prints its final line.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from resume_utils import assert_nested_equal
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fitkit
import fitkit._pipeline
from fitkit.callbacks import BackupAndRestore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"fitkit_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gan, vae, lstm_lm, lbfgs = (_example(name) for name in ("gan", "vae", "lstm_lm", "lbfgs"))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # One intra-op thread: on a shared 2-core machine a second thread spins more than it computes (the
    # LSTM cells' small matmuls were 20x slower with two), and results do not depend on it.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class BatchLogs(fitkit.Callback):
    """Records every training batch's logs (detached 0-dim tensors, cloned)."""

    def __init__(self) -> None:
        self.logs: list[dict[str, torch.Tensor]] = []

    def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.logs.append({key: value.clone() for key, value in (logs or {}).items()})

    def series(self, key: str) -> torch.Tensor:
        return torch.stack([logs[key] for logs in self.logs])


class CrashAfter(fitkit.Callback):
    """Raises after ``batches`` training batches, as a crash would (listed after BackupAndRestore, so the
    last backup is the one of the batch before)."""

    def __init__(self, batches: int) -> None:
        self.batches, self.seen = batches, 0

    def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.seen += 1
        if self.seen == self.batches:
            raise RuntimeError("simulated crash")


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not different, f"not bit-identical: {different}"


def interrupted_then_resumed(
    tmp_path: Path, build: Callable[[list[fitkit.Callback]], fitkit.Trainer], fit: Callable[[fitkit.Trainer], Any],
    crash_after: int,
) -> fitkit.Trainer:  # fmt: skip
    """Runs ``fit`` with a backup after every batch until a crash after ``crash_after`` batches, then
    rebuilds everything as a restarted script does (same seed) and lets BackupAndRestore resume it."""
    backup = tmp_path / "backup"
    crashing = build([BackupAndRestore(backup, save_freq=1), CrashAfter(crash_after)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashing)
    state = torch.load(backup / "backup.pt", weights_only=True)
    assert state["trainer"]["batch_in_epoch"] > 0, "the backup must be a mid-epoch one"
    resumed = build([BackupAndRestore(backup, save_freq=1)])
    fit(resumed)
    return resumed


# -- GAN: two optimizers, backward(optimizer=...), a StepLR per optimizer ---------------------------------
GAN_EPOCHS, GAN_BATCH = 3, 32


def _gan_images() -> torch.Tensor:
    pytest.importorskip("sklearn")
    return gan.load_images(96)


def dcgan_hand_loop(images: torch.Tensor) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """pytorch/examples dcgan/main.py's loop (netD.zero_grad(), errD_real.backward(), ...) with StepLR."""
    fitkit.seed_everything(0)
    model = gan.DCGAN()
    netG, netD = model.generator, model.discriminator
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) for opt in (optimizerG, optimizerD)]
    criterion = nn.BCELoss()
    dataloader = DataLoader(TensorDataset(images), batch_size=GAN_BATCH, shuffle=True)
    losses = []
    for _epoch in range(GAN_EPOCHS):
        for data in dataloader:
            # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
            netD.zero_grad()
            real = data[0]
            batch_size = real.size(0)
            label = torch.full((batch_size,), 1.0, dtype=real.dtype)
            output = netD(real).view(-1)
            errD_real = criterion(output, label)
            errD_real.backward()
            noise = torch.randn(batch_size, gan.NZ, 1, 1)
            fake = netG(noise)
            label.fill_(0.0)
            output = netD(fake.detach()).view(-1)
            errD_fake = criterion(output, label)
            errD_fake.backward()
            errD = errD_real + errD_fake
            optimizerD.step()
            # (2) Update G network: maximize log(D(G(z)))
            netG.zero_grad()
            label.fill_(1.0)
            output = netD(fake).view(-1)
            errG = criterion(output, label)
            errG.backward()
            optimizerG.step()
            losses.append((errD.detach(), errG.detach()))
        for scheduler in schedulers:
            scheduler.step()
    return model, losses


def _gan_trainer(callbacks: list[fitkit.Callback]) -> fitkit.Trainer:
    fitkit.seed_everything(0)
    return gan.build_trainer(step_size=1, gamma=0.5, callbacks=callbacks, device="cpu", verbose=0)


def _gan_fit(trainer: fitkit.Trainer) -> Any:
    return trainer.fit(_gan_images(), batch_size=GAN_BATCH, epochs=GAN_EPOCHS)


def test_gan_equals_the_dcgan_loop_bit_for_bit():
    images = _gan_images()
    model, losses = dcgan_hand_loop(images)
    logs = BatchLogs()
    trainer = _gan_trainer([logs])
    history = _gan_fit(trainer)
    assert torch.equal(logs.series("d_loss"), torch.stack([d for d, _ in losses]))
    assert torch.equal(logs.series("g_loss"), torch.stack([g for _, g in losses]))
    assert_same_tensors(trainer.model.state_dict(), model.state_dict())
    # Both schedules followed their own optimizer: lr halves every epoch, logged per optimizer (the rate
    # each epoch ran with: the schedules step after the logs are made).
    assert history.history["lr_generator"] == history.history["lr_discriminator"] == [2e-4, 1e-4, 5e-5]
    assert [opt.param_groups[0]["lr"] for opt in trainer.optimizers.values()] == [2.5e-5, 2.5e-5]
    assert trainer.state.optimizer_steps == {"generator": 9, "discriminator": 9}
    assert trainer.global_step == 9  # two optimizer steps on one batch are one global step


def test_gan_resumes_mid_epoch_exactly(tmp_path):
    uninterrupted = _gan_trainer([])
    _gan_fit(uninterrupted)
    resumed = interrupted_then_resumed(tmp_path, _gan_trainer, _gan_fit, crash_after=5)  # epoch 2, batch 2
    assert_same_tensors(resumed.model.state_dict(), uninterrupted.model.state_dict())
    for name in ("generator", "discriminator"):  # Adam's moments of both optimizers
        assert_nested_equal(resumed.optimizers[name].state_dict(), uninterrupted.optimizers[name].state_dict(), name)
    schedules = [cb.scheduler.state_dict() for cb in resumed.callbacks if isinstance(cb, fitkit.callbacks.LRScheduler)]
    expected = [
        cb.scheduler.state_dict() for cb in uninterrupted.callbacks if isinstance(cb, fitkit.callbacks.LRScheduler)
    ]
    assert len(schedules) == 2 and schedules == expected
    assert resumed.history.history == uninterrupted.history.history  # History is in the checkpoint too


# -- VAE: compute_loss, batches without targets, outputs to callbacks ------------------------------------
VAE_EPOCHS, VAE_BATCH = 2, 32


def _vae_data() -> tuple[torch.Tensor, torch.Tensor]:
    pytest.importorskip("sklearn")
    x = vae.load_pixels()[:160]
    return x[:128], x[128:]


def vae_hand_loop(x: torch.Tensor, x_val: torch.Tensor) -> tuple[nn.Module, list[torch.Tensor], list[float]]:
    """pytorch/examples vae/main.py's train() and test(), with the per-sample loss of vae.vae_loss."""
    fitkit.seed_everything(0)
    model = vae.VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_loader = DataLoader(TensorDataset(x), batch_size=VAE_BATCH, shuffle=True)
    test_loader = DataLoader(TensorDataset(x_val), batch_size=VAE_BATCH)
    losses, val_losses = [], []
    for _epoch in range(VAE_EPOCHS):
        model.train()
        for (data,) in train_loader:
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = vae.vae_loss(recon_batch, data, mu, logvar)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        model.eval()
        test_loss = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for (data,) in test_loader:
                recon_batch, mu, logvar = model(data)
                test_loss += vae.vae_loss(recon_batch, data, mu, logvar).double() * len(data)
        val_losses.append(float(test_loss / len(x_val)))
    return model, losses, val_losses


def _vae_trainer(callbacks: list[fitkit.Callback]) -> fitkit.Trainer:
    fitkit.seed_everything(0)
    return vae.build_trainer(callbacks=callbacks, device="cpu", verbose=0)


def _vae_fit(trainer: fitkit.Trainer) -> Any:
    x, x_val = _vae_data()
    return trainer.fit(x, x_val, batch_size=VAE_BATCH, epochs=VAE_EPOCHS)  # fit(x): no targets


def test_vae_equals_the_tutorial_loop_bit_for_bit():
    x, x_val = _vae_data()
    model, losses, val_losses = vae_hand_loop(x, x_val)
    logs = BatchLogs()
    trainer = _vae_trainer([logs])
    history = _vae_fit(trainer)
    assert torch.equal(logs.series("loss"), torch.stack(losses))
    assert_same_tensors(trainer.model.state_dict(), model.state_dict())
    assert history.history["val_loss"] == pytest.approx(val_losses, rel=1e-6)  # float64 sums in other orders


def test_vae_reconstructions_come_from_the_step_without_a_second_forward_pass(tmp_path):
    pytest.importorskip("torchvision")
    plain = _vae_trainer([])
    _vae_fit(plain)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Keep(vae.SaveReconstructions):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            assert self._pair is not None
            seen.append(self._pair)
            super().on_epoch_end(epoch, logs)

    trainer = _vae_trainer([Keep(tmp_path / "recon", count=4)])
    forwards = []
    trainer.model.register_forward_hook(lambda module, args, out: forwards.append(module.training))
    _vae_fit(trainer)
    # The saving callback changed nothing: same weights, same random stream, no extra forward pass.
    assert_same_tensors(trainer.model.state_dict(), plain.model.state_dict())
    assert forwards.count(False) == VAE_EPOCHS * 1  # one validation batch (32 samples) per epoch
    assert sorted(p.name for p in (tmp_path / "recon").iterdir()) == ["reconstruction_01.png", "reconstruction_02.png"]
    x_val = _vae_data()[1]
    images, recon = seen[-1]
    assert torch.equal(images, x_val[:VAE_BATCH])
    with torch.no_grad():
        trainer.model.eval()
        assert torch.equal(recon, trainer.model(x_val[:VAE_BATCH])[0])  # the eval step's own outputs


def test_vae_resumes_mid_epoch_exactly(tmp_path):
    uninterrupted = _vae_trainer([])
    _vae_fit(uninterrupted)
    resumed = interrupted_then_resumed(tmp_path, _vae_trainer, _vae_fit, crash_after=6)  # epoch 2, batch 2
    assert_same_tensors(resumed.model.state_dict(), uninterrupted.model.state_dict())
    assert_nested_equal(resumed.optimizer.state_dict(), uninterrupted.optimizer.state_dict())
    assert resumed.history.history == uninterrupted.history.history


# -- LSTM language model: hidden state carried by a Trainer subclass, clipping, ReduceLROnPlateau ----------
LSTM_EPOCHS, LSTM_BATCH, LSTM_EVAL_BATCH, BPTT = 4, 8, 4, 20


def _lstm_text() -> tuple[torch.Tensor, list[str]]:
    return lstm_lm.load_text(3000)


def get_batch(source: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq_len = min(BPTT, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


def lstm_hand_loop(lr: float = 20.0) -> tuple[nn.Module, list[torch.Tensor], list[float], list[float], float]:
    """pytorch/examples word_language_model/main.py's train()/evaluate() and its annealing (lr /= 4 when
    the validation loss does not improve), with torch.optim.SGD for its manual update."""
    fitkit.seed_everything(0)
    ids, vocab = _lstm_text()
    split = int(len(ids) * 0.9)
    train_data = lstm_lm.batchify(ids[:split], LSTM_BATCH)
    val_data = lstm_lm.batchify(ids[split:], LSTM_EVAL_BATCH)
    model = lstm_lm.CharLSTM(len(vocab))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = nn.NLLLoss()

    def evaluate(data_source: torch.Tensor) -> float:
        model.eval()
        total_loss = torch.zeros((), dtype=torch.float64)
        hidden = model.init_hidden(LSTM_EVAL_BATCH)
        with torch.no_grad():
            for i in range(0, data_source.size(0) - 1, BPTT):
                data, targets = get_batch(data_source, i)
                output, hidden = model(data, hidden)
                hidden = lstm_lm.repackage_hidden(hidden)
                total_loss += len(data) * criterion(output, targets).double()
        return float(total_loss / (len(data_source) - 1))

    losses, val_losses, lrs = [], [], []
    best_val_loss = None
    for _epoch in range(LSTM_EPOCHS):
        model.train()
        hidden = model.init_hidden(LSTM_BATCH)
        for i in range(0, train_data.size(0) - 1, BPTT):
            data, targets = get_batch(train_data, i)
            # Starting each batch, we detach the hidden state from how it was previously produced.
            hidden = lstm_lm.repackage_hidden(hidden)
            model.zero_grad()
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            optimizer.step()
            losses.append(loss.detach())
        val_loss = evaluate(val_data)
        val_losses.append(val_loss)
        lrs.append(optimizer.param_groups[0]["lr"])  # the rate this epoch ran with (fitkit's "lr" log)
        if best_val_loss is None or val_loss < best_val_loss:
            best_val_loss = val_loss
        else:  # anneal the learning rate if no improvement has been seen in the validation dataset
            for group in optimizer.param_groups:
                group["lr"] /= 4.0
    return model, losses, val_losses, lrs, optimizer.param_groups[0]["lr"]


def _lstm_trainer(callbacks: list[fitkit.Callback], lr: float = 20.0) -> Any:
    fitkit.seed_everything(0)
    return lstm_lm.build_trainer(len(_lstm_text()[1]), lr=lr, callbacks=callbacks, device="cpu", verbose=0)


def _lstm_loaders() -> tuple[DataLoader, DataLoader]:
    return lstm_lm.loaders(_lstm_text()[0], LSTM_BATCH, LSTM_EVAL_BATCH, BPTT)


def _lstm_fit(trainer: fitkit.Trainer) -> Any:
    return trainer.fit(*_lstm_loaders(), epochs=LSTM_EPOCHS)


def test_lstm_language_model_equals_the_tutorial_loop_bit_for_bit():
    model, losses, val_losses, lrs, final_lr = lstm_hand_loop()
    assert lrs[0] == 20.0 and lrs[-1] < 20.0, "the test must cover an annealing step"
    logs = BatchLogs()
    trainer = _lstm_trainer([logs])
    history = _lstm_fit(trainer)
    assert torch.equal(logs.series("loss"), torch.stack(losses))
    assert_same_tensors(trainer.model.state_dict(), model.state_dict())
    assert history.history["val_loss"] == pytest.approx(val_losses, rel=1e-6)
    assert history.history["lr"] == lrs
    assert trainer.optimizer.param_groups[0]["lr"] == final_lr
    # evaluate() resets the state through the subclass's own on_validation_begin: same value twice, and
    # the value a fresh hidden state gives.
    val_dl = _lstm_loaders()[1]
    first, second = trainer.evaluate(val_dl), trainer.evaluate(val_dl)
    assert first == second
    trainer.eval_hidden = (torch.ones(1), torch.ones(1))  # garbage: must be reset, never used
    assert trainer.evaluate(val_dl) == first
    # predict() too: the subclass's on_predict_begin starts it from zeros, and it carries the state.
    trainer.eval_hidden = (torch.ones(1), torch.ones(1))
    predicted = trainer.predict(val_dl)
    model.eval()
    with torch.no_grad():
        hidden, expected = model.init_hidden(LSTM_EVAL_BATCH), []
        for tokens, _ in val_dl:
            output, hidden = model(tokens, hidden)
            expected.append(output)
    assert torch.equal(predicted, torch.cat(expected))


def test_lstm_language_model_resumes_mid_epoch_with_its_hidden_state(tmp_path):
    uninterrupted = _lstm_trainer([])
    _lstm_fit(uninterrupted)
    per_epoch = len(_lstm_loaders()[0])
    crash = 2 * per_epoch + per_epoch // 2  # in the middle of epoch 3, after a plateau step
    resumed = interrupted_then_resumed(tmp_path, _lstm_trainer, _lstm_fit, crash_after=crash)
    assert_same_tensors(resumed.model.state_dict(), uninterrupted.model.state_dict())
    assert_nested_equal(resumed.optimizer.state_dict(), uninterrupted.optimizer.state_dict())
    assert_nested_equal(resumed.hidden, uninterrupted.hidden, "hidden")
    plateau = [
        cb
        for trainer in (resumed, uninterrupted)
        for cb in trainer.callbacks
        if type(cb).__name__ == "ReduceLROnPlateau"
    ]
    assert plateau[0].state_dict() == plateau[1].state_dict()


def test_lstm_hidden_state_is_what_makes_the_resume_exact(tmp_path):
    """Without the subclass's state_dict extension the resumed run differs: the test above can fail."""

    class Forgetful(lstm_lm.StatefulLMTrainer):
        PER_RANK = fitkit.Trainer.PER_RANK

        def state_dict(self) -> dict[str, Any]:
            return fitkit.Trainer.state_dict(self)

        def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
            fitkit.Trainer.load_state_dict(self, state, strict)

    def build(callbacks: list[fitkit.Callback]) -> Any:
        fitkit.seed_everything(0)
        model = lstm_lm.CharLSTM(len(_lstm_text()[1]))
        return Forgetful(
            model, torch.optim.SGD(model.parameters(), lr=20.0), "nll", callbacks=callbacks, grad_clip_norm=0.25,
            device="cpu", verbose=0,
        )  # fmt: skip

    uninterrupted = build([])
    _lstm_fit(uninterrupted)
    resumed = interrupted_then_resumed(tmp_path, build, _lstm_fit, crash_after=len(_lstm_loaders()[0]) + 2)
    assert not torch.equal(resumed.model.decoder.weight, uninterrupted.model.decoder.weight)


# -- LBFGS: the default step drives a closure optimizer ------------------------------------------------------
def _waves() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return lbfgs.split_waves(lbfgs.sine_waves(count=8, length=16))


def lbfgs_hand_loop(steps: int) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """pytorch/examples time_sequence_prediction/train.py's loop: optimizer.step(closure) per step."""
    fitkit.seed_everything(0)
    (inputs, target), (test_input, test_target) = _waves()
    seq = lbfgs.Sequence().double()
    criterion = nn.MSELoss()
    optimizer = torch.optim.LBFGS(seq.parameters(), lr=0.8)
    losses, val_losses = [], []
    for _step in range(steps):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            out = seq(inputs)
            loss = criterion(out, target)
            loss.backward()
            return loss

        losses.append(optimizer.step(closure).detach())
        with torch.no_grad():
            val_losses.append(criterion(seq(test_input), test_target))
    return seq, losses, val_losses


def _lbfgs_trainer(callbacks: list[fitkit.Callback]) -> fitkit.Trainer:
    fitkit.seed_everything(0)
    return lbfgs.build_trainer(0.8, callbacks=callbacks, device="cpu", verbose=0)


def test_lbfgs_default_step_equals_the_closure_loop_bit_for_bit():
    model, losses, val_losses = lbfgs_hand_loop(steps=3)
    (x, y), val = _waves()
    logs = BatchLogs()
    trainer = _lbfgs_trainer([logs])
    history = trainer.fit((x, y), val, batch_size=len(x), shuffle=False, epochs=3)
    assert torch.equal(logs.series("loss"), torch.stack(losses))  # the loss before each step
    assert_same_tensors(trainer.model.state_dict(), model.state_dict())
    assert history.history["val_loss"] == pytest.approx([float(v) for v in val_losses], rel=1e-12)  # float64 sums
    assert trainer.global_step == 3


@pytest.mark.slow  # three LBFGS runs of up to 20 evaluations a step: ~4 s
def test_lbfgs_resumes_mid_epoch_exactly(tmp_path):
    """Two mini-batches per epoch, so that a backup falls inside an epoch; LBFGS's history is restored."""

    def fit(trainer: fitkit.Trainer) -> Any:
        (x, y), val = _waves()
        return trainer.fit((x, y), val, batch_size=3, shuffle=True, epochs=2)

    uninterrupted = _lbfgs_trainer([])
    fit(uninterrupted)
    resumed = interrupted_then_resumed(tmp_path, _lbfgs_trainer, fit, crash_after=3)  # epoch 2, batch 1
    assert_same_tensors(resumed.model.state_dict(), uninterrupted.model.state_dict())
    assert_nested_equal(resumed.optimizer.state_dict(), uninterrupted.optimizer.state_dict())


# -- the scripts, as a user runs them -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "script, expected",
    [
        ("gan.py", "trained 2 epoch(s)"),
        ("vae.py", "trained 2 epoch(s)"),
        ("lstm_lm.py", "trained 2 epoch(s)"),
        ("lbfgs.py", "trained 2 L-BFGS step(s)"),
    ],
)
def test_example_runs_fast(tmp_path, script, expected):
    pytest.importorskip("sklearn")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--fast", "--device", "cpu", "--verbose", "0"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(expected) and "final" in last, result.stdout


# -- no host sync inside the batch loop --------------------------------------------------------------------------
def _dataloaders(name: str) -> tuple[Any, Any]:
    """Each example's data as DataLoaders (the in-memory path would ask CUDA for its free memory)."""
    if name == "gan":
        return DataLoader(TensorDataset(_gan_images()[:64]), batch_size=GAN_BATCH, shuffle=True), None
    if name == "vae":
        x, x_val = _vae_data()
        return DataLoader(TensorDataset(x), batch_size=VAE_BATCH, shuffle=True), DataLoader(TensorDataset(x_val), 32)
    if name == "lstm_lm":
        return _lstm_loaders()
    (x, y), (x_val, y_val) = _waves()
    return DataLoader(TensorDataset(x, y), batch_size=len(x)), DataLoader(TensorDataset(x_val, y_val), 3)


@pytest.mark.filterwarnings("ignore:.*a DataLoader with pin_memory=False on a CUDA run")  # CUDA is pretended
@pytest.mark.parametrize("name", ["gan", "vae", "lstm_lm", "lbfgs"])
def test_example_steps_read_nothing_back_to_the_host(name, monkeypatch):
    """Every example's step runs under debug_sync='error' (CUDA's sync debug mode, faked on the CPU as in
    tests/test_sync_debug.py): no value is read back to the host inside the batch loops, except LBFGS's own
    reads of its loss and gradient norms, which fitkit marks with allow_sync()."""
    from helpers import FakeSyncMode

    sync = FakeSyncMode().install(monkeypatch, record_reads=True)
    build = {"gan": _gan_trainer, "vae": _vae_trainer, "lstm_lm": _lstm_trainer, "lbfgs": _lbfgs_trainer}[name]
    train, val = _dataloaders(name)
    trainer = build([])
    trainer.debug_sync = "error"
    trainer.device = torch.device("cuda")  # takes the CUDA paths; the model and the data stay on the CPU

    monkeypatch.setattr(fitkit._pipeline, "move_to_device", lambda batch, device, non_blocking=False: batch)
    adam = importlib.import_module("torch.optim.adam")
    read_step_counter = adam._get_value

    def host_step_counter(value: Any) -> Any:  # Adam keeps its step count on the host on CUDA too
        previous, sync.mode = sync.mode, 0  # (capturable=False): reading it is no device sync
        try:
            return read_step_counter(value)
        finally:
            sync.mode = previous

    monkeypatch.setattr(adam, "_get_value", host_step_counter)
    trainer.fit(train, val, epochs=2)
    assert trainer.global_step > 0 and sync.mode == 0
    assert sync.reads == [], "host reads inside the batch loop outside Trainer.allow_sync():\n" + "\n".join(sync.reads)


@pytest.mark.slow
def test_gan_script_resumes_from_its_own_checkpoints(tmp_path):
    """Run again with more epochs, gan.py continues from the newest full-state checkpoint it wrote."""
    pytest.importorskip("sklearn")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(epochs: int) -> str:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "gan.py"), "--fast", "--epochs", str(epochs), "--device", "cpu",
             "--verbose", "0"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.strip().splitlines()[-1]

    assert run(1).startswith("trained 1 epoch(s)")
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "gan").glob("*.pt")) == ["epoch01.pt"]
    assert run(2).startswith("trained 1 epoch(s)")  # epoch 2 only: epoch 1 came from epoch01.pt
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "gan").glob("*.pt")) == ["epoch01.pt", "epoch02.pt"]
