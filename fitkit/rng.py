"""Seeding and the capture/restore of every random generator that decides what happens next.

States are stored as tensors and plain Python values, so checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import torch

from fitkit._warn import FitkitWarning, user_stacklevel

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with tensorboard
    np = None  # type: ignore[assignment]


def seed_everything(seed: int, deterministic: bool = False, per_rank: bool = True) -> int:
    """Seeds Python, NumPy and torch (CPU and every CUDA device) with ``seed``.

    DataLoader workers then get distinct, reproducible seeds: PyTorch derives each worker's torch,
    ``random`` and NumPy seeds from a base seed drawn from the (now seeded) global generator, plus the
    worker id. With ``deterministic=True`` torch's deterministic algorithms are turned on (an op with no
    deterministic implementation then raises) and cuDNN autotuning is off; CUBLAS_WORKSPACE_CONFIG is
    set for deterministic cuBLAS. Returns the seed.

    In a distributed run (``RANK`` set by torchrun), rank ``r`` seeds its generators with ``seed + r``
    (``per_rank=True``, the default): each rank draws its own dropout masks, augmentations and DataLoader
    worker seeds instead of the same ones as every other rank. What must agree across ranks does not
    depend on it: DDP/FSDP start every rank from rank 0's initial weights, and the shuffling order of the
    DistributedSampler (or of fitkit's sharded in-memory batches) uses ``seed`` itself, shared. So a run
    without randomness in the step (no dropout) on 2 ranks equals one process on the whole batch, and one
    with dropout is as exact to resume as before. ``per_rank=False`` gives every rank the same streams.

    Args:
        seed: the seed, an int in [0, 2**32).
        deterministic: True turns on torch's deterministic algorithms and off cuDNN autotuning (default False).
        per_rank: True (the default) seeds rank ``r`` with ``seed + r`` under torchrun; False seeds every rank
            with ``seed``.

    Returns:
        The seed this process used (``(seed + rank) % 2**32`` with ``per_rank``).
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    global _LAST_SEED
    _LAST_SEED = seed
    if per_rank:
        seed = (seed + int(os.environ.get("RANK", "0"))) % 2**32
    random.seed(seed)
    if np is not None:
        np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses; this interpreter's hash seed is fixed
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return seed


def _generators(loader: Any) -> dict[str, torch.Generator]:
    """The private generators a loader draws from, by role."""
    found: dict[str, torch.Generator] = {}
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        found["loader"] = generator
    sampler = getattr(loader, "sampler", None)
    sampler_gen = getattr(sampler, "generator", None)
    if isinstance(sampler_gen, torch.Generator) and sampler_gen is not generator:
        found["sampler"] = sampler_gen
    return found


def capture(loader: Any = None) -> dict[str, Any]:
    """Every global generator's state, plus the private generators of ``loader``."""
    state: dict[str, Any] = {"python": _python_state(), "torch": torch.get_rng_state()}
    if np is not None:
        numpy_state = np.random.get_state(legacy=True)
        assert isinstance(numpy_state, tuple)  # the global RandomState is an MT19937: the legacy tuple form
        kind, keys, pos, has_gauss, cached = numpy_state
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device's generator only (the Trainer's: it selects it), so that a resume where
        # CUDA_VISIBLE_DEVICES shows other or fewer GPUs still restores the stream its dropout draws from.
        device = torch.cuda.current_device()
        state["cuda"] = torch.cuda.get_rng_state(device)
        _warn_other_devices(device)
    if loader is not None:
        state["loader"] = {role: g.get_state() for role, g in _generators(loader).items()}
    return state


def restore(state: dict[str, Any], loader: Any = None) -> None:
    """Puts the generators back in the state `capture` recorded."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if np is not None and "numpy" in state:
        s = state["numpy"]
        np.random.set_state(
            (s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["cached_gaussian"])
        )
    if "cuda" in state and torch.cuda.is_available():
        cuda_state = state["cuda"]
        if isinstance(cuda_state, torch.Tensor):
            torch.cuda.set_rng_state(cuda_state, torch.cuda.current_device())
        elif len(cuda_state) == torch.cuda.device_count():  # a checkpoint of fitkit <= 0.1: every GPU's
            torch.cuda.set_rng_state_all(cuda_state)
    if loader is not None:
        generators = _generators(loader)
        for role, g_state in state.get("loader", {}).items():
            if role in generators:
                generators[role].set_state(g_state)


_WARNED_DEVICES: set[int] = set()


def _warn_other_devices(device: int) -> None:
    """Says once when code drew random numbers on a GPU other than the Trainer's: that stream is not saved."""
    for index in range(torch.cuda.device_count()):
        if index == device or index in _WARNED_DEVICES:
            continue
        generator = torch.cuda.default_generators[index]
        if generator.get_offset() > 0:
            _WARNED_DEVICES.add(index)
            warnings.warn(
                f"random numbers were drawn on cuda:{index}, but checkpoints save the generator of the "
                f"trainer's device (cuda:{device}) only: a resume does not restore cuda:{index}'s stream. "
                "Draw on the trainer's device, or save that generator yourself in a callback's state_dict",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )


def capture_loader(loader: Any) -> dict[str, torch.Tensor]:
    """The states of ``loader``'s own generators (its ``generator``, its sampler's), by role."""
    return {role: g.get_state() for role, g in _generators(loader).items()}


def restore_loader(states: dict[str, torch.Tensor], loader: Any) -> None:
    """Puts ``loader``'s own generators back in the states `capture_loader` recorded."""
    generators = _generators(loader)
    for role, g_state in states.items():
        if role in generators:
            generators[role].set_state(g_state)


def _python_state() -> tuple[int, list[int], float | None]:
    version, internal, gauss = random.getstate()
    return version, list(internal), gauss


_LAST_SEED: int | None = None


def last_seed() -> int | None:
    """The seed given to the last [seed_everything][fitkit.seed_everything] call in this process, if any."""
    return _LAST_SEED


__all__ = ["seed_everything", "capture", "restore", "capture_loader", "restore_loader", "last_seed"]
