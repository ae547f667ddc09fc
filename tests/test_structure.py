"""The shape of the library, pinned: a loop a maintainer can hold in their head (issue 18).

Each bound is one a reviewer would otherwise have to check by hand: the Trainer's file and its own state stay
small, no function outgrows a screen (ruff's C901 bounds complexity at 15, see pyproject.toml), callbacks see the
trainer through the typed contract instead of ``getattr`` fallbacks, and what differs between strategies lives
with the strategies.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import torch
from helpers import make_classification, make_trainer

import fitkit

PACKAGE = Path(__file__).resolve().parents[1] / "fitkit"


def _sources() -> dict[Path, str]:
    return {path: path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_trainer_py_stays_under_900_lines() -> None:
    lines = (PACKAGE / "trainer.py").read_text().count("\n")
    assert lines <= 900, f"trainer.py has {lines} lines: move a concern out (see _run.py, _steps.py, _pipeline.py)"


def test_the_trainer_keeps_at_most_30_attributes_of_its_own_before_and_after_a_fit() -> None:
    trainer = make_trainer(metrics=["accuracy"])
    before = set(vars(trainer))
    x, y = make_classification(32)
    trainer.fit((x, y), (x, y), batch_size=8, epochs=1)
    trainer.evaluate((x, y))
    trainer.predict(x)
    after = set(vars(trainer))
    assert after == before, f"a call added attributes to the Trainer: {sorted(after - before)} (per-call state: _run)"
    assert len(after) <= 30, sorted(after)


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for path, source in _sources().items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > 80:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_callbacks_read_the_trainer_through_the_contract_not_getattr() -> None:
    found = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path, source in _sources().items()
        if path.parent.name == "callbacks"
        for number, line in enumerate(source.splitlines(), 1)
        if re.search(r"getattr\((self\.)?trainer\b|getattr\(type\((self\.)?trainer\)", line)
    ]
    assert not found, found


def test_fsdp_is_named_only_where_the_strategies_are_defined() -> None:
    found = [
        str(path.relative_to(PACKAGE))
        for path, source in _sources().items()
        if "is_fsdp(" in source or re.search(r"strategy\s*==\s*[\"']fsdp[\"']", source)
    ]
    assert set(found) <= {"strategies.py"}, found


def test_every_private_torch_attribute_goes_through_compat() -> None:
    """``torch`` objects' private attributes (``x._name``) are read in ``_compat.py`` only: there each is pinned by a
    test against the installed torch. fitkit's own privates (``self._x``, ``trainer._run``) are not torch's."""
    private_torch = re.compile(
        r"\b(torch|nn|optimizer|optim|scaler|tensor|module|sampler|metric|distributed_c10d)\._[a-z]\w*"
    )
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path, source in _sources().items()
        if path.name != "_compat.py"
        for number, line in enumerate(source.splitlines(), 1)
        if private_torch.search(line) and not line.lstrip().startswith("#")
    ]
    assert not found, found
    assert torch.__version__  # the test reads the sources; torch imports for the pins in test_compat.py


class InfLoss(fitkit.Trainer):
    def train_step(self, batch: Any) -> Any:
        logs = super().train_step(batch)
        return {**logs, "loss": logs["loss"] * float("inf")}


def test_warnings_from_deep_inside_fit_point_at_the_users_line() -> None:
    """fitkit's warnings count their stack level (``_warn.user_stacklevel``) instead of a hand-set number that a
    new helper between ``fit`` and the warning would silently shift into fitkit's own files."""
    import warnings

    x, y = make_classification(16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer().fit((x, y), batch_size=8, epochs=1, steps_per_epoch=10)  # plan_fit warns, 4 frames down
        # The loop warns: a non-finite loss (the weights stay finite: a diverged run is an error, not a warning).
        InfLoss(torch.nn.Linear(x.shape[1], 3), "sgd", "cross_entropy", verbose=0).fit((x, y), batch_size=8, epochs=1)
    messages = {str(w.message).split(":")[0][:40]: w.filename for w in caught}
    assert any("steps_per_epoch=10" in m for m in messages), messages
    assert any("non-finite" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert {w.filename for w in caught} == {__file__}, [(w.filename, str(w.message)[:60]) for w in caught]
