"""How the ranks of a torchrun attempt agree on their store keys (`fitkit.distributed._agree_on_generation`),
against a real TCPStore that still holds a dead attempt's keys, as torchrun's shared rendezvous store does
after a restart (pytorch/pytorch#135712). The same protocol under two real torchrun agents whose restart counts
differ is tests/test_cluster.py's (slow)."""

from __future__ import annotations

import datetime
import threading
from typing import Any

import pytest
import torch.distributed as dist

from fitkit import distributed


def agree(port: int, world_size: int, timeout_s: float = 20.0) -> list[Any]:
    """Every rank of one attempt runs the protocol in its own thread, each through its own client."""
    results: list[Any] = [None] * world_size

    def rank(r: int) -> None:
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
        try:
            results[r] = distributed._agree_on_generation(client, r, world_size, timeout_s)
        except Exception as exc:
            results[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in reversed(range(world_size))]  # rank 0 last
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 5)
    return results


@pytest.fixture
def store() -> Any:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield server


def test_each_attempt_agrees_on_a_generation_no_earlier_attempt_used_despite_the_dead_attempts_keys(store: Any) -> None:
    first = agree(store.port, 3)
    assert len(set(first)) == 1 and isinstance(first[0], int), first
    # A dead attempt's leftovers: greetings never answered, an answer nobody read, a counter moved on.
    store.append("fitkit/greetings", "deadbeef,cafe,")
    store.set("fitkit/answer/deadbeef", str(first[0]))
    store.add("fitkit/generations", 5)
    second = agree(store.port, 3)
    assert len(set(second)) == 1 and second[0] > first[0] + 5, second
    third = agree(store.port, 2)  # another world size (an elastic membership change)
    assert len(set(third)) == 1 and third[0] > second[0], third


def test_rank_zero_gives_up_after_the_timeout_naming_the_ranks_that_did_not_join(store: Any) -> None:
    client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=5))
    with pytest.raises(RuntimeError, match=r"waited 1 s for the other 2 rank\(s\) of this torchrun attempt"):
        distributed._agree_on_generation(client, 0, 3, 1.0)
