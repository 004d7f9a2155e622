"""Stage 5 and the whole pipeline: run_all.sh at the micro preset, infer.py's outputs and errors."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import infer
import model
import render
from conftest import ROOT, one_line_error, run_script
from test_meshes import read_glb
from test_render import read_obj, read_ply


def run_all(*args, timeout=600):
    """`bash run_all.sh args...` from the repository root; it must succeed. -> its output."""
    cmd = ["bash", "run_all.sh", *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def run_infer(out, *args, check=True):
    """`python infer.py --preset micro --out <out> args...`; -> the CompletedProcess."""
    return run_script("infer.py", "--preset", "micro", "--out", out, *args, check=check)


@pytest.fixture(scope="module")
def pipeline(micro1, tmp_path_factory):
    """Every stage, 0 to 5 and the table, exactly as the README's first command runs them. Stages
    0-1 start from a copy of the session's micro world (their own tests train them), so run_all.sh
    must find them finished, skip their work and go on: the restart of an interrupted run."""
    out = tmp_path_factory.mktemp("pipeline")
    for stage in ("0_data", "1_video"):
        shutil.copytree(micro1 / stage, out / stage, symlinks=True)
    log = run_all("micro", out, timeout=900)
    assert "0 rendered now" in log and "resuming video_model" in log
    return out


def test_run_all_writes_every_stage_and_the_table(pipeline):
    for stage in ("0_data", "1_video", "2_views", "3_lrm", "4_finetune", "4_from_scratch"):
        assert (pipeline / stage / "meta.json").is_file(), stage
    rows = json.loads((pipeline / "table/metrics.json").read_text())["rows"]
    expected = {"A_3d_only", "B_synthetic_only", "C_synthetic_then_3d", "copy_input", "sphere"}
    assert expected <= set(rows)
    keys = {"psnr", "ssim", "color_err", "chamfer_l1", "fscore", "category_acc", "color_acc"}
    assert keys <= set(rows["C_synthetic_then_3d"])
    splits = json.loads((pipeline / "table/metrics.json").read_text())["splits"]
    for split in ("seen", "unseen"):  # the same rows on each split, as DESIGN.md shows
        assert expected <= set(splits[split]["rows"]) and splits[split]["n_objects"] > 0
    text = (pipeline / "table/table.md").read_text()
    assert "### seen categories" in text and "### unseen categories" in text
    page = (pipeline / "index.html").read_text()  # one page to look at; every picture it shows
    links = re.findall(r"src='([^']+)'", page)
    assert len(links) >= 10 and all((pipeline / link).is_file() for link in links)
    assert list((pipeline / "table").glob("compare_[0-9].gif"))
    s3, s4, s_a = (
        json.loads((pipeline / stage / "meta.json").read_text())["config"]["steps"]
        for stage in ("3_lrm", "4_finetune", "4_from_scratch")
    )
    assert s_a == s3 + s4  # same total steps


def test_scaling_step_trains_c_on_parts_of_the_synthetic_set(pipeline):
    run_all("scaling", "micro", pipeline)
    kept = len([d for d in (pipeline / "2_views").iterdir() if d.is_dir()])
    cells = [line.split("|") for line in (pipeline / "table/scaling.md").read_text().splitlines()]
    parts = ("sixteenth", "quarter", "half", "then_3d")
    curve = [f"C_synthetic_{part}" for part in parts]
    for split in ("all", "seen", "unseen"):
        lines = [c for c in cells[2:] if c[3].strip() == split]
        assert [int(c[1]) for c in lines] == [max(1, kept // 16), kept // 4, kept // 2, kept]
        assert [c[2].strip() for c in lines] == curve
    table = json.loads((pipeline / "table/metrics.json").read_text())
    assert set(curve) <= set(table["splits"]["unseen"]["rows"])


def test_scarce_step_trains_a_and_c_on_a_quarter_of_the_real_assets(pipeline):
    run_all("scarce", "micro", pipeline)
    n = len([d for d in (pipeline / "0_data/assets/train").iterdir() if d.is_dir()]) // 4
    a, c, b3 = (
        json.loads((pipeline / s / "metrics.json").read_text())
        for s in ("4_from_scratch_scarce", "4_finetune_scarce", "3_lrm")
    )
    assert a["train_objects"] == c["train_objects"] == n
    assert a["steps"] == b3["steps"] + c["steps"]  # same total steps
    rows = json.loads((pipeline / "table/metrics.json").read_text())["rows"]
    assert {"A_3d_only_scarce", "C_synthetic_then_3d_scarce"} <= set(rows)
    curve = (pipeline / "table/scaling_scarce.md").read_text().splitlines()[2:]
    unseen = [line for line in curve if line.split("|")[3].strip() == "unseen"]
    assert len(unseen) == 1 + len(list(pipeline.glob("scaling/*/3_lrm/lrm.safetensors")))
    assert list((pipeline / "table").glob("compare_scarce_*.gif"))  # (A) | (C) with 1/4 real


def test_inference_writes_every_file_and_meshes_parse_back(pipeline):
    lrm, _ = model.load_lrm(pipeline / "4_finetune/lrm.safetensors", "x")
    img = render.load_object(pipeline / "0_data/assets/test_unseen/00001")["images"][:1]
    with torch.no_grad():
        planes = lrm(img, model.camera_vector(model.CANONICAL[None], render.orbit(1)[1]))
        # untrained: pick a level with a surface
        level = lrm.field(planes, torch.rand(1, 4000, 3) * 2 - 1)[0].median().item()
    image = pipeline / "0_data/assets/test_unseen/00001/000.png"
    p = run_infer(pipeline, "--image", image, "--name", "t", "--mesh_level", level)
    folder = pipeline / "5_infer/t"
    for f in ("input.png", "mesh.obj", "mesh.ply", "mesh.glb", "turntable.gif", "views/000.png"):
        assert (folder / f).is_file(), f
    assert "triplane" in p.stdout and "mesh" in p.stdout and "turntable" in p.stdout
    ov, of, oc = read_obj(folder / "mesh.obj")
    pv, pf, pc = read_ply(folder / "mesh.ply")
    z_up = ov[:, [0, 2, 1]] * np.array([1.0, -1.0, 1.0])  # the OBJ is +Y up, the PLY +z up
    assert len(ov) > 0 and len(of) > 0 and np.allclose(z_up, pv, atol=1e-4) and (of == pf).all()
    assert oc.shape == (len(ov), 3) and 0 <= oc.min() and oc.max() <= 1
    assert np.abs(pc / 255 - oc).max() < 1 / 255 + 1e-3
    gltf, _ = read_glb(folder / "mesh.glb")
    assert gltf["accessors"][0]["count"] == len(ov) and gltf["accessors"][2]["count"] == of.size


def test_framing_keeps_training_views_and_recentres_others():
    ob = torch.ones(3, 32, 32)
    ob[:, 10:22, 11:21] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]
    assert torch.equal(infer.frame_object(ob, 32), ob)  # already framed: unchanged
    # small, off-centre, larger image
    big = torch.ones(3, 200, 300)
    big[:, 20:60, 200:260] = torch.tensor([0.1, 0.3, 0.9])[:, None, None]
    out = infer.frame_object(big, 32)
    mask = render.object_mask(out)
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    assert out.shape == (3, 32, 32)
    assert abs((rows[0] + rows[-1]) / 2 - 15.5) <= 1.5
    assert abs((cols[0] + cols[-1]) / 2 - 15.5) <= 1.5
    assert 0.25 <= (cols[-1] - cols[0] + 1) / 32 <= 0.45


def test_bad_inputs(pipeline, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG nope")
    p = run_infer(pipeline, "--image", tmp_path / "bad.png", check=False)
    assert one_line_error(p) and "bad.png" in p.stderr
    Image.new("RGB", (64, 64), "white").save(tmp_path / "white.png")
    p = run_infer(pipeline, "--image", tmp_path / "white.png", check=False)
    assert one_line_error(p) and "no object" in p.stderr
    video = pipeline / "1_video/video_model.safetensors"
    p = run_infer(pipeline, "--image", tmp_path / "white.png", "--model", video, check=False)
    assert one_line_error(p) and "expected 'lrm'" in p.stderr
    p = run_infer(pipeline, "--prompt", "a shiny red mug with a blue handle", "--name", "txt")
    assert p.returncode == 0 and "warning: unknown words shiny" in p.stdout
    assert (pipeline / "5_infer/txt/mesh.obj").is_file()
    # an empty mesh (the micro model is barely trained) is said out loud, never silent
    if " 0 vertices" in p.stdout:
        assert "warning: txt: empty mesh: the density peaks at" in p.stdout, p.stdout


def test_eval_and_the_true_surface_against_itself(pipeline):
    p = run_infer(pipeline, "--eval", pipeline / "0_data/assets", "--name", "ev")
    rows = json.loads((pipeline / "5_infer/ev/metrics.json").read_text())["rows"]
    assert {"lrm", "sphere", "copy_input"} <= set(rows) and "chamfer_l1" in rows["lrm"]
    assert "lrm" in p.stdout
    surf, _ = render.load_tensors(pipeline / "0_data/assets/test_seen/00000/surface.safetensors")
    assert model.chamfer_fscore(surf["points"], surf["points"]) == (0.0, 1.0)


def test_the_near_mesh_turntable_equals_the_plain_one():
    """Rays near the mesh only (infer.turntable) against every ray (infer.turntable_plain): the
    same frames but where the field is empty, with the shipped LRM on a held-out view."""
    lrm, _ = model.load_lrm(ROOT / "weights/lrm_tiny.safetensors", "x")
    obj = render.world_object(render.Config(), "test_unseen", 0)
    c2w, K = render.orbit(4)
    rgba, _ = render.render_views(
        render.pack([obj]), torch.zeros(1, dtype=torch.long), c2w[:1], K[:1], 32
    )
    with torch.no_grad():
        planes = lrm(render.on_white(rgba), model.camera_vector(model.CANONICAL[None], K[:1]))
        v, _, _ = model.lrm_mesh(lrm, planes[0], 32, 5.0)
        fast = infer.turntable(lrm, planes, v, (c2w, K), 32, (16, 16))
        plain = infer.turntable_plain(lrm, planes, (c2w, K), 32, (16, 16))
    assert len(v) and -10 * torch.log10(((fast - plain) ** 2).mean()) > 40
