"""Nested structures (a batch, a model's outputs, a state): tuples, lists and dicts of tensors, walked in one place.

Every function of fitkit that goes through such a structure walks it as these do: a ``Mapping`` by its values, a
tuple or list item by item, and anything else (a tensor, a number, a string, None) is a leaf. `map_structure`
rebuilds the containers around new leaves, `leaves` reads them, and `describe` puts a structure in an error
message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch


def map_structure(fn: Callable[..., Any], structure: Any, *others: Any) -> Any:
    """``structure`` with each leaf replaced by ``fn(leaf, *other_leaves)``, the containers rebuilt as they were.

    Args:
        fn: called once per leaf; it decides what to do with leaves that are not tensors (keep them, or raise).
        structure: the containers to rebuild: a dict stays a dict, another ``Mapping`` is rebuilt as its own
            type from a dict (a plain dict when its constructor takes other arguments, as ``defaultdict``'s
            does), a namedtuple field by field, a tuple or list (or a subclass) item by item.
        others: structures of the same layout, walked along ``structure``: by key (``structure``'s keys) and by
            position; their leaves are ``fn``'s further arguments (``predict`` joins per-batch outputs so).
    """
    if isinstance(structure, torch.Tensor):  # the usual leaf, first: a batch is mostly tensors
        return fn(structure, *others)
    if isinstance(structure, Mapping):
        mapped = {key: map_structure(fn, value, *(o[key] for o in others)) for key, value in structure.items()}
        if type(structure) is dict:
            return mapped
        mapping_type: Any = type(structure)  # a Mapping subclass: most are built from a dict
        try:
            return mapping_type(mapped)
        except TypeError:  # a mapping whose constructor takes other arguments (defaultdict): a plain dict
            return mapped
    if isinstance(structure, (list, tuple)):
        if others:
            items = [map_structure(fn, v, *(o[i] for o in others)) for i, v in enumerate(structure)]
        else:  # the per-batch case (a device move): no per-item generator
            items = [map_structure(fn, v) for v in structure]
        if isinstance(structure, tuple) and hasattr(structure, "_fields"):  # namedtuple
            return type(structure)(*items)
        return type(structure)(items)
    return fn(structure, *others)


def leaves(structure: Any) -> Iterator[Any]:
    """Every leaf of ``structure``, depth first, in order (a ``Mapping``'s in the order of its keys)."""
    if isinstance(structure, torch.Tensor):
        yield structure
    elif isinstance(structure, Mapping):
        for value in structure.values():
            yield from leaves(value)
    elif isinstance(structure, (list, tuple)):
        for value in structure:
            yield from leaves(value)
    else:
        yield structure


def tensors(structure: Any) -> list[torch.Tensor]:
    """The tensors among the leaves of ``structure``, in order."""
    return [leaf for leaf in leaves(structure) if isinstance(leaf, torch.Tensor)]


def describe(obj: Any, form: Literal["layout", "items", "size"] = "layout") -> str:
    """``obj`` in a few words, for an error message.

    Args:
        obj: the value to describe: a tensor, a structure of them, anything.
        form: how much to say. ``"layout"``: every tensor's shape and dtype, nested (a batch fitkit cannot
            read), ``tuple(Tensor(shape=(4,), dtype=torch.float32), int)``, ``{'x': ...}``, ``[...]`` (6 items
            at most); ``"items"``: a tensor's dtype and shape, a container's length and its items' types (what a
            loss was given), ``a float32 tensor of shape (4,)``, ``a tuple of 2 (Tensor, int)``, ``a dict with
            keys ['x']``; ``"size"``: as ``"items"``, without the items' types (the model's outputs, for a
            metric), ``a tuple of 2``.
    """
    if form == "layout":
        if isinstance(obj, torch.Tensor):
            return f"Tensor(shape={tuple(obj.shape)}, dtype={obj.dtype})"
        if isinstance(obj, Mapping):
            return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in list(obj.items())[:6]) + "}"
        if isinstance(obj, (list, tuple)):
            inner = ", ".join(describe(v) for v in obj[:6]) + (", ..." if len(obj) > 6 else "")
            return f"{type(obj).__name__}({inner})" if isinstance(obj, tuple) else f"[{inner}]"
        return type(obj).__name__
    if isinstance(obj, torch.Tensor):
        return f"a {str(obj.dtype).replace('torch.', '')} tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return f"a dict with keys {sorted(map(str, obj))}"
    if isinstance(obj, (list, tuple)):
        items = f" ({', '.join(type(v).__name__ for v in obj[:4])})" if form == "items" else ""
        return f"a {type(obj).__name__} of {len(obj)}{items}"
    return f"a {type(obj).__name__}"
