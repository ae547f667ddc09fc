"""fitkit's messages tell users what to call: every call a message spells out with keywords must work as written.

Issue 19: a damaged-file hint named a keyword that ``load()`` does not have, so following the advice raised a
TypeError. This test reads every string literal in ``fitkit/`` (f-strings included), finds each call written
with keywords (``name(..., key=...)``) whose name is a fitkit (or torch.load) function, and checks each keyword
against that function's signature.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import fitkit
import fitkit.callbacks
from fitkit import Trainer, checkpoint

FITKIT = Path(fitkit.__file__).parent
#: What a message writes before a fitkit function's name (``loss.backward(...)`` is torch's, not the Trainer's).
OWNERS = {
    "",
    "fitkit",
    "fitkit.checkpoint",
    "checkpoint",
    "fitkit.callbacks",
    "callbacks",
    "trainer",
    "Trainer",
    "self",
}
CALL = re.compile(r"([A-Za-z_][\w.]*)\(([^()]*)\)")


def _callables() -> dict[str, Callable[..., Any]]:
    """What a message can name: the public names of fitkit, its callbacks and checkpoint modules, the Trainer's
    methods (``fit(...)``, ``trainer.evaluate(...)``), and torch.load."""
    found: dict[str, Callable[..., Any]] = {}
    for module in (fitkit, fitkit.callbacks, checkpoint):
        for name in module.__all__:
            found[name] = getattr(module, name)
    for name, member in inspect.getmembers(Trainer, callable):
        if not name.startswith("_"):
            found[name] = member
    found["load"] = checkpoint.load  # "checkpoint.load(...)"
    found["torch.load"] = torch.load
    return found


def _messages() -> list[tuple[str, int, str]]:
    """(file, line, text) for every string literal outside a ``__repr__`` (an f-string's fields read ``{}``)."""
    out = []
    for path in sorted(FITKIT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        reprs = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.name == "__repr__"
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if id(node) in reprs:
                continue
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            out.append((str(path.relative_to(FITKIT.parent)), node.lineno, text))
    return out


def _calls_with_keywords(text: str) -> list[tuple[str, list[str]]]:
    calls = []
    for match in CALL.finditer(text):
        keywords = re.findall(r"(?:^|,)\s*(\w+)=(?!=)", match.group(2))
        if keywords:
            calls.append((match.group(1), keywords))
    return calls


def test_the_scanner_finds_calls_and_their_keywords():
    assert _calls_with_keywords("pass resume='auto' or trainer.fit(x, epochs=3, resume='restart')") == [
        ("trainer.fit", ["epochs", "resume"])
    ]
    assert _calls_with_keywords("checkpoint.load(path, verify=False) then torch.load(p, weights_only=True)") == [
        ("checkpoint.load", ["verify"]),
        ("torch.load", ["weights_only"]),
    ]


def _wrong_keywords(messages: list[tuple[str, int, str]]) -> list[str]:
    known = _callables()
    wrong = []
    for where, line, text in messages:
        for name, keywords in _calls_with_keywords(text):
            owner, _, short = name.rpartition(".")
            function = known.get(name) or (known.get(short) if owner in OWNERS else None)
            if function is None:
                continue
            parameters = inspect.signature(function).parameters
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
                continue
            wrong += [f"{where}:{line}: {name}(... {k}=...)" for k in keywords if k not in parameters]
    return wrong


def test_a_message_naming_a_missing_keyword_is_caught():
    # The case, planted: the check must see it.
    planted = [("fitkit/checkpoint.py", 1, "damaged: load it with fitkit.checkpoint.load(path, verify=False)")]
    assert _wrong_keywords(planted) == ["fitkit/checkpoint.py:1: fitkit.checkpoint.load(... verify=...)"]


def test_every_call_a_message_spells_out_takes_its_keywords():
    messages = _messages()
    assert len(messages) > 500  # the scan reads the package's messages, not an empty folder
    named = [m for m in messages if any(n.rsplit(".", 1)[-1] in _callables() for n, _ in _calls_with_keywords(m[2]))]
    assert len(named) >= 10  # the messages that name calls with keywords are there to check
    assert _wrong_keywords(messages) == []


@pytest.mark.parametrize("damage", ["truncated", "flipped", "no manifest"])
def test_a_damaged_file_says_what_to_do_and_the_advice_works(tmp_path: Path, damage: str):
    """The damaged-file paths end in a CheckpointError whose advice names only calls that exist."""
    trainer = Trainer(torch.nn.Linear(2, 2), "sgd", "cross_entropy", verbose=0)
    path = tmp_path / "a.pt"
    trainer.save_checkpoint(path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        path.write_bytes(data[:64] + bytes([data[64] ^ 1]) + data[65:])
    else:
        (tmp_path / checkpoint.MANIFEST).unlink()
    with pytest.raises(checkpoint.CheckpointError) as raised:
        checkpoint.load(path)
    message = str(raised.value)
    assert str(path) in message
    assert _wrong_keywords([("raised", 0, message)]) == []
    if damage == "no manifest":  # the advice: vouch for the file, then load it
        checkpoint.trust(path)
        assert checkpoint.load(path)["trainer"]["global_step"] == 0
