"""No two of the examples, and no example and the documentation's snippets, write into the same default folder.

A newcomer runs the README's snippets, a docs page and ``examples/train_digits.py`` from one working directory:
if two of them wrote checkpoints into one folder, the second would resume the first one's run, or refuse to start.
The folders are read from the code itself (nothing runs): the paths given to fitkit's writers (ModelCheckpoint,
TensorBoard, CSVLogger, BackupAndRestore, Profiler, SpikeDetection, PredictionWriter, ``save_checkpoint``,
``plot(path)``, MLflow's sqlite/file store), resolved through an example's argparse defaults (``args.log_dir``,
``f"{args.checkpoint_dir}/..."``).
"""

from __future__ import annotations

import ast
import json
import posixpath
from collections import defaultdict
from pathlib import Path

import pytest

from tests.markdown_blocks import ROOT, pages, python_blocks

# Writers whose path argument is a folder, and those whose path argument is a file: (name, argument, position).
FOLDER_WRITERS = {
    "BackupAndRestore": ("backup_dir", 0),
    "PredictionWriter": ("directory", 0),
    "Profiler": ("dirpath", 0),
    "SpikeDetection": ("dirpath", 0),
    "TensorBoard": ("log_dir", 0),
}
FILE_WRITERS = {
    "ModelCheckpoint": ("filepath", 0),
    "CSVLogger": ("filename", 0),
    "save_checkpoint": ("path", 0),
    "plot": ("path", None),  # History.plot(keys, path) and LRFindResult.plot(path): a keyword or a path-like string
    "savefig": ("fname", 0),
}
DEFAULTS = {"TensorBoard": "runs"}  # a writer's own default folder, when the call names none


def _name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


class _Paths(ast.NodeVisitor):
    """The output folders a piece of code writes to by default."""

    def __init__(self, defaults: dict[str, str]) -> None:
        self.defaults = defaults  # argparse: dest -> default
        self.folders: set[str] = set()

    def value(self, node: ast.AST | None) -> str | None:
        """A path expression's default value: a string, an f-string, ``args.name``, ``Path(a) / b``; else None."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
            return self.defaults.get(node.attr)
        if isinstance(node, ast.JoinedStr):
            parts = [self.value(v.value if isinstance(v, ast.FormattedValue) else v) for v in node.values]
            return None if None in parts else "".join(p or "" for p in parts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            left, right = self.value(node.left), self.value(node.right)
            return None if left is None or right is None else posixpath.join(left, right)
        if isinstance(node, ast.Call) and _name(node) == "Path" and len(node.args) == 1:
            return self.value(node.args[0])
        return None

    def argument(self, call: ast.Call, keyword: str, position: int | None) -> ast.AST | None:
        for item in call.keywords:
            if item.arg == keyword:
                return item.value
        if position is not None and len(call.args) > position:
            return call.args[position]
        if position is None:  # plot(path): the string argument that looks like a file
            return next((a for a in call.args if (v := self.value(a)) is not None and "." in v), None)
        return None

    def add(self, path: str, is_file: bool) -> None:
        folder = posixpath.normpath(posixpath.dirname(path) if is_file else path)
        url = ":" in folder.split("/")[0]  # memory://..., s3://...: not a folder of the working directory
        if folder not in (".", "") and not posixpath.isabs(folder) and not url:  # "." itself is everyone's
            self.folders.add(folder)

    def visit_Call(self, node: ast.Call) -> None:
        name = _name(node)
        for writers, is_file in ((FOLDER_WRITERS, False), (FILE_WRITERS, True)):
            if name in writers:
                keyword, position = writers[name]
                argument = self.argument(node, keyword, position)
                path = self.value(argument) if argument is not None else DEFAULTS.get(name)
                if path is not None:
                    self.add(path, is_file)
        if name == "MLflowLogger":
            uri = self.value(self.argument(node, "tracking_uri", None))
            if uri and uri.startswith(("sqlite:///", "file:")):
                self.add(uri.removeprefix("sqlite:///").removeprefix("file:"), uri.startswith("sqlite:"))
        self.generic_visit(node)


def _argparse_defaults(tree: ast.AST) -> dict[str, str]:
    defaults = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _name(node) == "add_argument" and node.args:
            flag = node.args[0]
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if isinstance(flag, ast.Constant) and isinstance(default, ast.Constant) and isinstance(default.value, str):
                defaults[str(flag.value).lstrip("-").replace("-", "_")] = default.value
    return defaults


def folders_of(code: str, script: bool = False) -> set[str]:
    """The default output folders of ``code``; ``script``: also every ``--*-dir`` option's default."""
    tree = ast.parse(code)
    defaults = _argparse_defaults(tree) if script else {}
    paths = _Paths(defaults)
    paths.visit(tree)
    if script:
        for dest, default in defaults.items():
            if dest.endswith("_dir"):
                paths.add(default, is_file=False)
    return paths.folders


def _notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    lines = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))  # IPython magics


def owners() -> dict[str, set[str]]:
    """Each default output folder -> who writes there: an example's path, or ``docs`` (README.md and docs/, whose
    snippets may share folders among themselves: a page resumes what another one wrote, as a reader would)."""
    found: dict[str, set[str]] = defaultdict(set)
    for script in sorted((ROOT / "examples").iterdir()):
        if script.suffix == ".py":
            code, is_script = script.read_text(encoding="utf-8"), True
        elif script.suffix == ".ipynb":
            code, is_script = _notebook_code(script), False
        else:
            continue
        for folder in folders_of(code, is_script):
            found[folder].add(f"examples/{script.name}")
    for page in pages():
        for block in python_blocks(page):
            for folder in folders_of(block.code):
                found[folder].add("docs")
    return found


def test_no_default_folder_is_shared_by_an_example_and_anything_else():
    found = owners()
    shared = {folder: sorted(who) for folder, who in found.items() if len(who) > 1}
    assert not shared, (
        "examples and docs snippets that write into the same default folder (running one resumes, or is refused "
        f"by, the other's files): give the example a folder named after it: {shared}"
    )
    # The collector sees what it must: the main example's folders, the notebook's and the docs' own.
    assert {"checkpoints/train_digits", "runs/train_digits"} <= {
        f for f, w in found.items() if w == {"examples/train_digits.py"}
    }
    assert any(w == {"examples/quickstart.ipynb"} for w in found.values())
    assert {"checkpoints/digits", "runs/digits", "logs", "ckpt", "backup", "runs/profile"} <= {
        f for f, w in found.items() if w == {"docs"}
    }


@pytest.mark.parametrize(
    ("code", "folders"),
    [
        ('ModelCheckpoint("ckpt/{epoch:02d}.pt", save_last=True)', {"ckpt"}),
        ('TensorBoard(log_dir="runs/x"); TensorBoard()', {"runs/x", "runs"}),
        ('CSVLogger("logs/a.csv"); history.plot(["loss"], path="plots/h.png"); r.plot("lr.png")', {"logs", "plots"}),
        ('trainer.save_checkpoint(Path("out") / "m.pt"); BackupAndRestore("bk")', {"out", "bk"}),
        ('MLflowLogger("e", tracking_uri="sqlite:///db/mlflow.db")', {"db"}),
        (
            'p.add_argument("--checkpoint-dir", default="checkpoints/a")\n'
            'p.add_argument("--log-dir", default="runs/a")\n'
            'ModelCheckpoint(f"{args.checkpoint_dir}/e{{epoch}}.pt"); TensorBoard(log_dir=args.log_dir)\n'
            'history.plot(path=f"{args.checkpoint_dir}/history.png")',
            {"checkpoints/a", "runs/a"},
        ),
    ],
)
def test_the_collector_reads_each_writer(code, folders):
    assert folders_of(code, script=True) == folders


def test_a_shared_folder_is_caught():
    example = 'p.add_argument("--log-dir", default="runs/digits")\nTensorBoard(log_dir=args.log_dir)'
    docs = 'TensorBoard("runs/digits")'
    assert folders_of(example, script=True) & folders_of(docs) == {"runs/digits"}
