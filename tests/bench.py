"""Benchmarks: the speed figures the issues ask for, printed as one table.

Run:  python tests/bench.py                 (everything; a few minutes on a 2-core laptop)
      python tests/bench.py --only render   (one group: render, volume)
Stage timings that need a full tiny run read the stage's own meta/metrics files when --out holds them.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import finetune_video  # noqa: E402
import generate_views  # noqa: E402
import infer  # noqa: E402
import model  # noqa: E402
import render  # noqa: E402
import train_lrm  # noqa: E402


def timed(fn, repeat=3):
    """Best wall time of `repeat` calls after one warm-up call, seconds."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_render(rows):
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "render.py", "--preset", "tiny", "--out", tmp],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        rows.append(("stage 0 wall time, tiny preset", time.perf_counter() - t, "s"))
    cfg = render.Config()
    objs = [render.make_object(render.object_seed(cfg, "train", i)) for i in range(12)]
    c2w, K = render.orbit(8)
    packed, idx = render.pack(objs), torch.arange(12).repeat_interleave(8)
    sec = timed(
        lambda: render.render_views(packed, idx, c2w.repeat(12, 1, 1), K.repeat(12, 1, 1), 32)
    )
    rows.append(("exact renderer (sphere tracing, 32x32, 2x2 rays)", 96 / sec, "views/s"))


def bench_volume(rows):
    """Volume rendering through the tiny LRM's triplane field: 8 objects x 4 views x 16x16 crops."""
    cfg = train_lrm.Config()
    lrm = model.LRM(train_lrm.lrm_config(cfg, 32))
    B, V = cfg.batch, cfg.views
    planes = torch.randn(B, 3, cfg.plane_ch, 32, 32, requires_grad=True)
    c2w, K = render.orbit(V)
    cams = (c2w[None].expand(B, V, 4, 4), K[None].expand(B, V, 3, 3))
    points = B * V * cfg.crop**2 * (cfg.n_coarse + cfg.n_fine)

    def fwd():
        with torch.no_grad():
            lrm.render(planes, *cams, 32, (8, 8, cfg.crop), (cfg.n_coarse, cfg.n_fine))

    def fwd_bwd():
        rgb, acc = lrm.render(planes, *cams, 32, (8, 8, cfg.crop), (cfg.n_coarse, cfg.n_fine))
        (rgb.mean() + acc.mean()).backward()

    rows.append(("volume rendering, forward (tiny LRM field)", points / timed(fwd), "points/s"))
    rows.append(("volume rendering, forward + backward", points / timed(fwd_bwd), "points/s"))


def tiny_unet(frames):
    cfg = finetune_video.Config()
    torch.manual_seed(0)
    vocab = sorted({w for s in range(200) for w in render.make_object(s)["caption"].split()})
    channels, attn_res = finetune_video.ints(cfg.channels), finetune_video.ints(cfg.attn_res)
    mv = finetune_video.ints(cfg.mv_attn_res)
    config = model.UNetConfig(vocab, channels, attn_res, 32, cfg.text_dim, frames, mv)
    return model.UNet(config), cfg


def bench_video(rows):
    """Stage 1 at the tiny sizes: a training step of the temporal layers, and a generated orbit."""
    unet, cfg = tiny_unet(8)
    for n, p in unet.named_parameters():
        p.requires_grad = n.startswith("temporal.")
    unet = unet.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], 1e-3)
    x = torch.randn(cfg.video_batch * 8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    ids = unet.text.tokenize(["a small red cone"] * cfg.video_batch)[0]

    def step():
        loss = model.v_loss(unet, x, ids, 8, clean_first=True, t_power=cfg.video_t_power)
        opt.zero_grad()
        loss.backward()
        opt.step()

    rows.append(
        (
            "stage 1 training (temporal layers), tiny",
            cfg.video_batch * 8 / timed(step, 2),
            "frames/s",
        )
    )
    first = torch.zeros(16, 3, 32, 32)
    ids = unet.text.tokenize(["a small red cone"] * 16)[0]
    noise = torch.randn(16, 8, 3, 32, 32)
    how = dict(steps=cfg.sample_steps, guidance=cfg.video_guidance, temperature=cfg.temperature)
    sec = timed(lambda: model.sample(unet.eval(), ids, noise, first, **how), 1)
    rows.append(
        (
            f"stage 1 orbit generation ({cfg.sample_steps} DDIM steps, guidance {cfg.video_guidance})",
            sec / 16,
            "s/orbit",
        )
    )
    gcfg = generate_views.Config()
    image, _ = tiny_unet(0)
    names = [f"{i:05d}" for i in range(gcfg.batch)]
    sec = timed(
        lambda: generate_views.generate(
            gcfg,
            image.eval(),
            unet,
            names,
            ["a small red cone"] * gcfg.batch,
            None,
            torch.device("cpu"),
        ),
        1,
    )
    rows.append(
        (
            f"stage 2 data engine ({gcfg.steps} steps, text -> frame -> orbit)",
            gcfg.batch / sec * 60,
            "orbits/min",
        )
    )


def bench_lrm(rows):
    """Stage 3 at the tiny sizes: a training step and its split between the parts."""
    cfg = train_lrm.Config()
    lrm = model.LRM(train_lrm.lrm_config(cfg, 32))
    N, V = 64, 8
    c2w, K = render.orbit(V)
    data = dict(
        images=torch.rand(N, V, 3, 32, 32),
        masks=torch.rand(N, V, 1, 32, 32),
        c2w=c2w.expand(N, V, 4, 4),
        K=K.expand(N, V, 3, 3),
    )
    opt = torch.optim.AdamW(lrm.parameters(), 1e-3)
    b = train_lrm.make_batch(cfg, data, cfg.steps - 1, 32)  # a second-stage (crop) batch
    parts = {}

    def step():
        t = time.perf_counter()
        planes = lrm(b["src"], b["cam"])
        t1 = time.perf_counter()
        rgb, acc = lrm.render(
            planes, b["c2w"], b["K"], b["res"], b["crop"], (cfg.n_coarse, cfg.n_fine)
        )
        loss = model.ssim_loss(
            rgb.flatten(0, 1), b["target"].flatten(0, 1)
        ) + torch.nn.functional.mse_loss(acc, b["mask"])
        t2 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        opt.step()
        parts.update(encode=t1 - t, render=t2 - t1, backward=time.perf_counter() - t2)

    sec = timed(step, 3)
    points = cfg.batch * cfg.views * cfg.crop**2 * (cfg.n_coarse + cfg.n_fine)
    rows.append(("stage 3 LRM training, tiny", cfg.batch / sec, "objects/s"))
    rows.append(("stage 3 rendered points, forward + backward", points / sec, "points/s"))
    for k, v in parts.items():
        rows.append(
            (
                f"stage 3 step split: {k} (encoder+transformer / volume render / all backward)",
                1000 * v,
                "ms",
            )
        )
    icfg = infer.Config()
    img = torch.rand(3, 32, 32)
    t = {}
    timed(lambda: t.update(infer_times(icfg, lrm.eval(), img)), 2)
    for k, v in t.items():
        rows.append((f"stage 5 inference: {k}", v, "s"))


def infer_times(cfg, lrm, img):
    """The three steps of infer.reconstruct, without writing files."""
    out, t = {}, time.perf_counter()
    with torch.no_grad():
        c2w, K = render.orbit(cfg.turntable)
        planes = lrm(img[None], model.camera_vector(model.CANONICAL[None], K[:1]))
        out["triplane"], t = time.perf_counter() - t, time.perf_counter()
        level = (
            lrm.field(planes, torch.rand(1, 4096, 3) * 2 - 1)[0].median().item()
        )  # random weights: a level that has a surface
        model.lrm_mesh(lrm, planes[0], cfg.mesh_res, level)
        out[f"mesh at {cfg.mesh_res}^3"], t = time.perf_counter() - t, time.perf_counter()
        lrm.render(planes, c2w[None], K[None], 32, None, (cfg.samples, cfg.samples), False)
        out[f"turntable, {cfg.turntable} frames"] = time.perf_counter() - t
    out["total per image"] = sum(out.values())
    return out


GROUPS = {"render": bench_render, "volume": bench_volume, "video": bench_video, "lrm": bench_lrm}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--only", default=",".join(GROUPS), help="comma-separated groups: " + ", ".join(GROUPS)
    )
    args = p.parse_args()
    model.keep_freed_memory()  # as every stage does in model.setup
    rows = []
    for name in args.only.split(","):
        GROUPS[name](rows)
    print(
        f"\n{'benchmark':56s} {'value':>12s}  unit   (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    for name, value, unit in rows:
        print(f"{name:56s} {value:12,.1f}  {unit}")


if __name__ == "__main__":
    main()
