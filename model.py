"""Everything learned: the text encoder, the video diffusion UNet (spatial + temporal layers), the
diffusion schedule and sampler, the LRM (DINO-style ViT, camera-modulated triplane transformer, NeRF
decoder), safetensors checkpoints and the shared training setup (device, seed, DDP).

Imported by the stage scripts; imports render.py for volume rendering and file helpers.
Paper: VFusion3D Sec. 3.1 (video model, temporal layers on frozen spatial layers) and Sec. 3.2 (LRM).
"""
import ctypes
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import render

# ----------------------------------------------------------------------------- setup

def setup(cfg):
    """Device (cuda > mps > cpu unless --device), seed, DDP under torchrun -> (device, rank, world)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.device in ("", "auto"):
        cfg.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_all(cfg.seed)
    keep_freed_memory()
    return device, rank, world

def keep_freed_memory():
    """By default glibc maps every big tensor fresh from the kernel and unmaps it when freed, so each
    training step page-faults its activations in again: on this VM half the CPU time of an LRM step
    went to the kernel. Serve all allocations from the heap (M_MMAP_MAX = 0) and keep up to 1 GiB of
    freed memory (M_TRIM_THRESHOLD): twice the LRM steps per second here, the same results."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)                                               # M_MMAP_MAX
        libc.mallopt(-1, 1 << 30)                                         # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass                                                              # not glibc (macOS, musl): nothing to tune

def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

def autocast(device):
    """bf16 autocast on CUDA only; a no-op elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, tensors, kind, config, **extra):
    """Tensors + JSON metadata (kind = which stage's model, config = how to rebuild it)."""
    meta = {"kind": kind, "config": json.dumps(config), "world_version": str(render.WORLD_VERSION)}
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    render.save_tensors(path, tensors, meta)

def load_checkpoint(path, kind, hint):
    """-> (tensors, config dict, metadata). A checkpoint of another kind is a one-line DataError."""
    if not os.path.isfile(path):
        raise render.DataError(f"{path}: checkpoint missing; run `{hint}` first")
    tensors, meta = render.load_tensors(path)
    if meta.get("kind") != kind:
        raise render.DataError(f"{path}: is a {meta.get('kind', 'unknown')!r} checkpoint, expected {kind!r}; pass the right file or run `{hint}`")
    if meta.get("world_version") != str(render.WORLD_VERSION):
        raise render.DataError(f"{path}: made for world v{meta.get('world_version')}, this code is v{render.WORLD_VERSION}; run `{hint}` again")
    return tensors, json.loads(meta["config"]), meta

def load_weights(module, tensors, path, prefix=""):
    """Copy tensors into module; mismatched names or shapes are a one-line DataError."""
    own = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        module.load_state_dict({k[len(prefix):]: v for k, v in own.items()})
    except RuntimeError as e:
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)[:200]
        raise render.DataError(f"{path}: does not fit this model ({first}); was it made with another config?") from None

# ----------------------------------------------------------------------------- text encoder

class TextEncoder(nn.Module):
    """Word-level tokens -> a small pre-norm transformer -> per-token features (B,L,D) and a pooled
    vector (B,D) from a start token. Empty captions (for classifier-free guidance) are just [start]."""

    def __init__(self, vocab, dim=64, layers=2, max_len=32):
        super().__init__()
        self.vocab, self.max_len = list(vocab), max_len
        self.index = {w: i + 3 for i, w in enumerate(self.vocab)}   # 0 pad, 1 unknown, 2 start
        self.embed = nn.Embedding(len(self.vocab) + 3, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, captions):
        """-> ids (B,L) long and the set of unknown words (the caller tells the user)."""
        ids, unknown = torch.zeros(len(captions), self.max_len, dtype=torch.long), set()
        for b, c in enumerate(captions):
            words = c.lower().replace(",", " ").split()[: self.max_len - 1]
            unknown |= {w for w in words if w not in self.index}
            ids[b, : len(words) + 1] = torch.tensor([2] + [self.index.get(w, 1) for w in words])
        return ids, unknown

    def forward(self, ids):
        pad = ids == 0                                              # (B,L)
        x = self.blocks(self.embed(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=pad)
        x = self.norm(x)
        return x, x[:, 0], pad                                      # tokens, pooled, padding mask

# ----------------------------------------------------------------------------- the video UNet

class ResBlock(nn.Module):
    """Spatial layer: GroupNorm-SiLU-conv, scale/shift from (time + pooled text), GroupNorm-SiLU-conv."""

    def __init__(self, cin, cout, emb):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * cout)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e, text):
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.emb(e)[..., None, None].chunk(2, 1)
        return self.skip(x) + self.c2(F.silu(self.n2(h) * (1 + scale) + shift))

class SpatialAttention(nn.Module):
    """Spatial layer: self-attention over pixels, then cross-attention from pixels to text tokens."""

    def __init__(self, dim, text_dim, heads=4):
        super().__init__()
        self.heads = heads
        self.n1, self.qkv, self.o1 = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.n2, self.q, self.kv, self.o2 = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Linear(text_dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, e, text):
        B, C, H, W = x.shape
        tokens, pad = text
        h = x.flatten(2).transpose(1, 2)                           # (B,HW,C)
        h = h + self.o1(attend(*self.qkv(self.n1(h)).chunk(3, -1), self.heads))
        k, v = self.kv(tokens).chunk(2, -1)
        h = h + self.o2(attend(self.q(self.n2(h)), k, v, self.heads, ~pad[:, None, None, :]))
        return h.transpose(1, 2).reshape(B, C, H, W)

def attend(q, k, v, heads, mask=None):
    """Multi-head scaled dot-product attention on (B,N,C) tensors."""
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)

class TemporalLayer(nn.Module):
    """Temporal layer (inserted after a spatial block): a circular 1D convolution over the frames of
    the orbit and attention across frames with a frame-position embedding. Both are residual branches
    whose output projections start at zero, so at insertion the block is the identity. With `full`
    (low resolutions) the attention spans every pixel of every frame (multi-view attention, as in
    MVDream), so a part can be followed as it moves across the image while the object turns."""

    def __init__(self, dim, frames, heads=4, full_res=0):
        super().__init__()
        self.heads, self.full = heads if full_res else 1, full_res > 0   # one head over 8 frames is faster, as good
        self.spos = nn.Parameter(torch.randn(full_res * full_res, dim) * 0.02) if self.full else None
        self.n1 = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1, padding_mode="circular")  # orbits wrap around
        self.conv_out = nn.Linear(dim, dim)
        self.pos = nn.Parameter(torch.randn(frames, dim) * 0.02)
        self.n2, self.qkv, self.attn_out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        for lin in (self.conv_out, self.attn_out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, frames):
        BF, C, H, W = x.shape
        h = x.view(BF // frames, frames, C, H * W).permute(0, 3, 1, 2).reshape(-1, frames, C)  # (B*HW,F,C)
        c = self.conv(F.silu(self.n1(h)).transpose(1, 2)).transpose(1, 2)
        h = h + self.conv_out(F.silu(c))
        if self.full:                                                 # tokens: all frames x all pixels
            s = h.view(BF // frames, H * W, frames, C).transpose(1, 2)  # (B,F,HW,C)
            q = (self.n2(s) + self.pos[:frames, None] + self.spos).flatten(1, 2)
            s = s + self.attn_out(attend(*self.qkv(q).chunk(3, -1), self.heads)).view_as(s)
            h = s.transpose(1, 2).reshape(-1, frames, C)
        else:
            h = h + self.attn_out(attend(*self.qkv(self.n2(h) + self.pos[:frames]).chunk(3, -1), self.heads))
        return h.view(BF // frames, H * W, frames, C).permute(0, 2, 3, 1).reshape(BF, C, H, W)

class UNet(nn.Module):
    """Text-to-image UNet (the spatial layers) that becomes a video UNet when frames > 0: then a
    TemporalLayer follows every spatial block. Sec. 3.1: only the temporal layers are fine-tuned.
    x (B*F,3,H,W), t (B*F,) in [0,1], caption ids (B,L) -> v-prediction (B*F,3,H,W)."""

    def __init__(self, vocab, channels=(32, 64, 96), attn_res=(8,), res=32, text_dim=64, frames=0, mv_attn_res=()):
        super().__init__()
        self.config = dict(vocab=list(vocab), channels=list(channels), attn_res=list(attn_res), res=res, text_dim=text_dim, frames=frames,
                           mv_attn_res=list(mv_attn_res))
        self.text = TextEncoder(vocab, text_dim)
        emb = 4 * channels[0]
        self.time = nn.Sequential(nn.Linear(channels[0], emb), nn.SiLU(), nn.Linear(emb, emb))
        self.text_proj = nn.Linear(text_dim, emb)
        self.inp = nn.Conv2d(3, channels[0], 3, padding=1)
        blocks, cin, r, skips, sizes = [], channels[0], res, [], []
        for i, c in enumerate(channels):                              # down path
            blocks.append(("down", ResBlock(cin, c, emb)))
            if r in attn_res:
                blocks.append(("down", SpatialAttention(c, text_dim)))
            sizes += [r] * (1 + (r in attn_res))
            skips.append(c)
            cin = c
            if i < len(channels) - 1:
                blocks.append(("pool", nn.Conv2d(c, c, 3, stride=2, padding=1)))
                r //= 2
        blocks += [("mid", ResBlock(cin, cin, emb)), ("mid", SpatialAttention(cin, text_dim)), ("mid", ResBlock(cin, cin, emb))]
        sizes += [r] * 3
        for i, c in reversed(list(enumerate(channels))):              # up path with skip connections
            blocks.append(("up", ResBlock(cin + skips.pop(), c, emb)))
            if r in attn_res:
                blocks.append(("up", SpatialAttention(c, text_dim)))
            sizes += [r] * (1 + (r in attn_res))
            cin = c
            if i > 0:
                blocks.append(("upsample", nn.Conv2d(c, c, 3, padding=1)))
                r *= 2
        self.roles = [role for role, _ in blocks]
        self.blocks = nn.ModuleList([m for _, m in blocks])
        self.out = nn.Sequential(nn.GroupNorm(8, cin), nn.SiLU(), nn.Conv2d(cin, 3, 3, padding=1))
        widths = [m.c2.out_channels if isinstance(m, ResBlock) else m.o1.out_features for m in self.blocks if isinstance(m, (ResBlock, SpatialAttention))]
        self.temporal = nn.ModuleList([TemporalLayer(w, frames, full_res=r if r in mv_attn_res else 0)
                                       for w, r in zip(widths, sizes)]) if frames else None

    def forward(self, x, t, ids, frames=1):
        tokens, pooled, pad = self.text(ids)                          # (B,L,D), (B,D), (B,L)
        if frames > 1:                                                # every frame sees its video's text
            tokens, pooled, pad = (z.repeat_interleave(frames, 0) for z in (tokens, pooled, pad))
        half = self.inp.out_channels // 2
        freq = torch.exp(-math.log(1000.0) * torch.arange(half, device=x.device) / half)
        temb = torch.cat([(t[:, None] * 1000 * freq).sin(), (t[:, None] * 1000 * freq).cos()], -1)
        e = self.time(temb) + self.text_proj(pooled)                  # (B*F, emb)
        h, skips, k = self.inp(x), [], 0
        for role, block in zip(self.roles, self.blocks):
            if role == "pool":
                h = block(h)
                continue
            if role == "upsample":
                h = block(F.interpolate(h, scale_factor=2.0, mode="nearest"))
                continue
            if role == "up" and isinstance(block, ResBlock):
                h = torch.cat([h, skips.pop()], 1)
            h = block(h, e, (tokens, pad))
            if role == "down" and isinstance(block, ResBlock):
                skips.append(h)
            if self.temporal is not None and frames > 1:
                h = self.temporal[k](h, frames)
            k += 1
        return self.out(h)

def load_unet(path, kind, hint, frames=0, mv_attn_res=()):
    """Rebuild a UNet from its checkpoint's own config. frames > 0 on an image model adds
    zero-initialised temporal layers (the video model at insertion)."""
    tensors, conf, meta = load_checkpoint(path, kind, hint)
    unet = UNet(**dict(conf, frames=frames or conf["frames"], mv_attn_res=conf.get("mv_attn_res") or mv_attn_res))
    if frames and not conf["frames"]:
        tensors = dict(tensors, **{k: v for k, v in unet.state_dict().items() if k.startswith("temporal.")})
    load_weights(unet, tensors, path)
    return unet, meta


# ----------------------------------------------------------------------------- diffusion

def alpha_sigma(t):
    """Cosine schedule (zero terminal SNR at t = 1): x_t = alpha x_0 + sigma eps."""
    return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)

def v_loss(unet, x0, ids, frames=1, clean_first=False, t_power=1.0):
    """v-prediction MSE. x0 (B*F,3,H,W) in [-1,1]. With clean_first, frame 0 of each video is given
    clean at t = 0 and only frames 1..F-1 are noised and scored (the image conditioning). Noise
    levels are t = u**t_power, u uniform: t_power < 1 spends more of the steps at high noise."""
    t = torch.rand(x0.shape[0], device=x0.device) ** t_power
    scored = torch.ones_like(t)
    if clean_first:
        first = torch.arange(x0.shape[0], device=x0.device) % frames == 0
        t, scored = t.masked_fill(first, 0.0), (~first).float()
    a, s = (z[:, None, None, None] for z in alpha_sigma(t))
    eps = torch.randn_like(x0)
    v = unet(a * x0 + s * eps, t, ids, frames)
    err = ((v - (a * eps - s * x0)) ** 2).mean((1, 2, 3))
    return (err * scored).sum() / scored.sum()

@torch.no_grad()
def sample(unet, ids, frames=1, steps=20, guidance=3.0, first=None, generator=None, noise=None, temperature=1.0):
    """DDIM (eta = 0) with classifier-free guidance on the text. ids (B,L); first (B,3,H,W) in
    [-1,1] is the clean input view for frame 0, or None; noise (B,F,3,H,W) replaces the generator's.
    temperature scales the starting noise: below 1 the sampler picks likelier, plainer images.
    -> (B,F,3,H,W) in [-1,1]."""
    B, res, device = ids.shape[0], unet.config["res"], ids.device
    x = (noise if noise is not None else torch.randn(B, frames, 3, res, res, generator=generator)).to(device) * temperature
    null = torch.zeros_like(ids)
    null[:, 0] = 2                                                   # the empty caption: [start] only
    ts = torch.linspace(1, 0, steps + 1, device=device)
    for i in range(steps):
        if first is not None:
            x[:, 0] = first
        t = torch.full((B, frames), float(ts[i]), device=device)
        if first is not None:
            t[:, 0] = 0.0
        xin, tin = x.flatten(0, 1), t.flatten()
        if guidance != 1.0:
            v = unet(torch.cat([xin, xin]), torch.cat([tin, tin]), torch.cat([ids, null]), frames)
            vc, vu = v.chunk(2)
            v = vu + guidance * (vc - vu)
        else:
            v = unet(xin, tin, ids, frames)
        a, s = (z[:, None, None, None] for z in alpha_sigma(tin))
        x0 = (a * xin - s * v).clamp(-1, 1)
        eps = torch.where(s > 1e-3, (xin - a * x0) / s.clamp(min=1e-3), s * xin + a * v)   # consistent with the clamped x0
        a2, s2 = alpha_sigma(ts[i + 1])
        x = (a2 * x0 + s2 * eps).view_as(x)
    if first is not None:
        x[:, 0] = first
    return x

# ----------------------------------------------------------------------------- the LRM (Sec. 3.2)

CANONICAL = render.orbit(1)[0][0]     # every source camera is moved here (the orbit's first view)


def camera_vector(c2w, K):
    """The 16-number camera: flattened 3x4 pose + normalised fx, fy, cx, cy. (B,4,4), (B,3,3) -> (B,16)."""
    return torch.cat([c2w[:, :3, :4].flatten(1), K[:, 0, 0:1], K[:, 1, 1:2], K[:, 0, 2:3], K[:, 1, 2:3]], -1)


def canonicalise(c2w_src, c2w):
    """Rigidly move the world so the source camera sits at CANONICAL; other cameras keep their pose
    relative to it. c2w_src (B,4,4), c2w (B,V,4,4) -> (B,V,4,4), and the world transform M (B,4,4)."""
    M = CANONICAL.to(c2w) @ torch.linalg.inv(c2w_src)
    return M[:, None] @ c2w, M


class Block(nn.Module):
    """Pre-norm transformer block (DINO/ViT style): x + attn(LN x), x + MLP(LN x)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.n1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.n2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.proj(attend(*self.qkv(self.n1(x)).chunk(3, -1), self.heads))
        return x + self.mlp(self.n2(x))


class ModLN(nn.Module):
    """Camera-modulated LayerNorm: LN(x) * (1 + scale) + shift, (shift, scale) from the camera
    embedding; zero-initialised, so it starts as a plain LayerNorm."""

    def __init__(self, dim, cam_dim):
        super().__init__()
        self.norm, self.mod = nn.LayerNorm(dim, elementwise_affine=False), nn.Linear(cam_dim, 2 * dim)
        nn.init.zeros_(self.mod.weight), nn.init.zeros_(self.mod.bias)

    def forward(self, x, cam):
        shift, scale = self.mod(F.silu(cam))[:, None].chunk(2, -1)
        return self.norm(x) * (1 + scale) + shift


class TriplaneBlock(nn.Module):
    """[modLN -> cross-attention to image tokens -> modLN -> self-attention -> modLN -> MLP]."""

    def __init__(self, dim, cam_dim, heads):
        super().__init__()
        self.heads = heads
        self.n1, self.q, self.kv, self.o1 = ModLN(dim, cam_dim), nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.n2, self.qkv, self.o2 = ModLN(dim, cam_dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.n3, self.mlp = ModLN(dim, cam_dim), nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, image, cam):
        x = x + self.o1(attend(self.q(self.n1(x, cam)), *self.kv(image).chunk(2, -1), self.heads))
        x = x + self.o2(attend(*self.qkv(self.n2(x, cam)).chunk(3, -1), self.heads))
        return x + self.mlp(self.n3(x, cam))


def sample_planes(planes, pts):
    """Triplane features at points: planes (B,3,C,P,P) for the xy, xz and yz planes (a plane's
    columns follow its first axis, its rows the second), points (B,N,3) in [-1,1]^3 -> (B,3C,N).
    One grid_sample reads all three planes; their features are concatenated (EG3D-style triplanes)."""
    B, N = pts.shape[:2]
    uv = torch.stack([pts[..., [0, 1]], pts[..., [0, 2]], pts[..., [1, 2]]], 1)   # (B,3,N,2)
    f = F.grid_sample(planes.flatten(0, 1), uv.reshape(B * 3, 1, N, 2), align_corners=False)  # (B*3,C,1,N)
    return f.view(B, 3 * planes.shape[2], N)


def plane_points(n, depths):
    """Cell centres of the xy, xz and yz planes' n x n grids, moved by each offset along the plane's
    normal -> (3, D, n, n, 3); grid (row, col) = plane (2nd, 1st) coordinate, as in sample_planes."""
    g = (torch.arange(n) + 0.5) / n * 2 - 1
    v, u = torch.meshgrid(g, g, indexing="ij")
    d = torch.tensor(depths, dtype=torch.float32).view(-1, 1, 1).expand(-1, n, n)
    u, v = u.expand_as(d), v.expand_as(d)
    return torch.stack([torch.stack(p, -1) for p in ((u, v, d), (u, d, v), (d, u, v))])


def plane_uv(n, depths):
    """Where plane_points(n, depths) land in the canonical source view, as grid_sample coordinates -> (1, 3*D*n*n, 1, 2)."""
    uv, _ = render.project(plane_points(n, depths).view(-1, 3), CANONICAL, render.intrinsics(render.FOV), 1)
    return (uv * 2 - 1).clamp(-1, 1).view(1, -1, 1, 2)


class LRM(nn.Module):
    """Image + source camera -> triplane -> NeRF. img (B,3,H,W) in [0,1], cam (B,16) -> planes
    (B,3,C,P,P) for the xy, xz and yz planes of the box [-1,1]^3. With plane_skip (not in the
    paper's LRM), every plane point also reads the input pixels where points along its normal line
    project (the source camera is always CANONICAL), so the planes get full-resolution detail."""

    def __init__(self, res=32, patch=4, enc_dim=128, enc_layers=4, dim=128, layers=3, heads=4, tokens=8, plane_ch=32,
                 hidden=64, density_scale=10.0, token_init="image", plane_skip=0):
        super().__init__()
        self.config = dict(res=res, patch=patch, enc_dim=enc_dim, enc_layers=enc_layers, dim=dim, layers=layers, heads=heads,
                           tokens=tokens, plane_ch=plane_ch, hidden=hidden, density_scale=density_scale, token_init=token_init,
                           plane_skip=plane_skip)
        n = (res // patch) ** 2
        self.patchify = nn.Conv2d(3, enc_dim, patch, stride=patch)                # DINO-style ViT encoder
        self.cls, self.pos = nn.Parameter(torch.zeros(1, 1, enc_dim)), nn.Parameter(torch.randn(1, n + 1, enc_dim) * 0.02)
        self.encoder = nn.Sequential(*[Block(enc_dim, heads) for _ in range(enc_layers)])
        self.enc_norm, self.to_kv = nn.LayerNorm(enc_dim), nn.Linear(enc_dim, dim)
        self.camera = nn.Sequential(nn.Linear(16, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.tokens = nn.Parameter(torch.randn(1, 3 * tokens * tokens, dim) * 0.02)   # learnable triplane tokens
        self.lift = nn.Linear(enc_dim, dim) if token_init == "image" else None
        self.blocks = nn.ModuleList([TriplaneBlock(dim, dim, heads) for _ in range(layers)])
        self.out_norm = nn.LayerNorm(dim)
        self.up = nn.ConvTranspose2d(dim, plane_ch, res // tokens, stride=res // tokens)  # planes at the image resolution
        self.decoder = nn.Sequential(nn.Conv1d(3 * plane_ch, hidden, 1), nn.SiLU(), nn.Conv1d(hidden, hidden, 1), nn.SiLU(), nn.Conv1d(hidden, 4, 1))
        nn.init.constant_(self.decoder[-1].bias[:1], -3.0)                        # start almost empty (white)
        if token_init == "image":                                                 # where each token's plane point lands in the source view
            self.register_buffer("token_uv", plane_uv(tokens, (0.0,)), persistent=False)
        self.skip = None
        if plane_skip:                                                            # pixel-aligned skip into the planes at full resolution
            depths = (-0.8, -0.4, 0.0, 0.4, 0.8)                                  # offsets along each plane's normal, box units
            self.skip_conv = nn.Sequential(nn.Conv2d(3, plane_skip, 3, padding=1), nn.SiLU(), nn.Conv2d(plane_skip, plane_skip, 3, padding=1))
            self.skip = nn.Conv2d((3 + plane_skip) * len(depths), plane_ch, 1)
            self.register_buffer("plane_uv", plane_uv(res, depths), persistent=False)

    def forward(self, img, cam, c2w=None, K=None, res=None, crop=None, **render_args):
        """-> triplanes (B,3,C,P,P); with cameras, their renders instead (one call, for DDP)."""
        planes = self.encode(img, cam)
        return planes if c2w is None else self.render(planes, c2w, K, res, crop, **render_args)

    def encode(self, img, cam):
        B, P = img.shape[0], self.config["tokens"]
        img = img * 2 - 1                                                         # (B,3,H,W) in [-1,1]
        x = self.patchify(img).flatten(2).transpose(1, 2)                         # (B,N,enc_dim) patch tokens
        x = self.enc_norm(self.encoder(torch.cat([self.cls.expand(B, -1, -1), x], 1) + self.pos))
        c = self.camera(cam)                                                      # (B,dim)
        t = self.tokens.expand(B, -1, -1)
        if self.lift is not None:                                                 # start each token from the patch it sees
            side = int(round((x.shape[1] - 1) ** 0.5))
            grid = x[:, 1:].transpose(1, 2).reshape(B, -1, side, side)
            t = t + self.lift(F.grid_sample(grid, self.token_uv.expand(B, -1, -1, -1), align_corners=False)[..., 0].transpose(1, 2))
        kv = self.to_kv(x)
        for blk in self.blocks:
            t = blk(t, kv, c)
        planes = self.up(self.out_norm(t).view(B * 3, P, P, -1).permute(0, 3, 1, 2))  # token grid -> (B*3,C,res,res)
        if self.skip is not None:                                                 # each plane point reads the pixels its normal line crosses
            f = torch.cat([img, self.skip_conv(img)], 1)                          # (B,3+S,H,W)
            s = F.grid_sample(f, self.plane_uv.expand(B, -1, -1, -1), align_corners=False)  # (B,3+S,3*D*R*R,1)
            R = planes.shape[-1]
            s = s.view(B, f.shape[1], 3, -1, R, R).transpose(1, 2).reshape(B * 3, -1, R, R)  # (B*3,(3+S)*D,R,R)
            planes = planes + self.skip(s)
        return planes.view(B, 3, *planes.shape[1:])

    def field(self, planes, pts):
        """planes (B,3,C,P,P), points (B,N,3) -> density (B,N) >= 0, colour (B,N,3)."""
        out = self.decoder(sample_planes(planes, pts))                            # (B,4,N): channels first, no copies
        return self.config["density_scale"] * F.softplus(out[:, 0] - 1), torch.sigmoid(out[:, 1:]).transpose(1, 2)

    def render(self, planes, c2w, K, res, crop=None, n_coarse=16, n_fine=16, stratified=True):
        """Render cameras c2w (B,V,4,4), K (B,V,3,3) at res x res (or a crop (top, left, size) of it)
        -> rgb (B,V,3,h,w) on white, opacity (B,V,1,h,w)."""
        B, V = c2w.shape[:2]
        o, d = render.camera_rays(c2w.flatten(0, 1), K.flatten(0, 1), res, crop)  # (B*V,h,w,3)
        h, w = o.shape[1:3]
        def field(p):                                                             # p (R,S,3), R = B*V*h*w
            sigma, rgb = self.field(planes, p.reshape(B, -1, 3))
            return sigma.view(p.shape[:2]), rgb.reshape(*p.shape[:2], 3)
        rgb, acc, _ = render.volume_render(field, o.reshape(-1, 3), d.reshape(-1, 3), n_coarse, n_fine, stratified)
        return rgb.view(B, V, h, w, 3).permute(0, 1, 4, 2, 3), acc.view(B, V, 1, h, w)


def load_lrm(path, hint):
    """Rebuild an LRM from its checkpoint (its own config travels in the metadata)."""
    tensors, conf, meta = load_checkpoint(path, "lrm", hint)
    lrm = LRM(**conf)
    load_weights(lrm, tensors, path)
    return lrm.eval(), meta


@torch.no_grad()
def lrm_mesh(lrm, planes, res, level):
    """Marching cubes of one object's density (planes (3,C,P,P)) at `level` -> vertices, faces, colours."""
    v, f = render.extract_mesh(lambda p: lrm.field(planes[None], p[None].to(planes.device))[0][0].float().cpu(), res, level)
    rgb = lrm.field(planes[None], v[None].to(planes.device))[1][0].float().cpu() if len(v) else torch.zeros(0, 3)
    return v, f, rgb


@torch.no_grad()
def evaluate_lrm(lrm, folders, device, mesh_res=64, level=5.0, n_points=10000):
    """DESIGN.md's held-out evaluation: input = view 0; PSNR/SSIM/colour of the other views, Chamfer-L1
    and F-score (tau 0.05) of the mesh against the true surface; with the sphere and copy baselines."""
    pred, true, copy, geo, sphere = [], [], [], [], []
    gen = torch.Generator().manual_seed(0)
    ball = F.normalize(torch.randn(n_points, 3, generator=gen), dim=-1) * 0.5    # sphere of radius 0.5
    for folder in folders:
        ob = render.load_object(folder, lrm.config["res"])
        V = len(ob["images"])
        c2w, M = canonicalise(ob["c2w"][:1], ob["c2w"][None])                 # (1,V,4,4)
        cam = camera_vector(c2w[:, 0], ob["K"][:1]).to(device)
        planes = lrm(ob["images"][:1].to(device), cam)
        rgb, _ = lrm.render(planes, c2w[:, 1:].to(device), ob["K"][None, 1:].to(device), lrm.config["res"], n_coarse=32, n_fine=32, stratified=False)
        pred.append(rgb[0].cpu()), true.append(ob["images"][1:]), copy.append(ob["images"][:1].expand(V - 1, -1, -1, -1))
        surf, _ = render.load_tensors(Path(folder) / "surface.safetensors")
        v, f, _ = lrm_mesh(lrm, planes[0].float(), mesh_res, level)
        pts = render.sample_mesh(v.cpu(), f.cpu(), n_points)
        pts = pts @ torch.linalg.inv(M[0])[:3, :3].T + torch.linalg.inv(M[0])[:3, 3]  # back to the world frame
        geo.append(render.chamfer_fscore(pts, surf["points"])), sphere.append(render.chamfer_fscore(ball, surf["points"]))
    mean = lambda rows: [float(np.mean([r[i] for r in rows])) for i in range(2)]
    rows = {"lrm": view_metrics(torch.cat(pred), torch.cat(true)), "sphere": {}, "copy_input": view_metrics(torch.cat(copy), torch.cat(true))}
    rows["lrm"]["chamfer_l1"], rows["lrm"]["fscore"] = mean(geo)
    rows["sphere"]["chamfer_l1"], rows["sphere"]["fscore"] = mean(sphere)
    return {k: {m: round(x, 4) for m, x in r.items()} for k, r in rows.items()}, torch.stack(pred)


def ssim_loss(x, y, window=7):
    """1 - SSIM with a uniform window, differentiable: the image-level loss (LPIPS needs downloads)."""
    C1, C2 = 0.01**2, 0.03**2
    pool = lambda z: F.avg_pool2d(z, window, 1, window // 2, count_include_pad=False)
    mx, my = pool(x), pool(y)
    vx, vy, cov = pool(x * x) - mx * mx, pool(y * y) - my * my, pool(x * y) - mx * my
    s = ((2 * mx * my + C1) * (2 * cov + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2))
    return 1 - s.mean()


# ----------------------------------------------------------------------------- evaluation

def object_colour(img):
    """Mean colour of an image's object pixels (not near-white), (3,H,W) -> (3,); white if none."""
    m = (img < 0.9).any(0)
    return img[:, m].mean(1) if m.any() else torch.ones(3)

def dominant_colour(img):
    """Index of the palette colour most object pixels match (allowing for shading); -1 if empty."""
    px = img[:, (img < 0.9).any(0)].T                          # (N,3) object pixels
    if len(px) == 0:
        return -1
    k = ((px @ render.PALETTE.T) / (render.PALETTE * render.PALETTE).sum(-1)).clamp(0.45, 1.1)   # best shading per colour
    err = (px[:, None] - k[..., None] * render.PALETTE).norm(dim=-1)               # (N,8)
    return int(torch.bincount(err.argmin(-1), minlength=8).argmax())

def view_metrics(pred, true):
    """PSNR, SSIM (scikit-image) and colour error of images (N,3,H,W) in [0,1], averaged over N."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    p, t = pred.clamp(0, 1).double().numpy(), true.clamp(0, 1).double().numpy()
    psnr = [peak_signal_noise_ratio(b, a, data_range=1.0) for a, b in zip(p, t)]
    ssim = [structural_similarity(b, a, data_range=1.0, channel_axis=0) for a, b in zip(p, t)]
    col = [(object_colour(a) - object_colour(b)).abs().mean().item() for a, b in zip(pred, true)]
    return dict(psnr=float(np.mean(np.minimum(psnr, 60))), ssim=float(np.mean(ssim)), color_err=float(np.mean(col)))
