"""In-memory data as Keras reads it: Python lists become tensors, and floating data takes the model's dtype.

Keras's ``fit(x, y)`` turns lists into arrays (``np.asarray``) and casts floating data to the model's float
type. fitkit does the same for in-memory data (tensors, NumPy arrays, Python lists) once per ``fit`` /
``evaluate`` / ``predict`` call, before the first batch, so nothing is cast per batch; integer class labels
(int32 from NumPy, say) become int64 for a classification loss. A DataLoader's batches are the user's and
are never cast: a dtype mismatch there is an error that names the fix (`fitkit._checks.check_input_dtypes`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Integer dtypes that class-index losses do not take, cast to int64 for in-memory labels.
_SMALL_INTS = (torch.int8, torch.int16, torch.int32, torch.uint8)


def is_array(obj: Any) -> bool:
    """True for a tensor or a NumPy array."""
    return isinstance(obj, torch.Tensor) or (type(obj).__module__ == "numpy" and hasattr(obj, "shape"))


def to_tensor(array: Any, name: str) -> torch.Tensor:
    """``array`` as a tensor: a tensor as it is, a NumPy array sharing its memory; anything else is a
    ``TypeError`` that names ``name`` (Python lists are converted before, by `from_python`)."""
    if isinstance(array, torch.Tensor):
        return array
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with tensorboard
        pass
    else:
        if isinstance(array, np.ndarray):
            return torch.from_numpy(array)
    raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(array).__name__}")


def is_python_array(obj: Any) -> bool:
    """True for a non-empty (nested) list or tuple whose first leaf is a Python (or NumPy) scalar, not a
    tensor: rows of values, not a list of batches. Strings count, so that they get a clear error."""
    if not isinstance(obj, (list, tuple)) or not obj:
        return False
    first = obj[0]
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    numpy_scalar = type(first).__module__ == "numpy" and getattr(first, "ndim", 1) == 0
    return isinstance(first, (bool, int, float, str, bytes)) or numpy_scalar


def _list_of_arrays(obj: Any) -> bool:
    return isinstance(obj, list) and bool(obj) and all(is_array(item) for item in obj[:8])


def _list_to_tensor(value: Any, name: str) -> torch.Tensor:
    """A (nested) Python list of numbers as a tensor, as ``np.asarray`` reads it (floats: float64, ints:
    int64; the model's dtype is applied by `follow_model`)."""
    import numpy as np

    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged rows
        raise ValueError(
            f"{name} is a Python list whose rows have different lengths ({exc}); in-memory data must be "
            "rectangular: pad the rows to one length, or feed them from a DataLoader with a collate_fn that pads"
        ) from exc
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"{name} is a Python list that does not convert to numbers (NumPy reads it as {array.dtype}); pass "
            "lists of numbers, NumPy arrays or tensors"
        )
    return torch.from_numpy(array)


def from_python(data: Any, name: str) -> Any:
    """``data`` with Python lists of numbers turned into tensors, as Keras converts them: an ``(x, y)`` or
    ``(x, y, sample_weight)`` tuple whose parts are lists, or a bare list of rows as ``x``. A list of
    batches (tensors or tuples of tensors) is left alone; a list of per-sample tensors as ``x`` is an error
    that says to stack them."""
    if isinstance(data, tuple) and 1 <= len(data) <= 3:
        if any(_list_of_arrays(part) for part in data):
            which = next(i for i, part in enumerate(data) if _list_of_arrays(part))
            part = data[which]
            raise TypeError(
                f"{name}: {('x', 'y', 'sample_weight')[which]} is a list of {len(part)} "
                f"{type(part[0]).__name__}s; in-memory data is one array per part, with samples along dim 0: "
                "stack them with torch.stack(...) (NumPy: np.stack(...)). A model with several inputs takes "
                "them from a DataLoader whose batches are ((x1, x2), y)"
            )
        if any(is_python_array(part) for part in data) and all(
            is_python_array(part) or is_array(part) for part in data
        ):
            return tuple(
                _list_to_tensor(part, f"{name}[{i}]") if is_python_array(part) else part for i, part in enumerate(data)
            )
        return data
    if isinstance(data, list) and is_python_array(data):
        return _list_to_tensor(data, name)  # x alone, as Keras's predict(x) takes a list of rows
    return data


def model_float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter (None: no floating parameter)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return None if param is None else param.dtype


def follow_model(data: Any, float_dtype: torch.dtype | None, class_labels: bool) -> Any:
    """In-memory ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)`` with every floating part cast to
    ``float_dtype`` (Keras casts to the model's float type) and, when ``class_labels``, integer ``y`` of
    another width cast to int64. Anything else (a DataLoader, a list of batches) is returned unchanged."""
    if is_array(data):
        return _cast(data, float_dtype, False)
    if isinstance(data, tuple) and 1 <= len(data) <= 3 and is_array(data[0]):
        return tuple(
            _cast(part, float_dtype, class_labels and i == 1) if is_array(part) else part for i, part in enumerate(data)
        )
    return data


def _cast(part: Any, float_dtype: torch.dtype | None, labels: bool) -> Any:
    if not isinstance(part, torch.Tensor):
        if part.dtype.kind not in "biuf":
            return part  # object/str arrays: to_tensor names the problem later
        part = torch.from_numpy(part)
    if part.is_floating_point():
        return part if float_dtype is None or part.dtype == float_dtype else part.to(float_dtype)
    if labels and part.dtype in _SMALL_INTS:
        return part.long()
    return part


__all__ = ["is_array", "to_tensor", "is_python_array", "from_python", "model_float_dtype", "follow_model"]
