"""Stage 2: generate_views.py, the data engine."""

import json
import os
import subprocess
import sys

import pytest
import torch

import render
import train_lrm
from conftest import ROOT, kill_when, linked_world, one_line_error, run_script


def engine(out, *extra):
    return ["generate_views.py", "--preset", "micro", "--out", out, *extra]


def folders(out):
    return sorted(p.name for p in (out / "2_views").iterdir() if p.is_dir())


def same_orbit(a, b):
    """Same prompt, same per-prompt noise -> the same pictures up to float rounding (BLAS kernels
    differ with batch size and thread count), while another noise would differ by tens of grey
    levels."""
    assert sorted(f.name for f in a.iterdir()) == sorted(f.name for f in b.iterdir())
    assert (a / "prompt.txt").read_text() == (b / "prompt.txt").read_text()
    for f in sorted(a.glob("*.png")):
        x, y = render.load_png(f)[0], render.load_png(b / f.name)[0]
        assert (x - y).abs().mean() < 1 / 255 and (x - y).abs().max() < 24 / 255, f


def test_micro_generation_writes_folders_the_lrm_loader_reads(micro1, tmp_path):
    out = linked_world(tmp_path / "run", micro1)
    p = run_script(*engine(out))
    assert "stage 2 done" in p.stdout
    names = folders(out)
    assert len(names) == 8 and not any(n.startswith(".") for n in names)
    data = train_lrm.load_set(out / "2_views", 16, "python generate_views.py")
    assert data["images"].shape == (8, 4, 3, 16, 16) and data["masks"].shape == (8, 4, 1, 16, 16)
    ob = render.load_object(out / "2_views" / names[0])
    assert torch.allclose(ob["c2w"], render.orbit(4)[0])
    assert ob["prompt"] == (micro1 / "0_data/prompts.txt").read_text().splitlines()[0]
    meta = render.read_meta(out / "2_views", "x")
    assert meta["counts"] == {"prompts": 8, "kept": 8, "rejected": 0}
    assert "filter" in meta and "orbits_per_minute" in meta
    rows = json.loads((out / "2_views/metrics.json").read_text())["rows"]
    assert {"synthetic", "synthetic_far"} <= set(rows)
    assert (out / "2_views/preview.png").is_file()


def test_filter_rejects_bad_orbits_and_reports_why():
    import generate_views

    cfg = generate_views.Config()
    good = torch.ones(4, 3, 16, 16)
    good[:, :, 5:11, 5:11] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    assert generate_views.judge(good, cfg) is None
    empty = good.clone()
    empty[2] = 1
    assert generate_views.judge(empty, cfg) == "empty_view"
    flood = good.clone()
    flood[1] = 0.2
    assert generate_views.judge(flood, cfg) == "flooded_view"
    jump = good.clone()
    jump[3, :, 2:14, 2:14] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    assert generate_views.judge(jump, cfg) == "area_jump"
    drift = good.clone()
    drift[2, :, 5:11, 5:11] = torch.tensor([0.1, 0.2, 0.9])[:, None, None]
    assert generate_views.judge(drift, cfg) == "colour_drift"


def test_killed_run_restarted_finishes_every_prompt_once(micro1, tmp_path):
    killed = linked_world(tmp_path / "killed", micro1)
    cmd = engine(killed, "--num", "16", "--batch", "2", "--n_eval", "1")
    kill_when(cmd, lambda: len([p for p in (killed / "2_views").glob("0*") if p.is_dir()]) >= 4)
    assert 4 <= len(folders(killed)) < 16
    run_script(*cmd)
    clean = linked_world(tmp_path / "clean", micro1)
    run_script(*engine(clean, "--num", "16", "--batch", "3", "--n_eval", "1"))
    assert folders(killed) == folders(clean) == [f"{i:05d}" for i in range(16)]
    # per-prompt noise: the same as an uninterrupted run
    for name in folders(clean):
        same_orbit(clean / "2_views" / name, killed / "2_views" / name)


def test_two_ranks_split_the_prompts(micro1, tmp_path):
    out = linked_world(tmp_path / "ddp", micro1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    flags = engine(out, "--num", "6", "--n_eval", "1", "--device", "cpu")[1:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd = [*torchrun, "--master_port", "29611", "generate_views.py", "--", *map(str, flags)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert folders(out) == [f"{i:05d}" for i in range(6)]
    solo = linked_world(tmp_path / "solo", micro1)
    run_script(*engine(solo, "--num", "6", "--n_eval", "1"))
    for name in folders(solo):
        same_orbit(solo / "2_views" / name, out / "2_views" / name)


@pytest.mark.parametrize("case", ["empty_prompts", "binary_prompts", "corrupt_images", "no_stage1"])
def test_bad_inputs_get_one_line_errors_and_write_nothing(case, micro1, micro, tmp_path):
    stages = ("0_data",) if case == "no_stage1" else ("0_data", "1_video")
    out = linked_world(tmp_path / "run", micro1, stages)
    extra = []
    if case == "empty_prompts":
        (tmp_path / "p.txt").write_text("\n\n")
        extra = ["--prompts", tmp_path / "p.txt"]
    elif case == "binary_prompts":
        (tmp_path / "p.txt").write_bytes(bytes(range(256)) * 4)
        extra = ["--prompts", tmp_path / "p.txt"]
    elif case == "corrupt_images":  # (one bad image among good ones is skipped: test_hostile)
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs/a.png").write_bytes(b"\x89PNG broken")
        (tmp_path / "imgs/b.png").write_bytes(b"not an image at all")
        extra = ["--images", tmp_path / "imgs"]
    p = run_script(*engine(out, *extra), check=False)
    assert one_line_error(p), p.stderr
    assert not (out / "2_views").exists()
    if case == "no_stage1":  # both ways on: train stage 1, or start from the shipped model
        assert "python finetune_video.py" in p.stderr and "--video_model weights/" in p.stderr


def test_images_as_prompts(micro1, tmp_path):
    out = linked_world(tmp_path / "run", micro1)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image

    # RGBA, other size
    Image.open(micro1 / "0_data/images/00001.png").resize((40, 40)).save(imgs / "big.png")
    (imgs / "captions.txt").write_text("big\ta small red cone\n")
    p = run_script(*engine(out, "--images", imgs, "--n_eval", "1"))
    assert "resized" in p.stdout and folders(out) == ["big"]
    assert (out / "2_views/big/prompt.txt").read_text().strip() == "a small red cone"
