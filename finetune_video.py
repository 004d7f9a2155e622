"""Stage 1: the video diffusion model (VFusion3D Sec. 3.1).

Phase image (the pretrained stand-in for EMU Video, shipped in weights/): a text-to-image UNet
trained on out/0_data/images/ with their captions. Phase video (the paper's first step): insert
zero-initialised temporal layers, freeze every spatial and text weight, and train only the temporal
layers on the orbit videos of out/0_data/assets/train, with frame 0 given clean (the input view)
and frames 1..V-1 denoised. Phase eval: orbits for the held-out assets against three baselines.

Reads:  out/0_data/ (stage 0), weights/image_model_<preset>.safetensors (or phase image's output)
Writes: out/1_video/image_model.safetensors, video_model.safetensors, samples/, eval_grid.png,
        eval.gif, metrics.json, meta.json (and *_state.safetensors for --resume)
Run:    python finetune_video.py                        (tiny: video + eval from the shipped model, ~13 min on 2 cores)
        python finetune_video.py --preset micro --out /tmp/run   (all three phases, seconds)
        python finetune_video.py --phase image           (retrain the stand-in: hours on a CPU)
        torchrun --nproc_per_node=4 finetune_video.py --preset small --device cuda
"""
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import model
import render

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    preset: str = "tiny"        # micro | tiny | small | paper
    out: str = "out"            # root holding the numbered stage folders
    device: str = "auto"        # auto | cpu | cuda | mps
    seed: int = 0               # repeatable runs on one machine
    phase: str = "auto"         # image | video | eval | auto (image only if no image model exists, then video, eval)
    image_model: str = ""       # pretrained image model; "" = out/1_video's, else weights/image_model_<preset>.safetensors
    resume: bool = True         # continue from the last *_state.safetensors checkpoint if there is one
    channels: str = "32,64,96"  # UNet channels per resolution level
    attn_res: str = "8"         # resolutions (pixels) with self- and cross-attention
    mv_attn_res: str = "8"      # resolutions where temporal attention spans all pixels of all frames ("" = none)
    text_dim: int = 64          # text encoder width
    image_steps: int = 4000     # optimizer steps of phase image
    image_batch: int = 64       # images per step (global, over all ranks)
    image_lr: float = 5e-4      # peak learning rate of phase image
    image_ema: float = 0.999    # EMA decay of the image model's weights
    video_steps: int = 1000     # optimizer steps of phase video
    video_batch: int = 4        # orbits per step (global)
    video_lr: float = 5e-3      # peak learning rate of the temporal layers
    video_t_power: float = 0.5  # phase video draws noise levels t = u**p: p < 1 trains more at high noise, where views are laid out
    video_ema: float = 0.99     # EMA decay of the temporal weights
    video_shift: bool = True    # start each training orbit at a random view (cyclic shift: 8x the orbits)
    warmup: int = 100           # linear warm-up steps, then cosine decay to 10%
    cfg_drop: float = 0.1       # share of captions dropped in training (for classifier-free guidance)
    sample_steps: int = 10      # DDIM steps when sampling
    guidance: float = 3.0       # classifier-free guidance on the text (image model: samples, per-frame baseline)
    video_guidance: float = 1.0 # classifier-free guidance of the video model (1 = off: frame 0 conditions it)
    temperature: float = 0.2    # scale of the orbit sampler's starting noise (1 = plain DDIM; lower = likelier, plainer views)
    n_eval: int = 50            # held-out assets evaluated by phase eval
    n_faithful: int = 96        # samples scored for caption faithfulness
    sample_every: int = 2000    # steps between sample grids in samples/
    ckpt_every: int = 250       # steps between resumable checkpoints

PRESETS = {
    "micro": dict(channels="16,32", text_dim=32, image_steps=40, image_batch=16, video_steps=12, video_batch=2,
                  warmup=5, sample_steps=4, n_eval=4, n_faithful=8, sample_every=20, ckpt_every=10),
    "tiny": {},
    "small": dict(channels="64,128,256,256", attn_res="16,8", text_dim=128, image_steps=60000, image_batch=256,
                  video_steps=20000, video_batch=32, sample_steps=50, n_eval=100, ckpt_every=1000),
    "paper": dict(channels="128,256,512,512", attn_res="32,16,8", text_dim=512, image_steps=500000, image_batch=2048,
                  video_steps=100000, video_batch=256, sample_steps=50, n_eval=1000, ckpt_every=5000),
}
ints = lambda s: [int(v) for v in s.split(",") if v]

# ----------------------------------------------------------------------------- data

def load_images(data):
    """All single views and their captions -> images (N,3,H,W) in [-1,1], captions list."""
    lines = (data / "images/captions.txt").read_text().splitlines() if (data / "images/captions.txt").is_file() else []
    if not lines:
        raise render.DataError(f"{data / 'images/captions.txt'}: missing or empty; run `python render.py` first")
    names, caps = zip(*(l.split("\t", 1) for l in lines))
    imgs = torch.stack([render.load_png(data / "images" / f"{n}.png", data_res(data))[0] for n in tqdm(names, desc="loading images", leave=False)])
    return imgs * 2 - 1, list(caps)

def load_orbits(folder, views, res, n=None):
    """Every object folder under `folder` -> orbits (N,V,3,H,W) in [-1,1], captions."""
    dirs = sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))[:n]
    if not dirs:
        raise render.DataError(f"{folder}: no object folders; run `python render.py` first")
    objs = [render.load_object(d, res, views) for d in tqdm(dirs, desc=f"loading {Path(folder).name}", leave=False)]
    return torch.stack([o["images"] for o in objs]) * 2 - 1, [o["prompt"] for o in objs]

def data_res(data):
    meta = render.read_meta(data, "python render.py")
    return meta["config"]["res"]

# ----------------------------------------------------------------------------- model

def image_model_path(cfg):
    own = Path(cfg.out) / "1_video/image_model.safetensors"
    return Path(cfg.image_model) if cfg.image_model else own if own.is_file() else Path(f"weights/image_model_{cfg.preset}.safetensors")

# ----------------------------------------------------------------------------- training loop (both phases)

def train(cfg, unet, trainable, get_batch, steps, lr, ema_decay, frames, name, out, device, rank, world, on_sample):
    """AdamW + warm-up/cosine, EMA of the trainable weights, resumable from {name}_state.safetensors.
    Every step reseeds the RNG from (seed, step, rank), so a resumed run repeats an uninterrupted one."""
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in trainable]
    state_path, start = out / f"{name}_state.safetensors", 0
    conf = {k: v for k, v in dataclasses.asdict(cfg).items()       # what a resumed state must share: training fields only
            if k not in ("device", "resume", "phase", "out", "sample_every", "ckpt_every", "n_eval", "n_faithful", "temperature",
                         "sample_steps", "guidance", "video_guidance") and not (frames == 1 and k.startswith("video"))}
    if cfg.resume and state_path.is_file():
        tensors, saved, meta = model.load_checkpoint(state_path, name + "_state", "python finetune_video.py")
        saved = {"video_t_power": 1.0} | saved   # a field newer than the state: the value the state was trained with
        if {k: saved.get(k) for k in conf} != conf:
            raise render.DataError(f"{state_path}: from another config; delete it or pass --resume false")
        start = int(meta["step"])
        with torch.no_grad():
            for i, (p, e) in enumerate(zip(trainable, ema)):
                p.copy_(tensors[f"p{i}"]), e.copy_(tensors[f"ema{i}"])
        if start:
            opt.load_state_dict({"state": {i: {"step": torch.tensor(float(start)), "exp_avg": tensors[f"m{i}"], "exp_avg_sq": tensors[f"v{i}"]}
                                           for i in range(len(trainable))}, "param_groups": opt.state_dict()["param_groups"]})
        print(f"resuming {name} from step {start}")
    net = torch.nn.parallel.DistributedDataParallel(unet) if world > 1 else unet
    bar = tqdm(range(start, steps), desc=f"phase {name.split('_')[0]}", disable=rank != 0, initial=start, total=steps)
    avg, t0 = None, time.time()
    for step in bar:
        model.seed_all(cfg.seed * 1_000_003 + step * world + rank)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / cfg.warmup) * (0.55 + 0.45 * np.cos(np.pi * step / steps))
        x, ids = get_batch(step, rank, world)                         # (B*F,3,H,W), (B,L)
        drop = torch.rand(ids.shape[0]) < cfg.cfg_drop
        ids = torch.where(drop[:, None], torch.nn.functional.pad(torch.full((ids.shape[0], 1), 2), (0, ids.shape[1] - 1)), ids)
        with model.autocast(device):
            loss = model.v_loss(net, x.to(device).contiguous(memory_format=torch.channels_last), ids.to(device), frames, clean_first=frames > 1,
                                t_power=cfg.video_t_power if frames > 1 else 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        with torch.no_grad():
            for p, e in zip(trainable, ema):
                e.lerp_(p, 1 - ema_decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}", img_s=f"{(step + 1 - start) * x.shape[0] * world / (time.time() - t0):.0f}")
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == steps):
            st = opt.state_dict()["state"]
            tensors = {f"p{i}": p for i, p in enumerate(trainable)} | {f"ema{i}": e for i, e in enumerate(ema)}
            tensors |= {f"m{i}": st[i]["exp_avg"] for i in st} | {f"v{i}": st[i]["exp_avg_sq"] for i in st}
            model.save_checkpoint(state_path, tensors, name + "_state", conf, step=step + 1)
        if rank == 0 and (step + 1) % cfg.sample_every == 0:
            on_sample(step + 1)
    with torch.no_grad():                                              # the EMA weights are the result
        for p, e in zip(trainable, ema):
            p.copy_(e)
    if world > 1:
        dist.barrier()
    return time.time() - t0

def batcher(data, ids, batch, frames, shift=False):
    """get_batch(step, rank, world): the same global batch for any number of ranks, this rank's share.
    With shift, each orbit starts at a random view (still a true orbit, from another first view)."""
    def get(step, rank, world):
        g = torch.Generator().manual_seed(step)
        idx, start = torch.randint(len(data), (batch,), generator=g), torch.randint(frames, (batch,), generator=g) * shift
        sl = slice(rank * batch // world, (rank + 1) * batch // world)
        if frames == 1:
            return data[idx[sl]], ids[idx[sl]]
        x = torch.stack([data[i].roll(-int(s), 0) for i, s in zip(idx[sl], start[sl])])   # (b,V,3,H,W)
        return x.flatten(0, 1), ids[idx[sl]]
    return get

# ----------------------------------------------------------------------------- evaluation

def caption_faithfulness(cfg, unet, prompts, device):
    """Share of samples for one-colour captions whose dominant object colour is the named colour."""
    one = [p for p in prompts if len({w for w in p.split() if w in render.COLOURS}) == 1][: cfg.n_faithful]
    ids, _ = unet.text.tokenize(one)
    imgs = torch.cat([model.sample(unet, i.to(device), 1, cfg.sample_steps, cfg.guidance, generator=torch.Generator().manual_seed(cfg.seed + k))[:, 0]
                      for k, i in enumerate(ids.split(32))]).cpu()
    named = [list(render.COLOURS).index(next(w for w in p.split() if w in render.COLOURS)) for p in one]
    hits = [model.dominant_colour((im + 1) / 2) == c for im, c in zip(imgs, named)]
    return float(np.mean(hits)), (imgs + 1) / 2, one

def save_grid(path, rows, scale=3):
    """rows: list of (N,3,H,W) in [0,1], each a row of the grid -> PNG."""
    grid = torch.cat([torch.cat(list(r), -1) for r in rows], -2)
    render.save_png(path, torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0])

def evaluate(cfg, out, device, views, res, data):
    """Orbits from (view 0, caption) of held-out assets: (a) video model, (b) image model frame by
    frame with the same noise, (c) copy of the input view, (d) white. PSNR/SSIM over views 1..V-1."""
    video, _ = model.load_unet(out / "video_model.safetensors", "video_model", "python finetune_video.py --phase video")
    image, _ = model.load_unet(out / "image_model.safetensors", "image_model", "python finetune_video.py --phase image")
    video, image = video.to(device).eval(), image.to(device).eval()
    true, caps = load_orbits(data / "assets/test", views, res, cfg.n_eval)        # (N,V,3,H,W)
    ids, unknown = video.text.tokenize(caps)
    gens = {}
    for name, net, g in (("video_model", video, cfg.video_guidance), ("image_model_per_frame", image, cfg.guidance)):
        chunks = [model.sample(net, i.to(device), views, cfg.sample_steps, g, first=f.to(device), generator=torch.Generator().manual_seed(cfg.seed + k),
                               temperature=cfg.temperature).cpu()
                  for k, (i, f) in enumerate(tqdm(list(zip(ids.split(16), true[:, 0].split(16))), desc=f"eval {name}", leave=False))]
        gens[name] = torch.cat(chunks)
    gens["copy_input"] = true[:, :1].expand_as(true)
    gens["white"] = torch.ones_like(true)
    far = [k for k in range(1, views) if min(k, views - k) * 360 / views >= 90]
    rows = {}
    for name, g in gens.items():
        for suffix, ks in (("", list(range(1, views))), ("_far", far)):
            m = model.view_metrics((g[:, ks].flatten(0, 1) + 1) / 2, (true[:, ks].flatten(0, 1) + 1) / 2)
            rows[name + suffix] = {"psnr": round(m["psnr"], 3), "ssim": round(m["ssim"], 4), "color_err": round(m["color_err"], 4)}
    faith, imgs, _ = caption_faithfulness(cfg, image, (data / "prompts.txt").read_text().splitlines(), device)
    rows["image_model_per_frame"]["caption_faithfulness"] = round(faith, 3)
    show = min(8, len(true))
    save_grid(out / "eval_grid.png", [torch.cat([gens["video_model"][i], true[i]], -1).add(1).div(2) for i in range(show)])
    frames = [torch.cat([torch.cat([gens["video_model"][i, v], true[i, v]], -1) for i in range(show)], -2) for v in range(views)]
    frames = [(torch.nn.functional.interpolate((f[None] + 1) / 2, scale_factor=3)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8) for f in frames]
    render.atomic_write(out / "eval.gif", lambda t: imageio.mimsave(t, frames, format="GIF", duration=0.25, loop=0))
    return rows, len(true)

def print_table(rows):
    print(f"{'row':28s} {'psnr':>7s} {'ssim':>7s} {'color_err':>9s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['psnr']:7.2f} {r['ssim']:7.3f} {r['color_err']:9.3f}")

# ----------------------------------------------------------------------------- main

def main():
    cfg = render.parse_config(Config, PRESETS)
    device, rank, world = model.setup(cfg)
    data, out = Path(cfg.out) / "0_data", Path(cfg.out) / "1_video"
    meta0 = render.read_meta(data, "python render.py" + (f" --preset {cfg.preset}" if cfg.preset != "tiny" else ""))
    if meta0.get("preset") != cfg.preset:
        raise render.DataError(f"{data}: was made with preset {meta0.get('preset')}, not {cfg.preset}; rerun `python render.py --preset {cfg.preset} --out {cfg.out}`")
    views, res = meta0["config"]["views"], meta0["config"]["res"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    phases = [cfg.phase] if cfg.phase != "auto" else (["image"] if not image_model_path(cfg).is_file() else []) + ["video", "eval"]
    t_start, rows, n_eval = time.time(), None, 0
    prompts = (data / "prompts.txt").read_text().splitlines()

    if "image" in phases:                                              # the pretrained stand-in
        imgs, caps = load_images(data)
        vocab = sorted({w for c in caps for w in c.split()})
        unet = model.UNet(vocab, ints(cfg.channels), ints(cfg.attn_res), res, cfg.text_dim).to(device).to(memory_format=torch.channels_last)
        ids, _ = unet.text.tokenize(caps)
        def on_sample(step):
            faith, shown, _ = caption_faithfulness(cfg, unet, prompts, device)
            save_grid(out / f"samples/image_{step:06d}.png", [shown[i : i + 8] for i in range(0, min(len(shown), 32), 8)])
            tqdm.write(f"step {step}: caption faithfulness {faith:.2f}")
        secs = train(cfg, unet, list(unet.parameters()), batcher(imgs, ids, cfg.image_batch, 1), cfg.image_steps, cfg.image_lr,
                     cfg.image_ema, 1, "image_model", out, device, rank, world, on_sample)
        if rank == 0:
            faith, shown, _ = caption_faithfulness(cfg, unet, prompts, device)
            save_grid(out / "samples/image_final.png", [shown[i : i + 8] for i in range(0, min(len(shown), 32), 8)])
            model.save_checkpoint(out / "image_model.safetensors", unet.state_dict(), "image_model", unet.config,
                                  steps=cfg.image_steps, seconds=round(secs), caption_faithfulness=faith, device=str(device))
            print(f"image model: caption faithfulness {faith:.2f} after {cfg.image_steps} steps ({secs / 60:.1f} min) -> {out / 'image_model.safetensors'}")

    if "video" in phases:                                              # Sec. 3.1: temporal layers only
        src = image_model_path(cfg)
        unet, _ = model.load_unet(src, "image_model", "python finetune_video.py --phase image", frames=views, mv_attn_res=ints(cfg.mv_attn_res))
        if rank == 0 and src.resolve() != (out / "image_model.safetensors").resolve():
            shutil.copyfile(src, out / ".image_model.tmp")
            Path(out / ".image_model.tmp").replace(out / "image_model.safetensors")
        for n, p in unet.named_parameters():
            p.requires_grad = n.startswith("temporal.")
        assert all(not p.requires_grad for n, p in unet.named_parameters() if not n.startswith("temporal."))
        unet = unet.to(device).to(memory_format=torch.channels_last)
        orbits, caps = load_orbits(data / "assets/train", views, res)
        ids, unknown = unet.text.tokenize(caps)
        if unknown:
            print(f"warning: {len(unknown)} caption words unknown to the image model ({', '.join(sorted(unknown)[:5])}...) map to <unk>")
        test, test_caps = load_orbits(data / "assets/test", views, res, 4)
        def on_sample(step):
            g = model.sample(unet, unet.text.tokenize(test_caps)[0].to(device), views, cfg.sample_steps, cfg.video_guidance, first=test[:, 0].to(device),
                             generator=torch.Generator().manual_seed(cfg.seed), temperature=cfg.temperature).cpu()
            save_grid(out / f"samples/video_{step:06d}.png", [torch.cat([a, b], -1).add(1).div(2) for a, b in zip(g, test)])
        trainable = [p for p in unet.parameters() if p.requires_grad]
        secs = train(cfg, unet, trainable, batcher(orbits, ids, cfg.video_batch, views, cfg.video_shift), cfg.video_steps, cfg.video_lr, cfg.video_ema,
                     views, "video_model", out, device, rank, world, on_sample)
        if rank == 0:
            on_sample(cfg.video_steps)
            model.save_checkpoint(out / "video_model.safetensors", unet.state_dict(), "video_model", unet.config, steps=cfg.video_steps, seconds=round(secs))
            print(f"video model: {sum(p.numel() for p in trainable) / 1e6:.2f}M temporal parameters trained, {cfg.video_steps} steps ({secs / 60:.1f} min)")

    if "eval" in phases and rank == 0:
        rows, n_eval = evaluate(cfg, out, device, views, res, data)
        render.save_json(out / "metrics.json", dict(stage="finetune_video", preset=cfg.preset, seconds=round(time.time() - t_start, 1), n_objects=n_eval, rows=rows))
        print_table(rows)
    if rank == 0:
        render.save_json(out / "meta.json", dict(stage="finetune_video", preset=cfg.preset, config=dataclasses.asdict(cfg), views=views, res=res,
                                                 phases=phases, versions=dict(torch=torch.__version__), world_version=render.WORLD_VERSION))
        print(f"stage 1 ({', '.join(phases)}) done in {(time.time() - t_start) / 60:.1f} min -> {out}\nnext: python generate_views.py")
    if world > 1:
        dist.destroy_process_group()

if __name__ == "__main__":
    render.run_cli(main)
