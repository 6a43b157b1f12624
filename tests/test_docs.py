"""The README and docs/: tables render, relative links resolve, the README stays short with its install line and
Python example up front, docs/cli.md equals `--help`, and the README's Python example and CLI quickstart run on a
tiny model."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gisp_fx

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

README_MAX_BYTES = 12 * 1024
UP_FRONT_BYTES = 4 * 1024


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fence = [], None
    for no, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*(`{3,}|~{3,})", line)
        if m:
            if fence is None:
                fence = m.group(1)[0] * len(m.group(1))
            elif m.group(1).startswith(fence):
                fence = None
            continue
        if fence is None:
            out.append((no, line))
    return out


def _cells(row: str) -> list[str]:
    """Cells of a GFM table row: split on pipes not escaped with a backslash (code spans do not protect a pipe)."""
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    return re.split(r"(?<!\\)\|", row)


DELIMITER = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")


def tables(text: str):
    """Yield (line number, header cells, [(line number, row cells)]) for every table, and raise on a row that
    belongs to no table (a table cut by a blank line or a paragraph)."""
    lines = _prose_lines(text)
    i = 0
    while i < len(lines):
        no, line = lines[i]
        if line.lstrip().startswith("|"):
            if i + 1 >= len(lines) or lines[i + 1][0] != no + 1 or not DELIMITER.match(lines[i + 1][1].strip()):
                raise AssertionError(f"line {no}: a table row outside any table (cut by a blank line or text?): "
                                     f"{line[:80]}")
            header, rows = _cells(line), []
            i += 2
            while i < len(lines) and lines[i][0] == lines[i - 1][0] + 1 and lines[i][1].lstrip().startswith("|"):
                rows.append((lines[i][0], _cells(lines[i][1])))
                i += 1
            yield no, header, rows
            continue
        i += 1


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_table_row_has_the_headers_column_count(page):
    text = page.read_text()
    bad = [f"line {no}: {len(cells)} cells, header (line {hno}) has {len(header)}"
           for hno, header, rows in tables(text) for no, cells in rows if len(cells) != len(header)]
    assert not bad, f"{page.name}:\n" + "\n".join(bad)


def test_the_table_check_catches_the_breakages_it_is_for():
    cut = "| a | b |\n|---|---|\n| 1 | 2 |\n\n| 3 | 4 |\n"
    with pytest.raises(AssertionError, match="outside any table"):
        list(tables(cut))
    code_pipe = "| a | b |\n|---|---|\n| `x |y|` | 2 |\n"
    (_, header, rows), = tables(code_pipe)
    assert len(rows[0][1]) != len(header)  # a pipe in a code span splits the cell on GitHub too
    escaped = "| a | b |\n|---|---|\n| `x \\|y\\|` | 2 |\n```\n| not | a | table |\n```\n"
    (_, header, rows), = tables(escaped)
    assert len(rows[0][1]) == len(header)


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for _, line in _prose_lines(page.read_text()):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base, n = slug(m.group(1)), 1
            name = base
            while name in found:
                name, n = f"{base}-{n}", n + 1
            found.add(name)
    return found


def relative_links(page: Path):
    for no, line in _prose_lines(page.read_text()):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            yield no, target


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_relative_link_points_to_a_file_that_exists(page):
    bad = []
    for no, target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"line {no}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"line {no}: {target}: no heading with that anchor in {dest.name}")
    assert not bad, f"{page.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_no_page_links_the_method_specs_that_are_not_in_the_repository():
    for page in PAGES:
        text = page.read_text()
        assert "GISP_SPEC" not in text and "PG_SPEC" not in text, page.name


def test_readme_is_short_with_the_install_line_and_a_python_example_up_front():
    raw = README.read_bytes()
    assert len(raw) <= README_MAX_BYTES, f"README.md is {len(raw):,} bytes, over {README_MAX_BYTES:,}"
    head = raw[:UP_FRONT_BYTES].decode("utf-8", "ignore")
    assert "pip install" in head and "make compile" in head
    start = head.find("```python")
    assert start >= 0 and head.find("\n```", start + 9) > 0, "a whole ```python block within the first 4 KB"


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # one subprocess per command
def test_cli_reference_equals_help():
    gen = _gen_cli()
    expected = gen.render()
    assert gen.CLI_MD.read_text() == expected, "docs/cli.md differs from --help: run `python docs/gen_cli.py`"
    for cmd in gen.commands():
        assert f"## gisp-fx {cmd}" in expected


def _block(lang: str, after: str | None = None) -> str:
    text = README.read_text()
    if after is not None:
        text = text[text.index(after):]
    m = re.search(rf"```{lang}\n(.*?)\n```", text, re.S)
    assert m, f"no ```{lang} block" + (f" after {after!r}" if after else "")
    return m.group(1)


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"the README's example no longer contains {old!r}: update tests/test_docs.py"
    return text.replace(old, new)


@pytest.mark.skipif(not hasattr(gisp_fx, "prune_"), reason="the Python API (gisp_fx.prune_) is not in this checkout")
def test_readme_python_example_runs_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):
    code = _block("python")
    code = _replace(code, '"smollm2"', repr(tiny_folder("llama-gqa")))
    code = _replace(code, "gx.GispConfig(sparsity=0.5)", "gx.GispConfig(sparsity=0.3, steps=2)")
    code = _replace(code, "windows=64, seq_len=128", "windows=8, seq_len=32")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (python example)", "exec"), namespace)
    result = namespace["result"]
    assert 0.25 <= result.sparsity <= 0.35
    assert (tmp_path / "runs/mine/config.json").is_file()
    assert (tmp_path / "runs/mine-onnx/model.onnx").is_file()
    import transformers

    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "runs/mine", trust_remote_code=True)
    assert saved.num_parameters() == namespace["loaded"].model.num_parameters()  # the pruned model was saved


FAST = "--steps 2 --calib-samples 8 --seq-len 32 --eval-windows 8"


@pytest.mark.slow
def test_readme_cli_quickstart_runs_on_a_tiny_model(tiny_folder, tmp_path):
    commands = [line for line in _block("bash", after="## CLI quickstart").splitlines() if line.strip()]
    assert [c.split()[0] + " " + c.split()[1] for c in commands if c.startswith("gisp-fx")] == [
        "gisp-fx inspect", "gisp-fx compile", "gisp-fx export", "gisp-fx eval"]
    folder = tiny_folder("llama-gqa")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for command in commands:
        command = re.sub(r"\bsmollm2\b", folder, command)
        if command.startswith("gisp-fx compile"):
            command = re.sub(r"\s+#\s.*$", "", command) + " " + FAST  # a quick compile of the same command
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (tmp_path / "runs/pruned/report.json").is_file()
    assert (tmp_path / "runs/pruned-onnx/model.onnx").is_file()
