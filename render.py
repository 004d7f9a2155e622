"""Stage 0 and everything geometric: cameras, the procedural 3D world, its exact renderer,
triplane-NeRF volume rendering, marching cubes, meshes, metrics and the folder format.

Reads:  nothing (the world is generated from seeds).
Writes: out/0_data/assets/{train,test}/<id>/  000.png.. (RGBA), cameras.safetensors, prompt.txt,
                                              surface.safetensors (ground-truth points + colours)
        out/0_data/images/<id>.png + captions.txt   single views of other objects (the "2D web")
        out/0_data/prompts.txt                      captions of yet other objects (the "prompts")
        out/0_data/meta.json, preview.png
Run:    python render.py                      (tiny preset, about a minute on a 2-core laptop)
        python render.py --preset micro --out /tmp/run
        (no training here, so there is no torchrun form)
Paper:  the stand-in for Objaverse renders (VFusion3D Sec. 3.1 fine-tunes on orbit renders of 3D
        assets) and for the volume rendering of the LRM (Sec. 3.2, via LRM/EG3D-style triplanes).
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

WORLD_VERSION = 1  # bump when the world (shapes, colours, framing) changes: shipped weights check it

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    preset: str = "tiny"       # micro | tiny | small | paper (fills the fields below)
    out: str = "out"           # root folder holding the numbered stage folders
    seed: int = 0              # world seed: the same seed writes the same bytes
    device: str = "cpu"        # unused here (rendering runs on the CPU), kept for a uniform CLI
    n_train: int = 400         # real 3D assets for training (the scarce 3D data)
    n_test: int = 50           # held-out real assets, evaluation only
    n_images: int = 10000      # single views of other objects (the abundant 2D data)
    n_prompts: int = 2000      # captions of other objects (the "web-scale" prompts)
    views: int = 8             # views per orbit
    res: int = 32              # image size, pixels
    supersample: int = 2       # rays per pixel side when rendering (anti-aliasing)
    trace_steps: int = 48      # sphere-tracing steps
    surface_points: int = 4096  # ground-truth surface points per asset
    batch: int = 96            # images rendered together

PRESETS = {
    "micro": dict(n_train=12, n_test=4, n_images=64, n_prompts=32, views=4, res=16, surface_points=1024),
    "tiny": {},
    "small": dict(n_train=2000, n_test=100, n_images=50000, n_prompts=20000, views=16, res=64),
    "paper": dict(n_train=100000, n_test=1000, n_images=1000000, n_prompts=4000000, views=16, res=256),
}

# Fixed framing (world units, degrees): objects fit a sphere of radius 0.85, which fills the frame.
ELEVATION, RADIUS, FOV = 20.0, 2.4, 45.0

class DataError(Exception):
    """Bad input from the user or the disk: printed as one line, never as a traceback."""

def parse_config(cls, presets, argv=None):
    """Fill dataclass `cls` from --preset, then from one flag per field (`--res 32`)."""
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__.split("\n")[0])
    for f in dataclasses.fields(cls):
        typ = (lambda s: s.lower() in ("1", "true", "yes")) if f.type is bool else f.type
        p.add_argument("--" + f.name, type=typ, default=None, nargs="?" if f.type is bool else None, const=True if f.type is bool else None)
        if f.type is bool:                                       # --flag, --flag false, --no_flag
            p.add_argument("--no_" + f.name, dest=f.name, action="store_const", const=False)
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--"]   # torchrun ... script.py -- --num 8
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = args.get("preset", cls.preset)
    if preset not in presets:
        raise DataError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    return cls(**{**presets[preset], **args, "preset": preset})

def run_cli(main):
    """Run `main()`, turning bad input (DataError) and file-system errors into one line on stderr."""
    try:
        main()
    except (DataError, OSError) as e:
        print(f"error: {e}" + (" (check --out and the disk)" if isinstance(e, OSError) else ""), file=sys.stderr)
        sys.exit(2)

# ----------------------------------------------------------------------------- atomic files

def atomic_write(path, write):
    """Call write(tmp_path), then rename to `path`: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def save_png(path, img):
    """img: float (C,H,W) in [0,1] or uint8 (H,W,C); C = 3 or 4."""
    if torch.is_tensor(img):
        img = (img.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
    atomic_write(path, lambda t: Image.fromarray(img).save(t, format="PNG"))

def write_text(path, text):
    """Atomic text write that leaves an identical file untouched (a rerun rewrites nothing complete)."""
    if not (Path(path).is_file() and Path(path).read_text() == text):
        atomic_write(path, lambda t: t.write_text(text))

def save_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, default=str) + "\n")

def save_tensors(path, tensors, meta=None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda t: save_file(tensors, str(t), metadata=meta))

def load_tensors(path):
    """Read a .safetensors file -> (dict of tensors, metadata dict). Never unpickles anything."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except FileNotFoundError:
        raise DataError(f"{path}: file missing") from None
    except Exception as e:
        raise DataError(f"{path}: not a readable safetensors file ({type(e).__name__}); delete it and rerun the stage that wrote it") from None

def load_png(path, res=None):
    """-> rgb (3,H,W) composited on white, alpha (1,H,W) or None. Checks the size when res is given."""
    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise DataError(f"{path}: file missing") from None
    except Exception:
        raise DataError(f"{path}: not a readable image; delete it and rerun the stage that wrote it") from None
    if res is not None and im.size != (res, res):
        raise DataError(f"{path}: is {im.size[0]}x{im.size[1]}, expected {res}x{res}; regenerate it at this preset")
    has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    x = torch.from_numpy(np.asarray(im.convert("RGBA"), dtype=np.float32) / 255).permute(2, 0, 1)
    return (x[:3] * x[3:] + 1 - x[3:], x[3:]) if has_alpha else (x[:3], None)

def read_meta(folder, hint):
    """The meta.json of a finished stage folder, or a one-line DataError naming the command to run."""
    path = Path(folder) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{folder}: missing or incomplete (no meta.json); run `{hint}` first") from None
    except ValueError:
        raise DataError(f"{path}: corrupt; delete {folder} and run `{hint}` again") from None

# ----------------------------------------------------------------------------- cameras

def orbit(views, start_deg=0.0, elevation_deg=ELEVATION, radius=RADIUS):
    """The fixed orbit: `views` azimuths evenly spaced from the input view's, as OpenGL camera-to-world
    matrices (+z up, each camera looking down its -z at the origin) -> c2w (V,4,4), K (V,3,3)."""
    az = (start_deg + torch.arange(views) * 360.0 / views).deg2rad()
    el = torch.full_like(az, float(elevation_deg)).deg2rad()
    pos = radius * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)  # (V,3)
    back = F.normalize(pos, dim=-1)                                 # camera +z points away from the target
    right = F.normalize(torch.cross(torch.tensor([0.0, 0, 1]).expand_as(back), back, dim=-1), dim=-1)
    up = torch.cross(back, right, dim=-1)
    c2w = torch.eye(4).repeat(len(az), 1, 1)
    c2w[:, :3, :3] = torch.stack([right, up, back], -1)
    c2w[:, :3, 3] = pos
    return c2w, intrinsics(FOV).expand(views, 3, 3).clone()

def intrinsics(fov_deg):
    """Pinhole intrinsics normalised by the image size: fx = fy = 0.5 / tan(fov/2), cx = cy = 0.5."""
    f = 0.5 / np.tan(np.deg2rad(fov_deg) / 2)
    return torch.tensor([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]], dtype=torch.float32)

def camera_rays(c2w, K, res, crop=None):
    """World rays through pixel centres of a res x res image, or of a crop (top, left, size), where top
    and left may be (B,) tensors (one crop per camera). c2w (B,4,4), K (B,3,3) -> origins, unit
    directions (B,h,w,3)."""
    top, left, size = crop if crop is not None else (0, 0, res)
    v, u = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    v = (v + torch.as_tensor(top).view(-1, 1, 1) + 0.5) / res                # normalised pixel centres (.,h,w)
    u = (u + torch.as_tensor(left).view(-1, 1, 1) + 0.5) / res
    x = (u - K[:, 0, 2, None, None]) / K[:, 0, 0, None, None]
    y = -(v - K[:, 1, 2, None, None]) / K[:, 1, 1, None, None]      # image rows go down, camera +y up
    d_cam = torch.stack([x, y, -torch.ones_like(x)], -1)             # (B,h,w,3)
    dirs = F.normalize(torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], d_cam), dim=-1)
    return c2w[:, None, None, :3, 3].expand_as(dirs), dirs

def project(points, c2w, K, res):
    """World points (N,3) -> pixel coordinates (N,2) as (column, row) in pixels, and depth (N,)."""
    w2c = torch.linalg.inv(c2w)
    p = points @ w2c[:3, :3].T + w2c[:3, 3]                           # camera coordinates
    depth = -p[:, 2]
    col = (K[0, 0] * p[:, 0] / depth + K[0, 2]) * res
    row = (-K[1, 1] * p[:, 1] / depth + K[1, 2]) * res
    return torch.stack([col, row], -1), depth

# ----------------------------------------------------------------------------- the procedural world

SHAPES = ("sphere", "box", "cylinder", "cone", "torus", "capsule")
COLOURS = {"red": (0.86, 0.13, 0.12), "orange": (0.97, 0.52, 0.08), "yellow": (0.96, 0.84, 0.10),
           "green": (0.16, 0.64, 0.20), "cyan": (0.08, 0.70, 0.78), "blue": (0.13, 0.28, 0.90),
           "purple": (0.55, 0.20, 0.75), "pink": (0.97, 0.45, 0.72)}
PALETTE = torch.tensor(list(COLOURS.values()))                       # (8,3)
RELATIONS = ("on top of", "next to")
AMBIENT, LIGHT = 0.55, F.normalize(torch.tensor([0.35, 0.25, 1.0]), dim=0)  # Lambert + ambient shading

def make_object(seed):
    """One object from a seed: 1-4 upright primitives in a chain, each placed relative to the
    previous one, and the caption that this structure implies. Returns dict of numpy arrays."""
    rng = np.random.default_rng(seed)
    n, prev_hz, prev_hr = rng.choice(4, p=[0.35, 0.35, 0.2, 0.1]) + 1, 0.0, 0.0   # primitives; previous one's extent
    kinds, colours, params, centres, yaws, words, rels = [], [], [], [], [], [], []
    for k in range(n):
        kind, colour, large = rng.integers(6), rng.integers(8), rng.random() < 0.5
        s = rng.uniform(0.5, 0.62) if large else rng.uniform(0.28, 0.36)
        u = rng.uniform(size=3)
        p = [(s, 0, 0), s * (0.55 + 0.35 * u), (s * (0.6 + 0.25 * u[0]), s * (0.55 + 0.35 * u[1]), 0),
             (s * (0.7 + 0.25 * u[0]), s * (0.65 + 0.3 * u[1]), 0), (s * (0.7 + 0.1 * u[0]), s * (0.25 + 0.08 * u[1]), 0),
             (s * (0.4 + 0.1 * u[0]), s * (0.35 + 0.2 * u[1]), 0)][kind]
        hz = [p[0], p[2], p[1], p[1], p[1], p[0] + p[1]][kind]                    # half height
        hr = [p[0], np.hypot(p[0], p[1]), p[0], p[0], p[0] + p[1], p[0]][kind]    # horizontal radius
        if k == 0:
            c = np.zeros(3)
        elif rng.random() < 0.5:                                                  # on top of the previous
            c = centres[-1] + np.r_[rng.uniform(-0.05, 0.05, 2), prev_hz + hz]
            rels.append(RELATIONS[0])
        else:                                                                     # next to it, same ground
            phi = rng.uniform(0, 2 * np.pi)
            c = centres[-1] + np.r_[np.cos(phi), np.sin(phi), 0] * 0.95 * (prev_hr + hr) + np.r_[0, 0, hz - prev_hz]
            rels.append(RELATIONS[1])
        kinds.append(kind); colours.append(colour); params.append(p); centres.append(c)
        yaws.append(rng.uniform(0, 2 * np.pi)); words.append(f"a {'large' if large else 'small'} {list(COLOURS)[colour]} {SHAPES[kind]}")
        prev_hz, prev_hr = hz, hr
    params, centres = np.array(params, np.float32), np.array(centres, np.float32)
    bound = np.array([[p[0], np.linalg.norm(p), np.hypot(p[0], p[1]), np.hypot(p[0], p[1]), p[0] + p[1], p[0] + p[1]][k]
                      for k, p in zip(kinds, params)], np.float32)             # bounding-sphere radius
    centres -= ((centres - bound[:, None]).min(0) + (centres + bound[:, None]).max(0)) / 2  # centre the object
    scale = min(1.0, 0.85 / (np.linalg.norm(centres, axis=1) + bound).max())      # fit the frame with a margin
    caption = words[-1] + "".join(f" {r} {w}" for r, w in zip(rels[::-1], words[-2::-1]))
    return dict(kind=np.array(kinds), colour=np.array(colours), params=params * scale,
                centre=centres * scale, yaw=np.array(yaws, np.float32), caption=caption)

def pack(objects):
    """List of objects -> tensors padded to 4 primitives (kind -1 = none)."""
    n = len(objects)
    out = dict(kind=torch.full((n, 4), -1), colour=torch.zeros(n, 4, dtype=torch.long), params=torch.zeros(n, 4, 3), centre=torch.zeros(n, 4, 3), yaw=torch.zeros(n, 4))
    for i, o in enumerate(objects):
        for key in out:
            out[key][i, : len(o["kind"])] = torch.as_tensor(o[key])
    return out

def pair_up(obj, packed):
    """The real (ray, primitive) pairs for rays of objects obj (R,) (non-decreasing: rays come object by
    object), sorted by primitive kind so each SDF formula runs on one contiguous slice, no padding."""
    n_rays = torch.bincount(obj, minlength=len(packed["kind"]))               # rays per object
    start = torch.cumsum(n_rays, 0) - n_rays
    o, slot = (packed["kind"] >= 0).nonzero(as_tuple=True)                     # existing primitives
    k, order = packed["kind"][o, slot].sort(stable=True)
    o, slot = o[order], slot[order]
    reps = n_rays[o]                                                             # each pairs with its object's rays
    ray = torch.repeat_interleave(start[o] - (torch.cumsum(reps, 0) - reps), reps) + torch.arange(int(reps.sum()))
    rep = lambda x: torch.repeat_interleave(x, reps, dim=0)
    yaw = packed["yaw"][o, slot]
    return dict(ray=ray, n=len(obj), counts=torch.bincount(k, weights=reps, minlength=6).long().tolist(), cos=rep(yaw.cos()),
                sin=rep(yaw.sin()), centre=rep(packed["centre"][o, slot]), params=rep(packed["params"][o, slot]), colour=rep(packed["colour"][o, slot]))

def pair_sdf(points, pr):
    """Signed distance of each pair's point to its primitive, in the primitive's upright frame.
    The cone's value is a lower bound (max of two half-spaces), which is enough for sphere tracing."""
    q = points[pr["ray"]] - pr["centre"]
    c, s = pr["cos"], pr["sin"]
    xs, ys, zs = (c * q[:, 0] + s * q[:, 1]).split(pr["counts"]), (c * q[:, 1] - s * q[:, 0]).split(pr["counts"]), q[:, 2].split(pr["counts"])
    ps = pr["params"].split(pr["counts"])
    pos = lambda u: u.clamp(min=0).square()
    out = []
    for k, (x, y, z, p) in enumerate(zip(xs, ys, zs, ps)):
        a, b, e = p.unbind(-1)
        rho = torch.sqrt(x * x + y * y)
        if k == 0:                                                          # sphere
            out.append(torch.sqrt(rho * rho + z * z) - a)
        elif k == 1:                                                        # box
            bx, by, bz = x.abs() - a, y.abs() - b, z.abs() - e
            out.append(torch.sqrt(pos(bx) + pos(by) + pos(bz)) + torch.maximum(torch.maximum(bx, by), bz).clamp(max=0))
        elif k == 2:                                                        # cylinder
            u, v = rho - a, z.abs() - b
            out.append(torch.sqrt(pos(u) + pos(v)) + torch.maximum(u, v).clamp(max=0))
        elif k == 3:                                                        # cone
            out.append(torch.maximum(((rho - a) * 2 * b + (z + b) * a) / torch.sqrt(4 * b * b + a * a), -z - b))
        elif k == 4:                                                        # torus
            out.append(torch.sqrt((rho - a).square() + z * z) - b)
        else:                                                               # capsule
            out.append(torch.sqrt(rho * rho + (z - z.clamp(-b, b)).square()) - a)
    return torch.cat(out)

def scene_sdf(points, pr):
    """Union of the primitives at points (R,3) -> distance (R,) and palette index of the nearest (R,)."""
    d = pair_sdf(points, pr)
    dist = torch.full((pr["n"],), float("inf")).scatter_reduce(0, pr["ray"], d, "amin")
    colour = torch.zeros(pr["n"], dtype=torch.long)
    nearest = d <= dist[pr["ray"]]
    colour[pr["ray"][nearest]] = pr["colour"][nearest]
    return dist, colour

@torch.no_grad()
def render_views(packed, obj, c2w, K, res, supersample=2, steps=48, eps=1e-3):
    """Exact renderer: sphere tracing, nearest primitive's colour, Lambert + ambient, white background.
    obj (B,) object index per image, c2w (B,4,4), K (B,3,3) -> RGBA (B,4,res,res) in [0,1] (straight
    alpha: RGB is the object's colour, A its coverage) and the hit points (B,res*ss,res*ss,3)."""
    B, ss = len(obj), supersample
    o, d = camera_rays(c2w, K, res * ss)                     # normalised intrinsics serve any resolution
    hw = o.shape[1] * o.shape[2]
    o, d, ray_obj = o.reshape(-1, 3), d.reshape(-1, 3), obj.repeat_interleave(hw)
    b = (o * d).sum(-1)                                       # ray vs bounding sphere of radius 1
    disc = b * b - (o * o).sum(-1) + 1.0
    t, t_far = (-b - disc.clamp(min=0).sqrt()).clamp(min=0), -b + disc.clamp(min=0).sqrt()
    alive, hit = disc > 0, torch.zeros(len(o), dtype=torch.bool)
    for _ in range(0, steps, 8):                                # compact the live rays every 8 steps
        i = alive.nonzero()[:, 0]
        if len(i) == 0:
            break
        oi, di, ti, fi, pr, live = o[i], d[i], t[i], t_far[i], pair_up(ray_obj[i], packed), alive[i]
        for _ in range(8):
            dist, _ = scene_sdf(oi + ti[:, None] * di, pr)
            ti = ti + dist * live
            live = live & (dist >= eps) & (ti < fi)
        t[i], alive[i], hit[i] = ti, live, (dist < eps) & (ti < fi)
    i = hit.nonzero()[:, 0]
    x, pr = o[i] + t[i, None] * d[i], pair_up(ray_obj[i], packed)
    _, near = scene_sdf(x, pr)
    h = 1e-3 * torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1.0]])  # tetrahedral gradient
    grad = sum(h[j] * scene_sdf(x + h[j], pr)[0][:, None] for j in range(4))
    shade = AMBIENT + (1 - AMBIENT) * (F.normalize(grad, dim=-1) @ LIGHT).clamp(min=0)
    rgb = torch.zeros(len(o), 3).index_copy_(0, i, PALETTE[near] * shade[:, None])
    pts = torch.full((len(o), 3), float("nan")).index_copy_(0, i, x)
    rgb, a = rgb.view(B, res, ss, res, ss, 3), hit.float().view(B, res, ss, res, ss, 1)
    cover = a.mean((2, 4))                                   # coverage, (B,res,res,1)
    colour = (rgb * a).sum((2, 4)) / (a.sum((2, 4)) + 1e-8)  # straight (unpremultiplied) colour
    return torch.cat([colour, cover], -1).permute(0, 3, 1, 2), pts.view(B, res * ss, res * ss, 3)

def surface_points(obj, n, res=64, seed=0):
    """Ground truth: n points (with albedo colours) spread uniformly over the object's surface."""
    packed = pack([obj])
    sdf = lambda p: scene_sdf(p, pair_up(torch.zeros(len(p), dtype=torch.long), packed))
    v, f = extract_mesh(lambda p: -sdf(p)[0], res, 0.0, chunk=res**3)    # inside = negative distance
    pts = sample_mesh(v, f, n, seed)
    return pts, PALETTE[sdf(pts)[1]]

# ----------------------------------------------------------------------------- volume rendering

def ray_box(o, d, bound=1.0):
    """Entry and exit distances of rays (R,3) through the box [-bound,bound]^3, and a hit mask."""
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t0, t1 = (-bound - o) * inv, (bound - o) * inv
    near = torch.minimum(t0, t1).max(-1).values.clamp(min=0)
    far = torch.maximum(t0, t1).min(-1).values
    return near, far, far > near + 1e-6

def composite_samples(sigma, rgb, t, far):
    """Alpha compositing on white (NeRF quadrature): sigma (R,S), rgb (R,S,3), sorted t (R,S)."""
    delta = torch.diff(torch.cat([t, far[:, None]], -1), dim=-1).clamp(min=0)
    tau = sigma * delta
    trans = torch.exp(-torch.cumsum(torch.cat([torch.zeros_like(tau[:, :1]), tau[:, :-1]], -1), -1))
    w = (1 - torch.exp(-tau)) * trans                          # (R,S)
    acc = w.sum(-1)
    return (w[..., None] * rgb).sum(1) + (1 - acc[:, None]), acc, (w * t).sum(-1) / acc.clamp(min=1e-6), w

def volume_render(field, o, d, n_coarse, n_fine, stratified=True):
    """Render rays o, d (R,3) through field(points (R,S,3)) -> (density (R,S) >= 0, colour (R,S,3)).
    Stratified coarse samples in the box place n_fine importance samples (inverse CDF of the coarse
    weights); both sets are merged and composited on white. With n_fine > 0 the coarse pass runs
    without gradient: it only finds the surface, and the fine samples carry the learning signal.
    -> rgb (R,3), opacity (R,), depth (R,)."""
    near, far, valid = ray_box(o, d)
    far = torch.where(valid, far, near + 1e-3)
    edges = torch.linspace(0, 1, n_coarse + 1)
    u = torch.rand(len(o), n_coarse) if stratified else torch.full((len(o), n_coarse), 0.5)
    t = near[:, None] + (far - near)[:, None] * (edges[:-1] + u / n_coarse)   # (R,Sc)
    with torch.set_grad_enabled(torch.is_grad_enabled() and n_fine == 0):
        sigma, rgb = field(o[:, None] + t[..., None] * d[:, None])
    if n_fine > 0:
        with torch.no_grad():
            w = composite_samples(sigma * valid[:, None], rgb, t, far)[3] + 1e-4
            cdf = torch.cat([torch.zeros_like(w[:, :1]), torch.cumsum(w / w.sum(-1, keepdim=True), -1)], -1)
            q = (torch.arange(n_fine) + (torch.rand(len(o), n_fine) if stratified else torch.full((len(o), n_fine), 0.5))) / n_fine
            k = torch.searchsorted(cdf, q.contiguous(), right=True).clamp(1, n_coarse)
            lo, hi = cdf.gather(1, k - 1), cdf.gather(1, k)
            e = near[:, None] + (far - near)[:, None] * edges
            t_fine = e.gather(1, k - 1) + ((q - lo) / (hi - lo).clamp(min=1e-8)).clamp(0, 1) * (e.gather(1, k) - e.gather(1, k - 1))
        s2, c2 = field(o[:, None] + t_fine[..., None] * d[:, None])
        t, order = torch.cat([t, t_fine], -1).sort(-1)
        sigma = torch.cat([sigma, s2], -1).gather(1, order)
        rgb = torch.cat([rgb, c2], 1).gather(1, order[..., None].expand(-1, -1, 3))
    colour, acc, depth, _ = composite_samples(sigma * valid[:, None], rgb, t, far)
    return colour, acc, depth

# ----------------------------------------------------------------------------- meshes and metrics

@torch.no_grad()
def extract_mesh(density_fn, res, level, chunk=2**16):
    """Evaluate density_fn (points (N,3) -> (N,)) on a res^3 grid over [-1,1]^3 in chunks, then
    marching cubes (scikit-image, Lewiner) at `level` -> vertices (V,3) in world units, faces (F,3)."""
    from skimage.measure import marching_cubes
    g = torch.linspace(-1, 1, res)
    grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).view(-1, 3)
    vol = torch.cat([density_fn(p) for p in grid.split(chunk)]).view(res, res, res).float().numpy()
    if not (vol.min() < level < vol.max()):
        return torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)
    v, f, _, _ = marching_cubes(vol, level, spacing=(2 / (res - 1),) * 3)
    return torch.from_numpy(v.copy()).float() - 1, torch.from_numpy(f[:, ::-1].astype(np.int64))  # wind outwards

def sample_mesh(v, f, n, seed=0):
    """n points spread uniformly (by area) over a triangle mesh; the origin if the mesh is empty."""
    if len(f) == 0:
        return torch.zeros(n, 3)
    gen = torch.Generator().manual_seed(seed)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    area = torch.cross(b - a, c - a, dim=-1).norm(dim=-1)
    tri = torch.multinomial(area + 1e-12, n, replacement=True, generator=gen)
    r1, r2 = torch.rand(n, 1, generator=gen).sqrt(), torch.rand(n, 1, generator=gen)
    return (1 - r1) * a[tri] + r1 * (1 - r2) * b[tri] + r1 * r2 * c[tri]

def write_obj(path, v, f, rgb):
    """Wavefront .obj with per-vertex colour ('v x y z r g b'), faces 1-based."""
    lines = [f"v {x:.5f} {y:.5f} {z:.5f} {r:.4f} {g:.4f} {b:.4f}" for (x, y, z), (r, g, b) in zip(v.tolist(), rgb.tolist())]
    lines += [f"f {i + 1} {j + 1} {k + 1}" for i, j, k in f.tolist()]
    atomic_write(path, lambda t: t.write_text("\n".join(lines) + "\n"))

def write_ply(path, v, f, rgb):
    """Binary little-endian .ply: float xyz + uchar rgb per vertex, uchar-counted int faces."""
    head = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(v)}\nproperty float x\nproperty float y\n"
            f"property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nelement face {len(f)}\n"
            "property list uchar int vertex_indices\nend_header\n").encode()
    vert = np.zeros(len(v), dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    vert["p"], vert["c"] = v.numpy(), (rgb.clamp(0, 1) * 255 + 0.5).byte().numpy()
    face = np.zeros(len(f), dtype=[("n", "u1"), ("i", "<i4", 3)])
    face["n"], face["i"] = 3, f.numpy()
    atomic_write(path, lambda t: t.write_bytes(head + vert.tobytes() + face.tobytes()))

def chamfer_fscore(pred, gt, tau=0.05):
    """Chamfer-L1 (mean of the two directed mean distances) and F-score at tau, points (N,3), (M,3)."""
    near = lambda a, b: torch.cat([torch.cdist(x, b, compute_mode="donot_use_mm_for_euclid_dist").min(1).values for x in a.split(2048)])
    d_pg, d_gp = near(pred, gt), near(gt, pred)
    prec, rec = (d_pg < tau).float().mean().item(), (d_gp < tau).float().mean().item()
    return (d_pg.mean().item() + d_gp.mean().item()) / 2, 2 * prec * rec / max(prec + rec, 1e-8)

# ----------------------------------------------------------------------------- object folders

def write_object(folder, views, c2w, K, prompt, surface=None):
    """One object folder, written under a temporary name and renamed when complete.
    views (V,3|4,H,W) in [0,1]; surface = (points (N,3), colours (N,3)) for real assets."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, v in enumerate(views):
        save_png(tmp / f"{i:03d}.png", v)
    save_tensors(tmp / "cameras.safetensors", {"c2w": c2w, "intrinsics": K})
    (tmp / "prompt.txt").write_text(prompt + "\n")
    if surface is not None:
        save_tensors(tmp / "surface.safetensors", {"points": surface[0], "colors": surface[1]})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)

def load_object(folder, res=None, views=None):
    """Read one object folder (real or synthetic) -> dict(images (V,3,H,W) on white, masks (V,1,H,W)
    or None, c2w (V,4,4), K (V,3,3), prompt). Checks image sizes and the view count."""
    folder = Path(folder)
    files = sorted(folder.glob("[0-9][0-9][0-9].png"))
    if not files:
        raise DataError(f"{folder}: no views (000.png ...); regenerate this object folder")
    if views is not None and len(files) != views:
        raise DataError(f"{folder}: has {len(files)} views, expected {views}; regenerate it at this preset")
    loaded = [load_png(p, res) for p in files]
    cams, _ = load_tensors(folder / "cameras.safetensors")
    if cams.get("c2w", torch.zeros(0)).shape != (len(files), 4, 4):
        raise DataError(f"{folder / 'cameras.safetensors'}: c2w is not ({len(files)},4,4); regenerate this object folder")
    prompt = (folder / "prompt.txt").read_text().strip() if (folder / "prompt.txt").is_file() else ""
    masks = torch.stack([a for _, a in loaded]) if all(a is not None for _, a in loaded) else None
    return dict(images=torch.stack([x for x, _ in loaded]), masks=masks, c2w=cams["c2w"], K=cams["intrinsics"], prompt=prompt)

# ----------------------------------------------------------------------------- stage 0

def object_seed(cfg, split, i):
    """Disjoint seed ranges per split, so the test objects appear nowhere else."""
    return cfg.seed * 100_000_000 + {"train": 0, "test": 1, "images": 2, "prompts": 3}[split] * 10_000_000 + i

def render_split(cfg, split, root):
    """Render the orbit assets (train/test) or the single images that are missing -> (count, rendered)."""
    real, V = split != "images", cfg.views if split != "images" else 1
    ids = [f"{i:05d}" for i in range({"train": cfg.n_train, "test": cfg.n_test, "images": cfg.n_images}[split])]
    need = [f"{k:03d}.png" for k in range(V)] + ["cameras.safetensors", "prompt.txt", "surface.safetensors"]
    todo = [i for i in ids if not (all((root / i / n).is_file() for n in need) if real else (root / f"{i}.png").is_file())]
    (c2w, K), per = orbit(V), max(1, cfg.batch // V)                            # per: objects per batch
    for start in tqdm(range(0, len(todo), per), desc=f"stage 0 {split:6s}", unit="batch", disable=not todo):
        chunk = todo[start : start + per]
        objs = [make_object(object_seed(cfg, split, int(i))) for i in chunk]
        rgba, _ = render_views(pack(objs), torch.arange(len(chunk)).repeat_interleave(V), c2w.repeat(len(chunk), 1, 1),
                               K.repeat(len(chunk), 1, 1), cfg.res, cfg.supersample, cfg.trace_steps)
        for j, (i, o) in enumerate(zip(chunk, objs)):
            if real:
                surf = surface_points(o, cfg.surface_points, seed=object_seed(cfg, split, int(i)))
                write_object(root / i, rgba[j * V : (j + 1) * V], c2w, K, o["caption"], surf)
            else:
                save_png(root / f"{i}.png", rgba[j])
    if not real:
        write_text(root / "captions.txt", "".join(f"{i}\t{make_object(object_seed(cfg, split, int(i)))['caption']}\n" for i in ids))
    return len(ids), len(todo)

def contact_sheet(path, folders, scale=3):
    """preview.png: one row per asset (its orbit views, enlarged) with the caption beneath."""
    rows = [load_object(f) for f in folders]
    V, H = rows[0]["images"].shape[0], rows[0]["images"].shape[-1] * scale
    sheet = Image.new("RGB", (max(V * H, 360), len(rows) * (H + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, ob in enumerate(rows):
        for v, img in enumerate(ob["images"]):
            im = Image.fromarray((img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).resize((H, H), Image.NEAREST)
            sheet.paste(im, (v * H, r * (H + 14)))
        draw.text((2, r * (H + 14) + H), ob["prompt"], fill="black")
    atomic_write(path, lambda t: sheet.save(t, format="PNG"))

def main():
    cfg = parse_config(Config, PRESETS)
    root = Path(cfg.out) / "0_data"
    if Path(cfg.out).is_file() or root.is_file():
        raise DataError(f"{cfg.out}: is a file, not a folder; pick another --out")
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "device", "batch")}
    if (root / "meta.json").is_file() and read_meta(root, "python render.py").get("config") != conf:
        raise DataError(f"{root}: was written with another config; delete it or pick another --out")
    t0 = time.time()
    counts = {split: render_split(cfg, split, root / sub) for split, sub in (("train", "assets/train"), ("test", "assets/test"), ("images", "images"))}
    write_text(root / "prompts.txt", "".join(make_object(object_seed(cfg, "prompts", i))["caption"] + "\n" for i in range(cfg.n_prompts)))
    seconds = time.time() - t0
    if any(new for _, new in counts.values()) or not (root / "meta.json").is_file():
        contact_sheet(root / "preview.png", sorted((root / "assets/train").iterdir())[:8])
        save_json(root / "meta.json", dict(stage="render", preset=cfg.preset, config=conf, world_version=WORLD_VERSION, seconds=round(seconds, 1),
                                            versions=dict(torch=torch.__version__, numpy=np.__version__), elevation=ELEVATION, radius=RADIUS, fov=FOV,
                                            counts=dict(train=cfg.n_train, test=cfg.n_test, images=cfg.n_images, prompts=cfg.n_prompts)))
    print(f"\nstage 0 done in {seconds:.0f} s  (world v{WORLD_VERSION}, preset {cfg.preset}, {cfg.res}x{cfg.res}, {cfg.views} views)")
    for split, (n, new) in counts.items():
        print(f"  {split:7s} {n:6d} objects  ({new} rendered now, {n - new} already complete)")
    print(f"  prompts {cfg.n_prompts:6d} captions -> {root / 'prompts.txt'}\n  assets -> {root / 'assets'}   images -> {root / 'images'}"
          f"   preview -> {root / 'preview.png'}\nnext: python finetune_video.py")

if __name__ == "__main__":
    run_cli(main)
