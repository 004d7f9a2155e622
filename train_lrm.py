"""Stage 3: train the LRM (image -> triplane NeRF) on the synthetic multi-view data (VFusion3D Sec. 3.2).

The paper's strategies for imperfect generated views, each behind a flag for the ablation:
multi-stage training (--low_frac: whole views at --low_res first, then --crop crops at full
resolution), an image-level loss (--w_ssim; SSIM stands in for LPIPS, which needs downloaded
weights), an opacity loss against the object mask (--w_mask), noise on the source camera
(--cam_noise), and the pixel loss as an option (--w_pixel, off for synthetic data as in the paper).

Reads:  out/2_views/<id>/ (or any folder of object folders, --data), out/0_data/assets/test/
Writes: out/3_lrm/lrm.safetensors, lrm_state.safetensors (for --resume), samples/, metrics.json, meta.json
Run:    python train_lrm.py                                   (tiny: about 15 minutes on 2 CPU cores)
        python train_lrm.py --preset micro --out /tmp/run      (seconds)
        torchrun --nproc_per_node=4 train_lrm.py --preset small --device cuda
"""
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import model
import render

# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    preset: str = "tiny"         # micro | tiny | small | paper
    out: str = "out"             # root holding the numbered stage folders
    device: str = "auto"         # auto | cpu | cuda | mps
    seed: int = 0                # repeatable runs on one machine
    data: str = ""               # folder of object folders ("" = <out>/2_views)
    max_objects: int = 0         # use only the first N objects of --data (0 = all; for the scaling curve)
    init: str = ""               # checkpoint to start from ("" = random weights)
    stage_dir: str = "3_lrm"     # output folder under --out
    resume: bool = True          # continue from <stage_dir>/lrm_state.safetensors if present
    patch: int = 4               # ViT patch size, pixels
    enc_dim: int = 128           # ViT width
    enc_layers: int = 4          # ViT blocks
    dim: int = 128               # triplane transformer width
    layers: int = 3              # triplane transformer blocks
    heads: int = 4               # attention heads
    tokens: int = 8              # triplane tokens per plane side (3 x tokens x tokens)
    plane_ch: int = 32           # channels per plane after the x(res/tokens) transposed convolution
    hidden: int = 64             # NeRF MLP width
    density_scale: float = 10.0  # density = scale * softplus(x - 1), per box unit
    token_init: str = "image"    # image (tokens start from the patch they project to) | learned
    plane_skip: int = 16         # channels of a pixel-aligned skip from the input view into the planes (0 = none, the paper's LRM)
    steps: int = 3400            # optimizer steps
    batch: int = 8               # objects per step (global, over all ranks)
    views: int = 4               # target views per object
    input_target: bool = True    # the input view is always one of the targets
    random_source: bool = True   # any view of an orbit may be the input (canonicalised)
    lr: float = 2e-3             # peak learning rate (AdamW, betas 0.9/0.95)
    warmup: int = 100            # linear warm-up steps, then cosine decay to 10%
    weight_decay: float = 0.05   # AdamW weight decay (not on biases, norms, tokens)
    low_res: int = 16            # multi-stage: render resolution of the first stage (whole views)
    low_frac: float = 0.5        # share of the steps in the low-resolution stage (0 = none)
    crop: int = 16               # second stage: crop size rendered at full resolution, pixels
    n_coarse: int = 16           # coarse samples per ray (no gradient: they place the fine ones)
    n_fine: int = 8              # importance samples per ray
    stratified: bool = True      # jitter the coarse samples
    w_pixel: float = 0.0         # pixel MSE weight (the paper drops it for synthetic views)
    w_ssim: float = 1.0          # image-level (1 - SSIM) loss weight
    w_mask: float = 1.0          # opacity loss weight (against alpha or the non-white pixels)
    cam_noise: float = 0.02      # std of the noise added to the 16-number source camera
    n_eval: int = 50             # held-out assets evaluated at the end
    mesh_res: int = 64           # marching-cubes grid for the evaluation meshes
    mesh_level: float = 5.0      # density level of the mesh surface
    sample_every: int = 250      # steps between sample renders
    ckpt_every: int = 100        # steps between resumable checkpoints


PRESETS = {
    "micro": dict(enc_dim=32, enc_layers=1, dim=32, layers=1, tokens=4, plane_ch=8, hidden=16, steps=6, batch=4, views=2,
                  low_res=8, crop=8, n_coarse=8, n_fine=8, n_eval=2, mesh_res=24, sample_every=3, ckpt_every=2, warmup=2),
    "tiny": {},
    "small": dict(enc_dim=384, enc_layers=8, dim=512, layers=8, heads=8, tokens=16, plane_ch=48, steps=30000, batch=32,
                  low_res=32, crop=32, n_coarse=48, n_fine=48, n_eval=100),
    "paper": dict(patch=8, enc_dim=768, enc_layers=12, dim=1024, layers=16, heads=16, tokens=32, plane_ch=80, steps=100000, batch=256,
                  low_res=128, crop=128, n_coarse=64, n_fine=64, n_eval=1000, mesh_res=256, plane_skip=0),
}
ARCH = ("patch", "enc_dim", "enc_layers", "dim", "layers", "heads", "tokens", "plane_ch", "hidden", "density_scale", "token_init", "plane_skip")

# ----------------------------------------------------------------------------- data


def check_data(folder, preset, hint, required):
    """A data folder's meta.json (its own, or stage 0's for assets/train) must match the preset; a
    folder of the user's own (--data) may have none."""
    folder = Path(folder)
    found = [c for c in (folder, folder.parent.parent) if (c / "meta.json").is_file()]
    if not found and not required:
        return
    meta = render.read_meta(found[0] if found else folder, hint)
    if meta.get("preset") != preset:
        raise render.DataError(f"{folder}: was made with preset {meta.get('preset')}, not {preset}; rerun `{hint} --preset {preset}`")


def load_set(folder, res, hint, limit=None):
    """Every object folder under `folder` -> dict of tensors: images (N,V,3,H,W) in [0,1] on white,
    masks (N,V,1,H,W) (alpha where known, else the non-white pixels), c2w (N,V,4,4), K (N,V,3,3)."""
    dirs = sorted(p for p in Path(folder).iterdir() if p.is_dir() and (p / "000.png").is_file())[:limit] if Path(folder).is_dir() else []
    if not dirs:
        raise render.DataError(f"{folder}: no object folders (000.png, cameras.safetensors, ...); run `{hint}` first")
    objs = [render.load_object(d, res) for d in tqdm(dirs, desc=f"loading {folder}", leave=False)]
    views = {len(o["images"]) for o in objs}
    if len(views) != 1:
        raise render.DataError(f"{folder}: objects have different view counts {sorted(views)}; regenerate it")
    masks = [o["masks"] if o["masks"] is not None else (o["images"] < 0.92).any(1, keepdim=True).float() for o in objs]
    return dict(images=torch.stack([o["images"] for o in objs]), masks=torch.stack(masks), c2w=torch.stack([o["c2w"] for o in objs]),
                K=torch.stack([o["K"] for o in objs]), dirs=dirs)


def make_batch(cfg, data, step, res):
    """The global batch of step `step` (same for any number of ranks): inputs, canonical cameras,
    targets (whole views at low resolution in the first stage, random crops later)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    N, V = data["images"].shape[:2]
    B, T = cfg.batch, min(cfg.views, V)
    idx = torch.randint(N, (B,), generator=g)
    src = torch.randint(V, (B,), generator=g) if cfg.random_source else torch.zeros(B, dtype=torch.long)
    order = torch.rand(B, V, generator=g).masked_fill(F.one_hot(src, V).bool(), -1 if cfg.input_target else 2).argsort(1)
    tgt = order[:, :T]                                                          # (B,T), the source first if input_target
    c2w, _ = model.canonicalise(data["c2w"][idx, src], data["c2w"][idx[:, None], tgt])  # (B,T,4,4)
    K = data["K"][idx[:, None], tgt]
    cam = model.camera_vector(model.CANONICAL.expand(B, 4, 4), data["K"][idx, src]) + cfg.cam_noise * torch.randn(B, 16, generator=g)
    img, mask = data["images"][idx[:, None], tgt], data["masks"][idx[:, None], tgt]  # (B,T,C,H,W)
    low = step < cfg.low_frac * cfg.steps
    if low:                                                                     # stage 1: whole views, low resolution
        f = res // cfg.low_res
        img, mask, crop = F.avg_pool2d(img.flatten(0, 1), f).unflatten(0, (B, T)), F.avg_pool2d(mask.flatten(0, 1), f).unflatten(0, (B, T)), None
    else:                                                                       # stage 2: random crops at full resolution
        top, left = torch.randint(res - cfg.crop + 1, (2, B * T), generator=g)
        rows = (top[:, None] + torch.arange(cfg.crop))[:, :, None]
        cols = (left[:, None] + torch.arange(cfg.crop))[:, None, :]
        pick = lambda x: x.flatten(0, 1)[torch.arange(B * T)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).unflatten(0, (B, T))
        img, mask, crop = pick(img), pick(mask), (top, left, cfg.crop)
    return dict(src=data["images"][idx, src], cam=cam, c2w=c2w, K=K, target=img, mask=mask, crop=crop, res=cfg.low_res if low else res)


def shard(batch, rank, world):
    """This rank's slice of the global batch."""
    n = batch["src"].shape[0]
    sl = slice(rank * n // world, (rank + 1) * n // world)
    out = {k: (v[sl] if torch.is_tensor(v) else v) for k, v in batch.items()}
    if batch["crop"] is not None:
        t = batch["c2w"].shape[1]
        out["crop"] = (batch["crop"][0][sl.start * t : sl.stop * t], batch["crop"][1][sl.start * t : sl.stop * t], batch["crop"][2])
    return out


# ----------------------------------------------------------------------------- loop


def loss_fn(cfg, lrm, b, device):
    """Pixel + image-level (SSIM) + opacity losses on the rendered targets -> total, parts."""
    rgb, acc = lrm(b["src"].to(device), b["cam"].to(device), b["c2w"].to(device), b["K"].to(device), b["res"], b["crop"],
                   n_coarse=cfg.n_coarse, n_fine=cfg.n_fine, stratified=cfg.stratified)   # (B,T,3,h,w), (B,T,1,h,w)
    target, mask = b["target"].to(device), b["mask"].to(device)
    parts = {"pixel": F.mse_loss(rgb, target), "ssim": model.ssim_loss(rgb.flatten(0, 1), target.flatten(0, 1)), "mask": F.mse_loss(acc, mask)}
    return cfg.w_pixel * parts["pixel"] + cfg.w_ssim * parts["ssim"] + cfg.w_mask * parts["mask"], parts


@torch.no_grad()
def save_samples(path, lrm, test, device, n=4):
    """Grid: per held-out object, the input view | rendered orbit | true orbit."""
    rows = []
    for i in range(min(n, len(test["images"]))):
        c2w, _ = model.canonicalise(test["c2w"][i, :1], test["c2w"][i][None])
        cam = model.camera_vector(c2w[:, 0], test["K"][i, :1]).to(device)
        rgb, _ = lrm(test["images"][i, :1].to(device), cam, c2w.to(device), test["K"][i][None].to(device), test["images"].shape[-1], stratified=False)
        rows.append(torch.cat([test["images"][i, 0], torch.cat(list(rgb[0].float().cpu()), -1), torch.cat(list(test["images"][i]), -1)], -1))
    render.save_png(path, F.interpolate(torch.cat(rows, -2)[None], scale_factor=3, mode="nearest")[0])


def run(cfg, stage="train_lrm", hint="python generate_views.py"):
    """Train (or fine-tune) an LRM as cfg says, evaluate it on the held-out assets, write the stage folder."""
    device, rank, world = model.setup(cfg)
    out, data_dir = Path(cfg.out) / cfg.stage_dir, Path(cfg.data or Path(cfg.out) / "2_views")
    meta0 = render.read_meta(Path(cfg.out) / "0_data", "python render.py")
    res = meta0["config"]["res"]
    check_data(data_dir, cfg.preset, hint, required=not cfg.data)
    data = load_set(data_dir, res, hint, cfg.max_objects or None)
    test = load_set(Path(cfg.out) / "0_data/assets/test", res, "python render.py", cfg.n_eval)
    arch = {k: getattr(cfg, k) for k in ARCH}
    lrm = model.LRM(res=res, **arch)
    if cfg.init:
        init, _ = model.load_lrm(cfg.init, "python train_lrm.py")
        if init.config != lrm.config:
            diff = ", ".join(f"{k} {init.config.get(k)} there, {v} here" for k, v in lrm.config.items() if init.config.get(k) != v)
            raise render.DataError(f"{cfg.init}: an LRM of another config ({diff}); pass the same --preset and architecture flags")
        lrm.load_state_dict(init.state_dict())
    lrm.to(device).train()
    params = [p for p in lrm.parameters()]
    decay = [p for n, p in lrm.named_parameters() if p.ndim >= 2 and "tokens" not in n and "pos" not in n]
    nodecay = [p for n, p in lrm.named_parameters() if not (p.ndim >= 2 and "tokens" not in n and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": nodecay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    state_path, start, losses = out / "lrm_state.safetensors", 0, []
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "resume", "n_eval", "sample_every", "ckpt_every", "mesh_res", "mesh_level")}
    if cfg.resume and state_path.is_file():
        tensors, saved, meta = model.load_checkpoint(state_path, stage + "_state", f"python {stage}.py")
        if saved != conf:
            raise render.DataError(f"{state_path}: from another config; delete it or pass --resume false")
        start, losses = int(meta["step"]), json.loads(meta["losses"])
        model.load_weights(lrm, {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}, state_path)
        opt.load_state_dict({"state": {i: {"step": torch.tensor(float(start)), "exp_avg": tensors[f"m{i}"], "exp_avg_sq": tensors[f"v{i}"]}
                                       for i in range(len(params)) if f"m{i}" in tensors}, "param_groups": opt.state_dict()["param_groups"]})
        print(f"resuming {stage} from step {start}")
    net = torch.nn.parallel.DistributedDataParallel(lrm) if world > 1 else lrm
    if rank == 0:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        print(f"{stage}: {len(data['images'])} objects from {data_dir}, LRM {sum(p.numel() for p in params) / 1e6:.2f}M parameters, {cfg.steps} steps")
    bar = tqdm(range(start, cfg.steps), desc=stage, initial=start, total=cfg.steps, disable=rank != 0)
    t0, avg = time.time(), None
    for step in bar:
        model.seed_all(cfg.seed * 1_000_003 + step * world + rank)
        for gr in opt.param_groups:
            gr["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.55 + 0.45 * np.cos(np.pi * step / cfg.steps))
        b = shard(make_batch(cfg, data, step, res), rank, world)
        with model.autocast(device):
            loss, parts = loss_fn(cfg, net, b, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        shown = loss.detach().clone()
        if world > 1:
            dist.all_reduce(shown, op=dist.ReduceOp.AVG)
        losses.append(round(shown.item(), 6))
        avg = shown.item() if avg is None else 0.95 * avg + 0.05 * shown.item()
        bar.set_postfix(loss=f"{avg:.4f}", ssim=f"{1 - parts['ssim'].item():.3f}", obj_s=f"{(step + 1 - start) * cfg.batch / (time.time() - t0):.1f}")
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
            st = opt.state_dict()["state"]
            tensors = {"w." + k: v for k, v in lrm.state_dict().items()} | {f"m{i}": s["exp_avg"] for i, s in st.items()} | {f"v{i}": s["exp_avg_sq"] for i, s in st.items()}
            model.save_checkpoint(state_path, tensors, stage + "_state", conf, step=step + 1, losses=losses)
        if rank == 0 and (step + 1) % cfg.sample_every == 0:
            lrm.eval(), save_samples(out / f"samples/step_{step + 1:06d}.png", lrm, test, device), lrm.train()
    seconds = time.time() - t0
    if rank == 0:
        lrm.eval()
        model.save_checkpoint(out / "lrm.safetensors", lrm.state_dict(), "lrm", lrm.config, stage=stage, steps=cfg.steps, data=str(data_dir),
                              n_objects=len(data["images"]))
        save_samples(out / "samples/final.png", lrm, test, device)
        rows, _ = model.evaluate_lrm(lrm, test["dirs"], device, cfg.mesh_res, cfg.mesh_level)
        render.save_json(out / "metrics.json", dict(stage=stage, preset=cfg.preset, seconds=round(seconds, 1), n_objects=len(test["dirs"]),
                                                    train_objects=len(data["images"]), steps=cfg.steps, rows=rows))
        render.save_json(out / "meta.json", dict(stage=stage, preset=cfg.preset, config=dataclasses.asdict(cfg), res=res,
                                                 versions=dict(torch=torch.__version__), world_version=render.WORLD_VERSION))
        print_table(rows)
        print(f"{stage} done: {cfg.steps - start} steps in {seconds / 60:.1f} min ({(cfg.steps - start) * cfg.batch / seconds:.1f} objects/s) -> {out}")
    if world > 1:
        dist.destroy_process_group()
    return out


def print_table(rows):
    keys = ("psnr", "ssim", "color_err", "chamfer_l1", "fscore")
    print(f"{'row':14s}" + "".join(f"{k:>11s}" for k in keys))
    for name, r in rows.items():
        print(f"{name:14s}" + "".join(f"{r[k]:11.4f}" if k in r else f"{'-':>11s}" for k in keys))


if __name__ == "__main__":
    render.run_cli(lambda: run(render.parse_config(Config, PRESETS)))
