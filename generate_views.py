"""Stage 2: the data engine (VFusion3D Sec. 3.1-3.2). Prompts -> first frame (the stage-1 image
model, text-to-image) -> orbit video (the stage-1 video model, image + text to video) -> one object
folder per prompt, in exactly the format of the real assets, so train_lrm.py reads both with one
loader. Images can be prompts too (--images DIR): they become the first frames.

A simple automatic filter stands in for the paper's DINO-feature classifier: it rejects orbits
whose views are almost all background, flooded with colour, whose object area jumps between
neighbouring views, or whose object colour drifts away from the first frame's (--no_filter: off).

Reads:  out/0_data/prompts.txt (or --prompts FILE, or --images DIR), out/1_video/*.safetensors
Writes: out/2_views/<id>/ (000.png.., cameras.safetensors, prompt.txt), <id>.rejected markers,
        meta.json (counts, settings, time, filter statistics), metrics.json, preview.png
Run:    python generate_views.py                          (tiny: 1000 prompts, about 9 minutes on 2 CPU cores)
        python generate_views.py --preset micro --out /tmp/run
        torchrun --nproc_per_node=4 generate_views.py --preset small --device cuda   (ranks split the prompts;
        put `--` before the script's flags to pass --num, which torchrun takes for its own --numa-binding)
"""
import dataclasses
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import model
import render

# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    preset: str = "tiny"          # micro | tiny | small | paper
    out: str = "out"              # root holding the numbered stage folders
    device: str = "auto"          # auto | cpu | cuda | mps
    seed: int = 0                 # repeatable runs on one machine
    prompts: str = ""             # text prompts, one a line ("" = <out>/0_data/prompts.txt)
    images: str = ""              # folder of PNG/JPG images used as first frames instead (+ optional captions.txt)
    num: int = 1000               # prompts to turn into orbits (the first `num` of the file)
    batch: int = 25               # orbits generated together
    steps: int = 8                # DDIM steps of both samplers
    guidance: float = 3.0         # classifier-free guidance of the text-to-image first frame
    video_guidance: float = 1.0   # classifier-free guidance of the orbit (1 = off, half the cost)
    temperature: float = 0.2      # scale of the orbit sampler's starting noise (as stage 1's evaluation; 1 = plain DDIM)
    filter: bool = True           # reject bad orbits (--no_filter keeps everything)
    min_area: float = 0.01        # filter: smallest object share of any view
    max_area: float = 0.75        # filter: largest object share of any view
    max_jump: float = 0.6         # filter: largest relative change of object area between neighbours
    max_drift: float = 0.25       # filter: largest mean-colour distance of a view from the first frame
    n_eval: int = 50              # held-out assets whose (view 0, caption) orbits are scored


PRESETS = {
    "micro": dict(num=8, batch=4, steps=3, n_eval=2, filter=False),   # micro models draw noise: keep it all
    "tiny": {},
    "small": dict(num=50000, batch=256, steps=25, n_eval=100),
    "paper": dict(num=4000000, batch=1024, steps=50, n_eval=1000),
}

# ----------------------------------------------------------------------------- data


def read_prompts(cfg, data, res):
    """-> list of (id, caption, first frame (3,H,W) in [0,1] or None). Every image is read (and
    checked) before anything is generated, so a corrupt one stops the run with nothing written."""
    if cfg.images:
        folder = Path(cfg.images)
        if not folder.is_dir():
            raise render.DataError(f"{folder}: not a folder of images; pass --images DIR")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[: cfg.num]
        if not files:
            raise render.DataError(f"{folder}: holds no .png/.jpg images")
        caps = dict(l.split("\t", 1) for l in (folder / "captions.txt").read_text().splitlines() if "\t" in l) if (folder / "captions.txt").is_file() else {}
        return [(p.stem, caps.get(p.stem, ""), load_first_frame(p, res)) for p in files]
    path = Path(cfg.prompts or data / "prompts.txt")
    try:
        lines = [l.strip() for l in path.read_text().splitlines() if l.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise render.DataError(f"{path}: unreadable prompts file ({type(e).__name__}); pass --prompts FILE with one caption a line") from None
    if not lines:
        raise render.DataError(f"{path}: no prompts in it; write one caption a line")
    return [(f"{i:05d}", c, None) for i, c in enumerate(lines[: cfg.num])]


def load_first_frame(path, res):
    """Any image -> (3,res,res) in [0,1]: RGBA composited on white, other sizes resized (with a warning)."""
    rgb, _ = render.load_png(path)
    if rgb.shape[-1] != res or rgb.shape[-2] != res:
        print(f"warning: {path} is {rgb.shape[-1]}x{rgb.shape[-2]}, resized to {res}x{res}")
        rgb = F.interpolate(rgb[None], size=(res, res), mode="area")[0]
    return rgb


# ----------------------------------------------------------------------------- the filter


def judge(views, cfg):
    """views (V,3,H,W) in [0,1] -> None if kept, else the reason for rejecting the orbit."""
    mask = (views < 0.92).any(1)                                          # (V,H,W) object pixels
    area = mask.float().mean((1, 2))
    if area.min() < cfg.min_area:
        return "empty_view"
    if area.max() > cfg.max_area:
        return "flooded_view"
    nxt = area.roll(-1)
    if ((area - nxt).abs() / torch.maximum(area, nxt)).max() > cfg.max_jump:
        return "area_jump"
    colour = torch.stack([model.object_colour(v) for v in views])
    if (colour - colour[0]).abs().mean(1).max() > cfg.max_drift:
        return "colour_drift"
    return None


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(cfg, image_unet, video_unet, names, captions, firsts, views, res, device):
    """Captions (+ optional first frames in [0,1]) -> orbits (B,V,3,H,W) in [0,1]. Each prompt's
    noise comes from its own name, so an orbit does not depend on its batch (or on a resume)."""
    ids, _ = video_unet.text.tokenize(captions)
    gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(n.encode())) for n in names]
    noise = torch.stack([torch.randn(views + 1, 3, res, res, generator=g) for g in gens])       # (B,1+V,3,H,W)
    if firsts is None:                                                     # text -> first frame (factorised generation)
        firsts = (model.sample(image_unet, ids.to(device), 1, cfg.steps, cfg.guidance, noise=noise[:, :1])[:, 0].cpu() + 1) / 2
    orbit = model.sample(video_unet, ids.to(device), views, cfg.steps, cfg.video_guidance, first=(firsts * 2 - 1).to(device), noise=noise[:, 1:],
                         temperature=cfg.temperature)
    return ((orbit.cpu() + 1) / 2).clamp(0, 1)


def evaluate(cfg, image_unet, video_unet, data, views, res, device):
    """The engine on held-out assets: orbits from (true view 0, caption) against the true views."""
    dirs = sorted(p for p in (data / "assets/test").iterdir() if p.is_dir())[: cfg.n_eval]
    objs = [render.load_object(d, res, views) for d in dirs]
    true = torch.stack([o["images"] for o in objs])
    gen = torch.cat([generate(cfg, image_unet, video_unet, [d.name for d in dirs[i : i + cfg.batch]], [o["prompt"] for o in objs[i : i + cfg.batch]],
                              true[i : i + cfg.batch, 0], views, res, device) for i in range(0, len(objs), cfg.batch)])
    far = [k for k in range(1, views) if min(k, views - k) * 360 / views >= 90]
    rows = {}
    for name, ks in (("synthetic", list(range(1, views))), ("synthetic_far", far)):
        m = model.view_metrics(gen[:, ks].flatten(0, 1), true[:, ks].flatten(0, 1))
        rows[name] = {k: round(v, 4) for k, v in m.items()}
    return rows


def main():
    cfg = render.parse_config(Config, PRESETS)
    device, rank, world = model.setup(cfg)
    data, out = Path(cfg.out) / "0_data", Path(cfg.out) / "2_views"
    meta0 = render.read_meta(data, "python render.py")
    meta1 = render.read_meta(Path(cfg.out) / "1_video", "python finetune_video.py")
    if meta1.get("preset") != cfg.preset or meta0.get("preset") != cfg.preset:
        raise render.DataError(f"{cfg.out}: stages 0-1 were run with preset {meta1.get('preset')}, not {cfg.preset}; rerun them with --preset {cfg.preset}")
    views, res = meta0["config"]["views"], meta0["config"]["res"]
    hint = "python finetune_video.py" + (f" --preset {cfg.preset}" if cfg.preset != "tiny" else "")
    image_unet = model.load_unet(Path(cfg.out) / "1_video/image_model.safetensors", "image_model", hint)[0].to(device).eval()
    video_unet = model.load_unet(Path(cfg.out) / "1_video/video_model.safetensors", "video_model", hint)[0].to(device).eval()
    if video_unet.config["res"] != res or video_unet.config["frames"] != views:
        raise render.DataError(f"{Path(cfg.out) / '1_video/video_model.safetensors'}: made for {video_unet.config['frames']} views of "
                               f"{video_unet.config['res']} px, stage 0 has {views} of {res}; rerun `{hint}`")
    items = read_prompts(cfg, data, res)
    unknown = set().union(*(video_unet.text.tokenize([c])[1] for _, c, _ in items[:2000]))
    if unknown and rank == 0:
        print(f"warning: words the text encoder has never seen map to <unk>: {', '.join(sorted(unknown)[:8])}")
    out.mkdir(parents=True, exist_ok=True)
    done = lambda i: (out / i / f"{views - 1:03d}.png").is_file() and (out / i / "prompt.txt").is_file() or (out / f"{i}.rejected").is_file()
    todo = [it for k, it in enumerate(items) if k % world == rank and not done(it[0])]     # this rank's share
    c2w, K = render.orbit(views)
    t0, made = time.time(), 0
    bar = tqdm(total=len(todo), desc=f"stage 2 rank {rank}" if world > 1 else "stage 2", unit="orbit", disable=rank != 0 and world > 1)
    for start in range(0, len(todo), cfg.batch):
        chunk = todo[start : start + cfg.batch]
        firsts = torch.stack([f for _, _, f in chunk]) if cfg.images else None
        orbits = generate(cfg, image_unet, video_unet, [i for i, _, _ in chunk], [c for _, c, _ in chunk], firsts, views, res, device)
        for (i, caption, _), orbit in zip(chunk, orbits):
            reason = judge(orbit, cfg) if cfg.filter else None
            if reason is None:
                render.write_object(out / i, orbit, c2w, K, caption)
            else:
                render.atomic_write(out / f"{i}.rejected", lambda t: t.write_text(reason + "\n"))
        made += len(chunk)
        bar.update(len(chunk))
        bar.set_postfix(orbits_per_min=f"{made / (time.time() - t0) * 60:.0f}")
    bar.close()
    seconds = time.time() - t0
    if world > 1:
        dist.barrier()
    if rank == 0:
        kept = sorted(p.name for p in out.iterdir() if p.is_dir() and (p / "prompt.txt").is_file())
        reasons = [p.read_text().strip() for p in out.glob("*.rejected")]
        stats = {r: reasons.count(r) for r in ("empty_view", "flooded_view", "area_jump", "colour_drift")}
        rows = evaluate(cfg, image_unet, video_unet, data, views, res, device)
        render.save_json(out / "metrics.json", dict(stage="generate_views", preset=cfg.preset, seconds=round(seconds, 1), n_objects=cfg.n_eval, rows=rows))
        render.save_json(out / "meta.json", dict(stage="generate_views", preset=cfg.preset, config=dataclasses.asdict(cfg), views=views, res=res,
                                                 counts=dict(prompts=len(items), kept=len(kept), rejected=len(reasons)), filter=stats,
                                                 seconds=round(seconds, 1), orbits_per_minute=round(made / max(seconds, 1e-6) * 60, 1),
                                                 world_version=render.WORLD_VERSION, versions=dict(torch=torch.__version__)))
        if kept:
            render.contact_sheet(out / "preview.png", [out / k for k in kept[:8]])
        print(f"stage 2 done in {seconds / 60:.1f} min: {len(kept)} orbits kept, {len(reasons)} rejected {stats} -> {out}")
        for name, r in rows.items():
            print(f"  {name:14s} psnr {r['psnr']:6.2f}  ssim {r['ssim']:.3f}  color_err {r['color_err']:.3f}   (held-out assets, view 0 + caption)")
        print("next: python train_lrm.py")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    render.run_cli(main)
