"""Per-block FSDP2, the strategies' options and channels_last under FSDP, on forked gloo ranks (CPU)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_utils import run_ranks, run_single
from test_distributed import EpochPermutations, N, make_data, max_difference
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit import strategies
from fitkit.strategies import DDPStrategy, FSDPStrategy, find_blocks

pytestmark = pytest.mark.distributed


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.linear(x))


class Blocky(nn.Module):
    """An input layer, three repeated blocks in a ModuleList, a head: the shape of a transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([Block(16) for _ in range(3)])
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _blocky_job(rank: int, out: Path, strategy: Any = "fsdp", precision: str = "32") -> dict[str, Any]:
    from torch.distributed.fsdp import FSDPModule

    fitkit.seed_everything(0)
    model = Blocky()
    dtypes: list[torch.dtype] = []
    model.blocks[0].linear.register_forward_pre_hook(lambda m, args: dtypes.append(m.weight.dtype))
    distributed_run = os.environ.get("WORLD_SIZE", "1") != "1"
    trainer = fitkit.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "cross_entropy",
        metrics=["accuracy"],
        device="cpu",
        verbose=0,
        precision=precision,
        strategy=strategy if distributed_run else "auto",
    )
    data = make_data()
    if trainer.world_size == 1:
        train = DataLoader(data, batch_size=32, sampler=EpochPermutations(N, seed=0))
    else:
        train = DataLoader(data, batch_size=16, shuffle=True)
    history = trainer.fit(train, DataLoader(TensorDataset(*make_data(40)[:]), batch_size=16), epochs=2)
    return {
        "weights": trainer.model_state_dict(),
        "history": history.history,
        "blocks": [isinstance(b, FSDPModule) for b in trainer.model.blocks],
        "others": [isinstance(m, FSDPModule) for m in (trainer.model.inp, trainer.model.head)],
        "root": isinstance(trainer.model, FSDPModule),
        "compute_dtype": dtypes[-1],
    }


@pytest.mark.slow
def test_fsdp_shards_each_repeated_block_and_matches_one_process(tmp_path: Path) -> None:
    one = run_single(_blocky_job, tmp_path / "one")
    ranks = run_ranks(_blocky_job, tmp_path / "two").check()
    for rank in ranks:
        assert rank["blocks"] == [True, True, True] and rank["root"] and rank["others"] == [False, False]
        for key, values in one["history"].items():
            assert rank["history"][key] == pytest.approx(values, abs=1e-6), key
    assert max_difference(ranks[0]["weights"], one["weights"]) < 1e-6


@pytest.mark.slow
def test_fsdp_block_classes_and_bf16_mixed_precision(tmp_path: Path) -> None:
    strategy = FSDPStrategy(block_classes=["Block", nn.Linear], reshard_after_forward=False)
    ranks = run_ranks(_blocky_job, tmp_path / "bf16", strategy=strategy, precision="bf16").check()
    for rank in ranks:
        # Block instances are sharded; the Linears inside them are nested, so only inp and head are added.
        assert rank["blocks"] == [True, True, True] and rank["others"] == [True, True] and rank["root"]
        assert rank["compute_dtype"] == torch.bfloat16  # MixedPrecisionPolicy(param_dtype=bf16)
    plain = run_ranks(
        _blocky_job, tmp_path / "bf16-off", strategy=FSDPStrategy(mixed_precision=False), precision="bf16"
    )
    assert [r["compute_dtype"] for r in plain.check()] == [torch.float32, torch.float32]


def test_the_default_block_policy() -> None:
    assert [type(b).__name__ for b in find_blocks(Blocky())] == ["Block"] * 3
    sequential = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    assert find_blocks(sequential) == [sequential[0], sequential[2]]  # no container: the repeated class
    assert find_blocks(nn.Linear(2, 2)) == []  # nothing repeated: the root alone


def test_fsdp_and_ddp_options_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match=r"^FSDPStrategy\(block_classes=...\) names \['Nope'\], which the model"):
        find_blocks(Blocky(), ["Nope"])
    with pytest.raises(TypeError, match=r"^FSDPStrategy\(block_classes=...\) must be a non-empty list of nn.Module"):
        FSDPStrategy(block_classes=Block)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^FSDPStrategy\(block_classes=...\) holds 3, which is neither"):
        FSDPStrategy(block_classes=[3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"^FSDPStrategy\(reshard_after_forward=...\) must be True or False, got 1$"):
        FSDPStrategy(reshard_after_forward=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^DDPStrategy\(static_graph=...\) must be True or False, got 'yes'$"):
        DDPStrategy(static_graph="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^DDPStrategy\(bucket_cap_mb=...\) must be a number of MiB > 0 or None"):
        DDPStrategy(bucket_cap_mb=0)
    with pytest.raises(ValueError, match=r"or a fitkit.DDPStrategy\(...\) / fitkit.FSDPStrategy\(...\) to set"):
        fitkit.Trainer(nn.Linear(2, 2), "sgd", "mse", device="cpu", strategy=3)  # type: ignore[arg-type]


class Branchy(nn.Module):
    """A branch that the forward pass never uses: plain DDP raises about it in the next step."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def _ddp_options_job(rank: int, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    fitkit.seed_everything(0)
    model = Branchy()
    trainer = fitkit.Trainer(model, "sgd", "cross_entropy", device="cpu", verbose=0, strategy=DDPStrategy(**options))
    trainer.fit(DataLoader(make_data(), batch_size=16, shuffle=True), epochs=1)
    ddp = trainer._modules.train
    return {
        "find_unused": ddp.find_unused_parameters,
        "bucket_view": ddp.gradient_as_bucket_view,
        "static": ddp.static_graph,
        "steps": trainer.global_step,
    }


def test_ddp_options_pass_through(tmp_path: Path) -> None:
    options = {"find_unused_parameters": True, "gradient_as_bucket_view": True}
    for rank in run_ranks(_ddp_options_job, tmp_path, options=options).check():
        assert rank == {"find_unused": True, "bucket_view": True, "static": False, "steps": 3}


def _conv_job(rank: int, out: Path) -> dict[str, Any]:
    fitkit.seed_everything(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 2)
    )
    distributed_run = os.environ.get("WORLD_SIZE", "1") != "1"
    trainer = fitkit.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        "cross_entropy",
        device="cpu",
        verbose=0,
        channels_last=True,
        strategy="fsdp" if distributed_run else "auto",
    )
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 3, 4, 4, generator=g), torch.randint(0, 2, (32,), generator=g)
    seen: list[bool] = []
    model[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    # Each rank takes every other sample (fitkit shards in-memory data): 2 x 8 per step, as one process's 16.
    history = trainer.fit((x, y), batch_size=16 // trainer.world_size, epochs=2, shuffle=False)
    return {
        "weights": trainer.model_state_dict(),
        "loss": history.history["loss"],
        "channels_last_inputs": all(seen),
        "sharded": type(next(trainer.model.parameters())).__name__,
    }


@pytest.mark.slow
def test_fsdp_with_channels_last_converts_the_inputs_and_trains_like_one_process(tmp_path: Path) -> None:
    one = run_single(_conv_job, tmp_path / "one")
    ranks = run_ranks(_conv_job, tmp_path / "two").check()
    assert one["channels_last_inputs"]
    for rank in ranks:
        assert rank["sharded"] == "DTensor" and rank["channels_last_inputs"]
    assert ranks[0]["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert max_difference(ranks[0]["weights"], one["weights"]) < 1e-5


def _channels_last_model_job(rank: int, out: Path) -> dict[str, Any]:
    model = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    try:
        strategies.shard_blocks(model, FSDPStrategy())
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def test_sharding_a_channels_last_model_is_fitkits_own_error(tmp_path: Path) -> None:
    def job(rank: int, out: Path) -> dict[str, Any]:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        return _channels_last_model_job(rank, out)

    (result,) = run_ranks(job, tmp_path, world_size=1).check()
    assert result["error"].startswith(
        "strategy='fsdp' cannot shard non-contiguous parameters (a model converted with "
        "model.to(memory_format=torch.channels_last), say); keep the model contiguous"
    )
