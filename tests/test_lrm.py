"""Stages 3-4: the LRM in model.py, train_lrm.py and finetune_3d.py."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import model
import render
import train_lrm
from conftest import ROOT, kill_at_checkpoint, one_line_error, run_script

MICRO = train_lrm.Config(**train_lrm.PRESETS["micro"])


def micro_lrm(**kw):
    torch.manual_seed(0)
    return model.LRM(dataclasses.replace(train_lrm.lrm_config(MICRO, 16), **kw))


def test_lrm_shapes_at_micro():
    lrm = micro_lrm()
    img = torch.rand(2, 3, 16, 16)
    c2w, K = render.orbit(4)
    cam = model.camera_vector(c2w[:2], K[:2])
    planes = lrm(img, cam)
    assert planes.shape == (2, 3, MICRO.plane_ch, 16, 16)
    sigma, rgb = lrm.field(planes, torch.rand(2, 50, 3) * 2 - 1)
    assert (
        sigma.shape == (2, 50)
        and rgb.shape == (2, 50, 3)
        and (sigma >= 0).all()
        and rgb.min() >= 0
        and rgb.max() <= 1
    )
    out, acc = lrm(
        img,
        cam,
        c2w[None].expand(2, 4, 4, 4),
        K[None].expand(2, 4, 3, 3),
        16,
        (torch.tensor([0] * 8), torch.tensor([4] * 8), 8),
    )
    assert out.shape == (2, 4, 3, 8, 8) and acc.shape == (2, 4, 1, 8, 8)
    assert model.camera_vector(c2w, K).shape == (4, 16)


def test_triplane_layout_and_lifted_tokens_agree():
    P = 8
    g = (torch.arange(P) + 0.5) / P * 2 - 1
    rows, cols = torch.meshgrid(g, g, indexing="ij")
    planes = torch.stack([cols, rows])[None, None].expand(
        1, 3, 2, P, P
    )  # channel 0 = 1st axis, 1 = 2nd
    pts = (torch.rand(1, 200, 3) * 2 - 1) * (1 - 1 / P)
    reads, weights = model.plane_corners(pts, P)  # (N,12): 4 texels on each plane
    texels = planes.permute(0, 1, 3, 4, 2).reshape(-1, 2)  # (3*P*P, 2): a row per texel
    f = [
        model.TexelGather.apply(texels, reads[:, k], weights[:, k])
        for k in (slice(0, 4), slice(4, 8), slice(8, 12))
    ]  # each plane's (N,2)
    x, y, z = pts[0].T
    assert torch.allclose(torch.cat(f, 1).T, torch.stack([x, y, x, z, y, z]), atol=1e-5)
    lrm = model.LRM(model.LRMConfig(res=32, tokens=P))  # each token's point sits in its own cell
    tok = model.plane_points(P, (0.0,))[:, 0]  # (3,P,P,3)
    for k, (a, b) in enumerate(((0, 1), (0, 2), (1, 2))):
        assert torch.allclose(tok[k, ..., a], cols) and torch.allclose(tok[k, ..., b], rows)
    uv, depth = render.project(
        tok.reshape(-1, 3), model.CANONICAL, render.intrinsics(render.FOV), 1
    )
    assert (depth > 0).all() and torch.allclose(lrm.token_uv.view(-1, 2), (uv * 2 - 1).clamp(-1, 1))


def test_field_equals_the_plain_field():
    """The first layer moved onto the texels (LRM.field) gives LRM.field_plain's numbers and
    gradients (grid_sample, then the decoder), outside the box too (zero features there)."""
    lrm = micro_lrm()
    planes = torch.randn(2, 3, MICRO.plane_ch, 16, 16, requires_grad=True)
    pts = torch.rand(2, 300, 3) * 2.4 - 1.2

    def textbook():
        return lrm.field_plain(planes, pts)

    params = [planes, *lrm.decoder.parameters()]
    for (a, b), want in zip(zip(lrm.field(planes, pts), textbook()), ("density", "colour")):
        assert torch.allclose(a, b, atol=1e-5), want
    grads = [
        torch.autograd.grad(sum(x.square().sum() for x in fn()), params)
        for fn in (lambda: lrm.field(planes, pts), textbook)
    ]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_plane_skip_reads_the_pixel_a_plane_point_projects_to():
    res, p = 16, torch.tensor([[0.0, 0.3, 0.4]])  # a point on the yz plane (y=0.3, z=0.4)
    uv, _ = render.project(p, model.CANONICAL, render.intrinsics(render.FOV), res)
    col, row = uv[0]
    img = torch.ones(1, 3, res, res)
    img[0, 1:, int(row), int(col)] = 0.0  # one red pixel where it lands
    lrm = micro_lrm(plane_skip=2)
    green = F.grid_sample(img, lrm.plane_uv, align_corners=False)[0, 1, :, 0].view(3, 5, res, res)
    r, c = divmod(int(green[2, 2].argmin()), res)  # yz plane, offset 0 along x
    assert (
        abs(r - (0.4 + 1) / 2 * res + 0.5) <= 1 and abs(c - (0.3 + 1) / 2 * res + 0.5) <= 1
    )  # plane rows follow z, columns y
    assert green[2, 2].min() < 0.5 and green[2, 2].flatten().sort().values[-10:].min() == 1.0
    planes = lrm(img, torch.zeros(1, 16))  # the skip is added to the planes
    assert planes.shape == (1, 3, MICRO.plane_ch, res, res)
    lrm.skip.weight.data.zero_()
    assert not torch.allclose(lrm(img, torch.zeros(1, 16)), planes)


def test_each_token_writes_only_its_own_plane_cell():
    lrm = micro_lrm()
    P, up = MICRO.tokens, 16 // MICRO.tokens
    # tokens go straight to the planes
    lrm.lift = None
    lrm.blocks = torch.nn.ModuleList()
    lrm.out_norm = torch.nn.Identity()
    img, cam = torch.rand(1, 3, 16, 16), torch.zeros(1, 16)
    with torch.no_grad():
        lrm.tokens.zero_()
        base = lrm.encode(img, cam)
        for k in range(3):  # plane k, token row 1, column 2
            lrm.tokens.zero_()
            lrm.tokens[0, k * P * P + 1 * P + 2] = 1.0
            diff = (lrm.encode(img, cam) - base)[0].abs().sum(1)  # (3,16,16)
            inside = diff[k, up : 2 * up, 2 * up : 3 * up].sum()
            assert inside > 0 and torch.isclose(diff.sum(), inside)


def test_canonicalisation_moves_the_source_and_keeps_relative_poses():
    c2w, _ = render.orbit(8, start_deg=37.0)
    can, M = model.canonicalise(c2w[2:3], c2w[None])
    assert torch.allclose(can[0, 2], model.CANONICAL, atol=1e-5)

    def rel(a, b):
        """The pose of b relative to a."""
        return torch.linalg.inv(a) @ b

    for j in range(8):
        assert torch.allclose(rel(can[0, 2], can[0, j]), rel(c2w[2], c2w[j]), atol=1e-5)
    p = torch.tensor([0.3, -0.2, 0.5, 1.0])  # M is a rigid motion
    assert torch.allclose((M[0] @ p)[:3].norm(), p[:3].norm(), atol=1e-5)


def test_ssim_loss_known_answers():
    x = torch.rand(2, 3, 16, 16)
    assert model.ssim_loss(x, x).abs() < 1e-6 and model.ssim_loss(x, 1 - x) > 0.5


def test_micro_lrm_overfits_one_object(micro):
    ob = render.load_object(micro / "0_data/assets/train/00000", 16)
    lrm = micro_lrm(density_scale=10.0)
    opt = torch.optim.Adam(lrm.parameters(), 3e-3)
    c2w, _ = model.canonicalise(ob["c2w"][:1], ob["c2w"][None])
    cam = model.camera_vector(c2w[:, 0], ob["K"][:1])
    losses = []
    for step in range(150):
        torch.manual_seed(step)
        rgb, acc = lrm(ob["images"][:1], cam, c2w, ob["K"][None], 16, samples=(16, 16))
        loss = F.mse_loss(rgb[0], ob["images"]) + F.mse_loss(acc[0], ob["masks"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-10:]) < losses[0] / 10, (losses[0], losses[-10:])


def train_args(out, *extra):
    return ["train_lrm.py", "--preset", "micro", "--out", out, *extra]


@pytest.fixture(scope="module")
def lrm_world(micro, tmp_path_factory):
    """A micro world whose stage 2 is a copy of the real training assets (no video model needed)."""
    out = tmp_path_factory.mktemp("lrm")
    (out / "0_data").symlink_to(micro / "0_data")
    (out / "2_views").mkdir()
    for d in sorted((micro / "0_data/assets/train").iterdir())[:8]:
        (out / "2_views" / d.name).symlink_to(d)
    render.save_json(out / "2_views/meta.json", dict(stage="generate_views", preset="micro"))
    return out


def test_micro_stages_3_and_4_write_their_folders(lrm_world):
    run_script(*train_args(lrm_world))
    run_script("finetune_3d.py", "--preset", "micro", "--out", lrm_world)
    for stage in ("3_lrm", "4_finetune"):
        m = json.loads((lrm_world / stage / "metrics.json").read_text())
        assert {"lrm", "sphere", "copy_input"} <= set(m["rows"])
        assert {"psnr", "ssim", "color_err", "chamfer_l1", "fscore"} <= set(m["rows"]["lrm"])
        assert (lrm_world / stage / "samples/final.png").is_file()
    meta = render.load_tensors(lrm_world / "4_finetune/lrm.safetensors")[1]
    assert meta["kind"] == "lrm" and json.loads(meta["stage"]) == "finetune_3d"


def test_mix_adds_synthetic_orbits_to_stage_4(lrm_world):
    """--mix N: stage 4 trains on the real assets and the first N orbits of 2_views."""
    args = ["--preset", "micro", "--out", lrm_world, "--n_eval", "1", "--sample_every", "1000"]
    run_script("finetune_3d.py", *args, "--from_scratch", "--mix", "3", "--stage_dir", "4_mix")
    m = json.loads((lrm_world / "4_mix/metrics.json").read_text())
    real = len(list((lrm_world / "0_data/assets/train").glob("*/000.png")))
    assert m["train_objects"] == real + 3
    # stage 3 trains on 2_views already: --mix there would count each orbit twice
    p = run_script(*train_args(lrm_world, "--mix", "3", "--stage_dir", "3_mix"), check=False)
    assert one_line_error(p) and "finetune_3d.py" in p.stderr


def test_bf16_on_the_cpu_trains_and_changes_the_numbers(lrm_world):
    """--bf16 true: stage 3 under CPU bf16 autocast runs, and its losses are not fp32's."""
    args = ["--n_eval", "1", "--sample_every", "1000", "--steps", "3"]
    run_script(*train_args(lrm_world, *args, "--stage_dir", "bf16", "--bf16", "true"))
    run_script(*train_args(lrm_world, *args, "--stage_dir", "fp32"))
    losses = [
        render.load_tensors(lrm_world / d / "lrm_state.safetensors")[1] for d in ("bf16", "fp32")
    ]
    assert losses[0]["losses"] != losses[1]["losses"]


def test_resume_after_sigkill_gives_the_same_weights(lrm_world, tmp_path):
    def args(name):
        root = tmp_path / name
        root.mkdir()
        for sub in ("0_data", "2_views"):
            (root / sub).symlink_to(lrm_world / sub)
        return root, train_args(
            root, "--steps", "40", "--ckpt_every", "3", "--sample_every", "1000", "--n_eval", "1"
        )

    killed, cmd = args("killed")
    assert 9 <= kill_at_checkpoint(cmd, killed / "3_lrm/lrm_state.safetensors", 9) < 40
    run_script(*cmd)
    straight, cmd = args("straight")
    log = run_script(*cmd).stderr
    # into a log file the bar redraws once a minute, not at each of the 40 steps (issue #19)
    assert log.count("it/s") < 10, f"{log.count('it/s')} redraws of the progress bar"
    a, _ = render.load_tensors(killed / "3_lrm/lrm.safetensors")
    b, _ = render.load_tensors(straight / "3_lrm/lrm.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ddp_processes_match_one_process(lrm_world, tmp_path):
    def first_loss(name, procs):
        root = tmp_path / name
        root.mkdir()
        for sub in ("0_data", "2_views"):
            (root / sub).symlink_to(lrm_world / sub)
        args = train_args(
            root,
            "--steps",
            "1",
            "--stratified",
            "false",
            "--cam_noise",
            "0",
            "--n_eval",
            "1",
            "--device",
            "cpu",
        )
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(procs),
                "--master_port",
                str(29500 + procs),
            ]
            if procs > 1
            else [sys.executable]
        )
        p = subprocess.run(
            cmd + [str(a) for a in args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(render.load_tensors(root / "3_lrm/lrm_state.safetensors")[1]["losses"])[0]

    one, two = first_loss("one", 1), first_loss("two", 2)
    assert abs(one - two) < 1e-5 * max(1.0, abs(one)), (one, two)


def test_bad_inputs_get_one_line_errors(lrm_world, micro, tmp_path):
    (tmp_path / "empty").mkdir()
    p = run_script(*train_args(lrm_world, "--data", tmp_path / "empty"), check=False)
    assert one_line_error(p) and "no object folders" in p.stderr
    cameras = micro / "0_data/assets/train/00000/cameras.safetensors"
    with pytest.raises(render.DataError, match="expected 'lrm'"):
        model.load_lrm(cameras, "python train_lrm.py")
    # an LRM of the micro sizes, refused by a run of another width
    lrm = micro_lrm()
    model.save_checkpoint(tmp_path / "z.safetensors", lrm.state_dict(), "lrm", lrm.config)
    flags = ["--init", tmp_path / "z.safetensors", "--enc_dim", "16", "--stage_dir", "w"]
    p = run_script(*train_args(lrm_world, *flags), check=False)
    assert one_line_error(p) and "another config (enc_dim 32 there, 16 here)" in p.stderr
    p = run_script("finetune_3d.py", "--preset", "micro", "--out", tmp_path, check=False)
    assert one_line_error(p) and "render.py" in p.stderr


def test_attention_equals_the_plain_attention():
    q, k, v = torch.randn(3, 2, 10, 16).unbind()
    mask = torch.rand(2, 1, 1, 10) > 0.3
    mask[..., 0] = True  # every query can read something
    for m in (None, mask):
        assert torch.allclose(
            model.attend(q, k, v, 4, m), model.attend_plain(q, k, v, 4, m), atol=1e-5
        )
