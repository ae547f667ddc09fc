"""The documentation cannot drift from the code: every Python block of README.md and docs/ runs, page by page in a
temporary working folder, and every public name has a reference entry with a summary and its arguments documented.

A page's blocks share one namespace and run in order, as a reader would paste them. ``mkdocs build --strict``
(run by .ci/run) checks the links and references themselves.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import types
import warnings
from pathlib import Path

import pytest

import fitkit
import fitkit.callbacks
import fitkit.metrics
import fitkit.schedule
from tests.markdown_blocks import ROOT, compile_block, pages, python_blocks

PAGES = [page for page in pages() if python_blocks(page)]
# Pages whose blocks train for seconds (pictures drawn on real data, the README's tour): in CI's full run, not in
# the quick loop (`pytest -m "not slow"`), which CONTRIBUTING keeps under 90 s of CPU.
HEAVY = {"README.md", "docs/validation-and-logging.md", "docs/getting-started.md", "docs/performance-tools.md",
         "docs/checkpoints.md"}  # fmt: skip
PAGE_PARAMS = [
    pytest.param(page, marks=pytest.mark.slow) if str(page.relative_to(ROOT)) in HEAVY else page for page in PAGES
]


def run_page(page: Path, slow: bool = True) -> int:
    """Runs the page's runnable blocks in order in one namespace (``slow=False``: leaving out the blocks
    marked ``slow``); returns how many ran."""
    # A real module, so that classes a page defines can be pickled (torch.save, DataLoader workers).
    module = types.ModuleType("fitkit_docs_page")
    sys.modules[module.__name__] = module
    ran = 0
    try:
        for block in python_blocks(page):
            if not block.runs or ("slow" in block.flags and not slow):
                continue
            try:
                exec(compile_block(block), module.__dict__)  # the documentation's own examples
            except Exception as exc:
                where = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
                raise AssertionError(f"{where}, the block at line {block.line} failed: {exc!r}") from exc
            ran += 1
    finally:
        del sys.modules[module.__name__]
    return ran


def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # files the examples write (checkpoints, runs/, CSVs) land here
    monkeypatch.setattr(fitkit.schedule, "clock", fitkit.schedule.clock)  # a page may fake max_time's clock


def _ids(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGE_PARAMS, ids=_ids)
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch):
    _isolated(tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # a page may show a warning; pytest's error filters are for the tests
        assert run_page(page, slow=False) > 0
    check_pictures(page, tmp_path)  # the pictures the page shows are the ones its code just drew


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any("slow" in b.flags for b in python_blocks(p))], ids=_ids)
def test_pages_with_slow_blocks_run_whole(page, tmp_path, monkeypatch):
    _isolated(tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert run_page(page, slow=True) > 0


# -- pictures: what a page shows is what its own code draws -----------------------------------------------------
IMAGES = ROOT / "docs" / "images"
# Pictures a page cannot draw itself (a benchmark's chart, a browser's screenshot): each one's script.
SCRIPT_PICTURES = {
    "time-breakdown.png": "benchmarks/time_breakdown.py",
    "profiler-tensorboard.png": "benchmarks/profiler_screenshot.py",
}
# The root mean square difference of two renderings, in 0..255 pixel values: the same code on another machine
# (other float rounding: torch on 1 thread instead of 2) differs by 0.2; a run of 95 steps instead of 100, or
# another seed, by 25.
PICTURE_TOLERANCE = 3.0
UPDATE_PICTURES = "FITKIT_UPDATE_PICTURES"  # =1: copy what the pages draw into docs/images instead of comparing


def shown_pictures(page: Path) -> list[str]:
    """The file names of the pictures under images/ that the page shows, ``![alt](images/name.png)``."""
    return re.findall(r"!\[[^\]]*\]\(images/([^)\s]+)\)", page.read_text(encoding="utf-8"))


def picture_difference(expected: Path, actual: Path) -> float | None:
    """The root mean square difference of two PNGs' pixels (0..255); None when their sizes differ."""
    import numpy as np
    from matplotlib.image import imread

    a, b = imread(expected), imread(actual)
    if a.shape != b.shape:
        return None
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)) * 255)


def check_pictures(page: Path, workdir: Path, images: Path = IMAGES) -> None:
    """Every picture the page shows that no script makes is drawn by the page's own code: its blocks, just run in
    ``workdir``, wrote a file of that name there, and it is the picture in ``images`` (to the pixel tolerance)."""
    update = os.environ.get(UPDATE_PICTURES) == "1"
    regenerate = f"{UPDATE_PICTURES}=1 pytest tests/test_docs.py -k {page.name!r} redraws it"
    for name in shown_pictures(page):
        if name in SCRIPT_PICTURES:
            continue
        drawn, shown = workdir / name, images / name
        assert drawn.is_file(), (
            f"{page.name} shows images/{name}, which its code no longer draws: a block of the page must write "
            f"{name} (the picture is the one its code makes), or list it in SCRIPT_PICTURES with the script that makes it"
        )
        if update:
            shutil.copyfile(drawn, shown)
            continue
        assert shown.is_file(), f"{page.name} shows images/{name}, which does not exist; {regenerate}"
        difference = picture_difference(shown, drawn)
        assert difference is not None and difference <= PICTURE_TOLERANCE, (
            f"{page.name}: images/{name} is not what the page's code draws now (RMS difference "
            f"{'of sizes' if difference is None else f'{difference:.1f}'} > {PICTURE_TOLERANCE}); {regenerate}"
        )


def test_every_picture_is_shown_and_made_by_its_page_or_a_named_script():
    shown = {name: page for page in pages() for name in shown_pictures(page)}
    files = {p.name for p in IMAGES.iterdir()}
    assert sorted(files - set(shown)) == [], "pictures in docs/images that no page shows"
    assert sorted(set(shown) - files) == [], "pictures a page shows that are not in docs/images"
    for name, script in SCRIPT_PICTURES.items():
        assert name in (ROOT / script).read_text(encoding="utf-8"), f"{script} does not make {name}"
    # What users would rather look at than prose: the history and the learning-rate finder, drawn by the code of
    # the page that documents them.
    made = {name: page.name for name, page in shown.items() if name not in SCRIPT_PICTURES}
    drawn_by = {
        name: [b.code for b in python_blocks(ROOT / "docs" / page) if b.runs and name in b.code]
        for name, page in made.items()
    }
    assert [n for n, blocks in drawn_by.items() if not blocks] == [], "pictures no block of their page names"
    codes = {n: "\n".join(blocks) for n, blocks in drawn_by.items()}
    assert any(".plot(" in c and "history" in c for c in codes.values()), "no page shows its History.plot"
    assert any("lr_find" in c and ".plot(" in c for c in codes.values()), "no page shows its lr_find curve"


def test_a_picture_the_page_no_longer_draws_fails(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    images, work = tmp_path / "images", tmp_path / "work"
    images.mkdir()
    work.mkdir()
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nfrom matplotlib.figure import Figure\n\nfigure = Figure(figsize=(2, 2))\n"
        "figure.subplots().plot([0, 1], [0, 1])\nfigure.savefig('line.png')\n```\n\n![a line](images/line.png)\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(work)
    run_page(page)
    with pytest.raises(AssertionError, match=r"shows images/line.png, which does not exist"):
        check_pictures(page, work, images)
    shutil.copyfile(work / "line.png", images / "line.png")
    check_pictures(page, work, images)  # the picture is what the code draws
    other = Figure(figsize=(2, 2))
    other.subplots().plot([0, 1], [1, 0])
    other.savefig(images / "line.png")
    with pytest.raises(AssertionError, match=r"images/line.png is not what the page's code draws now"):
        check_pictures(page, work, images)
    (work / "line.png").unlink()
    with pytest.raises(AssertionError, match=r"shows images/line.png, which its code no longer draws"):
        check_pictures(page, work, images)


def test_the_collector_finds_blocks_in_lists_and_comments_and_honours_notest(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\n- item\n\n    ```python\n    y = x + 1\n    ```\n\n"
        "<!--\n```python\nz = y + 1\n```\n-->\n\n```python {.notest}\nraise RuntimeError\n```\n\n"
        "```bash\nexit 1\n```\n\n```python\nassert z == 3\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [b.line for b in blocks] == [4, 10, 15, 20, 28]
    assert [b.runs for b in blocks] == [True, True, True, False, True]
    assert run_page(page) == 4


def test_a_failing_block_names_its_page_and_line(tmp_path):
    page = tmp_path / "broken.md"
    page.write_text("# t\n\n```python\nok = 1\n```\n\n```python\nundefined_name\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match=r"broken.md, the block at line 8 failed: NameError"):
        run_page(page)


def test_the_readme_and_every_guide_have_runnable_blocks():
    names = {page.name for page in PAGES}
    guides = {p.name for p in (ROOT / "docs").glob("*.md")} - {"changelog.md"}
    assert "README.md" in names
    assert guides <= names, f"guides without a runnable Python block: {sorted(guides - names)}"
    skipped = [f"{b.path.name}:{b.line}" for page in pages() for b in python_blocks(page) if not b.runs]
    runnable = sum(b.runs for page in pages() for b in python_blocks(page))
    assert len(skipped) <= max(3, runnable // 10), f"too many notest blocks (keep them rare): {skipped}"


# -- the API reference ------------------------------------------------------------------------------------------
REFERENCE = ROOT / "docs" / "api"

# mkdocstrings renders Markdown: a reST role (:meth:`fit`) would show as literal text on the site.
REST_ROLE = re.compile(r":(?:py:)?(?:meth|func|class|attr|mod|data|exc|obj|const|ref):`")


def test_docstrings_cross_reference_in_markdown_not_rest_roles():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "fitkit").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if REST_ROLE.search(line)
    ]
    assert not found, (
        "reST roles render as literal text in the reference; write [Trainer.fit][fitkit.Trainer.fit] for a name "
        "the reference documents, `name` otherwise:\n" + "\n".join(found)
    )


def _reference_entries() -> list[str]:
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(REFERENCE.glob("*.md")))
    return re.findall(r"^::: (\S+)", text, re.M)


def test_every_public_name_has_a_reference_entry():
    entries = set(_reference_entries())
    public = {f"fitkit.{n}" for n in fitkit.__all__ if n not in ("callbacks", "metrics")}
    public |= {f"fitkit.callbacks.{n}" for n in fitkit.callbacks.__all__}
    public |= {f"fitkit.metrics.{n}" for n in fitkit.metrics.__all__}
    public |= {f"fitkit.checkpoint.{n}" for n in ("atomic_save", "load", "verify", "trust", "CheckpointError")}
    # fitkit.Callback and fitkit.History are fitkit.callbacks.Callback and .History: one entry serves both.
    aliases = {"fitkit.Callback": "fitkit.callbacks.Callback", "fitkit.History": "fitkit.callbacks.History"}
    missing = sorted(n for n in public if n not in entries and aliases.get(n) not in entries)
    assert not missing, f"public names without a '::: name' entry in docs/api/: {missing}"


def _undocumented(path: str, obj: object, griffe: object) -> list[str]:
    """What the reference would show without a summary or an argument's description."""
    problems: list[str] = []

    def described(item: object) -> tuple[str, set[str]]:
        docstring = item.docstring  # type: ignore[attr-defined]
        if docstring is None or not docstring.value.strip():
            return "", set()
        names: set[str] = set()
        for section in docstring.parse("google"):
            if section.kind.value in ("parameters", "other parameters", "attributes"):
                names |= {p.name.lstrip("*") for p in section.value}
        return docstring.value.strip().splitlines()[0], names

    def arguments(function: object) -> list[str]:
        return [
            p.name
            for p in function.parameters  # type: ignore[attr-defined]
            if p.name not in ("self", "cls") and not p.name.startswith("_")
        ]

    def check_function(name: str, function: object, extra: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        summary, names = described(function)
        if not summary:
            problems.append(f"{name}: no docstring")
        else:
            missing = [a for a in arguments(function) if a not in names | extra]
            if missing:
                problems.append(f"{name}: arguments without a description: {missing}")

    target = obj.final_target if obj.is_alias else obj  # type: ignore[attr-defined]
    summary, names = described(target)
    if not summary:
        problems.append(f"{path}: no docstring")
    if target.is_function:
        check_function(path, target)
    elif target.is_class:
        init = target.members.get("__init__")
        if init is not None and not init.is_alias:
            init_summary, init_names = described(init)
            missing = [a for a in arguments(init) if a not in names | init_names]
            if missing:
                problems.append(f"{path}: arguments without a description: {missing}")
        for name, member in target.members.items():
            if name.startswith("_") or member.is_alias or not _shown(path, name):
                continue
            if member.is_function:
                check_function(f"{path}.{name}", member)
            elif "property" in member.labels and not described(member)[0]:
                problems.append(f"{path}.{name}: no docstring")
    return problems


def _shown(path: str, member: str) -> bool:
    """The reference shows a callback's hooks and state methods on Callback only (mkdocs.yml's filters)."""
    inherited = member.startswith("on_") or member in ("state_dict", "load_state_dict", "set_trainer")
    base = path in ("fitkit.callbacks.Callback", "fitkit.TrainerState", "fitkit.Trainer")
    if path.startswith(("fitkit.callbacks.", "fitkit.History")) and not base and inherited:
        return False
    logger_methods = ("log_epoch", "log_step", "log_validation", "end_run", "start_run")
    if path in ("fitkit.callbacks.TensorBoard", "fitkit.callbacks.CSVLogger", "fitkit.callbacks.MLflowLogger"):
        return member not in logger_methods
    return True


def test_every_reference_entry_has_a_summary_and_documents_its_arguments():
    griffe = pytest.importorskip("griffe", reason="the docs extra: pip install -e '.[docs]'")
    package = griffe.load("fitkit", search_paths=[str(ROOT)], docstring_parser="google")
    problems = []
    for entry in _reference_entries():
        if entry == "fitkit.checkpoint":  # the module's own text, members listed one by one
            continue
        problems += _undocumented(entry, package[entry.removeprefix("fitkit.")], griffe)
    assert not problems, (
        "docstrings to fix (a reference entry needs a summary and every argument described, Google style: "
        "Args:/Returns:/Raises:):\n" + "\n".join(problems)
    )


# -- the built site: what the Markdown says is what the reader sees -------------------------------------------
def _heading_text(markup: str) -> str:
    """A heading's visible text, from Markdown or from HTML: no tags, links, code marks, ids or permalinks."""
    import html

    text = re.sub(r"<[^>]+>", "", markup)  # HTML tags
    text = re.sub(r"\{[#.][^}]*\}\s*$", "", text)  # attr_list {#id}
    text = re.sub(r"\[([^\]]*)\]\[[^\]]*\]|\[([^\]]*)\]\([^)]*\)", lambda m: m[1] or m[2] or "", text)
    text = html.unescape(text).replace("¶", "").replace("`", "").replace("**", "").replace("*", "")
    return " ".join(text.split())


def _markdown_headings(page: Path) -> list[str]:
    """The ATX headings of a page, outside fenced blocks and HTML comments."""
    text = re.sub(r"<!--.*?-->", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings: list[str] = []
    fence: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None:
            if opening := re.match(r"(`{3,}|~{3,})", stripped):
                fence = opening[1]
            elif heading := re.match(r"#{1,6}\s+(.*)", line):
                headings.append(_heading_text(heading[1]))
        elif stripped.startswith(fence) and not stripped.strip(fence[0]):
            fence = None
    return headings


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import contextlib

    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    site = tmp_path_factory.mktemp("site")
    with warnings.catch_warnings(), contextlib.chdir(ROOT):  # snippets' base_path "." is the repository
        warnings.simplefilter("ignore")
        build(load_config(str(ROOT / "mkdocs.yml"), site_dir=str(site), strict=False))
    return site


def _built_page(site: Path, page: Path) -> Path:
    relative = page.relative_to(ROOT / "docs").with_suffix("")
    return site / "index.html" if relative.name == "index" else site / relative / "index.html"


@pytest.mark.slow  # builds the whole site (~20 s)
@pytest.mark.parametrize("page", sorted((ROOT / "docs").rglob("*.md")), ids=_ids)
def test_every_heading_of_the_page_is_a_heading_of_its_built_page_and_no_fence_leaks(page, built_site):
    built = _built_page(built_site, page).read_text(encoding="utf-8")
    shown = {_heading_text(h) for _, h in re.findall(r"<h([1-6])[^>]*>(.*?)</h\1>", built, flags=re.S)}
    missing = [h for h in _markdown_headings(page) if h not in shown]
    assert not missing, (
        f"{page.name}: these headings are not headings on the built page (swallowed by a fence?): {missing}"
    )
    leaked = [c[:60] for c in re.findall(r"<p><code>([^<]*)</code>", built) if "\n" in c]
    assert not leaked, (
        f"{page.name}: a fenced block renders as inline code (a fence MkDocs did not recognise): {leaked}"
    )
    assert "```" not in re.sub(r"<pre.*?</pre>|<code>.*?</code>", "", built, flags=re.S), (
        f"{page.name}: a raw ``` shows"
    )


def test_a_flag_written_as_a_bare_word_after_the_language_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python slow\nx = 1\n```\n\n## Swallowed\n")
    with pytest.raises(ValueError, match=r"'python slow': write flags as classes in braces, ```python \{\.slow\}"):
        python_blocks(page)


def test_every_message_the_troubleshooting_page_names_is_raised_by_fitkit():
    """Each heading of docs/troubleshooting.md is the fixed part of a message: it must still be in fitkit's code."""
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "fitkit").rglob("*.py"))
    page = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    messages = re.findall(r"^## `(.+)`$", page, flags=re.M)
    assert len(messages) >= 10
    gone = [m for m in messages if m not in source]
    assert not gone, f"docs/troubleshooting.md names messages fitkit no longer raises: {gone}"


def test_the_examples_gallery_names_every_example():
    page = (ROOT / "docs" / "examples.md").read_text(encoding="utf-8")
    scripts = sorted(p.name for p in (ROOT / "examples").iterdir() if p.suffix in (".py", ".ipynb"))
    assert [s for s in scripts if f"`examples/{s}`" not in page] == []
