"""Stage 5: image (or text) -> triplane -> coloured mesh + turntable, the held-out evaluation, and the
paper's comparison table in miniature (VFusion3D Sec. 4: 3D data only vs synthetic only vs both).

Reads:  an LRM checkpoint (default: the newest under --out, out/4_finetune before out/3_lrm),
        an image file or folder (--image), or a caption (--prompt, drawn by the stage-1 image model)
Writes: out/5_infer/<name>/ input.png, mesh.obj, mesh.ply, turntable.gif (+ .mp4 with imageio-ffmpeg), views/
        --eval DIR: out/5_infer/<name>/metrics.json;  --table: out/table/ metrics.json, table.md,
        scaling.md (+ scaling.png with matplotlib), scaling_scarce.md after `run_all.sh scarce`, compare_*.gif
Run:    python infer.py --image out/0_data/assets/test/00000/000.png
        python infer.py --prompt "a small red cone on top of a large blue box"
        python infer.py --eval out/0_data/assets/test --model out/4_finetune/lrm.safetensors
        python infer.py --table          (after run_all.sh's experiment step)
        (inference needs no torchrun: one image at a time)
"""
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F

import model
import render

# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    preset: str = "tiny"        # micro | tiny | small | paper (only picks the default image model)
    out: str = "out"            # root holding the numbered stage folders
    device: str = "auto"        # auto | cpu | cuda | mps
    seed: int = 0               # noise of --prompt's first frame
    image: str = ""             # an image file or a folder of them (PNG/JPG; RGBA or a near-white background)
    prompt: str = ""            # a caption instead: the stage-1 image model draws the first frame (text-to-3D)
    model: str = ""             # LRM checkpoint ("" = newest under --out: 4_finetune, then 3_lrm)
    name: str = ""              # output folder under <out>/5_infer ("" = from the input's name)
    mesh_res: int = 64          # marching-cubes grid per side
    mesh_level: float = 5.0     # density level of the surface (density = scale * softplus(x - 1), per box unit)
    turntable: int = 24         # turntable frames (elevation 20 degrees, the input view first)
    render_res: int = 0         # turntable/view resolution, pixels (0 = the model's)
    samples: int = 16           # turntable samples per ray, coarse and importance each (training's; --eval uses 32)
    views: int = 8              # rendered views saved under views/
    steps: int = 20             # DDIM steps for --prompt
    guidance: float = 3.0       # classifier-free guidance for --prompt
    eval: str = ""              # folder of real assets: score the model on them instead
    n_eval: int = 0             # assets to score (0 = all)
    table: bool = False         # assemble out/table from the experiment's stage folders


PRESETS = {"micro": dict(mesh_res=24, turntable=4, views=2, steps=3), "tiny": {}, "small": dict(mesh_res=128), "paper": dict(mesh_res=256)}

# ----------------------------------------------------------------------------- inputs


def default_model(cfg):
    for stage in ("4_finetune", "3_lrm"):
        if (Path(cfg.out) / stage / "lrm.safetensors").is_file():
            return Path(cfg.out) / stage / "lrm.safetensors"
    raise render.DataError(f"{cfg.out}: no trained LRM (4_finetune/ or 3_lrm/); run `python train_lrm.py` or pass --model")


def frame_object(rgb, res):
    """Find the object (non-white pixels), recentre it if it is off-centre, rescale it if it is much
    smaller or larger than the training framing (30-80% of the frame), resize to res x res.
    rgb (3,H,W) on white -> (3,res,res). A view already framed like the training data passes unchanged."""
    mask = (rgb < 0.92).any(0)
    if mask.float().mean() < 1e-3:
        raise render.DataError("no object found: the image is (almost) all white background; pass an image with an object on white")
    H, W = rgb.shape[1:]
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    cy, cx = (rows[0] + rows[-1] + 1).item() / 2, (cols[0] + cols[-1] + 1).item() / 2
    extent = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1).item() / max(H, W)       # object size / frame
    centred = abs(cy - H / 2) < 0.15 * H and abs(cx - W / 2) < 0.15 * W
    if centred and 0.3 <= extent <= 0.8 and H == W == res:
        return rgb
    cy, cx = (H / 2, W / 2) if centred else (cy, cx)
    side = max(H, W) * extent / min(max(extent, 0.3), 0.8)                   # square window to crop, pixels
    if side > 2 * res:                                                       # area-downsample big images first
        s = 2 * res / side
        rgb = F.interpolate(rgb[None], scale_factor=s, mode="area", recompute_scale_factor=False)[0]
        H, W, cy, cx, side = rgb.shape[1], rgb.shape[2], cy * s, cx * s, side * s
    theta = torch.tensor([[side / W, 0, 2 * cx / W - 1], [0, side / H, 2 * cy / H - 1]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], (1, 3, 2 * res, 2 * res), align_corners=False)
    out = F.grid_sample(rgb[None] - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1  # white outside
    return F.avg_pool2d(out, 2)[0].clamp(0, 1)


def read_inputs(cfg, res, device):
    """-> list of (name, image (3,res,res) in [0,1])."""
    if cfg.prompt:
        path = Path(cfg.out) / "1_video/image_model.safetensors"
        path = path if path.is_file() else Path(f"weights/image_model_{cfg.preset}.safetensors")
        unet, _ = model.load_unet(path, "image_model", "python finetune_video.py --phase image")
        ids, unknown = unet.text.tokenize([cfg.prompt])
        if unknown:
            print(f"warning: unknown words {', '.join(sorted(unknown))} (the model only knows its captions' vocabulary); they are ignored")
        img = model.sample(unet.to(device).eval(), ids.to(device), 1, cfg.steps, cfg.guidance, generator=torch.Generator().manual_seed(cfg.seed))
        img = F.interpolate((img[:, 0].cpu() + 1) / 2, size=(res, res), mode="area")[0] if img.shape[-1] != res else (img[0, 0].cpu() + 1) / 2
        return [(cfg.name or re.sub(r"[^a-z0-9]+", "_", cfg.prompt.lower()).strip("_")[:60] or "prompt", img)]
    src = Path(cfg.image)
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")) if src.is_dir() else [src]
    if not files or not files[0].exists():
        raise render.DataError(f"{src}: no such image or folder of images; pass --image FILE|DIR or --prompt TEXT")
    out = []
    for p in files:
        rgb, _ = render.load_png(p)
        try:
            out.append((cfg.name if cfg.name and len(files) == 1 else f"{p.parent.name}_{p.stem}" if p.stem.isdigit() else p.stem, frame_object(rgb, res)))
        except render.DataError as e:
            raise render.DataError(f"{p}: {e}") from None
    return out


# ----------------------------------------------------------------------------- 3D


@torch.no_grad()
def reconstruct(cfg, lrm, name, img, device):
    """One image -> the files of out/5_infer/<name>/, with the time of each step."""
    folder, res = Path(cfg.out) / "5_infer" / name, cfg.render_res or lrm.config["res"]
    times, t = {}, time.perf_counter()
    c2w, K = render.orbit(cfg.turntable)
    cam = model.camera_vector(model.CANONICAL[None], K[:1]).to(device)
    planes = lrm(img[None].to(device), cam)                                    # (1,3,C,P,P)
    times["triplane"], t = time.perf_counter() - t, time.perf_counter()
    v, f, rgb = model.lrm_mesh(lrm, planes[0].float(), cfg.mesh_res, cfg.mesh_level)
    times["mesh"], t = time.perf_counter() - t, time.perf_counter()
    frames, _ = lrm.render(planes, c2w[None].to(device), K[None].to(device), res, n_coarse=cfg.samples, n_fine=cfg.samples, stratified=False)
    frames = frames[0].float().cpu()                                           # (T,3,res,res)
    times["turntable"] = time.perf_counter() - t
    render.save_png(folder / "input.png", img)
    render.write_obj(folder / "mesh.obj", v.cpu(), f.cpu(), rgb.cpu())
    render.write_ply(folder / "mesh.ply", v.cpu(), f.cpu(), rgb.cpu())
    gif = [(F.interpolate(x[None], scale_factor=4, mode="nearest")[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8) for x in frames]
    render.atomic_write(folder / "turntable.gif", lambda p: imageio.mimsave(p, gif, format="GIF", duration=0.08, loop=0))
    try:
        render.atomic_write(folder / "turntable.mp4", lambda p: imageio.mimsave(p, gif, format="FFMPEG", fps=12))
    except (ImportError, ValueError, RuntimeError):
        pass                                                                   # imageio-ffmpeg is optional
    for i in range(cfg.views):
        render.save_png(folder / "views" / f"{i:03d}.png", frames[i * cfg.turntable // cfg.views])
    print(f"{name}: {len(v)} vertices, {len(f)} faces | triplane {times['triplane']:.2f} s, mesh {times['mesh']:.2f} s, "
          f"turntable {times['turntable']:.2f} s = {sum(times.values()):.2f} s -> {folder}")
    return times


# ----------------------------------------------------------------------------- the experiment table


def experiment_table(cfg):
    """out/table: the paper's comparison (A 3D only, B synthetic only, C synthetic then 3D) and the
    scaling curve (C with a quarter, a half and all of the synthetic set), from each run's metrics;
    the same with a quarter of the real assets (`_scarce`) where `run_all.sh scarce` has run."""
    root, table = Path(cfg.out), Path(cfg.out) / "table"
    runs = {"A_3d_only": "4_from_scratch", "B_synthetic_only": "3_lrm", "C_synthetic_then_3d": "4_finetune",
            "C_synthetic_quarter": "scaling/quarter/4_finetune", "C_synthetic_half": "scaling/half/4_finetune",
            "A_3d_only_scarce": "4_from_scratch_scarce", "C_synthetic_then_3d_scarce": "4_finetune_scarce",   # 1/4 of the real assets
            "C_synthetic_quarter_scarce": "scaling/quarter/4_finetune_scarce", "C_synthetic_half_scarce": "scaling/half/4_finetune_scarce"}
    rows, info = {}, {}
    for row, stage in runs.items():
        path = root / stage / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            rows[row] = m["rows"]["lrm"]
            info[row] = dict(seconds=m["seconds"], steps=m.get("steps"), train_objects=m.get("train_objects"), stage_dir=stage)
    if not {"A_3d_only", "B_synthetic_only", "C_synthetic_then_3d"} <= set(rows):
        raise render.DataError(f"{root}: the experiment needs 4_from_scratch, 3_lrm and 4_finetune; run `bash run_all.sh` first")
    base = json.loads((root / "4_finetune/metrics.json").read_text())["rows"]
    rows["copy_input"], rows["sphere"] = base["copy_input"], base["sphere"]
    keys = ("psnr", "ssim", "color_err", "chamfer_l1", "fscore")
    lines = ["| row | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r} | " + " | ".join(f"{v[k]:.4f}" if k in v else "-" for k in keys) + " |" for r, v in rows.items()]
    render.save_json(table / "metrics.json", dict(stage="table", preset=cfg.preset, n_objects=json.loads((root / "4_finetune/metrics.json").read_text())["n_objects"],
                                                 seconds=round(sum(i["seconds"] for i in info.values()), 1), rows=rows, runs=info))
    render.write_text(table / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    for real in ("", "_scarce"):                             # all of the real assets, then a quarter
        scaling_curve(cfg, table / f"scaling{real}", rows, info, [f"C_synthetic_{part}{real}" for part in ("quarter", "half", "then_3d")])
    comparison_gifs(cfg, table, root / "4_from_scratch/lrm.safetensors", root / "4_finetune/lrm.safetensors")
    return rows


def scaling_curve(cfg, name, rows, info, curve):
    """(C) against the number of synthetic objects it was pre-trained on: <name>.md (+ <name>.png)."""
    pts = []
    for row in curve:
        if row in rows:
            s3 = json.loads((Path(cfg.out) / Path(info[row]["stage_dir"]).parent / "3_lrm/metrics.json").read_text())
            pts.append((s3["train_objects"], row, rows[row]))
    if not pts:                                              # that curve's runs have not been made
        return
    keys = ("psnr", "ssim", "color_err", "chamfer_l1", "fscore")
    lines = ["| synthetic objects | row | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    lines += [f"| {n} | {row} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |" for n, row, r in pts]
    render.write_text(name.with_suffix(".md"), "\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, k in zip(axes, ("ssim", "color_err", "chamfer_l1")):
        ax.plot([n for n, _, _ in pts], [r[k] for _, _, r in pts], "o-")
        ax.set_xlabel("synthetic objects"), ax.set_title(k)
    fig.tight_layout()
    render.atomic_write(name.with_suffix(".png"), lambda p: fig.savefig(p, format="png", dpi=100))


@torch.no_grad()
def comparison_gifs(cfg, table, path_a, path_c, n=4, frames=24):
    """Turntables of held-out objects: input | (A) 3D only | (C) synthetic then 3D | ground truth."""
    meta0 = render.read_meta(Path(cfg.out) / "0_data", "python render.py")
    c0, res = render.Config(**meta0["config"]), meta0["config"]["res"]
    models = [model.load_lrm(p, "python finetune_3d.py")[0] for p in (path_a, path_c)]
    c2w, K = render.orbit(frames)
    cam = model.camera_vector(model.CANONICAL[None], K[:1])
    for i in range(min(n, c0.n_test)):
        ob = render.load_object(Path(cfg.out) / f"0_data/assets/test/{i:05d}", res)
        rgba, _ = render.render_views(render.pack([render.make_object(render.object_seed(c0, "test", i))]), torch.zeros(frames, dtype=torch.long), c2w, K, res)
        cols = [ob["images"][:1].expand(frames, -1, -1, -1)]
        cols += [m.render(m(ob["images"][:1], cam), c2w[None], K[None], res, n_coarse=32, n_fine=32, stratified=False)[0][0] for m in models]
        cols.append(rgba[:, :3] * rgba[:, 3:] + 1 - rgba[:, 3:])
        strip = F.interpolate(torch.cat(cols, -1), scale_factor=3, mode="nearest").clamp(0, 1)
        gif = [(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for x in strip]
        render.atomic_write(table / f"compare_{i}.gif", lambda p: imageio.mimsave(p, gif, format="GIF", duration=0.08, loop=0))


def main():
    cfg = render.parse_config(Config, PRESETS)
    if cfg.table:
        return experiment_table(cfg)
    device, _, _ = model.setup(cfg)
    path = Path(cfg.model) if cfg.model else default_model(cfg)
    t = time.perf_counter()
    lrm, meta = model.load_lrm(path, "python train_lrm.py")
    lrm.to(device)
    stage = json.loads(meta["stage"]) if "stage" in meta else "lrm"
    print(f"loaded {path} ({stage}, {sum(p.numel() for p in lrm.parameters()) / 1e6:.2f}M parameters) in {time.perf_counter() - t:.2f} s")
    if cfg.eval:
        folders = sorted(p for p in Path(cfg.eval).iterdir() if (p / "surface.safetensors").is_file()) if Path(cfg.eval).is_dir() else []
        if not folders:
            raise render.DataError(f"{cfg.eval}: no real assets (object folders with surface.safetensors); pass out/0_data/assets/test")
        rows, _ = model.evaluate_lrm(lrm, folders[: cfg.n_eval or None], device, cfg.mesh_res, cfg.mesh_level)
        name = cfg.name or f"eval_{path.parent.name}"
        render.save_json(Path(cfg.out) / "5_infer" / name / "metrics.json", dict(stage="infer", preset=cfg.preset, model=str(path), n_objects=len(folders[: cfg.n_eval or None]),
                                                                               seconds=round(time.perf_counter() - t, 1), rows=rows))
        for row, r in rows.items():
            print(f"{row:12s} " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()))
        return rows
    if not (cfg.image or cfg.prompt):
        raise render.DataError("nothing to do: pass --image FILE|DIR, --prompt TEXT, --eval DIR or --table")
    for name, img in read_inputs(cfg, lrm.config["res"], device):
        reconstruct(cfg, lrm, name, img, device)


if __name__ == "__main__":
    render.run_cli(main)
