"""Shared fixtures: one micro world per test session, and helpers to run the scripts as a
student would."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_script(*args, check=True, timeout=600):
    """Run `python <script> args...` from the repository root; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def one_line_error(p):
    """A bad input must give a non-zero exit, one line on stderr and no traceback."""
    lines = [line for line in p.stderr.splitlines() if line.strip() and "%|" not in line]
    return (
        p.returncode != 0
        and len(lines) == 1
        and lines[0].startswith("error:")
        and "Traceback" not in p.stderr
    )


def kill_when(cmd, ready, timeout=120):
    """Start `python cmd...` and SIGKILL it as soon as ready() is true
    (or after timeout seconds)."""
    proc = subprocess.Popen(
        [sys.executable, *map(str, cmd)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_at_checkpoint(cmd, state, min_step, timeout=120):
    """SIGKILL `python cmd...` once its checkpoint `state` holds step >= min_step; -> that step."""
    import render

    def step():
        """The step the checkpoint holds, or -1 before the first one is written."""
        return int(render.load_tensors(state)[1]["step"]) if state.is_file() else -1

    kill_when(cmd, lambda: step() >= min_step, timeout)
    return step()


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """Stage 0 at the micro preset, shared by every test that needs data."""
    out = tmp_path_factory.mktemp("micro")
    run_script("render.py", "--preset", "micro", "--out", out)
    return out


@pytest.fixture(scope="session")
def micro1(micro):
    """Stage 1 at the micro preset (all three phases) on the shared micro world."""
    if not (micro / "1_video/meta.json").is_file():
        run_script("finetune_video.py", "--preset", "micro", "--out", micro)
    return micro


def linked_world(root, micro, stages=("0_data", "1_video")):
    """A fresh --out folder whose earlier stages are links to the shared micro run."""
    root.mkdir(parents=True, exist_ok=True)
    for s in stages:
        (root / s).symlink_to(micro / s)
    return root
