"""fitkit.data: device moves, batch unpacking, the in-memory batcher and mid-epoch loader resumption."""

from __future__ import annotations

import inspect
from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, get_worker_info

from fitkit.data import (
    LOADER_SETTINGS,
    InMemoryLoader,
    batch_size_of,
    check_reiterable,
    move_to_device,
    rebuild_loader,
    resume_loader_iterator,
    split_batch,
)

META = torch.device("meta")  # a second device on every machine: tensors moved there change .device
Pair = namedtuple("Pair", ["image", "mask"])


# -- move_to_device ----------------------------------------------------------------------------------
def test_move_to_device_moves_every_nested_tensor_and_keeps_the_containers():
    batch = (
        {"image": torch.ones(2, 3), "pair": Pair(torch.zeros(2), [torch.ones(1), "label"]), "id": 7},
        torch.arange(2),
    )
    moved = move_to_device(batch, META)
    inputs, targets = moved
    assert type(moved) is tuple and type(inputs) is dict and type(inputs["pair"]) is Pair
    assert targets.device == META and inputs["image"].device == META
    assert inputs["image"].shape == (2, 3)
    assert inputs["pair"].image.device == META and inputs["pair"].mask[0].device == META
    assert type(inputs["pair"].mask) is list and inputs["pair"].mask[1] == "label"
    assert inputs["id"] == 7
    assert batch[0]["image"].device.type == "cpu"  # the input is not modified


def test_move_to_device_keeps_mapping_types():
    batch = OrderedDict([("b", torch.ones(1)), ("a", torch.zeros(1))])
    moved = move_to_device(batch, META)
    assert type(moved) is OrderedDict and list(moved) == ["b", "a"]
    assert all(v.device == META for v in moved.values())


def test_move_to_device_on_the_same_device_returns_the_same_tensors():
    x = torch.ones(3)
    assert move_to_device([x], torch.device("cpu"))[0] is x


# -- split_batch / batch_size_of ----------------------------------------------------------------------
@pytest.mark.parametrize("batch", [(torch.ones(2, 3), torch.zeros(2)), [torch.ones(2, 3), torch.zeros(2)]])
def test_split_batch_accepts_pairs(batch):
    inputs, targets, sample_weight = split_batch(batch)
    assert inputs is batch[0] and targets is batch[1] and sample_weight is None


def test_split_batch_reads_the_keras_layouts():
    x, y, w = torch.ones(4, 3), torch.zeros(4), torch.ones(4)
    assert split_batch(x) == (x, None, None)
    assert split_batch((x,)) == (x, None, None)
    assert split_batch((x, y, w)) == (x, y, w)
    inputs = {"x": x, "mask": y}
    assert split_batch(inputs) == (inputs, None, None)  # a dict is the inputs, as in Keras


@pytest.mark.parametrize(
    "batch, shown",
    [
        ((), r"tuple\(\)"),
        ((torch.ones(4),) * 4, r"tuple\(Tensor\(shape=\(4,\), dtype=torch.float32\), Tensor"),
        ([torch.ones(1)] * 8, r"\[Tensor\(shape=\(1,\), dtype=torch.float32\), .*, \.\.\.\]"),
        ("text", r"str"),
    ],
)
def test_split_batch_says_what_it_got_and_how_to_fix_it(batch, shown):
    with pytest.raises(
        ValueError,
        match=r"cannot read a batch of "
        + shown
        + r".*x \(a tensor or a dict\), \(x,\), \(x, y\) or \(x, y, sample_weight\).*override train_step",
    ):
        split_batch(batch)


@pytest.mark.parametrize(
    "batch, expected",
    [
        ((torch.ones(5, 3), torch.zeros(5)), 5),
        (({"a": torch.ones(6, 2)}, torch.zeros(6)), 6),
        ((torch.ones(4, 2), torch.tensor(1.0)), 4),  # 0-dim targets: the inputs tell
        ({"nested": [torch.ones(3, 1)]}, 3),
    ],
)
def test_batch_size_of(batch, expected):
    assert batch_size_of(batch) == expected


def test_batch_size_of_a_batch_without_tensors_is_an_error():
    with pytest.raises(
        ValueError,
        match=r"cannot tell the number of samples in a batch of type dict: it holds no "
        r"tensor with a batch dimension",
    ):
        batch_size_of({"ids": [1, 2, 3]})


def test_check_reiterable_rejects_one_shot_iterators():
    check_reiterable([1, 2], "train_data")
    with pytest.raises(TypeError, match=r"train_data is a one-shot iterator \(list_iterator\)"):
        check_reiterable(iter([1, 2]), "train_data")


# -- InMemoryLoader ---------------------------------------------------------------------------------------
def targets_of(batches):
    return [b[1].tolist() for b in batches]


def data(n=10):
    return torch.arange(n, dtype=torch.float32).unsqueeze(1) * 10, torch.arange(n)


@pytest.mark.parametrize("n, batch_size", [(10, 4), (8, 4), (3, 5)])
def test_in_memory_order_equals_a_shuffled_dataloader_for_the_same_seed(n, batch_size):
    x, y = data(n)
    reference = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    in_memory = InMemoryLoader(x, y, batch_size)
    torch.manual_seed(0)
    expected = [targets_of(reference) for _ in range(3)]  # three epochs in a row
    state_after = torch.get_rng_state()
    torch.manual_seed(0)
    got = [targets_of(in_memory) for _ in range(3)]
    assert got == expected
    assert expected[0] != expected[1]  # shuffled again every epoch
    assert torch.equal(torch.get_rng_state(), state_after)  # same draws from the global generator
    assert len(in_memory) == len(reference)


def test_in_memory_batches_pair_x_with_y():
    x, y = data(10)
    torch.manual_seed(0)
    for xb, yb in InMemoryLoader(x, y, 4):
        assert torch.equal(xb[:, 0], yb.float() * 10)


def test_in_memory_order_with_a_generator_equals_the_dataloader_with_that_generator():
    x, y = data(10)
    g = torch.Generator()
    reference = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=g)
    g.manual_seed(3)
    expected = [targets_of(reference) for _ in range(3)]
    g.manual_seed(3)
    in_memory = InMemoryLoader(x, y, 4, generator=g)
    assert [targets_of(in_memory) for _ in range(3)] == expected


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_skip_next_starts_at_that_batch_of_the_same_permutation(skip):
    x, y = data(10)
    in_memory = InMemoryLoader(x, y, 4)
    torch.manual_seed(1)
    full = targets_of(in_memory)
    after_full = torch.get_rng_state()
    torch.manual_seed(1)
    in_memory.skip_next(skip)
    assert targets_of(in_memory) == full[skip:]
    assert torch.equal(torch.get_rng_state(), after_full)
    torch.manual_seed(1)
    assert targets_of(in_memory) == full  # the skip applies to one iteration only


def test_in_memory_without_shuffle_is_sequential_and_accepts_numpy():
    x, y = data(10)
    batches = list(InMemoryLoader(x.numpy(), y.numpy(), 4, shuffle=False))
    assert targets_of(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(isinstance(b[0], torch.Tensor) for b in batches)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_in_memory_batch_size_must_be_a_positive_int(batch_size):
    x, y = data(4)
    with pytest.raises(ValueError, match=rf"batch_size must be a positive int, got {batch_size!r}"):
        InMemoryLoader(x, y, batch_size)


def test_in_memory_x_and_y_must_have_the_same_length():
    x, y = data(4)
    with pytest.raises(ValueError, match=r"x and y must have the same number of samples, got 4 and 3"):
        InMemoryLoader(x, y[:3], 2)


def test_in_memory_rejects_lists():
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor or a NumPy array, got list"):
        InMemoryLoader([[1.0], [2.0]], np.zeros(2), 2)


# -- resume_loader_iterator --------------------------------------------------------------------------------
class IndexAndSeed(Dataset):
    """Item i is (i, the worker base seed): shows both the order and the workers' seeds."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        info = get_worker_info()
        return i, -1 if info is None else info.seed - info.id


def as_lists(batches):
    return [[t.tolist() if isinstance(t, torch.Tensor) else t for t in batch] for batch in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("with_generator", [False, True])
def test_resume_loader_iterator_yields_the_remaining_batches(num_workers, with_generator):
    g = torch.Generator() if with_generator else None
    loader = DataLoader(IndexAndSeed(), batch_size=3, shuffle=True, num_workers=num_workers, generator=g)

    def reset():
        torch.manual_seed(11)
        if g is not None:
            g.manual_seed(5)

    reset()
    full = as_lists(loader)
    after_full = torch.get_rng_state()
    assert len(full) == 4 and sorted(i for b in full for i in b[0]) == list(range(10))
    for k in (1, 3):
        reset()
        assert as_lists(resume_loader_iterator(loader, k)) == full[k:]
        assert torch.equal(torch.get_rng_state(), after_full)  # the same draws as the full epoch


def test_resume_loader_iterator_without_batching():
    loader = DataLoader(IndexAndSeed(), batch_size=None, shuffle=True)
    torch.manual_seed(2)
    full = list(loader)
    torch.manual_seed(2)
    assert list(resume_loader_iterator(loader, 4)) == full[4:]


def test_move_to_device_turns_a_defaultdict_into_a_plain_dict():
    import collections

    batch = collections.defaultdict(list, {"x": torch.ones(2)})
    moved = move_to_device(batch, torch.device("cpu"))
    assert type(moved) is dict and list(moved) == ["x"] and torch.equal(moved["x"], batch["x"])


# -- rebuild_loader ------------------------------------------------------------------------------------
def _collate(batch):
    return batch


def _worker_init(worker_id):
    pass


def _every_argument_changed(**kwargs):
    """A DataLoader with a non-default value for every constructor argument that can take one at once."""
    dataset = TensorDataset(torch.arange(10.0))
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(3))
    arguments = dict(
        batch_size=3,
        sampler=sampler,
        num_workers=2,
        collate_fn=_collate,
        pin_memory=True,
        drop_last=True,
        timeout=7.5,
        worker_init_fn=_worker_init,
        multiprocessing_context=torch.multiprocessing.get_context("spawn"),
        generator=torch.Generator().manual_seed(4),
        prefetch_factor=5,
        persistent_workers=True,
        pin_memory_device="cpu",
        in_order=False,
    )
    arguments.update(kwargs)
    return DataLoader(dataset, **arguments), arguments


def test_rebuild_loader_handles_every_dataloader_argument():
    # shuffle only picks the sampler, which is carried; every other argument a torch release adds must be
    # carried (LOADER_SETTINGS) or handled by name, not silently dropped.
    parameters = set(inspect.signature(DataLoader.__init__).parameters) - {"self"}
    handled = set(LOADER_SETTINGS) | {"dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"}
    assert parameters == handled, f"DataLoader's arguments changed: {sorted(parameters ^ handled)}"


def test_rebuild_loader_carries_every_argument():
    loader, arguments = _every_argument_changed()
    assert set(arguments) | {"dataset", "shuffle", "batch_sampler"} == set(
        inspect.signature(DataLoader.__init__).parameters
    ) - {"self"}
    rebuilt = rebuild_loader(loader)
    assert rebuilt is not loader and rebuilt.dataset is loader.dataset
    for name, value in arguments.items():
        assert getattr(rebuilt, name) is value or getattr(rebuilt, name) == value, name
    assert type(rebuilt.batch_sampler) is torch.utils.data.BatchSampler
    assert rebuilt.batch_sampler.sampler is loader.sampler and rebuilt.batch_sampler.drop_last


def test_rebuild_loader_with_a_new_sampler_keeps_everything_else():
    loader, arguments = _every_argument_changed()
    indices = [9, 1, 5, 3]
    rebuilt = rebuild_loader(loader, sampler=indices)
    assert rebuilt.sampler is indices and rebuilt.batch_sampler.sampler is indices
    for name, value in arguments.items():
        if name != "sampler":
            assert getattr(rebuilt, name) is value or getattr(rebuilt, name) == value, name


def test_rebuild_loader_with_a_batch_sampler_and_overrides():
    loader, arguments = _every_argument_changed()
    batches = [[0, 1], [5]]
    replay = torch.Generator()
    rebuilt = rebuild_loader(loader, batch_sampler=batches, generator=replay, persistent_workers=False)
    assert rebuilt.batch_sampler is batches and rebuilt.batch_size is None and not rebuilt.drop_last
    assert rebuilt.generator is replay and rebuilt.persistent_workers is False
    for name in ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "prefetch_factor"):
        assert getattr(rebuilt, name) == arguments[name], name
    assert rebuilt.multiprocessing_context is arguments["multiprocessing_context"]
    assert (rebuilt.pin_memory_device, rebuilt.in_order) == ("cpu", False)


def test_rebuild_loader_without_workers_keeps_prefetch_factor_unset():
    loader = DataLoader(TensorDataset(torch.arange(6.0)), batch_size=2, shuffle=True, drop_last=True)
    rebuilt = rebuild_loader(loader)
    assert rebuilt.prefetch_factor is None and rebuilt.num_workers == 0
    assert rebuilt.sampler is loader.sampler and rebuilt.drop_last and rebuilt.batch_size == 2
    torch.manual_seed(0)
    expected = [b[0].tolist() for b in loader]
    torch.manual_seed(0)
    assert [b[0].tolist() for b in rebuilt] == expected


def test_rebuild_loader_keeps_a_users_batch_sampler_and_refuses_a_sampler_under_it():
    dataset = TensorDataset(torch.arange(6.0))
    batches = [[0, 2], [4]]
    loader = DataLoader(dataset, batch_sampler=batches)
    assert rebuild_loader(loader).batch_sampler is batches
    with pytest.raises(ValueError, match=r"draws its batches from its own batch_sampler \(list\).*pass batch_sampler="):
        rebuild_loader(loader, sampler=[0, 1])
    with pytest.raises(ValueError, match="pass a sampler or a batch_sampler, not both"):
        rebuild_loader(loader, sampler=[0], batch_sampler=[[0]])


def test_rebuild_loader_of_an_iterable_dataset_passes_no_sampler():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(torch.arange(5.0))

    loader = DataLoader(Stream(), batch_size=2, drop_last=True)
    rebuilt = rebuild_loader(loader)
    assert [b.tolist() for b in rebuilt] == [[0.0, 1.0], [2.0, 3.0]]
