"""Stage 0, the world, and the geometry every stage shares. Nothing here learns.

Stage 0 makes the project's own small world, the stand-in for everything the paper downloads:
procedural 3D objects of 16 categories whose 3D assets cover only a few (Objaverse), their single
views and captions (the web's images), more captions (the prompts) and, to retrain the video
prior, web clips that come without cameras (the videos EMU Video learnt from).

Reads:  nothing (the world is generated from seeds); --meshes DIR: the user's .obj/.ply files
Writes: out/0_data/assets/{train,test_seen,test_unseen}/<id>/  000.png.. (RGBA),
                cameras.safetensors, prompt.txt, object.json (category, split),
                surface.safetensors (ground-truth points + colours)
        out/0_data/images/<id>.png + captions.txt   single views of other objects (the "2D web")
        out/0_data/prompts.txt                      captions of yet other objects (the "prompts")
        out/0_data/videos/<id>/ 000.png.., prompt.txt   web clips of yet others (--n_videos)
        out/0_data/meta.json, preview.png, categories.png, videos.png
        --meshes DIR: out/0_data/meshes/<name>/     the user's meshes as real assets
Run:    python render.py                      (tiny preset, about 2.5 minutes on a 2-core laptop)
        python render.py --preset micro --out /tmp/run
        python render.py --n_videos 6000      (+ 6,000 web clips, 4 minutes: to retrain the prior)
        python render.py --meshes my_meshes/
        (no training here, so there is no torchrun form)
Paper:  the stand-in for Objaverse renders (VFusion3D Sec. 3.1 fine-tunes on orbit renders of 3D
        assets) and for the web's images, prompts and videos.

Contents, in reading order:
Part 1: stage 0, the world
    config | primitives | colours and light | categories | the exact renderer | web clips | stage 0
    used by render.py's main and the tests; its masks, captions and renderer by every stage
Part 2: geometry the stages share
    cameras | marching cubes | meshes out
    used by every stage
Part 3: utilities every script uses, which you need not read to follow the method
    flags and errors | files | object folders | reports
    used by every script
Appendix: your own meshes
    meshes in | a ray tracer for meshes | stage 0 for meshes
    used by render.py --meshes

Shapes: B batch, V views, N points, R rays, P parts, H W image rows and columns, C channels;
(F,3) triangles (faces) of a mesh (in code, F is torch.nn.functional).
"""

import argparse
import dataclasses
import html
import inspect
import json
import os
import re
import shutil
import struct
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm


# ==================================================================================================
# Part 1: stage 0, the world
# ==================================================================================================
# ------------------------------------------------------------------------------------------- config
# Bump when the world (shapes, colours, framing) changes: shipped weights check it.
WORLD_VERSION = 2


@dataclass
class Config:
    preset: str = "tiny"  # micro | tiny | small | paper (fills the fields below)
    out: str = "out"  # root folder holding the numbered stage folders
    seed: int = 0  # world seed: the same seed writes the same bytes [0..]
    device: str = "cpu"  # unused here (rendering runs on the CPU), kept for a uniform CLI
    categories_3d: int = 6  # categories with 3D assets: the first N of CATEGORIES [1..15]
    n_train: int = 400  # real 3D assets of those categories for training (scarce) [1..]
    n_test_seen: int = 40  # held-out real assets of the same categories, evaluation only [0..]
    n_test_unseen: int = 40  # held-out real assets of the other categories, evaluation only [0..]
    n_images: int = 10000  # single views of other objects (the abundant 2D data) [1..]
    n_prompts: int = 2000  # captions of other objects (the "web-scale" prompts) [1..]
    n_videos: int = 0  # web clips, no cameras (only to retrain the video prior) [0..]
    views: int = 8  # views per orbit [2..]
    res: int = 32  # image size, pixels [8..]
    supersample: int = 2  # rays per pixel side when rendering (anti-aliasing) [1..]
    trace_steps: int = 48  # sphere-tracing steps [1..]
    surface_points: int = 4096  # ground-truth surface points per asset [1..]
    batch: int = 96  # images rendered together [1..]
    # your own meshes: python render.py --meshes DIR (instead of the world)
    meshes: str = ""  # folder of .obj/.ply files -> object folders in <out>/0_data/meshes/
    mesh_colour: str = "0.7,0.7,0.7"  # RGB in [0,1] of meshes without vertex colours
    mesh_up: str = "y"  # the files' up axis: y (most exporters) or z (this world's)
    max_faces: int = 200000  # meshes with more triangles are skipped (decimate them first) [1..]


PRESETS = {
    "micro": dict(n_train=12, n_test_seen=4, n_test_unseen=4, n_images=64, n_prompts=32)
    | dict(n_videos=8, views=4, res=16, surface_points=1024),
    "tiny": {},
    "small": dict(n_train=2000, n_images=50000, n_prompts=20000, views=16, res=64),
    "paper": dict(n_train=100000, n_images=1000000, n_prompts=4000000, views=16, res=256),
}

# Fixed framing (world units, degrees): objects fit a sphere of radius FRAME_FILL, which fills
# the frame, seen from cameras on a circle of radius RADIUS at ELEVATION degrees.
ELEVATION = 20.0
RADIUS = 2.4
FOV = 45.0
FRAME_FILL = 0.85


# --------------------------------------------------------------------------------------- primitives
# Each primitive stands upright (axis z) with three parameters (a, b, e); its distance function of
# x, y, z in its own frame and rho = sqrt(x^2 + y^2) says what they mean (exact but for the cone).


def sphere_sdf(x, y, z, rho, a, b, e):
    """Sphere of radius a."""
    return torch.sqrt(rho * rho + z * z) - a


def box_sdf(x, y, z, rho, a, b, e):
    """Box of half sizes a, b, e along x, y, z."""
    bx = x.abs() - a
    by = y.abs() - b
    bz = z.abs() - e
    outside = bx.clamp(min=0).square() + by.clamp(min=0).square() + bz.clamp(min=0).square()
    return torch.sqrt(outside) + torch.maximum(torch.maximum(bx, by), bz).clamp(max=0)


def cylinder_sdf(x, y, z, rho, a, b, e):
    """Cylinder of radius a and half height b."""
    radial = rho - a
    axial = z.abs() - b
    outside = radial.clamp(min=0).square() + axial.clamp(min=0).square()
    return torch.sqrt(outside) + torch.maximum(radial, axial).clamp(max=0)


def cone_sdf(x, y, z, rho, a, b, e):
    """Cone of base radius a and half height b, apex up: the larger of the distances to the plane of
    its slanted side and to its base's, a lower bound, which is enough for sphere tracing."""
    side = ((rho - a) * 2 * b + (z + b) * a) / torch.sqrt(4 * b * b + a * a)
    return torch.maximum(side, -z - b)


def torus_sdf(x, y, z, rho, a, b, e):
    """Ring around the z axis: radius a to the middle of the tube, tube radius b."""
    return torch.sqrt((rho - a).square() + z * z) - b


def capsule_sdf(x, y, z, rho, a, b, e):
    """Capsule: all points within a of the upright segment from z = -b to z = b."""
    return torch.sqrt(rho * rho + (z - z.clamp(-b, b)).square()) - a


@dataclass(frozen=True)
class Shape:
    """One kind of primitive: its name, the radius of its bounding sphere (which centres and fits
    an object into the frame) and its signed distance."""

    name: str
    bound: Callable  # (a, b, e) -> the radius of a sphere around its centre that holds it
    sdf: Callable  # (x, y, z in its upright frame, rho = sqrt(x^2 + y^2), a, b, e) -> distance


# One entry per kind; the index is the kind integer stored in objects (0 sphere ... 5 capsule).
SHAPES = (
    Shape("sphere", lambda a, b, e: a, sphere_sdf),
    Shape("box", lambda a, b, e: np.sqrt(a * a + b * b + e * e), box_sdf),
    Shape("cylinder", lambda a, b, e: np.hypot(a, b), cylinder_sdf),
    Shape("cone", lambda a, b, e: np.hypot(a, b), cone_sdf),
    Shape("torus", lambda a, b, e: a + b, torus_sdf),
    Shape("capsule", lambda a, b, e: a + b, capsule_sdf),
)
SHAPE_NAMES = tuple(shape.name for shape in SHAPES)


# -------------------------------------------------------------------------------- colours and light
COLOURS = {
    "red": (0.86, 0.13, 0.12),
    "orange": (0.97, 0.52, 0.08),
    "yellow": (0.96, 0.84, 0.10),
    "green": (0.16, 0.64, 0.20),
    "cyan": (0.08, 0.70, 0.78),
    "blue": (0.13, 0.28, 0.90),
    "purple": (0.55, 0.20, 0.75),
    "pink": (0.97, 0.45, 0.72),
}
PALETTE = torch.tensor(list(COLOURS.values()))  # (8,3)

# Lambert + ambient shading under one distant light, from above and a little to the side.
AMBIENT = 0.55
LIGHT = F.normalize(torch.tensor([0.35, 0.25, 1.0]), dim=0)

# A pixel is background when every channel is at least this bright. One threshold serves every
# mask: the LRM's opacity target, the data engine's filter, the colour metric, framing a photo.
NON_WHITE = 0.92


def object_mask(img):
    """Object pixels of images (..., 3, H, W) on white -> bool (..., H, W)."""
    return (img < NON_WHITE).any(-3)


def on_white(rgba):
    """Straight-alpha RGBA (B,4,H,W) composited on white -> RGB (B,3,H,W)."""
    return rgba[:, :3] * rgba[:, 3:] + 1 - rgba[:, 3:]


# --------------------------------------------------------------------------------------- categories
@dataclass(frozen=True)
class Part:
    """One part of a recipe: a primitive, its nominal parameters (a, b, e) and centre in the
    object's frame (+x is the front, +z up), its rotation, and which of the object's colours it
    wears (0 = the first the caption names)."""

    shape: str  # a name of SHAPE_NAMES
    size: tuple  # (a, b, e), as its distance function reads them; world units
    at: tuple  # (x, y, z) centre
    turn: tuple = (0, 0, 0)  # rotation about x, then y, then z, degrees (90 about x: axis along y)
    colour: int = 0


def mirrored(part):
    """A part and its mirror images across the x = 0 and y = 0 planes (legs, wheels, fins)."""
    x, y, z = part.at
    return [dataclasses.replace(part, at=(sx * x, sy * y, z)) for sx in (1, -1) for sy in (1, -1)]


@dataclass(frozen=True)
class Category:
    """A named kind of thing: a recipe of parts and the caption its colours fill in."""

    name: str
    caption: str  # "a {0} mug with a {1} handle": {k} is the k-th colour's name
    parts: tuple
    asymmetric: bool  # looks different from the front and from behind


# One entry per category. The first six are the default 3D categories (3 asymmetric, 3 not).
CATEGORIES = (
    Category("mug", "a {0} mug with a {1} handle", (
        Part("cylinder", (0.3, 0.36, 0), (-0.1, 0, 0)),
        Part("torus", (0.2, 0.065, 0), (0.2, 0, 0), (90, 0, 0), 1)), True),
    Category("table", "a {0} table with {1} legs", (
        Part("box", (0.5, 0.5, 0.05), (0, 0, 0.22)),
        *mirrored(Part("cylinder", (0.05, 0.26, 0), (0.4, 0.4, -0.08), colour=1))), False),
    Category("car", "a {0} car with a {1} cabin and {2} wheels", (
        Part("box", (0.6, 0.3, 0.14), (0, 0, -0.04)),
        Part("box", (0.26, 0.26, 0.14), (-0.16, 0, 0.22), colour=1),
        *mirrored(Part("cylinder", (0.15, 0.06, 0), (0.36, 0.3, -0.2), (90, 0, 0), 2))), True),
    Category("tree", "a {0} tree with a {1} trunk", (
        Part("cone", (0.42, 0.42, 0), (0, 0, 0.22)),
        Part("cylinder", (0.09, 0.26, 0), (0, 0, -0.42), colour=1)), False),
    Category("chair", "a {0} chair with {1} legs", (
        Part("box", (0.32, 0.32, 0.05), (0, 0, -0.02)),
        Part("box", (0.05, 0.32, 0.32), (-0.28, 0, 0.34)),
        *mirrored(Part("cylinder", (0.045, 0.24, 0), (0.26, 0.26, -0.28), colour=1))), True),
    Category("mushroom", "a {0} mushroom with a {1} stem", (
        Part("cone", (0.5, 0.2, 0), (0, 0, 0.2)),
        Part("cylinder", (0.14, 0.3, 0), (0, 0, -0.22), colour=1)), False),
    Category("house", "a {0} house with a {1} roof and a {2} door", (
        Part("box", (0.42, 0.42, 0.3), (0, 0, -0.2)),
        Part("cone", (0.62, 0.28, 0), (0, 0, 0.38), colour=1),
        Part("box", (0.04, 0.12, 0.18), (0.42, 0, -0.32), colour=2)), True),
    Category("duck", "a {0} duck with a {1} beak", (
        Part("capsule", (0.26, 0.16, 0), (-0.08, 0, -0.2), (0, 90, 0)),
        Part("sphere", (0.18, 0, 0), (0.2, 0, 0.2)),
        Part("cone", (0.08, 0.12, 0), (0.46, 0, 0.18), (0, 90, 0), 1)), True),
    Category("snowman", "a {0} snowman with a {1} nose and a {2} hat", (
        Part("sphere", (0.32, 0, 0), (0, 0, -0.36)),
        Part("sphere", (0.22, 0, 0), (0, 0, 0.12)),
        Part("cone", (0.06, 0.14, 0), (0.32, 0, 0.14), (0, 90, 0), 1),
        Part("cylinder", (0.16, 0.1, 0), (0, 0, 0.42), colour=2)), True),
    Category("teapot", "a {0} teapot with a {1} spout and lid", (
        Part("sphere", (0.34, 0, 0), (0, 0, -0.08)),
        Part("cylinder", (0.06, 0.2, 0), (0.4, 0, 0.06), (0, 50, 0), 1),
        Part("torus", (0.17, 0.05, 0), (-0.36, 0, -0.04), (90, 0, 0)),
        Part("cone", (0.14, 0.1, 0), (0, 0, 0.34), colour=1)), True),
    Category("fish", "a {0} fish with a {1} tail", (
        Part("capsule", (0.2, 0.28, 0), (0.12, 0, 0), (0, 90, 0)),
        Part("cone", (0.22, 0.12, 0), (-0.46, 0, 0), (0, 90, 0), 1)), True),
    Category("hammer", "a {0} hammer with a {1} handle", (
        Part("box", (0.3, 0.1, 0.1), (0.12, 0, 0.42)),
        Part("cylinder", (0.05, 0.46, 0), (0, 0, -0.08), colour=1)), True),
    Category("bed", "a {0} bed with a {1} headboard", (
        Part("box", (0.56, 0.34, 0.1), (0.06, 0, -0.1)),
        Part("box", (0.05, 0.34, 0.3), (-0.52, 0, 0.04), colour=1)), True),
    Category("rocket", "a {0} rocket with {1} fins", (
        Part("cylinder", (0.16, 0.4, 0), (0, 0, -0.06)),
        Part("cone", (0.16, 0.2, 0), (0, 0, 0.54)),
        *mirrored(Part("box", (0.1, 0.1, 0.12), (0.14, 0.14, -0.36), (0, 0, 45), 1))), False),
    Category("dumbbell", "a {0} dumbbell with a {1} bar", (
        Part("cylinder", (0.05, 0.42, 0), (0, 0, 0), (90, 0, 0), 1),
        Part("cylinder", (0.22, 0.08, 0), (0, 0.4, 0), (90, 0, 0)),
        Part("cylinder", (0.22, 0.08, 0), (0, -0.4, 0), (90, 0, 0))), False),
    Category("lamp", "a {0} lamp with a {1} stand", (
        Part("cone", (0.32, 0.2, 0), (0, 0, 0.36)),
        Part("cylinder", (0.035, 0.36, 0), (0, 0, -0.1), colour=1),
        Part("cylinder", (0.24, 0.04, 0), (0, 0, -0.46), colour=1)), False),
)  # fmt: skip
CATEGORY_NAMES = tuple(c.name for c in CATEGORIES)
MAX_PARTS = max(len(c.parts) for c in CATEGORIES)


def rotation(turn_deg):
    """Rotation matrix of turns about x, then y, then z (degrees) -> (3,3)."""
    ax, ay, az = np.deg2rad(turn_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def caption_labels(text):
    """What a caption names: (its first category word, its first colour word) as indices into
    CATEGORIES and COLOURS, -1 for what it names none of. The world's captions name the category
    and lead with the body's colour."""
    words = re.findall(r"[a-z]+", text.lower())
    category = next((CATEGORY_NAMES.index(w) for w in words if w in CATEGORY_NAMES), -1)
    colour = next((list(COLOURS).index(w) for w in words if w in COLOURS), -1)
    return category, colour


def caption_of(category, colours):
    """The category's caption with its colours' names, and "an" before a vowel."""
    text = category.caption.format(*[list(COLOURS)[c] for c in colours])
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def make_object(seed, category):
    """One object of CATEGORIES[category] from a seed: each part's parameters within +-15% of the
    recipe's, distinct colours for the recipe's colour slots, the whole object turned by a random
    angle about z, centred and scaled to fill the frame. -> dict of numpy arrays per part, the
    caption, the category, the colour slots and the facing."""
    rng = np.random.default_rng(seed)
    recipe = CATEGORIES[category]
    n_colours = 1 + max(p.colour for p in recipe.parts)
    colours = rng.choice(len(COLOURS), n_colours, replace=False)
    jitter = rng.uniform(0.85, 1.15, (len(recipe.parts), 3))  # (P,3) proportions
    params = np.array([p.size for p in recipe.parts]) * jitter
    facing = rotation((0, 0, rng.uniform(0, 360)))  # the object's turn about z
    rot = np.stack([facing @ rotation(p.turn) for p in recipe.parts])  # (P,3,3)
    centres = np.array([p.at for p in recipe.parts]) @ facing.T
    kinds = np.array([SHAPE_NAMES.index(p.shape) for p in recipe.parts])
    bound = np.array([SHAPES[k].bound(*p) for k, p in zip(kinds, params)])
    # centre the box around the parts' bounding spheres, scale it to fill a sphere of FRAME_FILL
    centres -= ((centres - bound[:, None]).min(0) + (centres + bound[:, None]).max(0)) / 2
    scale = FRAME_FILL / (np.linalg.norm(centres, axis=1) + bound).max()
    return dict(
        kind=kinds,
        colour=colours[[p.colour for p in recipe.parts]],
        params=(params * scale).astype(np.float32),
        centre=(centres * scale).astype(np.float32),
        rot=rot.astype(np.float32),
        caption=caption_of(recipe, colours),
        category=recipe.name,
        slots=colours,  # the colour of each role, in the order the caption names them
        facing=float(np.rad2deg(np.arctan2(facing[1, 0], facing[0, 0])) % 360),  # degrees about z
    )


# ------------------------------------------------------------------------------- the exact renderer
EMPTY = -1  # the kind of an unused part slot in pack()


def pack(objects):
    """List of objects -> tensors padded to MAX_PARTS parts (kind EMPTY = none)."""
    n = len(objects)
    out = dict(
        kind=torch.full((n, MAX_PARTS), EMPTY),
        colour=torch.zeros(n, MAX_PARTS, dtype=torch.long),
        params=torch.zeros(n, MAX_PARTS, 3),
        centre=torch.zeros(n, MAX_PARTS, 3),
        rot=torch.eye(3).repeat(n, MAX_PARTS, 1, 1),
    )
    for i, o in enumerate(objects):
        for key in out:
            out[key][i, : len(o["kind"])] = torch.as_tensor(o[key])
    return out


def pair_up(obj, packed):
    """The real (ray, part) pairs for rays of objects obj (R,) (non-decreasing: rays come object by
    object), sorted by primitive kind so each SDF formula runs on one contiguous slice,
    no padding."""
    n_rays = torch.bincount(obj, minlength=len(packed["kind"]))  # rays per object
    start = torch.cumsum(n_rays, 0) - n_rays
    o, slot = (packed["kind"] != EMPTY).nonzero(as_tuple=True)  # existing parts
    k, order = packed["kind"][o, slot].sort(stable=True)
    o, slot = o[order], slot[order]
    reps = n_rays[o]  # each pairs with its object's rays
    # pair j of part i is ray start[o[i]] + j: count all pairs, less those before part i
    first = start[o] - (torch.cumsum(reps, 0) - reps)
    ray = torch.repeat_interleave(first, reps) + torch.arange(int(reps.sum()))
    per_part = {key: packed[key][o, slot] for key in ("rot", "centre", "params", "colour")}
    counts = torch.bincount(k, weights=reps, minlength=len(SHAPES)).long().tolist()  # per kind
    per_pair = {key: torch.repeat_interleave(x, reps, dim=0) for key, x in per_part.items()}
    return dict(ray=ray, n=len(obj), counts=counts, **per_pair)


def pair_sdf(points, pairs):
    """Signed distance of each pair's point to its part, in the part's own frame (the inverse
    rotation of the offset from its centre): the pairs come sorted by kind, so each kind's
    distance runs on one slice (SHAPES[kind].sdf)."""
    offset = points[pairs["ray"]] - pairs["centre"]
    q = torch.einsum("rij,ri->rj", pairs["rot"], offset)  # R^T (p - c)
    per_kind = pairs["counts"]
    out = []
    for shape, local, p in zip(SHAPES, q.split(per_kind), pairs["params"].split(per_kind)):
        x, y, z = local.unbind(-1)
        out.append(shape.sdf(x, y, z, torch.sqrt(x * x + y * y), *p.unbind(-1)))
    return torch.cat(out)


def scene_sdf(points, pairs):
    """The union of the primitives at points (R,3), from their (ray, part) pairs (pair_up)
    -> distance (R,) and palette index of the nearest part (R,). It gives scene_sdf_padded's
    numbers for a tenth of its formula evaluations (each part meets only its own kind's formula
    and its own object's points): the exact renderer runs 3.1x faster."""
    d = pair_sdf(points, pairs)
    dist = torch.full((pairs["n"],), float("inf")).scatter_reduce(0, pairs["ray"], d, "amin")
    colour = torch.zeros(pairs["n"], dtype=torch.long)
    nearest = d <= dist[pairs["ray"]]
    colour[pairs["ray"][nearest]] = pairs["colour"][nearest]
    return dist, colour


def scene_sdf_padded(points, obj, packed):
    """The plain union that scene_sdf speeds up: points (R,3) of objects obj (R,) against every
    part slot of their object (padded to MAX_PARTS), each slot through every kind's formula, then
    the slot's own kind picked and the empty slots ignored -> distance (R,), palette index (R,)."""
    offset = points[:, None] - packed["centre"][obj]  # (R,P,3)
    q = torch.einsum("rpij,rpi->rpj", packed["rot"][obj], offset)  # R^T (p - c) per slot
    x, y, z = q.unbind(-1)
    rho = torch.sqrt(x * x + y * y)
    size = packed["params"][obj].unbind(-1)  # a, b, e: (R,P) each
    every = torch.stack([shape.sdf(x, y, z, rho, *size) for shape in SHAPES], -1)  # (R,P,kinds)
    kind = packed["kind"][obj]  # (R,P)
    d = every.gather(-1, kind.clamp(min=0)[..., None])[..., 0]
    dist, slot = d.masked_fill(kind == EMPTY, float("inf")).min(-1)
    return dist, packed["colour"][obj].gather(1, slot[:, None])[:, 0]


@torch.no_grad()
def render_views(packed, obj, c2w, K, res, supersample=2, steps=48, eps=1e-3):
    """Exact renderer: sphere tracing, nearest primitive's colour, Lambert + ambient, white
    background. obj (B,) object index per image, c2w (B,4,4), K (B,3,3) -> RGBA (B,4,res,res)
    in [0,1] (straight alpha: RGB is the object's colour, A its coverage) and
    the hit points (B,res*ss,res*ss,3)."""
    B = len(obj)
    ss = supersample
    o, d = camera_rays(c2w, K, res * ss)  # normalised intrinsics serve any resolution
    ray_obj = obj.repeat_interleave(o.shape[1] * o.shape[2])  # (B*h*w,)
    o = o.reshape(-1, 3)
    d = d.reshape(-1, 3)
    # ray vs the bounding sphere of radius 1: where each ray enters it and leaves it
    b = (o * d).sum(-1)
    disc = b * b - (o * o).sum(-1) + 1.0
    t = (-b - disc.clamp(min=0).sqrt()).clamp(min=0)
    t_far = -b + disc.clamp(min=0).sqrt()
    alive = disc > 0
    hit = torch.zeros(len(o), dtype=torch.bool)
    # sphere tracing: each step goes as far as the distance to the scene; the live rays are
    # compacted every 8 steps, so rays that hit or left stop costing anything
    for _ in range(0, steps, 8):
        i = alive.nonzero()[:, 0]
        if len(i) == 0:
            break
        ti = t[i]
        pairs = pair_up(ray_obj[i], packed)
        live = alive[i]
        for _ in range(8):
            dist, _ = scene_sdf(o[i] + ti[:, None] * d[i], pairs)
            ti = ti + dist * live
            live = live & (dist >= eps) & (ti < t_far[i])
        t[i] = ti
        alive[i] = live
        hit[i] = (dist < eps) & (ti < t_far[i])
    # shade the hits: the nearest primitive's colour, Lambert + ambient
    i = hit.nonzero()[:, 0]
    x = o[i] + t[i, None] * d[i]
    pairs = pair_up(ray_obj[i], packed)
    _, near = scene_sdf(x, pairs)
    # the normal is the distance's gradient, from four samples on a tetrahedron around x
    h = 1e-3 * torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1.0]])
    grad = sum(h[j] * scene_sdf(x + h[j], pairs)[0][:, None] for j in range(4))
    shade = AMBIENT + (1 - AMBIENT) * (F.normalize(grad, dim=-1) @ LIGHT).clamp(min=0)
    rgb = torch.zeros(len(o), 3).index_copy_(0, i, PALETTE[near] * shade[:, None])
    pts = torch.full((len(o), 3), float("nan")).index_copy_(0, i, x)
    rgba = average_rays(rgb.view(B, -1, 3), hit.view(B, -1), res, ss)
    return rgba, pts.view(B, res * ss, res * ss, 3)


def average_rays(rgb, hit, res, ss):
    """Each pixel averages its ss x ss rays: colours (B,(res*ss)^2,3) or (B,res*ss,res*ss,3) and
    hits of the same shape -> RGBA (B,4,res,res), straight alpha (RGB is the mean colour of the
    rays that hit, A their share)."""
    B = len(hit)
    rgb = rgb.reshape(B, res, ss, res, ss, 3)
    a = hit.float().reshape(B, res, ss, res, ss, 1)
    cover = a.mean((2, 4))  # coverage, (B,res,res,1)
    colour = (rgb * a).sum((2, 4)) / (a.sum((2, 4)) + 1e-8)  # straight (unpremultiplied) colour
    return torch.cat([colour, cover], -1).permute(0, 3, 1, 2)


def surface_points(obj, n, res=64, seed=0):
    """Ground truth: n points (with albedo colours) spread uniformly over the object's surface."""
    packed = pack([obj])

    def sdf(p):  # distance (N,) to the object, palette index (N,) of the nearest part at p (N,3)
        return scene_sdf(p, pair_up(torch.zeros(len(p), dtype=torch.long), packed))

    v, f = extract_mesh(lambda p: -sdf(p)[0], res, 0.0, chunk=res**3)  # inside = negative distance
    pts, _ = sample_mesh(v, f, n, seed)
    return pts, PALETTE[sdf(pts)[1]]


# ---------------------------------------------------------------------------------------- web clips
# A web clip's camera (clip_cameras): the range each of its quantities is drawn from (degrees,
# world units). Each but the arc is drawn twice, for the first and the last frame.
CLIP = dict(elevation=(-5.0, 45.0), arc=(90.0, 300.0), radius=(2.0, 3.0), fov=(38.0, 52.0))
CLIP |= dict(aim=(-0.12, 0.12))  # the point looked at, each coordinate


def clip_cameras(seed, views):
    """The camera path of one web clip, as a phone or a turntable would film it, unlike the orbit
    in every way: the elevation drifts, the azimuth advances in uneven steps (either way round)
    over less than a full turn, the distance and the field of view change, and the aim wanders
    off the centre. Stage 0 renders the clip's frames with it and keeps no trace of it (videos
    come without cameras) -> c2w (V,4,4), K (V,3,3)."""
    rng = np.random.default_rng([seed, 1])  # a stream apart from the object's (make_object)
    t = torch.linspace(0, 1, views)

    def drift(low, high, size=()):
        """A quantity that moves linearly between two draws over the clip -> (V, *size)."""
        start = torch.tensor(rng.uniform(low, high, size), dtype=torch.float32)
        end = torch.tensor(rng.uniform(low, high, size), dtype=torch.float32)
        return torch.lerp(start, end, t.view(-1, *[1] * len(size)))

    elevation = drift(*CLIP["elevation"])
    steps = rng.dirichlet(np.full(views - 1, 2.0)) * rng.uniform(*CLIP["arc"]) * rng.choice([-1, 1])
    azimuth = rng.uniform(0, 360) + np.concatenate([[0.0], np.cumsum(steps)])
    azimuth = torch.tensor(azimuth, dtype=torch.float32)
    eye = on_sphere(azimuth.deg2rad(), elevation.deg2rad(), drift(*CLIP["radius"])[:, None])
    aim = drift(*CLIP["aim"], (3,))
    K = torch.stack([intrinsics(fov) for fov in drift(*CLIP["fov"]).tolist()])
    return look_at(eye, aim), K


# ------------------------------------------------------------------------------------------ stage 0
# Each set of objects owns a range of seeds, so no test object appears in another set; the real
# assets' sets (the splits) are folders under assets/, and the sheet's objects only pictures.
SEED_RANGES = ("train", "test_seen", "test_unseen", "images", "prompts", "sheet", "videos")
ASSETS = ("train", "test_seen", "test_unseen")

# fields that change no byte of the world: n_videos writes to 0_data/videos/ only (clips can be
# added to a finished world), the mesh fields to 0_data/meshes/ only
NOT_RECORDED = ("out", "device", "batch", "n_videos")
NOT_RECORDED += ("meshes", "mesh_colour", "mesh_up", "max_faces")


def object_seed(cfg, split, i):
    """Object i of a set: seed ranges of 10M a set, 100M a --seed."""
    return cfg.seed * 100_000_000 + SEED_RANGES.index(split) * 10_000_000 + i


def set_size(cfg, split):
    """How many objects stage 0 makes of a set."""
    sizes = dict(train=cfg.n_train, test_seen=cfg.n_test_seen, test_unseen=cfg.n_test_unseen)
    return (sizes | dict(images=cfg.n_images, prompts=cfg.n_prompts, videos=cfg.n_videos))[split]


def split_categories(cfg, split):
    """The categories a split draws from, as indices of CATEGORIES: the 3D categories for the
    training and seen test assets, the others for the unseen ones, all of them for the rest."""
    if split in ("train", "test_seen"):
        return list(range(cfg.categories_3d))
    if split == "test_unseen":
        return list(range(cfg.categories_3d, len(CATEGORIES)))
    return list(range(len(CATEGORIES)))


def world_object(cfg, split, i):
    """Object i of a split: its categories in turn, so every one is represented."""
    cats = split_categories(cfg, split)
    return make_object(object_seed(cfg, split, i), cats[i % len(cats)])


ASSET_FILES = ("cameras.safetensors", "surface.safetensors", "object.json")


def is_complete(root, i, views, extra=ASSET_FILES):
    """Whether object `i` is on disk in `root`: its image (views None), or its folder's views,
    prompt.txt and the `extra` files (a real asset's; a web clip has none)."""
    if views is None:
        return (root / f"{i}.png").is_file()
    need = [f"{k:03d}.png" for k in range(views)] + ["prompt.txt", *extra]
    return all((root / i / n).is_file() for n in need)


def render_split(cfg, split, root):
    """The missing objects of a set -> (count, rendered now): real assets (the orbit's views,
    cameras, caption, surface points), single images (<id>.png and captions.txt), or web clips
    (new objects of every category filmed along clip_cameras paths: frames on white and a
    caption, no cameras)."""
    views = None if split == "images" else cfg.views
    extra = () if split == "videos" else ASSET_FILES
    ids = [f"{i:05d}" for i in range(set_size(cfg, split))]
    todo = [i for i in ids if not is_complete(root, i, views, extra)]
    V = views or 1
    ring = orbit(V)  # every asset's and image's cameras; a web clip draws its own
    per = max(1, cfg.batch // V)  # objects per batch
    batches = range(0, len(todo), per)
    for start in progress(batches, desc=f"stage 0 {split:11s}", unit="batch", disable=not todo):
        chunk = todo[start : start + per]
        objs = [world_object(cfg, split, int(i)) for i in chunk]
        seeds = [object_seed(cfg, split, int(i)) for i in chunk]
        cams = [clip_cameras(s, V) if split == "videos" else ring for s in seeds]
        c2w = torch.cat([c for c, _ in cams])  # (len(chunk)*V,4,4)
        K = torch.cat([k for _, k in cams])
        owner = torch.arange(len(chunk)).repeat_interleave(V)  # the object of each image
        rgba, _ = render_views(pack(objs), owner, c2w, K, cfg.res, cfg.supersample, cfg.trace_steps)
        for i, o, seed, own, (c, k) in zip(chunk, objs, seeds, rgba.split(V), cams):
            if views is None:
                save_png(root / f"{i}.png", own[0])
            elif split == "videos":  # a video has no alpha channel and no cameras
                write_object(root / i, on_white(own), None, None, o["caption"])
            else:
                surf = surface_points(o, cfg.surface_points, seed=seed)
                info = dict(category=o["category"], split=split)
                write_object(root / i, own, c, k, o["caption"], surf, info)
    if views is None:
        captions = [f"{i}\t{world_object(cfg, split, int(i))['caption']}\n" for i in ids]
        write_text(root / "captions.txt", "".join(captions))
    return len(ids), len(todo)


def image_sheet(path, rows, labels, scale=3, left=0, below=0):
    """A PNG grid: rows of images (each (N,3,H,W) in [0,1]), enlarged `scale` times, each row's
    label at its left (a `left` pixels wide column) or below it (a `below` pixels high band)."""
    H = rows[0].shape[-1] * scale
    width = max(left + max(len(r) for r in rows) * H, 360)
    sheet = Image.new("RGB", (width, len(rows) * (H + below)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (images, label) in enumerate(zip(rows, labels)):
        top = r * (H + below)
        for c, img in enumerate(images):
            im = Image.fromarray((img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
            sheet.paste(im.resize((H, H), Image.NEAREST), (left + c * H, top))
        draw.text((2, top + H) if below else (4, top + H // 2 - 6), label, fill="black")
    atomic_write(path, lambda t: sheet.save(t, format="PNG"))


def contact_sheet(path, folders, cameras=True):
    """preview.png: one row per object folder (its views) with the caption beneath; web clips
    (videos.png) have no cameras."""
    objs = [load_object(f, cameras=cameras) for f in folders]
    image_sheet(path, [o["images"] for o in objs], [o["prompt"] for o in objs], below=14)


def category_sheet(cfg, path, per_row=8):
    """categories.png: one row per category (the 3D ones marked *), per_row random instances of
    it from their input view, at the world's resolution."""
    c2w, K = orbit(1)
    n = len(CATEGORIES) * per_row
    objs = [make_object(object_seed(cfg, "sheet", i), i // per_row) for i in range(n)]
    cams = (c2w.expand(n, 4, 4), K.expand(n, 3, 3))
    rgba, _ = render_views(pack(objs), torch.arange(n), *cams, cfg.res)
    rgb = on_white(rgba).split(per_row)
    labels = [c.name + (" *" if k < cfg.categories_3d else "") for k, c in enumerate(CATEGORIES)]
    image_sheet(path, rgb, labels, scale=2, left=90)


def check_out(cfg, root):
    """Refuse an --out that is a file or whose 0_data another config wrote -> the config to keep."""
    if Path(cfg.out).is_file() or root.is_file():
        raise DataError(f"{cfg.out}: is a file, not a folder; pick another --out")
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_RECORDED}
    if (root / "meta.json").is_file() and read_meta(root, "python render.py").get("config") != conf:
        raise DataError(f"{root}: was written with another config; delete it or pick another --out")
    return conf


def write_preview_and_meta(cfg, root, conf, seconds):
    """preview.png of the first training assets and categories.png, then meta.json: the mark of
    a finished stage 0, with the categories and which of them have 3D assets."""
    contact_sheet(root / "preview.png", sorted((root / "assets/train").iterdir())[:8])
    category_sheet(cfg, root / "categories.png")
    clips = sorted((root / "videos").glob("*/prompt.txt"))
    if clips:
        contact_sheet(root / "videos.png", [c.parent for c in clips[:16]], cameras=False)
    meta = dict(stage="render", preset=cfg.preset, config=conf, world_version=WORLD_VERSION)
    meta["seconds"] = round(seconds, 1)
    meta["versions"] = dict(torch=torch.__version__, numpy=np.__version__)
    meta.update(elevation=ELEVATION, radius=RADIUS, fov=FOV, categories=CATEGORY_NAMES)
    meta["categories_3d"] = CATEGORY_NAMES[: cfg.categories_3d]
    meta["asymmetric"] = [c.name for c in CATEGORIES if c.asymmetric]
    sets = (*ASSETS, "images", "prompts")
    meta["counts"] = {split: set_size(cfg, split) for split in sets} | dict(videos=len(clips))
    save_json(root / "meta.json", meta)


def print_summary(cfg, root, counts, seconds):
    """What stage 0 did, where it wrote, and the next command."""
    setup = f"world v{WORLD_VERSION}, preset {cfg.preset}, {cfg.res}x{cfg.res}, {cfg.views} views"
    print(f"\nstage 0 done in {seconds:.0f} s  ({setup})")
    for split, (n, new) in counts.items():
        print(f"  {split:11s} {n:6d} objects  ({new} rendered now, {n - new} already complete)")
    print(f"  prompts     {cfg.n_prompts:6d} captions -> {root / 'prompts.txt'}")
    if not counts["videos"][0]:
        print("  (web clips only retrain the video prior: python render.py --n_videos 6000)")
    seen = ", ".join(CATEGORY_NAMES[: cfg.categories_3d])
    print(f"  3D assets of {seen}; images, prompts, videos of all {len(CATEGORIES)} categories")
    print(f"  assets -> {root / 'assets'}   images -> {root / 'images'}   preview.png")
    print("next: python finetune_video.py")


def main():
    """Stage 0: check the output folder, render the splits, write the prompts, then (when anything
    was new) the preview and meta.json, and print the summary."""
    cfg = parse_config(Config, PRESETS)
    if cfg.meshes:
        return bring_meshes(cfg)
    root = Path(cfg.out) / "0_data"
    conf = check_out(cfg, root)
    t0 = time.time()
    with locked(root):
        counts = {split: render_split(cfg, split, root / "assets" / split) for split in ASSETS}
        counts["images"] = render_split(cfg, "images", root / "images")
        counts["videos"] = render_split(cfg, "videos", root / "videos")
        prompts = (world_object(cfg, "prompts", i)["caption"] + "\n" for i in range(cfg.n_prompts))
        write_text(root / "prompts.txt", "".join(prompts))
        seconds = time.time() - t0
        if any(new for _, new in counts.values()) or not (root / "meta.json").is_file():
            write_preview_and_meta(cfg, root, conf, seconds)
    write_index(cfg.out)
    print_summary(cfg, root, counts, seconds)


# ==================================================================================================
# Part 2: geometry the stages share
# ==================================================================================================
# ------------------------------------------------------------------------------------------ cameras
def look_at(eye, target):
    """OpenGL camera-to-world matrices of cameras at eye (V,3) looking at target (V,3), +z up
    (the camera looks down its -z, +y is image-up) -> c2w (V,4,4)."""
    back = F.normalize(eye - target, dim=-1)  # camera +z points away from the target
    world_up = torch.tensor([0.0, 0, 1]).expand_as(back)
    right = F.normalize(torch.cross(world_up, back, dim=-1), dim=-1)
    up = torch.cross(back, right, dim=-1)
    c2w = torch.eye(4).repeat(len(eye), 1, 1)
    c2w[:, :3, :3] = torch.stack([right, up, back], -1)
    c2w[:, :3, 3] = eye
    return c2w


def on_sphere(azimuth, elevation, radius):
    """Points at azimuths and elevations (V,) (radians) and radius (a number or (V,1)), +z up
    -> (V,3)."""
    x = elevation.cos() * azimuth.cos()
    y = elevation.cos() * azimuth.sin()
    return radius * torch.stack([x, y, elevation.sin()], -1)


def orbit(views, start_deg=0.0, elevation_deg=ELEVATION, radius=RADIUS):
    """The fixed orbit: `views` azimuths evenly spaced from the input view's, at one elevation and
    distance, each camera looking at the origin -> c2w (V,4,4), K (V,3,3)."""
    az = (start_deg + torch.arange(views) * 360.0 / views).deg2rad()
    el = torch.full_like(az, float(elevation_deg)).deg2rad()
    c2w = look_at(on_sphere(az, el, radius), torch.zeros(views, 3))
    return c2w, intrinsics(FOV).expand(views, 3, 3).clone()


def far_views(views):
    """The orbit's views at least 90 degrees round from the input view (view 0), where copying
    the input is no answer -> their indices."""
    return [k for k in range(1, views) if min(k, views - k) * 360 / views >= 90]


def intrinsics(fov_deg):
    """Pinhole intrinsics normalised by the image size:
    fx = fy = 0.5 / tan(fov/2), cx = cy = 0.5."""
    f = 0.5 / np.tan(np.deg2rad(fov_deg) / 2)
    return torch.tensor([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]], dtype=torch.float32)


def camera_rays(c2w, K, res, crop=None):
    """World rays through pixel centres of a res x res image, or of a crop (top, left, size), where
    top and left may be (B,) tensors (one crop per camera). c2w (B,4,4), K (B,3,3) -> origins, unit
    directions (B,h,w,3)."""
    top, left, size = crop if crop is not None else (0, 0, res)
    v, u = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    v = (v + torch.as_tensor(top).view(-1, 1, 1) + 0.5) / res  # normalised pixel centres (.,h,w)
    u = (u + torch.as_tensor(left).view(-1, 1, 1) + 0.5) / res
    x = (u - K[:, 0, 2, None, None]) / K[:, 0, 0, None, None]
    y = -(v - K[:, 1, 2, None, None]) / K[:, 1, 1, None, None]  # image rows go down, camera +y up
    d_cam = torch.stack([x, y, -torch.ones_like(x)], -1)  # (B,h,w,3)
    dirs = F.normalize(torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], d_cam), dim=-1)
    return c2w[:, None, None, :3, 3].expand_as(dirs), dirs


def project(points, c2w, K, res):
    """World points (N,3) -> pixel coordinates (N,2) as (column, row) in pixels, and depth (N,)."""
    w2c = torch.linalg.inv(c2w)
    p = points @ w2c[:3, :3].T + w2c[:3, 3]  # camera coordinates
    depth = -p[:, 2]
    col = (K[0, 0] * p[:, 0] / depth + K[0, 2]) * res
    row = (-K[1, 1] * p[:, 1] / depth + K[1, 2]) * res
    return torch.stack([col, row], -1), depth


# ----------------------------------------------------------------------------------- marching cubes
# Corner c (0..7) of a cube sits at offset (c & 1, c >> 1 & 1, c >> 2 & 1) from its first voxel;
# its 12 edges join the corners that differ in one bit, four along each axis.
CUBE_EDGES = [(c, c | 1 << axis) for axis in range(3) for c in range(8) if not c >> axis & 1]


def cube_faces():
    """The cube's 6 faces as rings of 4 corners, counter-clockwise seen from outside."""
    faces = []
    for axis in range(3):
        u, w = (axis + 1) % 3, (axis + 2) % 3  # u x w = axis
        for side in (0, 1):
            ring = [side << axis | i << u | j << w for i, j in ((0, 0), (1, 0), (1, 1), (0, 1))]
            faces.append(ring if side else ring[::-1])
    return faces


def fan_start(loop, on_faces):
    """Where a loop's fan of triangles starts: at the first crossed edge that shares no face of
    the cube with any edge it has a diagonal to (those 2..n-2 further round); else at 0."""
    n = len(loop)
    for s in range(n):
        if not any(on_faces[loop[s]] & on_faces[loop[(s + i) % n]] for i in range(2, n - 1)):
            return s
    return 0


def marching_cubes_table():
    """Triangles (as triples of edge indices) for each of the 256 inside/outside patterns of a
    cube's corners, built here rather than copied. Walk each face's ring: every run of inside
    corners is entered across one edge and left across another, and a segment joins the two.
    Diagonal inside corners are separate runs, so a face's segments depend on its own four
    corners only and the two cubes sharing it agree: the mesh is watertight. A crossed edge is
    left on one of its two faces and entered on the other, so the segments chain into closed
    loops around the inside corners, and each loop becomes a fan of triangles; entering before
    leaving, counter-clockwise from outside, winds the triangles to face away from the inside.
    A fan starts where none of its diagonals lies in a face of the cube: a triangle in a face
    would meet the neighbouring cube's there, four triangles on one edge.
    -> (256, T, 3) edges, -1 past each case's triangles."""
    edge_of = {frozenset(e): k for k, e in enumerate(CUBE_EDGES)}
    faces = cube_faces()
    on_faces = [{k for k, ring in enumerate(faces) if {a, b} <= set(ring)} for a, b in CUBE_EDGES]
    table = []
    for case in range(256):
        inside = [case >> c & 1 for c in range(8)]
        leads_to = {}  # crossed edge -> the crossed edge at the other end of its segment
        for ring in faces:
            sides = [edge_of[frozenset((ring[k - 1], ring[k]))] for k in range(4)]  # k-1 -> k
            crossed = [k for k in range(4) if inside[ring[k]] != inside[ring[k - 1]]]
            for k, k_next in zip(crossed, crossed[1:] + crossed[:1]):
                if inside[ring[k]]:  # entered across side k, left across side k_next
                    leads_to[sides[k]] = sides[k_next]
        tris = []
        while leads_to:
            loop = [next(iter(leads_to))]
            while leads_to[loop[-1]] != loop[0]:
                loop.append(leads_to.pop(loop[-1]))
            leads_to.pop(loop[-1])
            s = fan_start(loop, on_faces)
            n = len(loop)
            tris += [(loop[s], loop[(s + i) % n], loop[(s + i + 1) % n]) for i in range(1, n - 1)]
        table.append(tris)
    width = max(len(t) for t in table)
    return torch.tensor([t + [(-1, -1, -1)] * (width - len(t)) for t in table])


MC_TABLE = marching_cubes_table()  # (256, T, 3)
CORNER = torch.tensor([[c & 1, c >> 1 & 1, c >> 2 & 1] for c in range(8)])  # (8,3) offsets
EDGE_START = CORNER[[a for a, _ in CUBE_EDGES]]  # (12,3) offset of each edge's first corner
EDGE_AXIS = torch.tensor([(b ^ a).bit_length() - 1 for a, b in CUBE_EDGES])  # (12,)


def marching_cubes(vol, level):
    """The surface vol = level of a grid vol (X,Y,Z) -> vertices (V,3) in voxel units, one on
    each grid edge whose ends lie on either side of the level, where the linear interpolation
    of the ends meets it, and triangles (F,3) wound outwards (towards values below the level).
    No loop over cells: every cube's pattern of inside corners indexes MC_TABLE at once."""
    X, Y, Z = vol.shape
    inside = vol > level
    # the vertices: axis by axis, the crossed edges and a vertex number for each
    verts, number = [], torch.full((3 * X * Y * Z,), -1)
    for axis in range(3):
        n = vol.shape[axis] - 1
        lo, hi = vol.narrow(axis, 0, n), vol.narrow(axis, 1, n)
        start = (inside.narrow(axis, 0, n) != inside.narrow(axis, 1, n)).nonzero()  # (E,3)
        v0, v1 = lo[tuple(start.T)], hi[tuple(start.T)]
        verts.append(start + ((level - v0) / (v1 - v0))[:, None] * torch.eye(3)[axis])
        key = ((axis * X + start[:, 0]) * Y + start[:, 1]) * Z + start[:, 2]
        number[key] = torch.arange(len(key)) + sum(len(v) for v in verts[:-1])
    # each cube's case (bit c: corner c is inside) picks its triangles from the table
    case = torch.zeros(X - 1, Y - 1, Z - 1, dtype=torch.int32)
    for c, (dx, dy, dz) in enumerate(CORNER.tolist()):
        case |= inside[dx : X - 1 + dx, dy : Y - 1 + dy, dz : Z - 1 + dz].int() << c
    case = case.flatten().long()
    cubes = (MC_TABLE[case, 0, 0] >= 0).nonzero()[:, 0]  # the cubes the surface crosses
    tri = MC_TABLE[case[cubes]]  # (C,T,3) edges of the cube
    keep = tri[..., 0] >= 0
    edge = tri[keep]  # (F,3)
    corner = torch.stack(torch.unravel_index(cubes, (X - 1, Y - 1, Z - 1)), -1)  # (C,3)
    start = corner[:, None, None].expand(*tri.shape, 3)[keep] + EDGE_START[edge]  # (F,3,3)
    key = ((EDGE_AXIS[edge] * X + start[..., 0]) * Y + start[..., 1]) * Z + start[..., 2]
    return torch.cat(verts), number[key]


def grid_points(res):
    """The points of a res^3 grid over the box [-1,1]^3 -> (res,res,res,3)."""
    g = torch.linspace(-1, 1, res)
    return torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1)


@torch.no_grad()
def extract_mesh(density_fn, res, level, chunk=2**13):
    """density_fn (points (N,3) -> (N,)) read at every point of a res^3 grid over [-1,1]^3, in
    chunks, then marching cubes at `level` -> vertices (V,3) in world units, faces (F,3) wound
    outwards."""
    vol = torch.cat([density_fn(p) for p in grid_points(res).view(-1, 3).split(chunk)])
    return mesh_of(vol.view(res, res, res).float(), level)


@torch.no_grad()
def extract_mesh_coarse(density_fn, res, level, coarse, chunk=2**13):
    """extract_mesh's surface from fewer reads, coarse to fine: the grid is read every `coarse`
    points first, then only the points of the coarse cells the surface crosses, and of their
    neighbours, at full resolution; every other point keeps its nearest coarse value, which lies
    on the same side. A part is found if a coarse point lies inside it, so one thinner than
    `coarse` steps may not be. At res 64 and coarse 2 an LRM's grid takes a quarter of the reads."""
    grid = grid_points(res)
    idx = torch.arange(res)
    keys = torch.unique(torch.cat([idx[::coarse], idx[-1:]]))  # the coarse grid's indices
    if len(keys) < 3:
        return extract_mesh(density_fn, res, level, chunk)
    small = grid[keys][:, keys][:, :, keys].reshape(-1, 3)
    n = len(keys)
    cvol = torch.cat([density_fn(p) for p in small.split(chunk)]).view(1, n, n, n).float()
    # the coarse cells the surface crosses (a corner on each side), grown by one cell
    high = F.max_pool3d(cvol, 2, 1)  # (1,n-1,n-1,n-1): each cell's largest corner
    low = -F.max_pool3d(-cvol, 2, 1)
    near = F.max_pool3d(((high > level) & (low <= level)).float(), 3, 1, 1)[0] > 0
    cell = (idx // coarse).clamp(max=n - 2)  # fine index -> its coarse cell
    need = near[cell][:, cell][:, :, cell]  # (res,res,res): points read at full resolution
    nearest = (keys[None] - idx[:, None]).abs().argmin(1)  # fine index -> nearest coarse index
    vol = cvol[0][nearest][:, nearest][:, :, nearest].clone()
    pts = grid[need]  # (M,3)
    if len(pts):
        vol[need] = torch.cat([density_fn(p) for p in pts.split(chunk)]).float()
    return mesh_of(vol, level)


def mesh_of(vol, level):
    """Marching cubes of a res^3 grid over [-1,1]^3 -> vertices in world units, faces. The grid
    is wrapped in a layer below the level first, so a surface that reaches the box is closed
    on its face (clamped onto it), never cut open there."""
    v, f = marching_cubes(F.pad(vol, (1, 1, 1, 1, 1, 1), value=level - 1.0), level)
    return ((v - 1) * (2 / (vol.shape[0] - 1)) - 1).clamp(-1, 1), f


def face_components(f, n_vertices):
    """The connected pieces of a mesh, faces joined where they share a vertex -> (F,) a piece
    number per face. Each vertex takes the smallest number among its faces' vertices, and then
    its number's number (pointer jumping), until nothing changes."""
    label = torch.arange(n_vertices)
    while True:
        low = label[f].min(1).values.repeat_interleave(3)  # each face's smallest, per corner
        new = label.scatter_reduce(0, f.flatten(), low, "amin")
        new = new[new]
        if torch.equal(new, label):
            return torch.unique(label[f[:, 0]], return_inverse=True)[1]
        label = new


def drop_floaters(v, f, rgb, share=0.01):
    """The mesh without its floaters: the pieces under `share` of the largest's area, and those
    that reach the box (no true object does: they fit in a ball of radius FRAME_FILL); the largest
    piece always stays -> v, f, rgb without them, and how many faces went."""
    if len(f) == 0:
        return v, f, rgb, 0
    piece = face_components(f, len(v))
    a, b, c = v[f].unbind(1)
    area = torch.linalg.cross(b - a, c - a).norm(dim=-1)  # (F,), twice each face's area
    total = torch.zeros(int(piece.max()) + 1, dtype=v.dtype).index_add_(0, piece, area)
    on_box = (v[f].abs() >= 1 - 1e-6).flatten(1).any(1).float()  # (F,) a corner on the box
    at_box = torch.zeros(len(total)).index_add_(0, piece, on_box)
    keep = (total >= share * total.max()) & (at_box == 0)
    keep[total.argmax()] = True
    kept = keep[piece]
    used = torch.zeros(len(v), dtype=torch.bool)
    used[f[kept].flatten()] = True
    new_index = torch.cumsum(used, 0) - 1
    return v[used], new_index[f[kept]], rgb[used], int((~kept).sum())


def sample_mesh(v, f, n, seed=0, rgb=None):
    """n points spread uniformly (by area) over a triangle mesh (the origin if it is empty) and
    their colours, interpolated from the vertex colours rgb (V,3) (black when None)."""
    if len(f) == 0:
        return torch.zeros(n, 3), torch.zeros(n, 3)
    gen = torch.Generator().manual_seed(seed)
    a, b, c = v[f].unbind(1)  # (F,3) each: the triangles' corners
    area = torch.cross(b - a, c - a, dim=-1).norm(dim=-1)
    tri = torch.multinomial(area + 1e-12, n, replacement=True, generator=gen)
    r1 = torch.rand(n, 1, generator=gen).sqrt()
    r2 = torch.rand(n, 1, generator=gen)
    w = torch.cat([1 - r1, r1 * (1 - r2), r1 * r2], -1)  # (n,3) barycentric weights
    rgb = torch.zeros_like(v) if rgb is None else rgb
    return torch.einsum("nk,nkc->nc", w, v[f[tri]]), torch.einsum("nk,nkc->nc", w, rgb[f[tri]])


# --------------------------------------------------------------------------------------- meshes out
def write_obj(path, v, f, rgb):
    """Wavefront .obj with per-vertex colour ('v x y z r g b'), faces 1-based, +Y up and -Z
    forward as Blender's and most tools' import expects: our (x, y, z) is written (x, z, -y).
    Seven decimals keep every vertex apart (at five, some coincide and the mesh pinches there)."""
    rows = zip(v.tolist(), rgb.tolist())
    lines = ["# +Y up, -Z forward: the world's (x, y, z) written as (x, z, -y)"]
    lines += [
        f"v {x:.7f} {z:.7f} {-y:.7f} {r:.4f} {g:.4f} {b:.4f}" for (x, y, z), (r, g, b) in rows
    ]
    lines += [f"f {i + 1} {j + 1} {k + 1}" for i, j, k in f.tolist()]
    atomic_write(path, lambda t: t.write_text("\n".join(lines) + "\n"))


def write_ply(path, v, f, rgb):
    """Binary little-endian .ply: float xyz + uchar rgb per vertex, uchar-counted int faces."""
    head = (
        f"ply\nformat binary_little_endian 1.0\nelement vertex {len(v)}\nproperty float x\n"
        "property float y\nproperty float z\nproperty uchar red\nproperty uchar green\n"
        f"property uchar blue\nelement face {len(f)}\n"
        "property list uchar int vertex_indices\nend_header\n"
    ).encode()
    vert = np.zeros(len(v), dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    vert["p"] = v.numpy()
    vert["c"] = (rgb.clamp(0, 1) * 255 + 0.5).byte().numpy()
    face = np.zeros(len(f), dtype=[("n", "u1"), ("i", "<i4", 3)])  # a vertex count, the vertices
    face["n"] = 3
    face["i"] = f.numpy()
    atomic_write(path, lambda t: t.write_bytes(head + vert.tobytes() + face.tobytes()))


GLB = dict(magic=0x46546C67, json=0x4E4F534A, bin=0x004E4942)  # "glTF", "JSON", "BIN\0"
GL = dict(float=5126, uint=5125, vertices=34962, indices=34963)  # glTF's numbers for them


def write_glb(path, v, f, rgb):
    """Binary glTF 2.0, written by hand: a 12-byte header, a JSON chunk and a binary chunk, each
    padded to 4 bytes. The binary chunk holds positions (+Y up, as glTF requires: our +z up turns
    to +y), vertex colours as COLOR_0 in linear light (ours are sRGB) and the triangles' indices;
    a plain double-sided material makes viewers show the colours. An empty mesh: an empty scene."""
    pos = (v[:, [0, 2, 1]] * torch.tensor([1.0, 1.0, -1.0])).numpy().astype("<f4")  # (V,3)
    c = rgb.clamp(0, 1)
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    blobs = [pos.tobytes(), linear.numpy().astype("<f4").tobytes()]
    blobs.append(f.numpy().astype("<u4").tobytes())
    start = np.cumsum([0] + [len(b) for b in blobs]).tolist()
    targets = (GL["vertices"], GL["vertices"], GL["indices"])
    views = [
        dict(buffer=0, byteOffset=s, byteLength=len(b), target=t)
        for s, b, t in zip(start, blobs, targets)
    ]
    accessors = [
        dict(bufferView=0, componentType=GL["float"], count=len(pos), type="VEC3"),
        dict(bufferView=1, componentType=GL["float"], count=len(pos), type="VEC3"),
        dict(bufferView=2, componentType=GL["uint"], count=3 * len(f), type="SCALAR"),
    ]
    gltf = dict(asset=dict(version="2.0", generator="VFusion3D teaching edition"), scene=0)
    gltf["scenes"] = [dict(nodes=[0] if len(f) else [])]
    if len(f):
        accessors[0].update(min=pos.min(0).tolist(), max=pos.max(0).tolist())
        shading = dict(baseColorFactor=[1, 1, 1, 1], metallicFactor=0.0, roughnessFactor=1.0)
        primitive = dict(attributes=dict(POSITION=0, COLOR_0=1), indices=2, material=0)
        gltf.update(nodes=[dict(mesh=0)], meshes=[dict(primitives=[primitive])])
        gltf.update(materials=[dict(pbrMetallicRoughness=shading, doubleSided=True)])
        gltf.update(buffers=[dict(byteLength=start[-1])], bufferViews=views, accessors=accessors)
    text = json.dumps(gltf).encode()
    text += b" " * (-len(text) % 4)
    chunks = struct.pack("<II", len(text), GLB["json"]) + text
    if len(f):
        chunks += struct.pack("<II", start[-1], GLB["bin"]) + b"".join(blobs)  # 4-byte aligned
    head = struct.pack("<III", GLB["magic"], 2, 12 + len(chunks))
    atomic_write(path, lambda p: p.write_bytes(head + chunks))


def save_gif(out, frames, scale, duration=0.08):
    """Frames (T,3,H,W) in [0,1], each pixel enlarged to scale x scale -> GIF `out`, looping, a
    frame every `duration` seconds; -> its frames, uint8 (H*scale, W*scale, 3)."""
    big = F.interpolate(frames, scale_factor=scale, mode="nearest")
    gif = [(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for x in big]
    atomic_write(out, lambda p: imageio.mimsave(p, gif, format="GIF", duration=duration, loop=0))
    return gif


# ==================================================================================================
# Part 3: utilities every script uses, which you need not read to follow the method
# ==================================================================================================
# --------------------------------------------------------------------------------- flags and errors
class DataError(Exception):
    """Bad input from the user or the disk: printed as one line, never as a traceback."""


class Parser(argparse.ArgumentParser):
    """argparse, whose complaints (an unknown flag, a value of the wrong type) are one line."""

    def error(self, message):
        raise DataError(f"{message}; see --help")


def parse_bool(text):
    """A bool flag's value: true, yes or 1 / false, no or 0 (any case); a typo is an error."""
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return words[text.lower()]


def field_comments(cls):
    """{field: (group title, comment)} from the source of dataclass `cls` and its bases: the
    `# ...` after each field (a subclass's replaces its base's); a comment line of its own above
    some fields is their group's title."""
    found = {}
    for klass in reversed(cls.__mro__[:-1]):  # the base classes first, `object` left out
        title = None
        for line in inspect.getsource(klass).splitlines()[1:]:
            heading = re.match(r"\s+# (.+)", line)
            field = re.match(r"\s+(\w+): [\w.]+ = .*?  # (.+)", line)
            if heading:
                title = heading[1]
            elif field:
                found[field[1]] = (title, field[2])
    return found


def check_range(name, value, comment):
    """A number flag against the range its comment ends with, "[1..]" or "[0..1]" (either end
    may be open); every float must be finite -> one-line DataError naming the flag."""
    if isinstance(value, float) and not np.isfinite(value):
        raise DataError(f"--{name} {value}: give a finite number")
    bounds = re.search(r"\[(-?[\d.]*)\.\.(-?[\d.]*)\]$", comment)
    if bounds is None:
        return
    low, high = bounds.groups()
    if low and high:
        accepts = f"{low} to {high}"
    elif low:
        accepts = f"{low} or more"
    else:
        accepts = f"{high} or less"
    if (low and value < float(low)) or (high and value > float(high)):
        raise DataError(f"--{name} {value}: out of range; it accepts {accepts}")


def parse_config(cls, presets, argv=None):
    """Fill dataclass `cls` from --preset, then from one flag per field (`--res 32`), each checked
    against its range (check_range). --help shows each flag's default and comment
    (field_comments), grouped as the fields of `cls` are."""
    parser = Parser(
        description=" ".join(sys.modules[cls.__module__].__doc__.split("\n\n")[0].split()),
        epilog="The defaults are the Config's: --preset replaces some, and flags override both.",
    )
    comments = field_comments(cls)
    groups = {}
    for f in dataclasses.fields(cls):
        title, comment = comments.get(f.name, (None, ""))
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        add = groups[title].add_argument
        flag = "--" + f.name
        text = f"{comment} (default: {f.default})".strip().replace("%", "%%")
        if f.type is bool:  # --flag, --flag false, --no_flag
            add(flag, type=parse_bool, nargs="?", const=True, default=None, help=text)
            add(f"--no_{f.name}", dest=f.name, action="store_const", const=False, help="= false")
        else:
            add(flag, type=f.type, default=None, help=text)
    # torchrun passes the script's own flags after a `--` (torchrun ... script.py -- --num 8)
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--"]
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = args.get("preset", cls.preset)
    if preset not in presets:
        raise DataError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    cfg = cls(**{**presets[preset], **args, "preset": preset})
    for name, (_, comment) in comments.items():
        value = getattr(cfg, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            check_range(name, value, comment)
    return cfg


def run_cli(main):
    """Run `main()`, turning bad input (DataError) and file-system errors into one line on stderr,
    on a line of its own (an open progress bar is closed first)."""
    try:
        main()
    except (DataError, OSError) as e:
        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
        hint = " (check --out and the disk)" if isinstance(e, OSError) else ""
        print(f"error: {e}{hint}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)


def progress(iterable=None, **kwargs):
    """A tqdm bar that redraws often on a terminal and once a minute into a log file."""
    return tqdm(iterable, mininterval=0.1 if sys.stderr.isatty() else 60.0, **kwargs)


# -------------------------------------------------------------------------------------------- files
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
    """Atomic text write that leaves an identical file untouched (a rerun rewrites nothing)."""
    if not (Path(path).is_file() and Path(path).read_text() == text):
        atomic_write(path, lambda t: t.write_text(text))


def save_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def save_tensors(path, tensors, meta=None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda t: save_file(tensors, str(t), metadata=meta))


# What to do with a file that cannot be used, by whoever made it: a stage, or the user.
ADVICE = dict(stage="delete it and rerun the stage that wrote it", user="export it again")


def read_text(path, made_by="stage"):
    """A text file that must be UTF-8 -> its text, or a one-line DataError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file missing") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; {ADVICE[made_by]} as UTF-8") from None


def load_tensors(path):
    """Read a .safetensors file -> (dict of tensors, metadata dict). Never unpickles anything."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except FileNotFoundError:
        raise DataError(f"{path}: file missing") from None
    except Exception as e:
        raise DataError(
            f"{path}: not a readable safetensors file ({type(e).__name__}); {ADVICE['stage']}"
        ) from None


MAX_PIXELS = 4096 * 4096  # larger images are refused before they are decoded
Image.MAX_IMAGE_PIXELS = None  # (PIL's own check would warn, or stop with a traceback)


def load_png(path, res=None, made_by="stage"):
    """An image file -> rgb (3,H,W) composited on white, alpha (1,H,W) or None. Checks the size
    when res is given; 16-bit grey is read as such; anything else is a one-line DataError."""
    path = Path(path)
    if not path.is_file():  # missing, a folder, a FIFO...
        raise DataError(f"{path}: not an image file")
    try:
        im = Image.open(path)
        if im.width * im.height > MAX_PIXELS:
            raise DataError(f"{path}: {im.width}x{im.height} pixels; shrink it to 4096 a side")
        im.load()
    except DataError:
        raise
    except Exception:
        raise DataError(f"{path}: not a readable image; {ADVICE[made_by]} as PNG") from None
    if res is not None and im.size != (res, res):
        raise DataError(
            f"{path}: is {im.size[0]}x{im.size[1]}, expected {res}x{res}; "
            "regenerate it at this preset"
        )
    if im.mode.startswith("I"):  # 16-bit grey: to 8 bits
        grey = np.asarray(im, dtype=np.float32) / 65535 * 255
        im = Image.fromarray(grey.clip(0, 255).astype(np.uint8))
    has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    x = torch.from_numpy(np.asarray(im.convert("RGBA"), dtype=np.float32) / 255).permute(2, 0, 1)
    return (on_white(x[None])[0], x[3:]) if has_alpha else (x[:3], None)


def read_json(path, hint):
    """A JSON object a stage wrote (meta.json, metrics.json), or a one-line DataError naming the
    command to run."""
    try:
        found = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run `{hint}` first") from None
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise DataError(f"{path}: corrupt; delete its folder and run `{hint}` again")
    return found


def read_meta(folder, hint):
    """The meta.json of a finished stage folder, or a one-line DataError naming the command."""
    if not (Path(folder) / "meta.json").is_file():
        raise DataError(f"{folder}: missing or incomplete (no meta.json); run `{hint}` first")
    return read_json(Path(folder) / "meta.json", hint)


def read_stage(folder, preset, hint):
    """The meta.json of a finished stage folder, which must have been made with this preset;
    else a one-line DataError naming the command to run."""
    meta = read_meta(folder, hint)
    if meta.get("preset") != preset:
        raise DataError(
            f"{folder}: was made with preset {meta.get('preset')}, not {preset}; "
            f"rerun `{hint}` with --preset {preset}"
        )
    return meta


def read_world(out, preset):
    """Stage 0's Config, from <out>/0_data/meta.json, which must be of this preset."""
    hint = f"python render.py --out {out}"
    meta = read_stage(Path(out) / "0_data", preset, hint)
    try:
        return Config(**meta["config"])
    except (KeyError, TypeError):
        raise DataError(f"{out}/0_data/meta.json: corrupt or of another version; run `{hint}`")


# ----------------------------------------------------------------------------------- object folders
def safe_name(text, taken=()):
    """A folder name made from a user's file name or caption: letters, digits, - and _ only (so
    never "." or ".." or a path), at most 60 characters, and not one of `taken` (a suffix _2, _3
    ... is added, said in one line)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:60] or "unnamed"
    unique = name
    k = 1
    while unique in taken:
        k += 1
        unique = f"{name}_{k}"
    if unique != name:
        print(f"note: {text!r} gets the folder {unique}: {name} is taken")
    return unique


def running(pid):
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


@contextmanager
def locked(folder, rank=0):
    """Hold folder/.lock while a stage writes there (rank 0 holds it for all ranks): a second run
    on the same folder stops at once with one line. A lock whose process died is taken over."""
    lock = Path(folder) / ".lock"
    if rank == 0:
        lock.parent.mkdir(parents=True, exist_ok=True)
        if lock.is_file():
            pid = lock.read_text().strip()
            if pid.isdigit() and running(int(pid)):
                raise DataError(f"{folder}: another run (pid {pid}) writes here; wait for it")
            lock.unlink()  # left by a run that was killed
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise DataError(f"{folder}: another run started writing here; wait for it") from None
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    try:
        yield
    finally:
        if rank == 0:
            lock.unlink(missing_ok=True)


def write_object(folder, views, c2w, K, prompt, surface=None, info=None):
    """One object folder, written under a temporary name and renamed when complete.
    views (V,3|4,H,W) in [0,1]; c2w None for a web clip (no cameras); for real assets, surface =
    (points (N,3), colours (N,3)) and info = what object.json records (the category)."""
    folder = Path(folder)
    if folder.name in ("", ".", "..") or folder.name.startswith("."):
        raise DataError(f"{folder}: not a name for an object folder")  # safe_name makes them
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, v in enumerate(views):
        save_png(tmp / f"{i:03d}.png", v)
    if c2w is not None:
        save_tensors(tmp / "cameras.safetensors", {"c2w": c2w, "intrinsics": K})
    (tmp / "prompt.txt").write_text(prompt + "\n")
    if surface is not None:
        save_tensors(tmp / "surface.safetensors", {"points": surface[0], "colors": surface[1]})
    if info is not None:
        (tmp / "object.json").write_text(json.dumps(info) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def object_folders(root, limit=None):
    """The object folders (or clips) in root, sorted: those with a first view, never a temporary
    folder (.<name>.tmp<pid>) that a killed run left behind."""
    root = Path(root)
    found = root.glob("*/000.png") if root.is_dir() else []
    return sorted(p.parent for p in found if not p.parent.name.startswith("."))[:limit]


def load_object(folder, res=None, views=None, cameras=True):
    """Read one object folder (real or synthetic) -> dict(images (V,3,H,W) on white, masks (V,1,H,W)
    or None, c2w (V,4,4), K (V,3,3), prompt). Checks image sizes, the view count and the cameras.
    A web clip (cameras False) has no cameras: its dict has none."""
    folder = Path(folder)
    files = sorted(folder.glob("[0-9][0-9][0-9].png"))
    if not files:
        raise DataError(f"{folder}: no views (000.png ...); regenerate this object folder")
    if views is not None and len(files) != views:
        raise DataError(
            f"{folder}: has {len(files)} views, expected {views}; regenerate it at this preset"
        )
    loaded = [load_png(p, res) for p in files]
    prompt_file = folder / "prompt.txt"
    prompt = read_text(prompt_file).strip() if prompt_file.is_file() else ""
    masks = torch.stack([a for _, a in loaded]) if all(a is not None for _, a in loaded) else None
    images = torch.stack([x for x, _ in loaded])
    if not cameras:
        return dict(images=images, masks=masks, prompt=prompt)
    path = folder / "cameras.safetensors"
    cams, _ = load_tensors(path)
    shapes = dict(c2w=(len(files), 4, 4), intrinsics=(len(files), 3, 3))
    for key, shape in shapes.items():
        found = cams.get(key, torch.zeros(0))
        if found.shape != shape or not torch.isfinite(found).all():
            raise DataError(f"{path}: {key} is not finite of shape {shape}; regenerate the folder")
    return dict(images=images, masks=masks, c2w=cams["c2w"], K=cams["intrinsics"], prompt=prompt)


def test_folders(data, n=None):
    """The held-out real assets: the first n (all when None) of test_seen, then of test_unseen."""
    split = ("test_seen", "test_unseen")
    return [f for s in split for f in object_folders(Path(data) / "assets" / s, n)]


def split_of(folder):
    """ "seen" or "unseen": whether a held-out asset's category has 3D training assets."""
    return Path(folder).parent.name.removeprefix("test_")


def rows_by_split(folders, score):
    """The shape of every metrics.json: score(indices into folders) -> rows, over all held-out
    assets and over the seen and the unseen categories apart."""
    out = {"rows": score(list(range(len(folders)))), "splits": {}}
    for split in ("seen", "unseen"):
        idx = [i for i, f in enumerate(folders) if split_of(f) == split]
        if idx:
            out["splits"][split] = {"n_objects": len(idx), "rows": score(idx)}
    return out


# ------------------------------------------------------------------------------------------ reports
# every metrics.json row's keys, those that apply; the last two need the classifier
METRIC_KEYS = ("psnr", "ssim", "color_err", "chamfer_l1", "fscore", "category_acc", "color_acc")


def print_table(rows):
    """Rows of metrics ({name: {key: value}}) as an aligned table, - where a key does not apply."""
    keys = [k for k in METRIC_KEYS if any(k in r for r in rows.values())]
    print(f"{'row':28s}" + "".join(f"{k:>13s}" for k in keys))
    for name, r in rows.items():
        print(f"{name:28s}" + "".join(f"{r[k]:13.4f}" if k in r else f"{'-':>13s}" for k in keys))


# The page's sections: title, stage folder under --out, the pictures in it, the script's command.
PAGE = (
    ("Stage 0: the world", "0_data", "categories.png preview.png videos.png", "render.py"),
    ("Stage 1: video model", "1_video", "eval_grid.png eval.gif", "finetune_video.py"),
    ("Stage 2: the data engine", "2_views", "preview.png", "generate_views.py"),
    ("Stage 3: (B) synthetic only", "3_lrm", "samples/final.png", "train_lrm.py"),
    ("Stage 4: (C) synthetic + real", "4_finetune", "samples/final.png", "finetune_3d.py"),
    ("(A) real only", "4_from_scratch", "samples/final.png", "finetune_3d.py --from_scratch"),
    ("Table: in | A | C | truth", "table", "compare_0.gif compare_1.gif", "finetune_3d.py --table"),
)  # fmt: skip


def metrics_html(path):
    """A metrics.json's rows as an HTML table, '-' where a key does not apply; a file it cannot
    read is said in a line, so one damaged file leaves the rest of the page."""
    try:
        rows = json.loads(path.read_text())["rows"]
        keys = [k for k in METRIC_KEYS if any(k in r for r in rows.values())]
        cells = {name: [f"{r[k]:.4f}" if k in r else "-" for k in keys] for name, r in rows.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"<p>{html.escape(str(path))}: unreadable ({type(e).__name__})</p>"
    lines = ["<table><tr>" + "".join(f"<th>{k}</th>" for k in ["row", *keys]) + "</tr>"]
    for name, row in cells.items():
        lines.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{c}</td>" for c in row))
    return "\n".join(lines) + "</table>"


def page_sections(out):
    """PAGE's sections, then stage 5's latest results (newest first, whatever their names) with
    the command each was made by (its command.txt) -> (title, folder, pictures, command)."""
    sections = [(title, folder, pictures, f"python {c}") for title, folder, pictures, c in PAGE]
    results = [p for p in (Path(out) / "5_infer").glob("*/command.txt")]
    for p in sorted(results, key=lambda p: p.stat().st_mtime, reverse=True)[:6]:
        command = p.read_text(errors="replace").strip()
        name = p.parent.name
        sections.append((f"Stage 5: {name}", f"5_infer/{name}", "input.png turntable.gif", command))
    return sections


def write_index(out):
    """out/index.html, rewritten at the end of each stage: every stage that has run, with its
    pictures, its metrics.json rows and the command that made it. Plain HTML beside the files it
    shows: no script, nothing fetched, it opens offline."""
    style = "img{image-rendering:pixelated;margin:4px}td,th{padding:2px 8px;text-align:right}"
    parts = [f"<!doctype html><meta charset='utf-8'><title>VFusion3D</title><style>{style}</style>"]
    parts.append(f"<h1>VFusion3D, workshop edition: {html.escape(str(out))}</h1>")
    for title, folder, pictures, command in page_sections(out):
        root = Path(out) / folder
        found = [p for p in pictures.split() if (root / p).is_file()]
        if not found:
            continue
        parts.append(f"<h2>{html.escape(title)}</h2><pre>{html.escape(command)}</pre>")
        parts += [f"<img src='{html.escape(folder)}/{p}' alt='{p}'>" for p in found]
        if (root / "metrics.json").is_file():
            parts.append(metrics_html(root / "metrics.json"))
    write_text(Path(out) / "index.html", "\n".join(parts) + "\n")


# ==================================================================================================
# Appendix: your own meshes
# ==================================================================================================
# ---------------------------------------------------------------------------------------- meshes in
def read_obj(path):
    """A Wavefront .obj -> vertices (V,3), triangles (F,3) (polygons cut into fans; 1-based or
    negative indices), vertex colours (V,3) where every 'v' line has them ('v x y z r g b')."""
    verts, faces = [], []
    for line in Path(path).read_text(errors="replace").splitlines():
        words = line.split()
        if words[:1] == ["v"]:
            verts.append([float(x) for x in words[1:7]])
        elif words[:1] == ["f"]:
            idx = [int(w.split("/")[0]) for w in words[1:]]
            idx = [i - 1 if i > 0 else len(verts) + i for i in idx]
            faces += [(idx[0], idx[k], idx[k + 1]) for k in range(1, len(idx) - 1)]
    coloured = len(verts) > 0 and all(len(row) == 6 for row in verts)
    v = torch.tensor([row[:3] for row in verts]).view(-1, 3)
    rgb = torch.tensor([row[3:] for row in verts]) if coloured else None
    return v, torch.tensor(faces, dtype=torch.long).view(-1, 3), rgb


PLY_TYPES = dict(char="i1", uchar="u1", short="i2", ushort="u2", int="i4", uint="u4")
PLY_TYPES |= dict(float="f4", double="f8", int8="i1", uint8="u1", int16="i2", uint16="u2")
PLY_TYPES |= dict(int32="i4", uint32="u4", float32="f4", float64="f8")


def ply_elements(path, head):
    """A PLY header -> its format and elements [(name, count, [(property, type, count type)])],
    the count type None for a scalar property."""
    lines = [line.split() for line in head.decode("ascii", "replace").splitlines() if line.strip()]
    if not lines or lines[0] != ["ply"]:
        raise DataError(f"{path}: not a PLY file (no 'ply' header); export it again as PLY")
    fmt = next((w[1] for w in lines if w[0] == "format"), "")
    elements = []
    for w in lines:
        if w[0] == "element":
            elements.append((w[1], int(w[2]), []))
        elif w[0] == "property" and elements:
            count = PLY_TYPES[w[2]] if w[1] == "list" else None
            elements[-1][2].append((w[-1], PLY_TYPES[w[-2]], count))
    if [e[0] for e in elements[:2]] != ["vertex", "face"]:
        raise DataError(f"{path}: the elements are not vertex then face; export it again")
    return fmt, elements


def binary_faces(data, n, props, e):
    """n binary PLY faces (a count, its vertex indices, then any other scalars) in byte order e
    -> polygons: at once when all have the first's size, else one by one."""
    count = np.dtype(e + props[0][2])
    index = np.dtype(e + props[0][1])
    others = [(name, e + t) for name, t, _ in props[1:]]
    size = int(np.frombuffer(data, count, count=1)[0])
    same = np.dtype([("n", count), ("i", index, size), *others])
    if len(data) >= same.itemsize * n:
        face = np.frombuffer(data, same, count=n)
        if (face["n"] == size).all():
            return face["i"].tolist()
    polys = []
    at = 0
    for _ in range(n):
        k = int(np.frombuffer(data, count, 1, at)[0])
        polys.append(np.frombuffer(data, index, k, at + count.itemsize).tolist())
        at += count.itemsize + k * index.itemsize + np.dtype(others).itemsize
    return polys


def read_ply(path):
    """A .ply, ascii or binary (either byte order) -> vertices (V,3), triangles (F,3) (polygons cut
    into fans), vertex colours (V,3) in [0,1] when it has red, green and blue."""
    parts = re.split(rb"end_header\r?\n", Path(path).read_bytes(), maxsplit=1)  # LF or CRLF
    head, body = parts if len(parts) == 2 else (parts[0], b"")
    fmt, ((_, nv, vprops), (_, nf, fprops), *_) = ply_elements(path, head)
    names = [name for name, _, _ in vprops]
    if fmt == "ascii":
        rows = body.decode("ascii", "replace").splitlines()
        vert = np.array([row.split()[: len(names)] for row in rows[:nv]], dtype=np.float64)
        vert = {name: vert[:, k] for k, name in enumerate(names)}
        rows = [row.split() for row in rows[nv : nv + nf]]
        polys = [[int(x) for x in row[1 : 1 + int(row[0])]] for row in rows]
    elif fmt in ("binary_little_endian", "binary_big_endian"):
        e = "<" if fmt == "binary_little_endian" else ">"  # the byte order
        vdt = np.dtype([(name, e + t) for name, t, _ in vprops])
        vert = np.frombuffer(body, vdt, count=nv)
        polys = binary_faces(body[vdt.itemsize * nv :], nf, fprops, e)
    else:
        raise DataError(f"{path}: PLY format {fmt!r}; export it as ascii or binary")
    v = torch.tensor(np.stack([vert[a] for a in "xyz"], -1), dtype=torch.float32)
    faces = [(p[0], p[k], p[k + 1]) for p in polys for k in range(1, len(p) - 1)]
    rgb = None
    if {"red", "green", "blue"} <= set(names):
        rgb = torch.tensor(np.stack([vert[c] for c in ("red", "green", "blue")], -1)).float()
        rgb = rgb / 255 if vprops[names.index("red")][1] == "u1" or rgb.max() > 1 else rgb
    return v, torch.tensor(faces, dtype=torch.long).view(-1, 3), rgb


def load_mesh(path, max_faces, up):
    """A mesh file -> vertices (V,3) in the world's framing (+z up, its box centred, its farthest
    vertex at FRAME_FILL), triangles (F,3) and vertex colours (V,3) or None; DataError says what
    is wrong with a file that cannot be used."""
    try:
        v, f, rgb = read_obj(path) if path.suffix.lower() == ".obj" else read_ply(path)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check the file") from None
    except (ValueError, IndexError, KeyError, TypeError, StopIteration) as e:
        raise DataError(f"{path}: not a readable mesh ({e}); export it again as OBJ or PLY")
    if rgb is not None and rgb.max() > 1:  # colours in 0..255, as in most PLY files
        rgb = rgb / 255
    if len(f) == 0:
        raise DataError(f"{path}: no faces (a point cloud?); only triangle meshes are rendered")
    if len(f) > max_faces:
        raise DataError(f"{path}: {len(f)} faces, over --max_faces {max_faces}; decimate it first")
    if f.min() < 0 or f.max() >= len(v) or not torch.isfinite(v).all():
        raise DataError(f"{path}: a face or vertex is out of range; the file is damaged")
    if up == "y":
        v = v[:, [0, 2, 1]] * torch.tensor([1.0, -1.0, 1.0])  # (x, y, z) -> (x, -z, y)
    v = v.double()  # (the framing of a mesh a 1e38 wide would overflow in float32)
    v = v - (v.min(0).values + v.max(0).values) / 2
    v = (v * (FRAME_FILL / v.norm(dim=-1).max())).float()
    a, b, c = v[f].unbind(1)
    area = torch.linalg.cross(b - a, c - a).norm(dim=-1).sum() / 2
    if not torch.isfinite(v).all() or area < 1e-6:
        raise DataError(f"{path}: its triangles have no area to render; check the file")
    return v, f, rgb


# -------------------------------------------------------------------------- a ray tracer for meshes
def ray_triangles(o, d, tri):
    """The nearest hit of rays o, d (R,3) on triangles tri (F,3,3), from either side
    (Moller-Trumbore: solve o + t d = a + u (b - a) + w (c - a) by Cramer's rule)
    -> distance (R,) (inf for a miss), triangle index (R,), barycentric weights (R,3)."""
    a, b, c = tri.unbind(1)  # (F,3) each
    e1 = b - a
    e2 = c - a
    p = torch.linalg.cross(d[:, None], e2[None])  # (R,F,3)
    det = (p * e1).sum(-1)  # (R,F)
    inv = 1 / torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
    s = o[:, None] - a  # (R,F,3)
    q = torch.linalg.cross(s, e1[None].expand_as(s))
    u = (s * p).sum(-1) * inv
    w = (q * d[:, None]).sum(-1) * inv
    t = (q * e2).sum(-1) * inv
    hit = (u >= 0) & (w >= 0) & (u + w <= 1) & (t > 1e-6) & (det.abs() >= 1e-12)
    t, idx = torch.where(hit, t, float("inf")).min(1)
    u = u.gather(1, idx[:, None])[:, 0]
    w = w.gather(1, idx[:, None])[:, 0]
    return t, idx, torch.stack([1 - u - w, u, w], -1)


def trace_mesh(v, f, c2w, K, n, tile=8):
    """Rays of one camera c2w (4,4), K (3,3) through an n x n image, tile by tile, each against
    the triangles whose box on the screen overlaps its tile -> distance, triangle, weights,
    ray directions, each (n, n, ...)."""
    o, d = (z[0] for z in camera_rays(c2w[None], K[None], n))  # (n,n,3) each
    px, _ = project(v, c2w, K, n)  # (V,2) column, row
    lo = px[f].min(1).values  # (F,2): each triangle's box on the screen
    hi = px[f].max(1).values
    t = torch.full((n, n), float("inf"))
    idx = torch.zeros(n, n, dtype=torch.long)
    bary = torch.zeros(n, n, 3)
    for top in range(0, n, tile):
        for left in range(0, n, tile):
            corner = torch.tensor([left, top])
            near = ((hi >= corner) & (lo <= corner + tile)).all(-1).nonzero()[:, 0]
            if len(near) == 0:
                continue
            box = (slice(top, top + tile), slice(left, left + tile))
            size = o[box].shape[:2]
            ti, fi, wi = ray_triangles(o[box].reshape(-1, 3), d[box].reshape(-1, 3), v[f[near]])
            t[box] = ti.view(size)
            idx[box] = near[fi].view(size)
            bary[box] = wi.view(*size, 3)
    return t, idx, bary, d


@torch.no_grad()
def render_mesh(v, f, rgb, c2w, K, res, supersample=2):
    """The exact renderer's twin for triangle meshes: the colour interpolated at the nearest hit,
    Lambert + ambient on the face's normal (turned to the camera), white background. v (V,3),
    f (F,3), rgb (V,3), cameras (B,4,4), (B,3,3) -> RGBA (B,4,res,res) as render_views gives."""
    n = res * supersample
    tri = v[f]  # (F,3,3)
    normal = F.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=-1)
    colours, hits = [], []
    for cam, k in zip(c2w, K):
        t, idx, bary, d = trace_mesh(v, f, cam, k, n)
        facing = normal[idx] * -torch.sign((normal[idx] * d).sum(-1, keepdim=True))  # (n,n,3)
        shade = AMBIENT + (1 - AMBIENT) * (facing @ LIGHT).clamp(min=0)
        colours.append(torch.einsum("hwk,hwkc->hwc", bary, rgb[f[idx]]) * shade[..., None])
        hits.append(torch.isfinite(t))
    return average_rays(torch.stack(colours), torch.stack(hits), res, supersample)


# ------------------------------------------------------------------------------- stage 0 for meshes
def mesh_names(src, files):
    """Each mesh file's object folder: its path under --meshes, "/" as "_", made safe (safe_name);
    two files that would share a folder get a suffix -> {file: name}."""
    names = {}
    for path in files:
        names[path] = safe_name(
            "_".join(path.relative_to(src).with_suffix("").parts), names.values()
        )
    return names


def mesh_caption(path):
    """A mesh's caption: <name>.txt or prompt.txt beside it, else its file name in words."""
    for file in (path.with_suffix(".txt"), path.parent / "prompt.txt"):
        try:
            text = read_text(file, "user").strip() if file.is_file() else ""
        except DataError as e:
            tqdm.write(f"warning: {e}; the caption is the file's name")
            text = ""
        if text:
            return text.splitlines()[0][:300]
    return re.sub(r"[_\-.]+", " ", path.stem).strip()


def parse_colour(text):
    """--mesh_colour "r,g,b" -> (3,) in [0,1], or DataError."""
    try:
        rgb = torch.tensor([float(x) for x in text.split(",")])
    except ValueError:
        rgb = torch.zeros(0)
    if rgb.shape != (3,) or not (0 <= rgb).all() or not (rgb <= 1).all():
        raise DataError(f"--mesh_colour {text}: give three numbers in [0,1], e.g. 0.7,0.7,0.7")
    return rgb


def import_meshes(cfg, root):
    """--meshes DIR: each .obj and .ply under DIR -> an object folder root/<name>/ in the real
    assets' format (the orbit's views, cameras, caption, surface points), the ones missing only;
    a file that cannot be used is skipped with one line -> (found, rendered now, skipped)."""
    src = Path(cfg.meshes)
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".obj", ".ply"))
    if not files:
        raise DataError(f"{src}: no .obj or .ply files there; pass a folder of meshes")
    colour = parse_colour(cfg.mesh_colour)  # (3,)
    c2w, K = orbit(cfg.views)
    names = mesh_names(src, files)
    todo = [p for p in files if not is_complete(root, names[p], cfg.views)]
    skipped = []
    for path in progress(todo, desc="stage 0 meshes", unit="mesh"):
        try:
            v, f, rgb = load_mesh(path, cfg.max_faces, cfg.mesh_up)
            caption = mesh_caption(path)
            rgb = colour.expand_as(v) if rgb is None else rgb.clamp(0, 1)
            views = render_mesh(v, f, rgb, c2w, K, cfg.res, cfg.supersample)
            if views[:, 3].max() < 0.01:
                raise DataError(f"{path}: renders no pixel from any view; check the file")
        except DataError as e:
            tqdm.write(f"skipped {e}")
            skipped.append(path)
            continue
        surface = sample_mesh(v, f, cfg.surface_points, 0, rgb)
        info = dict(category="own mesh", split="meshes", source=str(path))
        write_object(root / names[path], views, c2w, K, caption, surface, info)
    return len(files), len(todo) - len(skipped), len(skipped)


def bring_meshes(cfg):
    """--meshes DIR: the user's meshes -> object folders in <out>/0_data/meshes/, then the summary
    and the next commands; an error when none of them could be used."""
    if not Path(cfg.meshes).is_dir():
        raise DataError(f"{cfg.meshes}: no such folder; pass a folder of .obj or .ply files")
    if cfg.mesh_up not in ("y", "z"):
        raise DataError(f"--mesh_up {cfg.mesh_up}: pick y or z")
    root = Path(cfg.out) / "0_data/meshes"
    with locked(root):
        found, new, skipped = import_meshes(cfg, root)
    if skipped == found:
        raise DataError(f"{cfg.meshes}: none of its {found} meshes could be used (see above)")
    print(f"stage 0 meshes: {found} files, {new} rendered now, {skipped} skipped -> {root}")
    print(f"next: python train_lrm.py --data {root}   or   python infer.py --eval {root}")


if __name__ == "__main__":
    run_cli(main)
