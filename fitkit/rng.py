"""Seeding and the capture/restore of every random generator that decides what happens next.

States are stored as tensors and plain Python values, so checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with tensorboard
    np = None  # type: ignore[assignment]


def seed_everything(seed: int, deterministic: bool = False) -> int:
    """Seeds Python, NumPy and torch (CPU and every CUDA device) with ``seed``.

    DataLoader workers then get distinct, reproducible seeds: PyTorch derives each worker's torch,
    ``random`` and NumPy seeds from a base seed drawn from the (now seeded) global generator, plus the
    worker id. With ``deterministic=True`` torch's deterministic algorithms are turned on (an op with no
    deterministic implementation then raises) and cuDNN autotuning is off; CUBLAS_WORKSPACE_CONFIG is
    set for deterministic cuBLAS. Returns the seed.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    global _LAST_SEED
    _LAST_SEED = seed
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
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader is not None:
        state["loader"] = {role: g.get_state() for role, g in _generators(loader).items()}
    return state


def restore(state: dict[str, Any], loader: Any = None) -> None:
    """Puts the generators back in the state :func:`capture` recorded."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if np is not None and "numpy" in state:
        s = state["numpy"]
        np.random.set_state(
            (s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["cached_gaussian"])
        )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if loader is not None:
        generators = _generators(loader)
        for role, g_state in state.get("loader", {}).items():
            if role in generators:
                generators[role].set_state(g_state)


def _python_state() -> tuple[int, list[int], float | None]:
    version, internal, gauss = random.getstate()
    return version, list(internal), gauss


_LAST_SEED: int | None = None


def last_seed() -> int | None:
    """The seed given to the last :func:`seed_everything` call in this process, if any."""
    return _LAST_SEED
