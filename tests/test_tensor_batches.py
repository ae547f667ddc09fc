"""The TensorDataset fast path: the same batches and random stream as the DataLoader, bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import make_classification, make_trainer, params_of
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from fitkit import _tensor_batches


def _data(n=30):
    x, y = make_classification(n=n)
    return TensorDataset(x, y)


SAMPLERS = {
    "shuffle": lambda ds: {"shuffle": True},
    "sequential": lambda ds: {"sampler": SequentialSampler(ds)},
    "subset": lambda ds: {"sampler": SubsetRandomSampler(list(range(0, len(ds), 2)))},
    "weighted": lambda ds: {"sampler": WeightedRandomSampler(torch.rand(len(ds)).tolist(), 25)},
    "replacement": lambda ds: {"sampler": RandomSampler(ds, replacement=True, num_samples=17)},
    "generator": lambda ds: {"shuffle": True, "generator": torch.Generator().manual_seed(7)},
}


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_batches_and_random_stream_equal_the_dataloaders(sampler, drop_last):
    ds = _data()
    torch.manual_seed(0)
    kwargs = SAMPLERS[sampler](ds)
    dl = DataLoader(ds, batch_size=4, drop_last=drop_last, **kwargs)
    assert _tensor_batches.eligible(dl)
    for _ in range(2):  # two epochs: the generators continue identically
        torch.manual_seed(1)
        own = None if dl.generator is None else dl.generator.get_state()
        expected = list(dl)
        after_loader = torch.rand(3)
        own_after = None if dl.generator is None else dl.generator.get_state()
        torch.manual_seed(1)
        if own is not None:
            dl.generator.set_state(own)
        got = list(_tensor_batches.iterate(dl))
        if own is not None:
            assert torch.equal(dl.generator.get_state(), own_after)
        assert torch.equal(torch.rand(3), after_loader)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert type(a) is type(b) is list
            assert all(torch.equal(p, q) and p.dtype == q.dtype for p, q in zip(a, b))


@pytest.mark.parametrize(
    "make",
    [
        lambda ds: DataLoader(ds, batch_size=4, collate_fn=lambda b: b),
        lambda ds: DataLoader(ds, batch_size=4, num_workers=1),
        lambda ds: DataLoader(ds, batch_size=None),
        lambda ds: DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]),
        lambda ds: DataLoader(list(ds), batch_size=4),
        lambda ds: type("MyLoader", (DataLoader,), {})(ds, batch_size=4),
    ],
    ids=["collate_fn", "workers", "no_batching", "own_batch_sampler", "other_dataset", "subclass"],
)
def test_any_other_loader_keeps_the_normal_path(make):
    assert not _tensor_batches.eligible(make(_data()))


def test_a_batch_sampler_subclass_keeps_the_normal_path():
    ds = _data()
    custom = type("Mine", (BatchSampler,), {})(SequentialSampler(ds), 4, False)
    assert not _tensor_batches.eligible(DataLoader(ds, batch_sampler=custom))


def _fit(fast, resume=None, tmp=None, epochs=3):
    x, y = make_classification(n=30)
    torch.manual_seed(0)
    trainer = make_trainer(fast_tensor_batches=fast)
    dl = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, drop_last=True)
    trainer.fit(dl, epochs=epochs, resume=resume)
    return trainer


def test_fit_gives_the_same_weights_with_and_without_the_fast_path():
    fast, slow = _fit(True), _fit(False)
    assert fast._run.plan.train.fast and not slow._run.plan.train.fast
    assert all(torch.equal(p, q) for p, q in zip(params_of(fast.model), params_of(slow.model)))
    assert fast.history.history == slow.history.history


def test_a_mid_epoch_resume_on_the_fast_path_is_exact(tmp_path):
    from fitkit.callbacks import Callback

    class Save(Callback):
        def on_batch_end(self, batch, logs=None):
            if self.trainer.global_step == 10:  # epoch 1, batch 3 of 7
                self.trainer.after_callbacks(lambda: self.trainer.save_checkpoint(tmp_path / "mid.pt"))

    x, y = make_classification(n=30)
    torch.manual_seed(0)
    reference = make_trainer(callbacks=[Save()])
    reference.fit(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, drop_last=True), epochs=3)
    for fast in (True, False):  # either path resumes the other's checkpoint exactly
        torch.manual_seed(123)  # whatever the new process's state: the checkpoint decides
        resumed = make_trainer(fast_tensor_batches=fast)
        resumed.fit(
            DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, drop_last=True),
            epochs=3,
            resume=tmp_path / "mid.pt",
        )
        assert all(torch.equal(p, q) for p, q in zip(params_of(reference.model), params_of(resumed.model)))


def test_fast_tensor_batches_must_be_a_bool():
    with pytest.raises(TypeError, match=r"fast_tensor_batches must be True or False, got 'yes'"):
        make_trainer(fast_tensor_batches="yes")


def test_validation_on_the_fast_path_equals_the_dataloader_and_draws_the_same(monkeypatch):
    x, y = make_classification(30, seed=3)
    val = DataLoader(TensorDataset(x, y), batch_size=8)
    results = []
    original = _tensor_batches.iterate
    for fast in (True, False):
        calls: list[int] = []

        def counting(loader, calls=calls):
            calls.append(1)
            return original(loader)

        monkeypatch.setattr(_tensor_batches, "iterate", counting)
        torch.manual_seed(0)
        trainer = make_trainer(metrics=["accuracy"], fast_tensor_batches=fast)
        logs = trainer.evaluate(val)
        results.append((logs, torch.get_rng_state(), len(calls)))
    (fast_logs, fast_rng, fast_calls), (slow_logs, slow_rng, slow_calls) = results
    assert fast_calls == 1 and slow_calls == 0  # the fast path really served the validation batches
    assert fast_logs == slow_logs
    assert torch.equal(fast_rng, slow_rng)  # the DataLoader iterator's base-seed draw is made on both paths
