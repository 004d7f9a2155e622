"""The code reads in one sitting: one formatter, a few lint rules, the budgets, and the maps.

ruff is configured in pyproject.toml (100 columns; E7 statements, lambda assignment, ambiguous
names, at most 8 arguments). The budgets are in formatted lines (the files are formatted: the
first test checks it); parallel assignments count `a, b = x, y` statements.
"""

import ast
import importlib
import re
import subprocess
import sys

import pytest

import render
from conftest import ROOT

SCRIPTS = ["finetune_video.py", "generate_views.py", "train_lrm.py", "finetune_3d.py", "infer.py"]
BUDGETS = {name: 400 for name in SCRIPTS} | {"finetune_video.py": 650}
# The aim for the shared modules is render.py 1,450 and model.py 1,100 lines; with the video prior
# and the input checks they hold 1,842 and 1,160 (docs/log.md, 2026-12-07, "the house
# re-planned"). These ceilings stop them growing until they are cut.
BUDGETS |= {"render.py": 1845, "model.py": 1160}


def ruff(*args):
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_ruff_format_and_check_pass():
    targets = [*BUDGETS, "tests"]
    formatted = ruff("format", "--check", *targets)
    assert formatted.returncode == 0, f"run `ruff format`:\n{formatted.stdout}{formatted.stderr}"
    checked = ruff("check", *targets)
    assert checked.returncode == 0, f"`ruff check` found:\n{checked.stdout}{checked.stderr}"


@pytest.mark.parametrize("name", list(BUDGETS))
def test_files_keep_their_budgets(name):
    lines = (ROOT / name).read_text().count("\n")
    assert lines <= BUDGETS[name], f"{name}: {lines} lines, over its budget of {BUDGETS[name]}"


@pytest.mark.parametrize("name", list(BUDGETS))
def test_functions_keep_their_budgets(name):
    for node in ast.walk(ast.parse((ROOT / name).read_text())):
        if isinstance(node, ast.FunctionDef):
            size = node.end_lineno - node.lineno + 1
            n_args = len(node.args.posonlyargs) + len(node.args.args) + len(node.args.kwonlyargs)
            assert size <= 60, f"{name}: {node.name} is {size} lines (at most 60)"
            assert n_args <= 8, f"{name}: {node.name} takes {n_args} parameters (at most 8)"


@pytest.mark.parametrize("name", list(BUDGETS))
def test_few_parallel_assignments(name):
    """At most 8 statements `a, b = x, y` per 1,000 lines: values that come as a pair only."""
    source = (ROOT / name).read_text()
    packed = [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Tuple)
        and isinstance(node.value, ast.Tuple)
    ]
    lines = sum(1 for line in source.splitlines() if line.strip())
    assert len(packed) * 1000 <= 8 * lines, f"{name}: parallel assignments at lines {packed}"


def banners(source):
    """The parts ('# Part N: title' between '# ===' rules) and each part's sections (the titles at
    the end of '# ---' rules) -> [(part, [sections])]."""
    parts = []
    for line in source.splitlines():
        part = re.match(r"# ((?:Part \d+|Appendix): .+)$", line)
        section = re.match(r"# -{20,} (.+)$", line)
        if part:
            parts.append((part[1], []))
        elif section and parts:
            parts[-1][1].append(section[1])
    return parts


def contents_map(doc):
    """The module docstring's map: each part's title line, then indented lines of its sections
    ('a | b | c') and who uses it ('used by ...') -> [(part, [sections])]."""
    found = []
    for line in doc.splitlines():
        if re.match(r"(Part \d+|Appendix): ", line):
            found.append((line.strip(), []))
        elif line.startswith("    ") and found and not line.strip().startswith("used by"):
            found[-1][1].extend(line.strip().split(" | "))
    return found


@pytest.mark.parametrize("name", ["render.py", "model.py"])
def test_shared_modules_open_with_a_map_that_matches_their_banners(name):
    source = (ROOT / name).read_text()
    doc = ast.get_docstring(ast.parse(source))
    assert "Contents" in doc and "Shapes:" in doc, f"{name}: no contents map or shape legend"
    assert contents_map(doc) == banners(source), f"{name}: the map and the banners differ"


@pytest.mark.parametrize("name", ["render.py", *SCRIPTS])
def test_every_flag_has_its_comment_in_help(name):
    """--help shows each Config field's comment (render.field_comments): none may be missing."""
    config = importlib.import_module(name.removesuffix(".py")).Config
    comments = render.field_comments(config)
    for field in config.__dataclass_fields__:
        assert comments.get(field, (None, ""))[1], f"{name}: Config.{field} has no # comment"


def test_the_readme_reading_guide_names_functions_that_exist():
    """Each row of the README's reading guide, `| file | function |`, names a real function."""
    rows = re.findall(r"^\| `(\w+\.py)` \| `([\w.]+)` \|", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) >= 15
    for file, name in rows:
        obj = importlib.import_module(file.removesuffix(".py"))
        for part in name.split("."):
            obj = getattr(obj, part, None)
            assert obj is not None, f"README: {file} has no {name}"
