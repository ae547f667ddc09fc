"""The Python code blocks of the Markdown documentation, as the docs tests run them.

A block is a fenced block whose info string starts with ``python`` (or ``py``). Its flags are classes in braces,
```` ```python {.slow} ```` (the form MkDocs' superfences renders; a bare word after the language, ```` ```python
slow ````, is not a fence to it, and the page below it vanishes into one code block): ``notest`` (deliberately not
runnable: shown, never run; keep these rare) and ``slow`` (run only by the slow test that runs its page whole:
``-m "not slow"`` leaves it out). Blocks inside an HTML comment (``<!-- ... -->``) are run too but not rendered:
the way a page sets up names a shown sketch needs without printing them.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# An opening fence (any indentation, as inside a list item), its info string, and the body up to a closing fence
# with the same indentation.
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line in the file
    flags: frozenset[str]
    code: str

    @property
    def runs(self) -> bool:
        return "notest" not in self.flags


def pages() -> list[Path]:
    """README.md and every Markdown page of the site."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        words = match["info"].strip().split()
        if not words or words[0] not in ("python", "py"):
            continue
        line = text.count("\n", 0, match.start("body")) + 1
        code = textwrap.dedent(match["body"])
        blocks.append(Block(path, line, frozenset(flags(match["info"])), code))
    return blocks


def flags(info: str) -> list[str]:
    """The flags of a fence's info string, ``python {.slow .notest}`` -> ``["slow", "notest"]``; a bare word after
    the language is a ValueError (superfences would not render the block: see the module's docstring)."""
    language, _, rest = info.strip().partition(" ")
    rest = rest.strip()
    if not rest:
        return []
    if not (rest.startswith("{") and rest.endswith("}")):
        raise ValueError(
            f"fence info string {info.strip()!r}: write flags as classes in braces, ```{language} {{.{rest.split()[0]}}}; "
            "MkDocs does not render a bare word after the language as a code block"
        )
    return [word[1:] for word in rest[1:-1].split() if word.startswith(".")]


def compile_block(block: Block) -> object:
    """The block's code object; tracebacks name the Markdown file and its real line numbers."""
    return compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
