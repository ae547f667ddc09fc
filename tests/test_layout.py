"""The package's layout, pinned: what each module offers is declared, and private modules stay private (issue 18).

A module whose name starts with ``_`` (``fitkit/_compat.py``, ``fitkit/_structure.py``) is fitkit's own; every other
module says in ``__all__`` which of its names the rest of fitkit, and its users, may import.
"""

from __future__ import annotations

import importlib
import pkgutil

import fitkit


def _public_modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages(fitkit.__path__, prefix="fitkit.")
        if not any(part.startswith("_") for part in info.name.split("."))
    )


def test_the_walk_finds_the_modules() -> None:
    modules = _public_modules()
    assert {"fitkit.data", "fitkit.metrics", "fitkit.callbacks", "fitkit.callbacks.base"} <= set(modules)
    assert not any(name.startswith("fitkit._") for name in modules)


def test_every_public_module_declares_all() -> None:
    problems = []
    for name in _public_modules():
        module = importlib.import_module(name)
        declared = getattr(module, "__all__", None)
        if declared is None:
            problems.append(f"{name}: no __all__")
            continue
        missing = [item for item in declared if not hasattr(module, item)]
        problems += [f"{name}: __all__ lists {item!r}, which it does not define" for item in missing]
        if len(set(declared)) != len(declared):
            problems.append(f"{name}: __all__ lists a name twice")
    assert not problems, "\n".join(problems)
