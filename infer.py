"""Stage 5: image (or text) -> triplane -> coloured mesh + turntable; the held-out evaluation
(VFusion3D Sec. 4); text-to-3D judged by the classifier, (A) 3D only beside (C) synthetic then 3D.

Reads:  an LRM checkpoint (default: out/4_finetune's, else out/3_lrm's, else weights/),
        an image file or folder (--image), or a caption (--prompt, drawn by the stage-1 image model)
Writes: out/5_infer/<name>/ input.png, command.txt, mesh.obj, mesh.ply, mesh.glb, views/,
        turntable.gif (+ .mp4 with imageio-ffmpeg, + judged.json for --prompt); --eval DIR:
        out/5_infer/<name>/metrics.json; --eval_prompts: out/5_infer/eval_prompts/metrics.json
Run:    python infer.py --image out/0_data/assets/test_unseen/00000/000.png
        python infer.py --prompt "a red mug with a blue handle"
        python infer.py --eval out/0_data/assets --model out/4_finetune/lrm.safetensors
        python infer.py --eval_prompts held_out     (text-to-3D judged: (A) beside (C))
        (inference needs no torchrun: one image at a time)
"""

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import torch
import torch.nn.functional as F

import model
import render


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    preset: str = "tiny"  # micro | tiny | small | paper (picks the shipped models and sizes)
    out: str = "out"  # root holding the numbered stage folders
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0  # noise of --prompt's first frame [0..]
    image: str = ""  # an image file or folder of them (PNG/JPG; RGBA or a near-white background)
    prompt: str = ""  # a caption instead: stage 1's image model draws the first frame (text-to-3D)
    model: str = ""  # LRM checkpoint ("" = 4_finetune's, else 3_lrm's, else shipped)
    name: str = ""  # output folder under <out>/5_infer ("" = from the input's name)
    mesh_res: int = 64  # marching-cubes grid per side [4..]
    mesh_level: float = 5.0  # surface level of density = scale * softplus(x - 1), per box unit
    coarse: int = 2  # read the mesh grid coarse to fine: every N-th point first (1 = all) [1..]
    turntable: int = 24  # turntable frames (elevation 20 degrees, the input view first) [1..]
    render_res: int = 0  # turntable/view resolution, pixels (0 = the model's) [0..]
    samples: int = 16  # turntable rays: coarse and fine samples each (--eval: 32) [2..]
    views: int = 8  # rendered views saved under views/ [0..]
    steps: int = 20  # DDIM steps for --prompt [1..]
    guidance: float = 3.0  # classifier-free guidance for --prompt [0..]
    eval: str = ""  # folder of real assets: score the model on them instead
    n_eval: int = 0  # assets to score (0 = all) [0..]
    eval_prompts: str = ""  # text-to-3D judged, (A) beside (C): a prompts file, or "held_out"


PRESETS = {
    "micro": dict(mesh_res=24, turntable=4, views=2, steps=3),
    "tiny": {},
    "small": dict(mesh_res=128),
    "paper": dict(mesh_res=256),
}


# ----------------------------------------------------------------------------- inputs
def default_model(cfg):
    """The latest stage's LRM under --out (stage 4's fine-tuned one, else stage 3's), else the
    shipped one of --preset, said in one line."""
    for stage in ("4_finetune", "3_lrm"):
        if (Path(cfg.out) / stage / "lrm.safetensors").is_file():
            return Path(cfg.out) / stage / "lrm.safetensors"
    shipped = model.WEIGHTS / f"lrm_{cfg.preset}.safetensors"
    if shipped.is_file():
        print(f"no trained LRM under {cfg.out}/: using the shipped one, {shipped}")
        return shipped
    raise render.DataError(
        f"{cfg.out}: no trained LRM (4_finetune/ or 3_lrm/); "
        "run `python train_lrm.py` or pass --model"
    )


def frame_object(rgb, res, path="the image"):
    """Find the object (non-white pixels), recentre it if off-centre, rescale it if much smaller or
    larger than the training framing (30-80% of the frame), resize: rgb (3,H,W) on white ->
    (3,res,res). A view already framed like the training data passes unchanged."""
    mask = render.object_mask(rgb)  # (H,W)
    if mask.float().mean() < 1e-3:
        raise render.DataError(
            f"{path}: no object found, (almost) all white; pass an image with an object on white"
        )
    H, W = rgb.shape[1:]
    rows = mask.any(1).nonzero()[:, 0]
    cols = mask.any(0).nonzero()[:, 0]
    cy = (rows[0] + rows[-1] + 1).item() / 2  # the centre of the object's box, pixels
    cx = (cols[0] + cols[-1] + 1).item() / 2
    extent = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1).item() / max(H, W)  # size / frame
    centred = abs(cy - H / 2) < 0.15 * H and abs(cx - W / 2) < 0.15 * W
    if centred and 0.3 <= extent <= 0.8 and H == W == res:
        return rgb
    if centred:
        cy = H / 2
        cx = W / 2
    side = max(H, W) * extent / min(max(extent, 0.3), 0.8)  # square window to crop, pixels
    if side > 2 * res:  # area-downsample big images first
        s = 2 * res / side
        rgb = F.interpolate(rgb[None], scale_factor=s, mode="area", recompute_scale_factor=False)[0]
        H, W = rgb.shape[1:]
        cy *= s
        cx *= s
        side = side * s
    theta = [[side / W, 0, 2 * cx / W - 1], [0, side / H, 2 * cy / H - 1]]
    theta = torch.tensor(theta, dtype=torch.float32)
    grid = F.affine_grid(theta[None], (1, 3, 2 * res, 2 * res), align_corners=False)
    # sample rgb - 1 with zero padding, so that outside the image is white
    out = F.grid_sample(rgb[None] - 1, grid, padding_mode="zeros", align_corners=False) + 1
    return F.avg_pool2d(out, 2)[0].clamp(0, 1)


def output_name(cfg, image=None, n_images=1, taken=()):
    """The output folder's name under <out>/5_infer, for --prompt (image None) or one of n_images
    images: --name when there is one input; else the caption's words joined by _, an asset's view
    (000.png) with its folder's name (00000_000), any other image its own; always made a safe
    folder name, not one of `taken` (render.safe_name)."""
    if cfg.name and n_images == 1:
        text = cfg.name
    elif image is None:
        text = cfg.prompt.lower() or "prompt"
    elif image.stem.isdigit():
        text = f"{image.parent.name}_{image.stem}"
    else:
        text = image.stem
    return render.safe_name(text, taken)


def draw_first_frames(cfg, prompts, res, device):
    """Text-to-image: the stage-1 image model under --out (else the shipped one of --preset) draws
    each caption from the noise of seed + its index -> (N,3,res,res) in [0,1]."""
    path = model.find_weights(cfg.out, cfg.preset, "image_model")
    unet, _ = model.load_unet(path, "image_model", "python finetune_video.py --phase image")
    ids, unknown = unet.text.tokenize(prompts)
    if unknown:
        print(
            f"warning: unknown words {', '.join(sorted(unknown))} "
            "(the model only knows its captions' vocabulary); they are ignored"
        )
    shape = (1, 3, unet.config.res, unet.config.res)
    noise = [
        torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed + k))
        for k in range(len(prompts))
    ]
    unet = unet.to(device).eval()
    img = model.sample(
        unet, ids.to(device), torch.stack(noise), steps=cfg.steps, guidance=cfg.guidance
    )
    img = (img[:, 0].float().cpu() + 1) / 2  # (N,3,H,W) in [0,1]
    return F.interpolate(img, size=(res, res), mode="area") if img.shape[-1] != res else img


def read_inputs(cfg, res, device):
    """-> list of (name, image (3,res,res) in [0,1])."""
    if cfg.prompt:
        return [(output_name(cfg), draw_first_frames(cfg, [cfg.prompt], res, device)[0])]
    src = Path(cfg.image)
    files = [src]
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files or not files[0].exists():
        raise render.DataError(
            f"{src}: no such image or folder of images; pass --image FILE|DIR or --prompt TEXT"
        )
    out = []
    for p in files:
        try:
            rgb, _ = render.load_png(p, made_by="user")
            framed = frame_object(rgb, res, p)
        except render.DataError as e:
            if len(files) == 1:
                raise
            print(f"skipped {e}")  # one bad photo in a folder: the rest go on
            continue
        out.append((output_name(cfg, p, len(files), [name for name, _ in out]), framed))
    if not out:
        raise render.DataError(f"{src}: none of its images could be used (see above)")
    return out


# ----------------------------------------------------------------------------- 3D
@torch.no_grad()
def reconstruct(cfg, lrm, name, img, device):
    """One image -> the files of out/5_infer/<name>/, with the time of each step."""
    folder = Path(cfg.out) / "5_infer" / name
    res = cfg.render_res or lrm.config.res
    t0 = time.perf_counter()
    c2w, K = render.orbit(cfg.turntable)
    cam = model.camera_vector(model.CANONICAL[None], K[:1]).to(device)
    planes = lrm(img[None].to(device), cam)  # (1,3,C,P,P)
    t1 = time.perf_counter()
    v, f, rgb = model.lrm_mesh(lrm, planes[0].float(), cfg.mesh_res, cfg.mesh_level, cfg.coarse)
    if len(f) == 0:
        # no surface: say so, with how dense the field gets (on a 16^3 grid) and what to try
        grid = render.grid_points(16).view(1, -1, 3)
        peak = lrm.field(planes, grid.to(device))[0].max().item()
        why = f"the density peaks at {peak:.2f}, under --mesh_level {cfg.mesh_level}"
        hint = f"an untrained model? pass --model, or try --mesh_level {peak / 2:.2f}"
        print(f"warning: {name}: empty mesh: {why}; {hint}")
    t2 = time.perf_counter()
    frames = turntable(lrm, planes, v.cpu(), (c2w, K), res, (cfg.samples, cfg.samples))
    times = dict(triplane=t1 - t0, mesh=t2 - t1, turntable=time.perf_counter() - t2)
    render.save_png(folder / "input.png", img)
    command = " ".join(shlex.quote(arg) for arg in ["python", "infer.py", *sys.argv[1:]])
    render.write_text(folder / "command.txt", command + "\n")  # for the run page
    render.write_obj(folder / "mesh.obj", v.cpu(), f.cpu(), rgb.cpu())
    render.write_ply(folder / "mesh.ply", v.cpu(), f.cpu(), rgb.cpu())
    render.write_glb(folder / "mesh.glb", v.cpu(), f.cpu(), rgb.cpu())
    gif = render.save_gif(folder / "turntable.gif", frames, 4)
    try:
        mp4 = folder / "turntable.mp4"
        render.atomic_write(mp4, lambda p: imageio.mimsave(p, gif, format="FFMPEG", fps=12))
    except (ImportError, ValueError, RuntimeError):
        pass  # imageio-ffmpeg is optional
    for i in range(cfg.views):
        render.save_png(folder / "views" / f"{i:03d}.png", frames[i * cfg.turntable // cfg.views])
    if cfg.prompt:
        judge_prompt(cfg, folder, frames)
    steps = ", ".join(f"{step} {seconds:.2f} s" for step, seconds in times.items())
    total = sum(times.values())
    print(f"{name}: {len(v)} vertices, {len(f)} faces | {steps} = {total:.2f} s -> {folder}")
    return times


def turntable_plain(lrm, planes, cameras, res, samples):
    """The turntable frames (T,3,res,res) on white for cameras (c2w (T,4,4), K (T,3,3)): every
    ray of every frame, one lrm.render."""
    c2w, K = (z[None].to(planes.device) for z in cameras)
    rgb, _ = lrm.render(planes, c2w, K, res, samples=samples, stratified=False)
    return rgb[0].float().cpu()


def turntable(lrm, planes, v, cameras, res, samples):
    """turntable_plain's frames to 51 dB or closer, in 0.44x its time (docs/log.md): only the
    rays near the mesh are rendered, the pixels its vertices v (V,3) fall on grown by 3 pixels;
    the rest is white (no mesh: every ray)."""
    c2w, K = cameras
    frames = torch.ones(len(c2w), 3, res * res)
    o, d = render.camera_rays(c2w, K, res)  # (T,res,res,3)
    for i in range(len(c2w)):
        near = torch.ones(res * res, dtype=torch.bool)
        if len(v):
            col, row = render.project(v, c2w[i], K[i], res)[0].long().clamp(0, res - 1).T
            hit = torch.zeros(1, res, res)
            hit[0, row, col] = 1.0
            near = F.max_pool2d(hit, 7, 1, 3).flatten() > 0  # (res*res,) grown by 3 pixels
        rays = [z[i].view(-1, 3)[near][None].to(planes.device) for z in (o, d)]  # 2 x (1,R,3)
        rgb, _ = lrm.render_rays(planes, *rays, samples, stratified=False)
        frames[i][:, near] = rgb[0].T.float().cpu()
    return frames.view(-1, 3, res, res)


def judge_prompt(cfg, folder, frames):
    """Text-to-3D has no true views: the classifier says how much of the turntable (T,3,H,W) shows
    the category and the colour that the prompt names -> judged.json, and one line."""
    clf = model.find_classifier(cfg.out, cfg.preset)
    category, colour = render.caption_labels(cfg.prompt)
    if clf is None or category < 0:
        why = "no category classifier" if clf is None else "the prompt names no known category"
        return print(f"not judged: {why}")
    scores = model.judge_views(clf, frames[None], [cfg.prompt])
    render.save_json(folder / "judged.json", dict(prompt=cfg.prompt) | scores)
    thing = render.CATEGORY_NAMES[category]
    hue = list(render.COLOURS)[colour] if colour >= 0 else "-"
    print(f"judged: {scores['category_acc']:.0%} of the turntable shows a {thing}, "
          f"{scores['color_acc']:.0%} is {hue}")  # fmt: skip


def evaluate(cfg, lrm, path, device, start):
    """--eval DIR: the held-out evaluation of the model `path` on DIR's real assets ->
    out/5_infer/<name>/metrics.json; start: when loading the model began."""
    # a folder of real assets, or out/0_data/assets: its held-out test_seen and test_unseen
    src = Path(cfg.eval)
    folders = [p.parent for p in sorted(src.glob("*/surface.safetensors"))][: cfg.n_eval or None]
    if not folders and (src / "test_seen").is_dir():
        folders = render.test_folders(src.parent, cfg.n_eval or None)
    if not folders:
        raise render.DataError(
            f"{cfg.eval}: no real assets (object folders with surface.safetensors); "
            "pass out/0_data/assets"
        )
    clf = model.find_classifier(cfg.out, cfg.preset)
    scores, _ = model.evaluate_lrm(lrm, folders, device, cfg.mesh_res, cfg.mesh_level, clf)
    name = render.safe_name(cfg.name or f"eval_{path.parent.name}")
    seconds = round(time.perf_counter() - start, 1)
    metrics = dict(stage="infer", preset=cfg.preset, model=str(path), n_objects=len(folders))
    render.save_json(
        Path(cfg.out) / "5_infer" / name / "metrics.json", metrics | dict(seconds=seconds) | scores
    )
    render.print_table(scores["rows"])
    return scores["rows"]


def read_eval_prompts(cfg, world):
    """--eval_prompts: a file's lines, or "held_out": two captions of each category drawn from
    seeds no stage uses (the sheet split's, far past the ones categories.png shows)."""
    if cfg.eval_prompts != "held_out":
        path = Path(cfg.eval_prompts)
        lines = render.read_text(path, "user").splitlines() if path.is_file() else []
        if not [line for line in lines if line.strip()]:
            raise render.DataError(f"{path}: no such prompts file, or empty; one caption a line")
        return [line.strip() for line in lines if line.strip()]
    n = 2 * len(render.CATEGORIES)
    seeds = [render.object_seed(world, "sheet", 100_000 + i) for i in range(n)]
    return [
        render.make_object(s, i % len(render.CATEGORIES))["caption"] for i, s in enumerate(seeds)
    ]


@torch.no_grad()
def orbit_views(lrm, firsts, device, views=8):
    """Input views (N,3,H,W) -> each one's triplane rendered on the fixed orbit, the input view
    left out -> (N,views-1,3,H,W)."""
    c2w, K = render.orbit(views)
    out = []
    for chunk in firsts.split(8):
        n = len(chunk)
        cam = model.camera_vector(model.CANONICAL.expand(n, 4, 4), K[:1].expand(n, 3, 3))
        planes = lrm(chunk.to(device), cam.to(device))
        cams = (c2w.expand(n, -1, -1, -1).to(device), K.expand(n, -1, -1, -1).to(device))
        rgb, _ = lrm.render(planes, *cams, lrm.config.res, samples=(16, 16), stratified=False)
        out.append(rgb[:, 1:].float().cpu())
    return torch.cat(out)


def eval_prompts(cfg, device):
    """Text-to-3D judged without true views (the paper's Table 2 in miniature): each prompt's
    first frame drawn by the image model, then (A) and (C) each turn it into a triplane whose
    orbit the classifier judges against the prompt, over all prompts and over the seen and
    unseen categories apart -> out/5_infer/eval_prompts/metrics.json and a table."""
    stage0 = render.read_world(cfg.out, cfg.preset)
    clf = model.find_classifier(cfg.out, cfg.preset)
    if clf is None:
        raise render.DataError("no classifier; run `python finetune_video.py --phase classifier`")
    prompts = read_eval_prompts(cfg, stage0)
    firsts = draw_first_frames(cfg, prompts, stage0.res, device)  # (N,3,H,W)
    seen = [render.caption_labels(p)[0] < stage0.categories_3d for p in prompts]
    splits = {"seen": [k for k, s in enumerate(seen) if s]}
    splits["unseen"] = [k for k, s in enumerate(seen) if not s]
    views = {}
    for row, stage in (("A_3d_only", "4_from_scratch"), ("C_synthetic_then_3d", "4_finetune")):
        lrm, _ = model.load_lrm(Path(cfg.out) / stage / "lrm.safetensors", "bash run_all.sh")
        views[row] = orbit_views(lrm.to(device), firsts, device)

    def score(idx):
        """(A) and (C) over the prompts idx."""
        return {
            row: model.judge_views(clf, v[idx], [prompts[k] for k in idx])
            for row, v in views.items()
        }

    metrics = dict(stage="infer", preset=cfg.preset, n_prompts=len(prompts), prompts=prompts)
    metrics |= dict(rows=score(list(range(len(prompts)))), splits={})
    for split, idx in splits.items():
        if idx:
            metrics["splits"][split] = dict(n_prompts=len(idx), rows=score(idx))
    render.save_json(Path(cfg.out) / "5_infer/eval_prompts/metrics.json", metrics)
    print(f"text-to-3D, {len(prompts)} prompts ({len(splits['seen'])} of seen categories):")
    render.print_table(metrics["rows"])
    for split, m in metrics["splits"].items():
        print(f"{split} categories:")
        render.print_table(m["rows"])


def main():
    cfg = render.parse_config(Config, PRESETS)
    device, _, _ = model.setup(cfg)
    if cfg.eval_prompts:
        return eval_prompts(cfg, device)
    path = Path(cfg.model) if cfg.model else default_model(cfg)
    start = time.perf_counter()
    lrm, meta = model.load_lrm(path, "python train_lrm.py")
    lrm.to(device)
    stage = meta.get("stage", "lrm").strip('"')
    n = sum(p.numel() for p in lrm.parameters()) / 1e6
    print(f"loaded {path} ({stage}, {n:.2f}M parameters) in {time.perf_counter() - start:.2f} s")
    if cfg.eval:
        return evaluate(cfg, lrm, path, device, start)
    if not (cfg.image or cfg.prompt):
        raise render.DataError("nothing to do: pass --image FILE|DIR, --prompt TEXT, or --eval DIR")
    for name, img in read_inputs(cfg, lrm.config.res, device):
        with render.locked(Path(cfg.out) / "5_infer" / name):
            reconstruct(cfg, lrm, name, img, device)
    render.write_index(cfg.out)


if __name__ == "__main__":
    render.run_cli(main)
