"""Everything learned, from the caption and the image to the pixels, in reading order; then the
training utilities every script shares. Imports render.py for cameras, marching cubes and files.
Paper: VFusion3D Sec. 3.1 (the video model: temporal layers on frozen spatial layers), 3.2 (LRM).

Contents, in reading order:
Part 1: the text encoder
    used by the UNet
Part 2: the video UNet, spatial and temporal layers
    used by finetune_video.py, generate_views.py, infer.py --prompt
Part 3: diffusion
    used by the same
Part 4: the LRM, from the image to the pixels
    the source camera | encoder and triplane transformer | reading the planes | volume rendering
    meshes and the image loss
    used by train_lrm.py, finetune_3d.py, infer.py
Part 5: the classifier
    used by finetune_video.py (trains it), generate_views.py, train_lrm.py, infer.py (score with it)
Part 6: evaluation
    used by every stage that evaluates
Part 7: training utilities and checkpoints, which you need not read to follow the method
    device, seeds, processes | the optimiser | checkpoints
    used by every script

Shapes: B batch, V views (a video's frames), N points or tokens, L caption tokens, R rays, S samples
per ray, C channels, H W image rows and columns, P plane side.
"""

import contextlib
import ctypes
import dataclasses
import datetime
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import render


# ==================================================================================================
# Part 1: the text encoder
# ==================================================================================================
# Token ids before the vocabulary's
PAD = 0  # padding
UNKNOWN = 1  # a word the encoder never saw
START = 2  # begins every caption; the empty caption of classifier-free guidance is [START] alone


class TextEncoder(nn.Module):
    """Word-level tokens -> a small pre-norm transformer -> per-token features (B,L,D) and a pooled
    vector (B,D) from the START token."""

    def __init__(self, vocab, dim=64, layers=2, max_len=32):
        super().__init__()
        self.vocab = list(vocab)
        self.max_len = max_len
        self.index = {w: i + 3 for i, w in enumerate(self.vocab)}  # after PAD, UNKNOWN, START
        self.embed = nn.Embedding(len(self.vocab) + 3, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, 0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, captions):
        """-> ids (B,L) long and the set of unknown words (the caller tells the user)."""
        ids = torch.full((len(captions), self.max_len), PAD, dtype=torch.long)
        unknown = set()
        for b, caption in enumerate(captions):
            words = caption.lower().replace(",", " ").split()[: self.max_len - 1]
            unknown |= {w for w in words if w not in self.index}
            known = [self.index.get(w, UNKNOWN) for w in words]
            ids[b, : len(words) + 1] = torch.tensor([START] + known)
        return ids, unknown

    def forward(self, ids):
        pad = ids == PAD  # (B,L)
        x = self.blocks(self.embed(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=pad)
        x = self.norm(x)
        return x, x[:, 0], pad  # tokens, pooled, padding mask


def empty_caption(ids):
    """Empty captions shaped like ids (B,L): [START], then padding."""
    empty = torch.full_like(ids, PAD)
    empty[:, 0] = START
    return empty


# ==================================================================================================
# Part 2: the video UNet, spatial and temporal layers
# ==================================================================================================
def attend(q, k, v, heads, mask=None):
    """Multi-head attention: queries (B,N,C) read keys and values (B,M,C); mask (B,1,1,M) True
    where a key may be read -> (B,N,C). The fused kernel computes what attend_plain spells out."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B,heads,N,c)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def attend_plain(q, k, v, heads, mask=None):
    """attend, written out: each head's softmax(q k^T / sqrt(c)) v (the tests' reference)."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B,heads,N,c)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B,heads,N,M)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


class ResBlock(nn.Module):
    """Spatial layer: GroupNorm-SiLU-conv, scale/shift from time + text, GroupNorm-SiLU-conv."""

    def __init__(self, cin, cout, emb):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)  # scale and shift from the time + text embedding
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.width = cout

    def forward(self, x, e, text):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(e)[..., None, None].chunk(2, 1)
        return self.skip(x) + self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))


class SpatialAttention(nn.Module):
    """Spatial layer: self-attention over pixels, then cross-attention to the text tokens."""

    def __init__(self, dim, text_dim, heads=4):
        super().__init__()
        self.heads = heads
        self.width = dim
        self.norm_self = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.out_self = nn.Linear(dim, dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(text_dim, 2 * dim)
        self.out_cross = nn.Linear(dim, dim)

    def forward(self, x, e, text):
        B, C, H, W = x.shape
        tokens, pad = text
        h = x.flatten(2).transpose(1, 2)  # (B,HW,C)
        # every pixel attends to every pixel
        q, k, v = self.to_qkv(self.norm_self(h)).chunk(3, dim=-1)  # (B,HW,C) each
        h = h + self.out_self(attend(q, k, v, self.heads))
        # then to the caption's words
        q = self.to_q(self.norm_cross(h))  # (B,HW,C)
        k, v = self.to_kv(tokens).chunk(2, dim=-1)  # (B,L,C) each
        h = h + self.out_cross(attend(q, k, v, self.heads, ~pad[:, None, None, :]))
        return h.transpose(1, 2).reshape(B, C, H, W)


class TemporalLayer(nn.Module):
    """Temporal layer (after a spatial block): a circular 1D convolution over the frames, then
    attention across them with a frame-position embedding. Both are residual branches whose output
    projections start at zero, so at insertion the block is the identity. At mv_attn_res resolutions
    attention spans all frames' pixels (as in MVDream) to follow a part as it moves."""

    def __init__(self, dim, frames, heads=4, mv_attn_res=0):
        super().__init__()
        self.multiview = mv_attn_res > 0  # mv_attn_res: this layer's resolution, or 0
        self.heads = heads if self.multiview else 1  # one head over 8 frames is faster, as good
        if self.multiview:
            self.pixel_pos = nn.Parameter(torch.randn(mv_attn_res * mv_attn_res, dim) * 0.02)
        self.norm_conv = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1, padding_mode="circular")  # orbits wrap around
        self.conv_out = nn.Linear(dim, dim)
        self.frame_pos = nn.Parameter(torch.randn(frames, dim) * 0.02)
        self.norm_attn = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        for p in [*self.conv_out.parameters(), *self.attn_out.parameters()]:
            nn.init.zeros_(p)

    def forward(self, x, frames):
        BV, C, H, W = x.shape
        B = BV // frames
        h = x.view(B, frames, C, H * W).permute(0, 3, 1, 2).reshape(-1, frames, C)  # (B*HW,V,C)
        # each pixel's frames: a convolution over neighbouring ones
        c = self.conv(F.silu(self.norm_conv(h)).transpose(1, 2)).transpose(1, 2)
        h = h + self.conv_out(F.silu(c))
        if self.multiview:
            # attention over every pixel of every frame
            s = h.view(B, H * W, frames, C).transpose(1, 2)  # (B,V,HW,C)
            z = self.norm_attn(s) + self.frame_pos[:frames, None] + self.pixel_pos
            q, k, v = self.to_qkv(z.flatten(1, 2)).chunk(3, dim=-1)  # (B,V*HW,C) each
            s = s + self.attn_out(attend(q, k, v, self.heads)).view_as(s)
            h = s.transpose(1, 2).reshape(-1, frames, C)
        else:
            # attention over one pixel's frames
            z = self.norm_attn(h) + self.frame_pos[:frames]
            q, k, v = self.to_qkv(z).chunk(3, dim=-1)  # (B*HW,V,C) each
            h = h + self.attn_out(attend(q, k, v, self.heads))
        return h.view(B, H * W, frames, C).permute(0, 2, 3, 1).reshape(BV, C, H, W)


@dataclass
class UNetConfig:
    """The UNet's hyperparameters; saved in every checkpoint's metadata, so it rebuilds itself."""

    vocab: tuple  # caption words the text encoder knows
    channels: tuple = (32, 64, 96)  # channels per resolution level
    attn_res: tuple = (8,)  # resolutions (pixels) with self- and cross-attention
    res: int = 32  # image size, pixels
    text_dim: int = 64  # text encoder width
    frames: int = 0  # frames of the video model (0 = the image model: no temporal layers)
    mv_attn_res: tuple = ()  # resolutions where temporal attention spans all pixels of all frames


def unet_blocks(cfg, emb):
    """The UNet's spatial blocks in order, as (role, module, resolution): the down path (a
    ResBlock whose output is kept as a skip, attention where the resolution is in attn_res, a
    strided convolution), the middle, and the up path (each ResBlock also reads the skip of its
    level, then an upsampling convolution). Roles: down, attn, pool, mid, up, upsample."""
    blocks = []
    skips = []  # the channels of each level's skip
    cin = cfg.channels[0]
    r = cfg.res
    for i, c in enumerate(cfg.channels):
        blocks.append(("down", ResBlock(cin, c, emb), r))
        if r in cfg.attn_res:
            blocks.append(("attn", SpatialAttention(c, cfg.text_dim), r))
        skips.append(c)
        cin = c
        if i < len(cfg.channels) - 1:
            blocks.append(("pool", nn.Conv2d(c, c, 3, stride=2, padding=1), r))
            r //= 2
    blocks.append(("mid", ResBlock(cin, cin, emb), r))
    blocks.append(("attn", SpatialAttention(cin, cfg.text_dim), r))
    blocks.append(("mid", ResBlock(cin, cin, emb), r))
    for i, c in reversed(list(enumerate(cfg.channels))):
        blocks.append(("up", ResBlock(cin + skips.pop(), c, emb), r))
        if r in cfg.attn_res:
            blocks.append(("attn", SpatialAttention(c, cfg.text_dim), r))
        cin = c
        if i > 0:
            blocks.append(("upsample", nn.Conv2d(c, c, 3, padding=1), r))
            r *= 2
    return blocks


class UNet(nn.Module):
    """Text-to-image UNet (the spatial layers), a video UNet when frames > 0: then a TemporalLayer
    follows every residual and attention block (Sec. 3.1: only those are fine-tuned). x (B*V,3,H,W),
    t (B*V,) in [0,1], caption ids (B,L) -> v-prediction (B*V,3,H,W)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        c0 = config.channels[0]
        emb = 4 * c0  # the width of the time + text embedding
        self.text = TextEncoder(config.vocab, config.text_dim)
        self.time = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.text_proj = nn.Linear(config.text_dim, emb)
        self.conv_in = nn.Conv2d(3, c0, 3, padding=1)
        blocks = unet_blocks(config, emb)
        self.roles = [role for role, _, _ in blocks]
        self.blocks = nn.ModuleList([m for _, m, _ in blocks])
        norm_out = nn.GroupNorm(8, c0)
        self.conv_out = nn.Sequential(norm_out, nn.SiLU(), nn.Conv2d(c0, 3, 3, padding=1))
        self.temporal = None
        if config.frames:
            # one temporal layer after each ResBlock and attention block, none after the resamplers
            spatial = [(m.width, r) for role, m, r in blocks if role not in ("pool", "upsample")]
            self.temporal = nn.ModuleList(
                TemporalLayer(w, config.frames, mv_attn_res=r if r in config.mv_attn_res else 0)
                for w, r in spatial
            )

    def embed_time(self, t):
        """Sinusoidal features of the noise level t (N,) -> (N, channels[0])."""
        half = self.conv_in.out_channels // 2
        freq = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        return torch.cat([(t[:, None] * 1000 * freq).sin(), (t[:, None] * 1000 * freq).cos()], -1)

    def forward(self, x, t, ids, frames=1):
        tokens, pooled, pad = self.text(ids)  # (B,L,D), (B,D), (B,L)
        if frames > 1:
            # every frame sees its video's text
            tokens, pooled, pad = (z.repeat_interleave(frames, 0) for z in (tokens, pooled, pad))
        e = self.time(self.embed_time(t)) + self.text_proj(pooled)  # (B*V, emb)
        h = self.conv_in(x)
        skips = []
        k = 0  # the next temporal layer
        for role, block in zip(self.roles, self.blocks):
            if role == "upsample":
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            if role in ("pool", "upsample"):
                h = block(h)  # the resamplers read no embedding and have no temporal layer
                continue
            if role == "up":
                h = torch.cat([h, skips.pop()], 1)
            h = block(h, e, (tokens, pad))
            if role == "down":
                skips.append(h)
            if self.temporal is not None and frames > 1:
                h = self.temporal[k](h, frames)
            k += 1
        return self.conv_out(h)


def load_unet(path, kind, hint, frames=0, mv_attn_res=()):
    """Rebuild a UNet from its checkpoint's own config. frames > 0 on an image model adds
    zero-initialised temporal layers (the video model at insertion)."""
    tensors, config, meta = load_checkpoint(path, kind, hint, UNetConfig)
    image_model = not config.frames
    if frames and image_model:
        config.frames = frames
        config.mv_attn_res = tuple(mv_attn_res)
    unet = UNet(config)
    if frames and image_model:
        tensors |= {k: v for k, v in unet.state_dict().items() if k.startswith("temporal.")}
    return load_weights(unet, tensors, path), meta


# ==================================================================================================
# Part 3: diffusion
# ==================================================================================================
def alpha_sigma(t):
    """Cosine schedule (zero terminal SNR at t = 1): x_t = alpha x_0 + sigma eps."""
    return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)


def v_loss(unet, x0, ids, frames=1, clean_first=False, t_power=1.0):
    """v-prediction MSE. x0 (B*V,3,H,W) in [-1,1]. With clean_first, frame 0 of each video is given
    clean at t = 0 and only frames 1..V-1 are noised and scored (the image conditioning). Noise
    levels are t = u**t_power, u uniform: t_power < 1 spends more of the steps at high noise."""
    t = torch.rand(x0.shape[0], device=x0.device) ** t_power
    scored = torch.ones_like(t)
    if clean_first:
        first = torch.arange(x0.shape[0], device=x0.device) % frames == 0
        t = t.masked_fill(first, 0.0)
        scored = (~first).float()
    a, s = (z[:, None, None, None] for z in alpha_sigma(t))
    eps = torch.randn_like(x0)
    v = unet(a * x0 + s * eps, t, ids, frames)
    err = ((v - (a * eps - s * x0)) ** 2).mean((1, 2, 3))
    return (err * scored).sum() / scored.sum()


def guided_v(unet, x, t, ids, frames, guidance):
    """The UNet's v-prediction with classifier-free guidance: v_u + w (v_c - v_u); w = 1 is off."""
    if guidance == 1.0:
        return unet(x, t, ids, frames)
    v = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ids, empty_caption(ids)]), frames)
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def sample(unet, ids, noise, first=None, *, steps=20, guidance=3.0, temperature=1.0):
    """DDIM (eta = 0), classifier-free guidance on the text: ids (B,L), starting noise (B,V,3,H,W)
    of V frames, first (B,3,H,W) in [-1,1] the clean input view for frame 0 or None -> (B,V,3,H,W)
    in [-1,1]. temperature scales the starting noise: below 1 it picks likelier, plainer images."""
    B, frames = noise.shape[:2]
    device = ids.device
    x = noise.to(device) * temperature
    ts = torch.linspace(1, 0, steps + 1, device=device)
    for i in range(steps):
        t = torch.full((B, frames), float(ts[i]), device=device)
        if first is not None:
            # frame 0 is the clean input view at noise level 0
            x[:, 0] = first
            t[:, 0] = 0.0
        xin = x.flatten(0, 1)  # (B*V,3,H,W)
        tin = t.flatten()
        v = guided_v(unet, xin, tin, ids, frames, guidance)
        a, s = (z[:, None, None, None] for z in alpha_sigma(tin))
        x0 = (a * xin - s * v).clamp(-1, 1)
        # the noise consistent with the clamped x0 (at s ~ 0, from v instead)
        eps = torch.where(s > 1e-3, (xin - a * x0) / s.clamp(min=1e-3), s * xin + a * v)
        a_next, s_next = alpha_sigma(ts[i + 1])
        x = (a_next * x0 + s_next * eps).view_as(x)
    if first is not None:
        x[:, 0] = first
    return x


# ==================================================================================================
# Part 4: the LRM, from the image to the pixels
# ==================================================================================================
# -------------------------------------------------------------------------------- the source camera
CANONICAL = render.orbit(1)[0][0]  # every source camera is moved here (the orbit's first view)


def camera_vector(c2w, K):
    """The 16-number camera, 3x4 pose + normalised fx, fy, cx, cy: (B,4,4), (B,3,3) -> (B,16)."""
    focal_centre = [K[:, 0, 0:1], K[:, 1, 1:2], K[:, 0, 2:3], K[:, 1, 2:3]]
    return torch.cat([c2w[:, :3, :4].flatten(1), *focal_centre], -1)


def canonicalise(c2w_src, c2w):
    """Rigidly move the world so the source camera sits at CANONICAL, the others keeping their pose
    relative to it: c2w_src (B,4,4), c2w (B,V,4,4) -> (B,V,4,4), the world transform M (B,4,4)."""
    M = CANONICAL.to(c2w) @ torch.linalg.inv(c2w_src)
    return M[:, None] @ c2w, M


# ----------------------------------------------------------------- encoder and triplane transformer
def mlp(dim):
    """The transformer blocks' feed-forward part: dim -> 4 dim -> dim."""
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


class Block(nn.Module):
    """Pre-norm transformer block (DINO/ViT style): x + attn(LN x), x + MLP(LN x)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm_attn = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = mlp(dim)

    def forward(self, x):
        q, k, v = self.to_qkv(self.norm_attn(x)).chunk(3, dim=-1)  # (B,N,C) each
        x = x + self.attn_out(attend(q, k, v, self.heads))
        return x + self.mlp(self.norm_mlp(x))


class ModLN(nn.Module):
    """Camera-modulated LayerNorm: LN(x) * (1 + scale) + shift, (shift, scale) from the camera
    embedding; zero-initialised, so it starts as a plain LayerNorm."""

    def __init__(self, dim, cam_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mod = nn.Linear(cam_dim, 2 * dim)
        for p in self.mod.parameters():
            nn.init.zeros_(p)

    def forward(self, x, cam):
        shift, scale = self.mod(F.silu(cam))[:, None].chunk(2, -1)
        return self.norm(x) * (1 + scale) + shift


class TriplaneBlock(nn.Module):
    """[modLN -> cross-attention to image tokens -> modLN -> self-attention -> modLN -> MLP]."""

    def __init__(self, dim, cam_dim, heads):
        super().__init__()
        self.heads = heads
        self.norm_cross = ModLN(dim, cam_dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.norm_self = ModLN(dim, cam_dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.norm_mlp = ModLN(dim, cam_dim)
        self.mlp = mlp(dim)

    def forward(self, x, image, cam):
        # the tokens read the image
        q = self.to_q(self.norm_cross(x, cam))  # (B,N,C)
        k, v = self.to_kv(image).chunk(2, dim=-1)  # (B,M,C) each
        x = x + self.cross_out(attend(q, k, v, self.heads))
        # the tokens read each other
        q, k, v = self.to_qkv(self.norm_self(x, cam)).chunk(3, dim=-1)  # (B,N,C) each
        x = x + self.self_out(attend(q, k, v, self.heads))
        return x + self.mlp(self.norm_mlp(x, cam))


@dataclass
class LRMConfig:
    """The LRM's hyperparameters; saved in every checkpoint's metadata, so it rebuilds itself."""

    # the network
    res: int = 32  # input image size, pixels (the planes have this resolution too) [8..]
    patch: int = 4  # ViT patch size, pixels [1..]
    enc_dim: int = 128  # ViT width [8..]
    enc_layers: int = 4  # ViT blocks [1..]
    dim: int = 128  # triplane transformer width [8..]
    layers: int = 3  # triplane transformer blocks [1..]
    heads: int = 4  # attention heads [1..]
    tokens: int = 8  # triplane tokens per plane side (3 x tokens x tokens) [1..]
    plane_ch: int = 32  # channels per plane after the x(res/tokens) transposed convolution [1..]
    hidden: int = 64  # NeRF MLP width [1..]
    density_scale: float = 10.0  # density = scale * softplus(x - 1), per box unit [0..]
    token_init: str = "image"  # image (tokens start from the patch they project to) | learned
    plane_skip: int = 0  # channels of the pixel-aligned skip into the planes (0 = the paper's LRM)


SKIP_DEPTHS = (-0.8, -0.4, 0.0, 0.4, 0.8)  # where the plane skip reads, along each plane's normal


def plane_points(n, depths):
    """Cell centres of the xy, xz and yz planes' n x n grids, moved by each offset along the plane's
    normal -> (3, D, n, n, 3); grid (row, col) = plane (2nd, 1st) coordinate (as plane_corners)."""
    g = (torch.arange(n) + 0.5) / n * 2 - 1
    v, u = torch.meshgrid(g, g, indexing="ij")
    d = torch.tensor(depths, dtype=torch.float32).view(-1, 1, 1).expand(-1, n, n)
    u = u.expand_as(d)
    v = v.expand_as(d)
    return torch.stack([torch.stack(p, -1) for p in ((u, v, d), (u, d, v), (d, u, v))])


def plane_uv(n, depths):
    """Where plane_points(n, depths) land in the CANONICAL view: grid_sample's (1,3*D*n*n,1,2)."""
    K = render.intrinsics(render.FOV)
    uv, _ = render.project(plane_points(n, depths).view(-1, 3), CANONICAL, K, 1)
    return (uv * 2 - 1).clamp(-1, 1).view(1, -1, 1, 2)


class LRM(nn.Module):
    """Image + source camera -> triplane -> NeRF. img (B,3,H,W) in [0,1], cam (B,16) -> planes
    (B,3,C,P,P) for the xy, xz and yz planes of the box [-1,1]^3. With plane_skip (not in the
    paper's LRM) the planes also read the input pixels at full resolution (skip_features)."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        n_patches = (c.res // c.patch) ** 2
        # the DINO-style ViT encoder
        self.patchify = nn.Conv2d(3, c.enc_dim, c.patch, stride=c.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, c.enc_dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, c.enc_dim) * 0.02)
        self.encoder = nn.Sequential(*[Block(c.enc_dim, c.heads) for _ in range(c.enc_layers)])
        self.enc_norm = nn.LayerNorm(c.enc_dim)
        self.to_kv = nn.Linear(c.enc_dim, c.dim)
        # the camera-modulated triplane transformer, from learnable tokens
        self.camera = nn.Sequential(nn.Linear(16, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.tokens = nn.Parameter(torch.randn(1, 3 * c.tokens * c.tokens, c.dim) * 0.02)
        self.lift = nn.Linear(c.enc_dim, c.dim) if c.token_init == "image" else None
        self.blocks = nn.ModuleList([TriplaneBlock(c.dim, c.dim, c.heads) for _ in range(c.layers)])
        self.out_norm = nn.LayerNorm(c.dim)
        # token grid -> planes at the image resolution, and the NeRF decoder that reads them
        up = c.res // c.tokens
        self.up = nn.ConvTranspose2d(c.dim, c.plane_ch, up, stride=up)
        first = nn.Linear(3 * c.plane_ch, c.hidden)
        hidden = nn.Linear(c.hidden, c.hidden)
        self.decoder = nn.Sequential(first, nn.SiLU(), hidden, nn.SiLU(), nn.Linear(c.hidden, 4))
        nn.init.constant_(self.decoder[-1].bias[:1], -3.0)  # start almost empty (white)
        if c.token_init == "image":
            # where each token's plane point lands in the source view
            self.register_buffer("token_uv", plane_uv(c.tokens, (0.0,)), persistent=False)
        self.skip = None
        if c.plane_skip:
            s = c.plane_skip
            conv_in = nn.Conv2d(3, s, 3, padding=1)
            self.skip_conv = nn.Sequential(conv_in, nn.SiLU(), nn.Conv2d(s, s, 3, padding=1))
            self.skip = nn.Conv2d((3 + s) * len(SKIP_DEPTHS), c.plane_ch, 1)
            self.register_buffer("plane_uv", plane_uv(c.res, SKIP_DEPTHS), persistent=False)

    def forward(self, img, cam, c2w=None, K=None, res=None, crop=None, **render_args):
        """-> triplanes (B,3,C,P,P); with cameras, their renders instead (one call, for DDP)."""
        planes = self.encode(img, cam)
        return planes if c2w is None else self.render(planes, c2w, K, res, crop, **render_args)

    def encode(self, img, cam):
        B = img.shape[0]
        G = self.config.tokens  # the token grid's side
        img = img * 2 - 1  # (B,3,H,W) in [-1,1]
        x = self.patchify(img).flatten(2).transpose(1, 2)  # (B,N,enc_dim) patch tokens
        x = self.enc_norm(self.encoder(torch.cat([self.cls.expand(B, -1, -1), x], 1) + self.pos))
        c = self.camera(cam)  # (B,dim)
        t = self.tokens.expand(B, -1, -1)
        if self.lift is not None:
            # start each token from the patch it sees
            side = int(round((x.shape[1] - 1) ** 0.5))
            grid = x[:, 1:].transpose(1, 2).reshape(B, -1, side, side)
            seen = F.grid_sample(grid, self.token_uv.expand(B, -1, -1, -1), align_corners=False)
            t = t + self.lift(seen[..., 0].transpose(1, 2))
        kv = self.to_kv(x)
        for blk in self.blocks:
            t = blk(t, kv, c)
        planes = self.up(self.out_norm(t).view(B * 3, G, G, -1).permute(0, 3, 1, 2))  # (B*3,C,P,P)
        if self.skip is not None:
            planes = planes + self.skip(self.skip_features(img, planes.shape[-1]))
        return planes.view(B, 3, *planes.shape[1:])

    def skip_features(self, img, R):
        """Each plane point reads the pixels where points along its normal project (the source
        camera is always CANONICAL): img (B,3,H,W) in [-1,1] -> (B*3, (3+S)*D, R, R), the raw
        pixels and S learned features at each of the D depths."""
        B = img.shape[0]
        f = torch.cat([img, self.skip_conv(img)], 1)  # (B,3+S,H,W)
        s = F.grid_sample(f, self.plane_uv.expand(B, -1, -1, -1), align_corners=False)
        return s.view(B, f.shape[1], 3, -1, R, R).transpose(1, 2).reshape(B * 3, -1, R, R)

    def field_plain(self, planes, pts):
        """planes (B,3,C,P,P), points (B,N,3) -> density (B,N) >= 0, colour (B,N,3): the decoder
        reads the three planes' features at each point (bilinear, zero outside the box),
        concatenated (EG3D-style triplanes). field gives the same numbers faster."""
        B, N = pts.shape[:2]
        uv = torch.stack([pts[..., [0, 1]], pts[..., [0, 2]], pts[..., [1, 2]]], 1)  # (B,3,N,2)
        f = F.grid_sample(planes.flatten(0, 1), uv.flatten(0, 1)[:, None], align_corners=False)
        out = self.decoder(f.view(B, -1, N).transpose(1, 2))  # (B,N,4)
        density = self.config.density_scale * F.softplus(out[..., 0] - 1)
        return density, torch.sigmoid(out[..., 1:])

    def field(self, planes, pts):
        """field_plain's numbers for less than half the arithmetic (the LRM's step 1.14x faster):
        the decoder's first layer and bilinear sampling are both linear, so they commute. The layer
        runs once per texel, not per point; each point sums the 12 texels it reads (TexelGather)."""
        B, N = pts.shape[:2]
        C = planes.shape[2]
        P = planes.shape[-1]
        first = self.decoder[0]
        w = first.weight.view(-1, 3, C)  # (H,3,C): the part of the first layer each plane feeds
        table = torch.einsum("bkcyx,hkc->bkyxh", planes, w).reshape(-1, w.shape[0])  # (B*3P^2,H)
        rows, weights = plane_corners(pts, P)
        h = TexelGather.apply(table, rows, weights.to(table.dtype)) + first.bias  # (B*N,H)
        out = self.decoder[1:](h).view(B, N, 4)
        density = self.config.density_scale * F.softplus(out[..., 0] - 1)
        return density, torch.sigmoid(out[..., 1:])

    def render(self, planes, c2w, K, res, crop=None, samples=(16, 16), stratified=True):
        """Render cameras c2w (B,V,4,4), K (B,V,3,3) at res x res (or a crop (top, left, size) of
        it), samples = (coarse, fine) per ray -> rgb (B,V,3,h,w) on white, opacity (B,V,1,h,w)."""
        B, V = c2w.shape[:2]
        if V > 1 and not torch.is_grad_enabled():
            # without gradients, a view at a time: the field's activations stay in the CPU's cache
            cams = zip(c2w.split(1, dim=1), K.split(1, dim=1))
            views = [self.render(planes, c, k, res, crop, samples, stratified) for c, k in cams]
            return tuple(torch.cat(parts, 1) for parts in zip(*views))
        o, d = render.camera_rays(c2w.flatten(0, 1), K.flatten(0, 1), res, crop)  # (B*V,h,w,3)
        h, w = o.shape[1:3]
        rays = [z.reshape(B, -1, 3) for z in (o, d)]  # (B,V*h*w,3) each
        rgb, acc = self.render_rays(planes, *rays, samples, stratified)
        return rgb.view(B, V, h, w, 3).permute(0, 1, 4, 2, 3), acc.view(B, V, 1, h, w)

    def render_rays(self, planes, o, d, samples=(16, 16), stratified=True):
        """Volume-render rays o, d (B,R,3), R of them per object -> rgb (B,R,3), opacity (B,R)."""
        B = o.shape[0]

        def field(p):
            """Points p (B*R,S,3) along the rays -> density (B*R,S), colour (B*R,S,3)."""
            sigma, rgb = self.field(planes, p.reshape(B, -1, 3))
            return sigma.view(p.shape[:2]), rgb.reshape(*p.shape[:2], 3)

        rgb, acc, _ = volume_render(field, o.reshape(-1, 3), d.reshape(-1, 3), *samples, stratified)
        return rgb.view(B, -1, 3), acc.view(B, -1)


def load_lrm(path, hint):
    """Rebuild an LRM from its checkpoint (its own config travels in the metadata)."""
    tensors, config, meta = load_checkpoint(path, "lrm", hint, LRMConfig)
    return load_weights(LRM(config), tensors, path).eval(), meta


# ------------------------------------------------------------------------------- reading the planes
def plane_corners(pts, P):
    """Where points (B,N,3) in [-1,1]^3 read P x P triplanes: on each of the xy, xz and yz planes
    the 4 texels around the point's projection, with their bilinear weights -> rows (B*N,12) of
    the texel table (object b's plane k fills rows (3b+k)P^2 to (3b+k+1)P^2, row-major), weights
    (B*N,12), plane k in columns 4k..4k+3. As grid_sample (align_corners=False): texel centres at
    (i+0.5)/P*2-1, zero outside; a plane's columns follow its first axis, rows the second."""
    B, N = pts.shape[:2]
    uv = torch.stack([pts[..., [0, 1]], pts[..., [0, 2]], pts[..., [1, 2]]], 2)  # (B,N,3,2)
    x = ((uv + 1) * P - 1) / 2  # in texels: (column, row)
    low = x.floor()
    frac = torch.stack([1 - (x - low), x - low])  # (2,B,N,3,2): weight of the low, high texel
    low = low.int()  # int32 rows: the backward sorts them, and that is faster than int64
    obj = torch.arange(B, device=pts.device)[:, None, None]
    plane = torch.arange(3, device=pts.device)
    first = ((obj * 3 + plane) * P * P).int()  # (B,1,3): each plane's first row
    rows = []
    weights = []
    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
        col = low[..., 0] + dc  # (B,N,3)
        row = low[..., 1] + dr
        inside = (col >= 0) & (col < P) & (row >= 0) & (row < P)
        rows.append(first + row.clamp(0, P - 1) * P + col.clamp(0, P - 1))
        weights.append(frac[dc, ..., 0] * frac[dr, ..., 1] * inside)
    return torch.stack(rows, -1).view(B * N, 12), torch.stack(weights, -1).view(B * N, 12)


class TexelGather(torch.autograd.Function):
    """out[i] = sum_j weights[i,j] * table[rows[i,j]]: bilinear sampling as a weighted gather of
    texel rows (F.embedding_bag). The backward is the same gather turned around: each texel
    collects the gradients of the points that read it, found by one sort, which is far cheaper
    than scattering into the table. No gradient reaches the weights: the points are data here."""

    @staticmethod
    def forward(ctx, table, rows, weights):
        ctx.save_for_backward(rows, weights)
        ctx.texels = table.shape[0]
        return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        rows, weights = ctx.saved_tensors
        texel, order = rows.flatten().sort()
        starts = torch.searchsorted(texel, torch.arange(ctx.texels, device=texel.device))
        point = order // rows.shape[1]
        reads = weights.flatten()[order]
        g = F.embedding_bag(point, grad.contiguous(), starts, per_sample_weights=reads, mode="sum")
        return g, None, None


# --------------------------------------------------------------------------------- volume rendering
def ray_box(o, d, bound=1.0):
    """Entry and exit distances of rays (R,3) through the box [-bound,bound]^3, and a hit mask."""
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t0 = (-bound - o) * inv  # where each ray crosses each face's plane
    t1 = (bound - o) * inv
    near = torch.minimum(t0, t1).max(-1).values.clamp(min=0)
    far = torch.maximum(t0, t1).min(-1).values
    return near, far, far > near + 1e-6


def composite_samples(sigma, rgb, t, far):
    """Alpha compositing on white (NeRF quadrature): sigma (R,S), rgb (R,S,3), sorted t (R,S)."""
    delta = torch.diff(torch.cat([t, far[:, None]], -1), dim=-1).clamp(min=0)
    tau = sigma * delta
    trans = torch.exp(-torch.cumsum(torch.cat([torch.zeros_like(tau[:, :1]), tau[:, :-1]], -1), -1))
    w = (1 - torch.exp(-tau)) * trans  # (R,S)
    acc = w.sum(-1)
    colour = (w[..., None] * rgb).sum(1) + (1 - acc[:, None])
    depth = (w * t).sum(-1) / acc.clamp(min=1e-6)
    return colour, acc, depth, w


def bin_offsets(n_rays, n, stratified):
    """Where each of n samples per ray sits in its bin: uniform at random, or the middle."""
    return torch.rand(n_rays, n) if stratified else torch.full((n_rays, n), 0.5)


def sample_pdf(w, bins, n, stratified):
    """n importance samples per ray where the coarse weights w (R,S) are, in bins whose edges are
    bins (R,S+1): the inverse of the weights' CDF at n evenly spread (jittered) quantiles."""
    cum = torch.cumsum(w / w.sum(-1, keepdim=True), -1)
    cdf = torch.cat([torch.zeros_like(w[:, :1]), cum], -1)  # (R,S+1)
    q = (torch.arange(n) + bin_offsets(len(w), n, stratified)) / n  # (R,n)
    k = torch.searchsorted(cdf, q.contiguous(), right=True).clamp(1, w.shape[1])  # each q's bin
    lo = cdf.gather(1, k - 1)
    hi = cdf.gather(1, k)
    frac = ((q - lo) / (hi - lo).clamp(min=1e-8)).clamp(0, 1)  # where q lies in its bin
    start = bins.gather(1, k - 1)
    return start + frac * (bins.gather(1, k) - start)  # (R,n)


def volume_render(field, o, d, n_coarse, n_fine, stratified=True):
    """Render rays o, d (R,3) through field (points (R,S,3) to density (R,S) >= 0, colour (R,S,3))
    -> rgb (R,3), opacity (R,), depth (R,). Stratified coarse samples in the box place n_fine
    importance samples (inverse CDF of the coarse weights); all are composited on white. With
    n_fine > 0 the coarse pass has no gradient: it only finds the surface, the fine ones learn."""
    near, far, valid = ray_box(o, d)
    far = torch.where(valid, far, near + 1e-3)
    edges = torch.linspace(0, 1, n_coarse + 1)
    u = bin_offsets(len(o), n_coarse, stratified)
    t = near[:, None] + (far - near)[:, None] * (edges[:-1] + u / n_coarse)  # (R,Sc)
    with torch.set_grad_enabled(torch.is_grad_enabled() and n_fine == 0):
        sigma, rgb = field(o[:, None] + t[..., None] * d[:, None])
    if n_fine > 0:
        with torch.no_grad():
            w = composite_samples(sigma * valid[:, None], rgb, t, far)[3] + 1e-4
            bins = near[:, None] + (far - near)[:, None] * edges  # (R,Sc+1)
            t_fine = sample_pdf(w, bins, n_fine, stratified)  # (R,Sf)
        s2, c2 = field(o[:, None] + t_fine[..., None] * d[:, None])
        t, order = torch.cat([t, t_fine], -1).sort(-1)
        sigma = torch.cat([sigma, s2], -1).gather(1, order)
        rgb = torch.cat([rgb, c2], 1).gather(1, order[..., None].expand(-1, -1, 3))
    colour, acc, depth, _ = composite_samples(sigma * valid[:, None], rgb, t, far)
    return colour, acc, depth


# ------------------------------------------------------------------------ meshes and the image loss
@torch.no_grad()
def lrm_mesh(lrm, planes, res, level, coarse=1):
    """Marching cubes of one object's density (planes (3,C,P,P)) at `level`, its floaters dropped
    (render.drop_floaters) -> v, faces, colours; coarse > 1 reads the grid coarse to fine."""

    def density(p):
        return lrm.field(planes[None], p[None].to(planes.device))[0][0].float().cpu()

    if coarse > 1:
        v, f = render.extract_mesh_coarse(density, res, level, coarse)
    else:
        v, f = render.extract_mesh(density, res, level)
    v, f, _, _ = render.drop_floaters(v, f, v)
    if len(v) == 0:
        return v, f, torch.zeros(0, 3)
    return v, f, lrm.field(planes[None], v[None].to(planes.device))[1][0].float().cpu()


def ssim_loss(x, y, window=7):
    """1 - SSIM with a uniform window, differentiable: the image-level loss (LPIPS stand-in)."""
    C1 = 0.01**2
    C2 = 0.03**2

    def pool(z):
        return F.avg_pool2d(z, window, 1, window // 2, count_include_pad=False)

    mx = pool(x)
    my = pool(y)
    vx = pool(x * x) - mx * mx
    vy = pool(y * y) - my * my
    cov = pool(x * y) - mx * my
    s = ((2 * mx * my + C1) * (2 * cov + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2))
    return 1 - s.mean()


# ==================================================================================================
# Part 5: the classifier
# ==================================================================================================
@dataclass
class ClassifierConfig:
    res: int  # the views it was trained on, pixels (others are resized to it)
    width: int = 32  # channels of the first stage (then 2x, 4x)
    n_categories: int = len(render.CATEGORIES)
    n_colours: int = len(render.COLOURS)


class Classifier(nn.Module):
    """The paper's pretrained perception models in miniature (its DINO-feature filter, its CLIP
    scores): a small CNN, trained on the single views, that names a view's category and its main
    colour. Views (B,3,H,W) in [0,1] on white -> category logits (B,16), colour logits (B,8)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        chans = (3, cfg.width, 2 * cfg.width, 4 * cfg.width)
        layers = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
            layers += [nn.Conv2d(cout, cout, 3, 2, 1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.category = nn.Linear(chans[-1], cfg.n_categories)
        self.colour = nn.Linear(chans[-1], cfg.n_colours)

    def forward(self, views):
        if views.shape[-1] != self.config.res:
            views = F.interpolate(views, size=self.config.res, mode="bilinear", antialias=True)
        h = self.features(views * 2 - 1).mean((2, 3))  # (B,4w)
        return self.category(h), self.colour(h)


def find_classifier(out, preset):
    """Stage 1's classifier (out/1_video), else the shipped one of this preset and world, else
    None: the scores that need it are left out."""
    path = find_weights(out, preset, "classifier")
    if not path.is_file():
        return None
    version = render.load_tensors(path)[1].get("world_version")
    return load_classifier(path) if version == str(render.WORLD_VERSION) else None


def load_classifier(path):
    """A classifier checkpoint -> the model, in eval mode."""
    hint = "python finetune_video.py --phase classifier"
    tensors, config, _ = load_checkpoint(path, "classifier", hint, ClassifierConfig)
    return load_weights(Classifier(config), tensors, path).eval()


@torch.no_grad()
def classify(clf, views):
    """Views (N,3,H,W) in [0,1] -> the classifier's category (N,) and main colour (N,)."""
    out = [clf(chunk.float().cpu()) for chunk in views.split(256)]
    return torch.cat([a.argmax(-1) for a, _ in out]), torch.cat([b.argmax(-1) for _, b in out])


def judge_views(clf, views, captions):
    """The share of views (N,V,3,H,W) or (N,3,H,W) in [0,1] that the classifier gives the category
    and the main colour their captions (N,) name -> dict(category_acc, color_acc)."""
    labels = torch.tensor([render.caption_labels(c) for c in captions])  # (N,2)
    flat = views.flatten(0, 1) if views.dim() == 5 else views
    labels = labels.repeat_interleave(len(flat) // len(captions), 0)  # one row per view
    category, colour = classify(clf, flat)
    hits = dict(category_acc=category == labels[:, 0], color_acc=colour == labels[:, 1])
    return {k: round(hit.float().mean().item(), 4) for k, hit in hits.items()}


# ==================================================================================================
# Part 6: evaluation
# ==================================================================================================
def object_colour(img):
    """Mean colour of an image's object pixels (not near-white), (3,H,W) -> (3,); white if none."""
    m = render.object_mask(img)
    return img[:, m].mean(1) if m.any() else torch.ones(3)


def dominant_colour(img):
    """Index of the palette colour most object pixels match (allowing for shading); -1 if empty."""
    px = img[:, render.object_mask(img)].T  # (N,3) object pixels
    if len(px) == 0:
        return -1
    palette = render.PALETTE
    # the best shading factor for each palette colour, then the colour it leaves closest
    k = ((px @ palette.T) / (palette * palette).sum(-1)).clamp(0.45, 1.1)  # (N,8)
    err = (px[:, None] - k[..., None] * palette).norm(dim=-1)  # (N,8)
    return int(torch.bincount(err.argmin(-1), minlength=8).argmax())


def view_metrics(pred, true):
    """PSNR, SSIM (scikit-image) and colour error of images (N,3,H,W) in [0,1], averaged over N."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    p = pred.clamp(0, 1).double().numpy()
    t = true.clamp(0, 1).double().numpy()
    psnr = [peak_signal_noise_ratio(b, a, data_range=1.0) for a, b in zip(p, t)]
    ssim = [structural_similarity(b, a, data_range=1.0, channel_axis=0) for a, b in zip(p, t)]
    col = [(object_colour(a) - object_colour(b)).abs().mean().item() for a, b in zip(pred, true)]
    psnr = float(np.mean(np.minimum(psnr, 60)))  # identical images would score infinity
    return dict(psnr=psnr, ssim=float(np.mean(ssim)), color_err=float(np.mean(col)))


def chamfer_fscore(pred, gt, tau=0.05):
    """Chamfer-L1 (mean of the two directed mean distances), F-score at tau; points (N,3), (M,3)."""

    def nearest_distances(a, b):
        """For each point of a, the distance to the nearest point of b, 2048 rows at a time."""
        exact = "donot_use_mm_for_euclid_dist"  # the matrix-product shortcut is imprecise near 0
        rows = [torch.cdist(x, b, compute_mode=exact).min(1).values for x in a.split(2048)]
        return torch.cat(rows)

    d_pg = nearest_distances(pred, gt)
    d_gp = nearest_distances(gt, pred)
    prec = (d_pg < tau).float().mean().item()  # the predicted points near the truth
    rec = (d_gp < tau).float().mean().item()  # the true points the prediction reaches
    return (d_pg.mean().item() + d_gp.mean().item()) / 2, 2 * prec * rec / max(prec + rec, 1e-8)


def orbit_rows(name, gen, true, clf=None, captions=None):
    """Generated orbits gen (N,V,3,H,W) in [0,1] against the true ones: PSNR, SSIM, colour error
    (and with a classifier the category and colour accuracy) over views 1..V-1 as row `name`, and
    over the far views alone (render.far_views) as row name + "_far" -> rows."""
    views = true.shape[1]
    rows = {}
    for suffix, ks in (("", list(range(1, views))), ("_far", render.far_views(views))):
        m = view_metrics(gen[:, ks].flatten(0, 1), true[:, ks].flatten(0, 1))
        rows[name + suffix] = {k: round(x, 4) for k, x in m.items()}
        if clf is not None:
            rows[name + suffix] |= judge_views(clf, gen[:, ks], captions)
    return rows


@torch.no_grad()
def evaluate_object(lrm, folder, device, mesh_res, level):
    """One held-out asset, input = view 0 -> dict of the rendered views 1.., the true views, the
    mesh's points (in the world frame) and the true surface points."""
    ob = render.load_object(folder, lrm.config.res)
    c2w, M = canonicalise(ob["c2w"][:1], ob["c2w"][None])  # (1,V,4,4)
    cam = camera_vector(c2w[:, 0], ob["K"][:1]).to(device)
    planes = lrm(ob["images"][:1].to(device), cam)
    K = ob["K"][None, 1:].to(device)
    rgb, _ = lrm.render(planes, c2w[:, 1:].to(device), K, lrm.config.res, None, (32, 32), False)
    v, f, _ = lrm_mesh(lrm, planes[0].float(), mesh_res, level)
    pts, _ = render.sample_mesh(v.cpu(), f.cpu(), 10000)
    world = torch.linalg.inv(M[0])  # canonical frame -> world frame
    pts = pts @ world[:3, :3].T + world[:3, 3]
    surf, _ = render.load_tensors(Path(folder) / "surface.safetensors")
    out = dict(pred=rgb[0].cpu(), views=ob["images"], points=pts, surface=surf["points"])
    return out | dict(prompt=ob["prompt"])


@torch.no_grad()
def evaluate_lrm(lrm, folders, device, mesh_res=64, level=5.0, clf=None):
    """Held-out evaluation of an LRM, input = view 0: PSNR/SSIM/colour of the other views,
    Chamfer-L1 and F-score of the mesh against the true surface, with clf their category_acc and
    color_acc; beside the baselines "copy the input view" and "a sphere of radius 0.5"; over all
    folders, and seen and unseen categories apart -> ({"rows", "splits"}, views (N,V-1,3,H,W))."""
    gen = torch.Generator().manual_seed(0)
    ball = F.normalize(torch.randn(10000, 3, generator=gen), dim=-1) * 0.5  # sphere of radius 0.5
    obs = [evaluate_object(lrm, folder, device, mesh_res, level) for folder in folders]
    geo = {"lrm": [chamfer_fscore(ob["points"], ob["surface"]) for ob in obs]}
    geo["sphere"] = [chamfer_fscore(ball, ob["surface"]) for ob in obs]

    def score(idx):
        """The rows over the objects idx."""
        pred = torch.cat([obs[i]["pred"] for i in idx])
        true = torch.cat([obs[i]["views"][1:] for i in idx])
        copy = torch.cat([obs[i]["views"][:1].expand_as(obs[i]["pred"]) for i in idx])
        rows = {
            "lrm": view_metrics(pred, true),
            "sphere": {},
            "copy_input": view_metrics(copy, true),
        }
        for row, scores in geo.items():
            rows[row]["chamfer_l1"] = float(np.mean([scores[i][0] for i in idx]))
            rows[row]["fscore"] = float(np.mean([scores[i][1] for i in idx]))
        if clf is not None:  # does each view still show the caption's category and colour?
            caps = [obs[i]["prompt"] for i in idx]
            rows["lrm"] |= judge_views(clf, pred.unflatten(0, (len(idx), -1)), caps)
            rows["copy_input"] |= judge_views(clf, copy.unflatten(0, (len(idx), -1)), caps)
        return {name: {k: round(x, 4) for k, x in r.items()} for name, r in rows.items()}

    return render.rows_by_split(folders, score), torch.stack([ob["pred"] for ob in obs])


# ==================================================================================================
# Part 7: training utilities and checkpoints, which you need not read to follow the method
# ==================================================================================================
# ------------------------------------------------------------------------- device, seeds, processes
def setup(cfg):
    """Device, seed, DDP under torchrun -> (device, rank, world)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    found = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    found["cpu"] = True
    if cfg.device in ("", "auto"):  # cuda, then mps, then the cpu
        cfg.device = next(name for name, ok in found.items() if ok)
    if not found.get(cfg.device.split(":")[0]):
        there = " ".join(name for name, ok in found.items() if ok)
        raise render.DataError(f"--device {cfg.device}: not on this machine; it has: {there}")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # an hour's patience: the other ranks wait at the end while rank 0 evaluates and writes
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=1))
    seed_all(cfg.seed)
    keep_freed_memory()
    return device, rank, world


def teardown(world):
    """Under torchrun, every rank waits for rank 0's last writes, then all leave together
    (a gloo rank that destroys its group while another still works can abort at exit)."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def keep_freed_memory():
    """Let glibc keep freed memory, not unmap it: 2x the LRM's speed (docs/log.md)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve every allocation from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed memory


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device, cpu=False):
    """bf16 autocast on CUDA, and on the CPU if `cpu` (worth it only with native bf16)."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    on = kind == "cuda" or (cpu and device.type == "cpu")
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=on)


SEED_STRIDE = 1_000_003  # seed * SEED_STRIDE + step: every step of every run draws its own numbers


def step_seed(seed, step, rank=0, world=1):
    """The RNG seed of one step on one rank: a resumed run repeats an uninterrupted one."""
    return seed * SEED_STRIDE + step * world + rank


# ------------------------------------------------------------------------------------ the optimiser
def learning_rate(step, steps, peak, warmup):
    """Linear warm-up over `warmup` steps, then a cosine from `peak` to 10% of it at `steps`."""
    return peak * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * np.cos(np.pi * step / steps))


def set_learning_rate(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def adam_state(opt):
    """AdamW's moments as flat tensors for a safetensors file: m<i>, v<i> per parameter index."""
    state = opt.state_dict()["state"]
    moments = {f"m{i}": s["exp_avg"] for i, s in state.items()}
    return moments | {f"v{i}": s["exp_avg_sq"] for i, s in state.items()}


def restore_adam_state(opt, tensors, step):
    """The inverse of adam_state: load the moments saved at `step` back into `opt`."""
    n = sum(len(group["params"]) for group in opt.param_groups)
    state = {}
    for i in range(n):
        if f"m{i}" in tensors:
            moments = {"exp_avg": tensors[f"m{i}"], "exp_avg_sq": tensors[f"v{i}"]}
            state[i] = {"step": torch.tensor(float(step))} | moments
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


# -------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, tensors, kind, config, **extra):
    """Tensors + JSON metadata (kind = which stage's model, config = how to rebuild it)."""
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    meta = {"kind": kind, "config": json.dumps(config), "world_version": str(render.WORLD_VERSION)}
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    render.save_tensors(path, tensors, meta)


def load_checkpoint(path, kind, hint, config_class=dict):
    """-> (tensors, config_class(**the metadata's config), metadata). A checkpoint of another kind,
    world or code version, or with NaN or inf weights, is a one-line DataError."""
    if not os.path.isfile(path):
        raise render.DataError(f"{path}: checkpoint missing; run `{hint}` first")
    tensors, meta = render.load_tensors(path)
    found = meta.get("kind", "unknown")
    if found != kind:
        why = f"is a {found!r} checkpoint, expected {kind!r}; pass the right file or run `{hint}`"
        raise render.DataError(f"{path}: {why}")
    if meta.get("world_version") != str(render.WORLD_VERSION):
        why = f"made for world v{meta.get('world_version')}, this code is v{render.WORLD_VERSION}"
        raise render.DataError(f"{path}: {why}; run `{hint}` again")
    try:
        config = config_class(**json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        why = f"{type(e).__name__}: {e}"[:80]
        raise render.DataError(f"{path}: made by another version ({why}); run `{hint}` again")
    if not all(t.isfinite().all() for t in tensors.values() if t.is_floating_point()):
        raise render.DataError(f"{path}: holds NaN or inf weights; run `{hint}` again")
    return tensors, config, meta


def check_finite(loss, step, state):
    """Stop a run whose loss is no longer a number, before any bad weights are saved."""
    if not torch.isfinite(loss):
        stopped = f"the loss is {loss.item()} at step {step}: training stopped"
        advice = "check the data for NaN, or lower the learning rate"
        raise render.DataError(f"{stopped}, the last good state is {state}; {advice}")


def saved_step(meta, path, steps):
    """The step a training state was saved at, which must lie in 0..steps."""
    try:
        step = int(json.loads(meta["step"]))
    except (KeyError, ValueError, TypeError):
        step = -1
    if not 0 <= step <= steps:
        raise render.DataError(f"{path}: not a state of this run; delete it or pass --resume false")
    return step


WEIGHTS = Path(__file__).resolve().parent / "weights"  # the shipped models


def find_weights(out, preset, name):
    """A stage-1 model by name: <out>/1_video/<name>.safetensors where stage 1 made one, else the
    one shipped in weights/ for the preset (which may not exist either)."""
    own = Path(out) / "1_video" / f"{name}.safetensors"
    return own if own.is_file() else WEIGHTS / f"{name}_{preset}.safetensors"


def load_weights(module, tensors, path, prefix=""):
    """Copy tensors into module -> module; mismatched names or shapes are a one-line DataError."""
    own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(own)
    except RuntimeError as e:
        first = (str(e).split("\n")[1:] or [str(e)[:200]])[0].strip()  # the first mismatch
        why = f"does not fit this model ({first}); was it made with another config?"
        raise render.DataError(f"{path}: {why}") from None
    return module
