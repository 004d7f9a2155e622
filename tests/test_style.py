"""The code reads in one sitting: one formatter, a few lint rules, and the line budgets.

ruff is configured in pyproject.toml (100 columns; E7 statements, lambda assignment, ambiguous
names, at most 8 arguments). The budgets are the house's (STYLE.md), in formatted lines.
"""

import ast
import importlib
import subprocess
import sys

import pytest

import render
from conftest import ROOT

SCRIPTS = ["finetune_video.py", "generate_views.py", "train_lrm.py", "finetune_3d.py", "infer.py"]
BUDGETS = {"render.py": 900, "model.py": 800} | {name: 400 for name in SCRIPTS}


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


# Over their budgets (issue #19 stays open until they are not): finetune_video.py (and the phase
# classifier), render.py since world v2's categories and the meshes in and out, model.py since the
# classifier. Strict, so this test fails the day a file fits: then drop its mark.
OVER = {"finetune_video.py", "render.py", "model.py"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(strict=True)) if n in OVER else n for n in BUDGETS],
)
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


@pytest.mark.parametrize("name", ["render.py", *SCRIPTS])
def test_every_flag_has_its_comment_in_help(name):
    """--help shows each Config field's comment (render.field_comments): none may be missing."""
    config = importlib.import_module(name.removesuffix(".py")).Config
    comments = render.field_comments(config)
    for field in config.__dataclass_fields__:
        assert comments.get(field, (None, ""))[1], f"{name}: Config.{field} has no # comment"
