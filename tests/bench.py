"""Benchmarks: the speed figures the issues ask for, printed as one table, against the machine.

Run:  python tests/bench.py               (everything; a few minutes on a 2-core laptop)
      python tests/bench.py --only infer  (some groups: peak, render, mesh, volume, video, lrm,
                                           infer)

The "peak" rows measure the machine's own matmul speed (2048^3, fp32 and bf16). The MFU rows
divide a step's useful FLOPs (torch's flop counter: matmuls, convolutions, attention, forward and
backward) by its time and by the peak of the precision the step runs in (fp32; the LRM's step also
under bf16 autocast where the CPU has native bf16). The "reference"
row times a plain volume renderer, written here the way a tutorial writes one, on the same field
and rays as ours.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

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


def flops_of(fn):
    """The FLOPs torch's flop counter sees in one call of fn."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def add_mfu(rows, name, fn, seconds, ctx, precision="fp32"):
    """A row with fn's achieved GFLOP/s and its share of the matmul peak of `precision`."""
    achieved = flops_of(fn) / seconds
    rows.append((f"{name}: achieved", achieved / 1e9, "GFLOP/s"))
    rows.append((f"{name}: MFU (of the {precision} peak)", 100 * achieved / ctx[precision], "%"))


def bf16_is_native():
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX); without them torch emulates."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bench_peak(rows, ctx):
    """The machine's matmul peak: a 2048^3 product in fp32 and in bf16 (512^3 where bf16 is
    emulated: a 2048^3 one takes a minute there)."""
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        native = name == "fp32" or bf16_is_native()
        n = 2048 if native else 512
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        sec = timed(lambda: a @ b, 10 if native else 1)  # the best of ten: what the machine can do
        ctx[name] = 2 * n**3 / sec
        note = "" if native else ", emulated: no AVX512-BF16 or AMX on this CPU"
        rows.append((f"matmul peak {name} ({n}^3{note})", ctx[name] / 1e9, "GFLOP/s"))


def bench_render(rows, ctx):
    """Stage 0's wall time at tiny, and the exact renderer's speed."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cmd = [sys.executable, "render.py", "--preset", "tiny", "--out", tmp]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        rows.append(("stage 0 wall time, tiny preset", time.perf_counter() - t, "s"))
    cfg = render.Config()
    objs = [render.world_object(cfg, "train", i) for i in range(12)]
    c2w, K = render.orbit(8)
    packed, idx = render.pack(objs), torch.arange(12).repeat_interleave(8)
    c2ws, Ks = c2w.repeat(12, 1, 1), K.repeat(12, 1, 1)
    sec = timed(lambda: render.render_views(packed, idx, c2ws, Ks, 32))
    rows.append(("exact renderer (sphere tracing, 32x32, 2x2 rays)", 96 / sec, "views/s"))


def reference_render(lrm, planes, o, d, n_samples):
    """A plain volume renderer, as tutorials write it: per ray batch, a Python loop over evenly
    spaced samples in the box; at each, one grid_sample per plane, the decoder, and the running
    transmittance. planes (1,3,C,P,P), rays o, d (R,3) -> colour (R,3) on white, opacity (R,)."""
    near, far, hit = model.ray_box(o, d)
    step = (far - near) / n_samples
    colour, trans = torch.zeros(len(o), 3), torch.ones(len(o))
    for i in range(n_samples):
        p = o + (near + (i + 0.5) * step)[:, None] * d  # (R,3)
        # the last sample's interval ends at the box, half a step away
        feats = []
        for plane, axes in zip(planes[0], ([0, 1], [0, 2], [1, 2])):
            uv = p[:, axes].view(1, 1, -1, 2)
            feats.append(F.grid_sample(plane[None], uv, align_corners=False)[0, :, 0])  # (C,R)
        out = lrm.decoder(torch.cat(feats).T).T  # (4,R)
        sigma = lrm.config.density_scale * F.softplus(out[0] - 1) * hit
        alpha = 1 - torch.exp(-sigma * step * (0.5 if i == n_samples - 1 else 1.0))
        colour = colour + (trans * alpha)[:, None] * torch.sigmoid(out[1:]).T
        trans = trans * (1 - alpha)
    return colour + trans[:, None], 1 - trans


def bench_volume(rows, ctx):
    """Volume rendering through the tiny LRM's triplane field: 8 objects x 4 views x 16x16 crops,
    and ours against the reference on one object's whole 32x32 views with the same 24 samples."""
    cfg = train_lrm.Config()
    lrm = model.LRM(train_lrm.lrm_config(cfg, 32))
    B, V = cfg.batch, cfg.views
    planes = torch.randn(B, 3, cfg.plane_ch, 32, 32, requires_grad=True)
    c2w, K = render.orbit(V)
    cams = (c2w[None].expand(B, V, 4, 4), K[None].expand(B, V, 3, 3))
    samples = (cfg.n_coarse, cfg.n_fine)
    points = B * V * cfg.crop**2 * sum(samples)

    def fwd():
        with torch.no_grad():
            lrm.render(planes, *cams, 32, (8, 8, cfg.crop), samples)

    def fwd_bwd():
        rgb, acc = lrm.render(planes, *cams, 32, (8, 8, cfg.crop), samples)
        (rgb.mean() + acc.mean()).backward()

    rows.append(("volume rendering, forward (tiny LRM field)", points / timed(fwd), "points/s"))
    rows.append(("volume rendering, forward + backward", points / timed(fwd_bwd), "points/s"))
    # the same field and rays for both renderers: all 8 views of one object, 24 uniform samples
    n = sum(samples)
    one = planes[:1].detach()
    o, d = render.camera_rays(c2w, K, 32)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    field = one.requires_grad_()

    def ours():
        rgb, acc = lrm.render(field, c2w[None], K[None], 32, None, (n, 0), False)
        (rgb.mean() + acc.mean()).backward()

    def reference():
        rgb, acc = reference_render(lrm, field, o, d, n)
        (rgb.mean() + acc.mean()).backward()

    with torch.no_grad():
        ours_rgb = lrm.render(field, c2w[None], K[None], 32, None, (n, 0), False)[0]
        ref_rgb = reference_render(lrm, field, o, d, n)[0].view(V, 32, 32, 3).permute(0, 3, 1, 2)
    rows.append(
        (
            "volume renderer: max |ours - reference| (same image?)",
            (ours_rgb[0] - ref_rgb).abs().max().item(),
            "",
        )
    )
    sec_ours, sec_ref = timed(ours), timed(reference)
    rows.append((f"volume renderer, {n} samples, forward + backward: ours", 1000 * sec_ours, "ms"))
    rows.append(("volume renderer: the tutorial-style reference", 1000 * sec_ref, "ms"))
    rows.append(("volume renderer: speed against the reference (x)", sec_ref / sec_ours, "x"))


CAPTION = "a red mug with a blue handle"  # a caption of the world (every word in the vocabulary)


def tiny_unet(frames):
    """A UNet of the tiny preset's sizes with random weights (the image model when frames = 0)."""
    cfg = finetune_video.Config()
    torch.manual_seed(0)
    n = len(render.CATEGORIES)
    vocab = sorted({w for s in range(200) for w in render.make_object(s, s % n)["caption"].split()})
    channels, attn_res = finetune_video.ints(cfg.channels), finetune_video.ints(cfg.attn_res)
    mv = finetune_video.ints(cfg.mv_attn_res)
    config = model.UNetConfig(vocab, channels, attn_res, 32, cfg.text_dim, frames, mv)
    return model.UNet(config), cfg


def bench_video(rows, ctx):
    """Stage 1 at the tiny sizes: a training step of the temporal layers and a generated orbit;
    stage 2's engine (text -> first frame -> orbit)."""
    unet, cfg = tiny_unet(8)
    for n, p in unet.named_parameters():
        p.requires_grad = n.startswith("temporal.")
    unet = unet.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], 1e-3)
    x = torch.randn(cfg.video_batch * 8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    ids = unet.text.tokenize([CAPTION] * cfg.video_batch)[0]

    def step():
        loss = model.v_loss(unet, x, ids, 8, clean_first=True, t_power=cfg.t_power)
        opt.zero_grad()
        loss.backward()
        opt.step()

    sec = timed(step, 2)
    rows.append(("stage 1 training (temporal layers), tiny", cfg.video_batch * 8 / sec, "frames/s"))
    add_mfu(rows, "stage 1 training step", step, sec, ctx)
    first = torch.zeros(16, 3, 32, 32)
    ids = unet.text.tokenize([CAPTION] * 16)[0]
    noise = torch.randn(16, 8, 3, 32, 32)
    how = dict(steps=cfg.sample_steps, guidance=cfg.video_guidance, temperature=cfg.temperature)
    sec = timed(lambda: model.sample(unet.eval(), ids, noise, first, **how), 1)
    name = f"stage 1 orbit generation ({cfg.sample_steps} DDIM steps)"
    rows.append((name, sec / 16, "s/orbit"))
    gcfg = generate_views.Config()
    image, _ = tiny_unet(0)
    names = [f"{i:05d}" for i in range(gcfg.batch)]
    captions = [CAPTION] * gcfg.batch

    def engine():
        generate_views.generate(
            gcfg, image.eval(), unet, names, captions, None, torch.device("cpu")
        )

    sec = timed(engine, 1)
    rows.append((f"stage 2 data engine ({gcfg.steps} steps)", gcfg.batch / sec * 60, "orbits/min"))
    add_mfu(rows, "stage 2 sampling", engine, sec, ctx)


def bench_lrm(rows, ctx):
    """Stage 3 at the tiny sizes: a training step, its split between the parts, and stage 5."""
    cfg = train_lrm.Config()
    lrm = model.LRM(train_lrm.lrm_config(cfg, 32))
    N, V = 64, 8
    c2w, K = render.orbit(V)
    data = dict(images=torch.rand(N, V, 3, 32, 32), masks=torch.rand(N, V, 1, 32, 32))
    data |= dict(c2w=c2w.expand(N, V, 4, 4), K=K.expand(N, V, 3, 3))
    opt = torch.optim.AdamW(lrm.parameters(), 1e-3)
    b = train_lrm.make_batch(cfg, data, cfg.steps - 1, 32)  # a second-stage (crop) batch
    parts = {}

    def step():
        t = time.perf_counter()
        planes = lrm(b["src"], b["cam"])
        t1 = time.perf_counter()
        samples = (cfg.n_coarse, cfg.n_fine)
        rgb, acc = lrm.render(planes, b["c2w"], b["K"], b["res"], b["crop"], samples)
        loss = model.ssim_loss(rgb.flatten(0, 1), b["target"].flatten(0, 1))
        loss = loss + F.mse_loss(acc, b["mask"])
        t2 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        opt.step()
        parts.update(encode=t1 - t, render=t2 - t1, backward=time.perf_counter() - t2)

    sec = timed(step, 3)
    points = cfg.batch * cfg.views * cfg.crop**2 * (cfg.n_coarse + cfg.n_fine)
    rows.append(("stage 3 LRM training, tiny", cfg.batch / sec, "objects/s"))
    rows.append(("stage 3 rendered points, forward + backward", points / sec, "points/s"))
    add_mfu(rows, "stage 3 LRM step", step, sec, ctx)
    for k, v in parts.items():
        rows.append((f"stage 3 step split: {k}", 1000 * v, "ms"))

    # the same step under bf16 autocast (--bf16 true, what run_all.sh turns on where it is native)
    if bf16_is_native():
        with model.autocast(torch.device("cpu"), cpu=True):
            sec = timed(step, 3)
            rows.append(("stage 3 LRM training, tiny, bf16 autocast", cfg.batch / sec, "objects/s"))
            add_mfu(rows, "stage 3 LRM step, bf16 autocast", step, sec, ctx, "bf16")


def bench_infer(rows, ctx):
    """Stage 5 as infer.reconstruct runs it (mesh coarse to fine, turntable rays near the mesh),
    without the files: the shipped tiny LRM on eight test_unseen views of the world, else random
    weights."""
    icfg, cfg = infer.Config(), render.Config()
    shipped = ROOT / "weights/lrm_tiny.safetensors"
    try:
        lrm, level = model.load_lrm(shipped, "python tests/ship_models.py")[0], icfg.mesh_level
    except render.DataError:
        lrm, level = model.LRM(train_lrm.lrm_config(train_lrm.Config(), 32)).eval(), None
    objs = [render.world_object(cfg, "test_unseen", i) for i in range(8)]
    c2w, K = render.orbit(icfg.turntable)
    rgba, _ = render.render_views(
        render.pack(objs), torch.arange(8), c2w[:1].expand(8, 4, 4), K[:1].expand(8, 3, 3), 32
    )
    images = render.on_white(rgba)  # (8,3,32,32)
    t = {}
    timed(lambda: t.update(infer_times(icfg, lrm, images, level)), 1)
    for k, v in t.items():
        rows.append((f"stage 5 inference, mean of 8 images: {k}", v, "s"))


def infer_times(cfg, lrm, images, level=None):
    """The mean time of the three steps of infer.reconstruct over images (N,3,H,W)."""
    out = {}
    with torch.no_grad():
        c2w, K = render.orbit(cfg.turntable)
        cam = model.camera_vector(model.CANONICAL[None], K[:1])
        for img in images:
            t = time.perf_counter()
            planes = lrm(img[None], cam)
            t1 = time.perf_counter()
            # random weights: the median density is a level that has a surface
            pts = torch.rand(1, 4096, 3) * 2 - 1
            lvl = lrm.field(planes, pts)[0].median().item() if level is None else level
            v, _, _ = model.lrm_mesh(lrm, planes[0], cfg.mesh_res, lvl, cfg.coarse)
            t2 = time.perf_counter()
            infer.turntable(lrm, planes, v, (c2w, K), 32, (cfg.samples, cfg.samples))
            steps = dict(triplane=t1 - t, mesh=t2 - t1, turntable=time.perf_counter() - t2)
            for k, sec in steps.items():
                out[k] = out.get(k, 0.0) + sec / len(images)
    return out | {"total per image": sum(out.values())}


def bench_mesh(rows, ctx):
    """Our marching cubes against scikit-image's (Lewiner, compiled) on a 64^3 sphere field."""
    from skimage.measure import marching_cubes

    g = torch.linspace(-1, 1, 64)
    vol = 0.6 - torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).norm(dim=-1)
    ours = timed(lambda: render.marching_cubes(vol, 0.0), repeat=5)
    theirs = timed(lambda: marching_cubes(vol.numpy(), 0.0), repeat=5)
    rows.append(("marching cubes 64^3 (ours, torch)", ours * 1e3, "ms"))
    rows.append(("marching cubes 64^3 (scikit-image, compiled)", theirs * 1e3, "ms"))


GROUPS = {
    "peak": bench_peak,
    "render": bench_render,
    "mesh": bench_mesh,
    "volume": bench_volume,
    "video": bench_video,
    "lrm": bench_lrm,
    "infer": bench_infer,
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(GROUPS), help="groups: " + ", ".join(GROUPS))
    args = p.parse_args()
    model.keep_freed_memory()  # as every stage does in model.setup
    rows, ctx = [], {}  # ctx: the measured peaks, which the MFU rows divide by
    groups = args.only.split(",")
    if "peak" not in groups and {"video", "lrm"} & set(groups):
        groups.insert(0, "peak")
    for name in groups:
        GROUPS[name](rows, ctx)
    print(f"\n{'benchmark':64s} {'value':>12s}  unit")
    print(f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for name, value, unit in rows:
        print(f"{name:64s} {value:12,.2f}  {unit}")


if __name__ == "__main__":
    main()
