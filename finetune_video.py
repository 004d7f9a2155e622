"""Stage 1: the video diffusion model, the heart of the data engine (VFusion3D Sec. 3.1).

The paper starts from EMU Video, an image model (Emu) whose spatial layers stayed frozen while
new temporal layers learnt from 34M web videos, and fine-tunes only those temporal layers on
orbit renders of 3D assets. The phases, in that order:
- image: the stand-in for Emu, a text-to-image UNet on the single views (shipped in weights/);
- classifier: the stand-in for the paper's perception models (its DINO filter, its CLIP scores),
  a small CNN naming a view's category and main colour, trained on the same views (shipped);
- pretrain: the video prior, EMU Video's step: zero-initialised temporal layers in the frozen
  image model, trained on web clips (no cameras, no orbits) with frame 0 given clean (shipped);
- video: the paper's step: those temporal layers fine-tuned on the real assets' orbits, every
  other weight frozen, frame 0 given clean (the input view) and frames 1..V-1 denoised;
- eval: orbits of held-out assets from their first view, beside the video prior before its
  fine-tune, the image model frame by frame, a copy of the input view and white.

Reads:  out/0_data/ (stage 0); the image model, classifier, video prior of out/1_video or weights/
Writes: out/1_video/{image_model,video_model,classifier,pretrained_video,*_state}.safetensors (the
        last three if trained here), samples/, eval_grid.png, eval.gif, metrics.json, meta.json
Run:    python finetune_video.py              (tiny: video + eval from the shipped models, 13 min)
        python finetune_video.py --from_image_model   (the ablation: no video prior)
        python finetune_video.py --preset micro --out /tmp/run   (all five phases, a minute)
        python finetune_video.py --phase pretrain  (the prior, 2 h; render.py --n_videos 6000 first)
        python finetune_video.py --phase image      (retrain the stand-in for Emu: 45 min)
        torchrun --nproc_per_node=4 finetune_video.py --preset small --device cuda
"""

import copy
import dataclasses
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import model
import render


# ----------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class Config:
    preset: str = "tiny"  # micro | tiny | small | paper
    out: str = "out"  # root holding the numbered stage folders
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0  # repeatable runs on one machine [0..]
    phase: str = "auto"  # image | classifier | pretrain | video | eval | auto (see phases_to_run)
    resume: bool = True  # continue from the last *_state.safetensors checkpoint if there is one
    # the UNet
    channels: str = "32,64,96"  # UNet channels per resolution level
    attn_res: str = "8"  # resolutions (pixels) with self- and cross-attention
    mv_attn_res: str = "8"  # where temporal attention spans all pixels of all frames ("" = none)
    text_dim: int = 64  # text encoder width [8..]
    # the image model (phase image, the stand-in for Emu): a text-to-image UNet on the single views
    image_model: str = ""  # the image model to start from ("" = out/1_video's, else weights/)
    image_steps: int = 4000  # optimizer steps [1..]
    image_batch: int = 64  # images per step (global, over all ranks) [1..]
    image_lr: float = 5e-4  # peak learning rate [0..]
    image_ema: float = 0.999  # EMA decay of the weights [0..1]
    # the video prior (phase pretrain, EMU Video's step): temporal layers on the web clips
    pretrained: str = ""  # the video prior to start from ("" = out/1_video's, else weights/)
    pretrain_steps: int = 6000  # optimizer steps [1..]
    pretrain_batch: int = 8  # clips per step (global) [1..]
    pretrain_lr: float = 2e-3  # peak learning rate of the temporal layers [0..]
    pretrain_ema: float = 0.999  # EMA decay of the temporal weights [0..1]
    pretrain_holdout: float = 0.05  # share of the clips (the last ones) held out [0..0.5]
    # the 3D fine-tune (phase video, Sec. 3.1): temporal layers on the real assets' orbits
    from_image_model: bool = False  # start from the bare image model, not the prior (ablation)
    video_steps: int = 1000  # optimizer steps [1..]
    video_batch: int = 4  # orbits per step (global) [1..]
    video_lr: float = 2e-3  # peak learning rate of the temporal layers (5e-3 forgets more) [0..]
    video_ema: float = 0.99  # EMA decay of the temporal weights [0..1]
    video_shift: bool = True  # start each training orbit at a random view (cyclic shift: 8x orbits)
    train_spatial: bool = False  # train every UNet weight (what the paper rejects)
    # shared by the training phases
    t_power: float = 0.5  # video phases: noise levels t = u**p (p < 1: more at high noise) [0.01..]
    warmup: int = 100  # linear warm-up steps, then cosine decay to 10% [1..]
    cfg_drop: float = 0.1  # share of captions dropped (classifier-free guidance learns) [0..1]
    ckpt_every: int = 250  # steps between resumable checkpoints [1..]
    # sampling and evaluation
    sample_steps: int = 10  # DDIM steps when sampling [1..]
    guidance: float = 3.0  # classifier-free guidance of the image model's samples [0..]
    video_guidance: float = 1.0  # guidance of the video models (1 = off: frame 0 is enough) [0..]
    temperature: float = 0.2  # orbit sampler's start-noise scale (1 = DDIM; less = plainer) [0..]
    n_eval: int = 50  # held-out assets of each split evaluated by phase eval [1..]
    n_faithful: int = 96  # samples scored for caption faithfulness [1..]
    sample_every: int = 2000  # steps between sample grids in samples/ [1..]
    # the category classifier (phase classifier), the stand-in for the paper's DINO and CLIP
    classifier_steps: int = 3000  # optimizer steps [1..]
    classifier_batch: int = 64  # views per step [1..]
    classifier_lr: float = 2e-3  # peak learning rate (warm-up, then cosine) [0..]
    classifier_width: int = 32  # channels of its first stage (then 2x, 4x) [8..]
    classifier_holdout: float = 0.1  # share of images/ (the last ones) held out [0..0.5]


# Each preset in three parts: the networks, the phases' training, sampling and evaluation.
PRESETS = {
    "micro": dict(channels="16,32", text_dim=32, classifier_width=8)
    | dict(image_steps=40, image_batch=16, pretrain_steps=12, pretrain_batch=2, video_steps=12)
    | dict(video_batch=2, classifier_steps=20, classifier_batch=16, warmup=5, ckpt_every=10)
    | dict(sample_steps=4, n_eval=4, n_faithful=8, sample_every=20),
    "tiny": {},
    "small": dict(channels="64,128,256,256", attn_res="16,8", text_dim=128)
    | dict(image_steps=60000, image_batch=256, pretrain_steps=40000, pretrain_batch=64)
    | dict(video_steps=20000, video_batch=32, ckpt_every=1000)
    | dict(sample_steps=50, n_eval=100),
    "paper": dict(channels="128,256,512,512", attn_res="32,16,8", text_dim=512)
    | dict(image_steps=500000, image_batch=2048, pretrain_steps=200000, pretrain_batch=512)
    | dict(video_steps=100000, video_batch=256, ckpt_every=5000)
    | dict(sample_steps=50, n_eval=1000),
}
HINT_IMAGE = "python finetune_video.py --phase image"
HINT_PRETRAIN = "python finetune_video.py --phase pretrain"
HINT_VIDEO = "python finetune_video.py --phase video"


def ints(s):
    """A comma list flag ("16,8", or "" for none) -> [16, 8]."""
    return [int(v) for v in s.split(",") if v]


# ------------------------------------------------------------------------------------------- data
def load_images(data, res):
    """All single views and their captions -> images (N,3,H,W) in [-1,1], captions list."""
    path = data / "images/captions.txt"
    lines = render.read_text(path).splitlines() if path.is_file() else []
    if not lines:
        raise render.DataError(f"{path}: missing or empty; run `python render.py` first")
    names, caps = zip(*(line.split("\t", 1) for line in lines))
    names = render.progress(names, desc="loading images", leave=False)
    imgs = torch.stack([render.load_png(data / "images" / f"{n}.png", res)[0] for n in names])
    return imgs * 2 - 1, list(caps)


def load_videos(dirs, views, res, cameras=True):
    """Object folders (or web clips: cameras False) -> videos (N,V,3,H,W) in [-1,1], captions."""
    bar = render.progress(dirs, desc="loading videos", leave=False)
    objs = [render.load_object(d, res, views, cameras) for d in bar]
    return torch.stack([o["images"] for o in objs]) * 2 - 1, [o["prompt"] for o in objs]


def folders(root, hint="python render.py"):
    """The complete object folders (or clips) under root, or a one-line error naming `hint`."""
    found = sorted(p.parent for p in Path(root).glob("*/prompt.txt"))
    if not found:
        raise render.DataError(f"{root}: no object folders; run `{hint}` first")
    return found


def batcher(data, ids, batch, frames, shift=False):
    """get_batch(step, rank, world): the same global batch for any number of ranks, this rank's
    share. With shift, each orbit starts at a random view (still a true orbit, seen from there)."""

    def get(step, rank, world):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(len(data), (batch,), generator=g)
        start = torch.randint(frames, (batch,), generator=g) * shift
        mine = slice(rank * batch // world, (rank + 1) * batch // world)
        if frames == 1:
            return data[idx[mine]], ids[idx[mine]]
        x = torch.stack([data[i].roll(-int(s), 0) for i, s in zip(idx[mine], start[mine])])
        return x.flatten(0, 1), ids[idx[mine]]  # (b*V,3,H,W), (b,L)

    return get


# --------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class Stage:
    """Where stage 1 reads and writes, at what size, on which device and rank, since when."""

    data: Path  # out/0_data
    out: Path  # out/1_video
    views: int  # views per orbit
    res: int  # image size, pixels
    device: torch.device
    rank: int  # this process (0 logs and saves)
    world: int  # processes under torchrun
    start: float  # time.time() when stage 1 began


@dataclasses.dataclass
class Run:
    """One training run of the UNet: all of it on single views, or its temporal layers on videos."""

    name: str  # the model it makes: <name>.safetensors, <name>_state.safetensors to resume
    phase: str  # image | pretrain | video: a saved state shares the Config fields of this phase
    trainable: list  # the parameters the optimiser updates (and keeps an EMA of)
    get_batch: Callable  # (step, rank, world) -> x (B*V,3,H,W), ids (B,L): see batcher
    on_sample: Callable  # (step) -> None: a sample grid every cfg.sample_every steps
    steps: int  # optimizer steps
    lr: float  # peak learning rate
    ema: float  # EMA decay of the trainable weights
    frames: int  # frames per sample: 1 for images; videos give frame 0 clean, t = u**cfg.t_power


def training_fields(cfg, phase):
    """The fields of cfg a saved state of this phase must share: all but where it runs, how it
    samples and evaluates, the model paths, and other phases' own fields (named <phase>_...)."""
    not_training = """device resume phase out sample_every ckpt_every n_eval n_faithful temperature
        sample_steps guidance video_guidance image_model pretrained""".split()
    others = tuple(f"{p}_" for p in PHASES if p != phase)  # PHASES: the phase functions, below
    fields = dataclasses.asdict(cfg).items()
    return {k: v for k, v in fields if k not in not_training and not k.startswith(others)}


def resume(path, conf, run, opt, ema):
    """Load a saved state into the weights, their EMA and AdamW -> its step, seconds trained."""
    kind = f"{run.name}_state"
    tensors, saved, meta = model.load_checkpoint(path, kind, "python finetune_video.py")
    if saved != conf:
        raise render.DataError(f"{path}: from another config; delete it or pass --resume false")
    start = model.saved_step(meta, path, run.steps)
    seconds = meta.get("seconds", "0")  # (a state may lack it)
    before = float(seconds) if seconds.isdigit() else 0.0
    with torch.no_grad():
        for i, (p, e) in enumerate(zip(run.trainable, ema)):
            p.copy_(tensors[f"p{i}"])
            e.copy_(tensors[f"ema{i}"])
    if start:
        model.restore_adam_state(opt, tensors, start)
    print(f"resuming {run.name} from step {start}")
    return start, before


def train(cfg, unet, run, stage):
    """AdamW + warm-up/cosine, EMA of the trainable weights, resumable -> seconds trained in all.
    Each step reseeds the RNG from (seed, step, rank): a resumed run repeats one never stopped."""
    opt = torch.optim.AdamW(run.trainable, lr=run.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in run.trainable]
    path = stage.out / f"{run.name}_state.safetensors"
    conf = training_fields(cfg, run.phase)
    start, before = resume(path, conf, run, opt, ema) if cfg.resume and path.is_file() else (0, 0)
    net = torch.nn.parallel.DistributedDataParallel(unet) if stage.world > 1 else unet
    steps = range(start, run.steps)
    bar = render.progress(steps, desc=f"phase {run.phase}", initial=start, total=run.steps)
    bar.disable = stage.rank != 0
    t_power = cfg.t_power if run.frames > 1 else 1.0  # images: noise levels t uniform
    avg = None
    t0 = time.time()
    for step in bar:
        # one optimiser step on this rank's share of the global batch; a share cfg_drop of the
        # captions becomes the empty caption, from which classifier-free guidance learns
        model.seed_all(model.step_seed(cfg.seed, step, stage.rank, stage.world))
        model.set_learning_rate(opt, model.learning_rate(step, run.steps, run.lr, cfg.warmup))
        x, ids = run.get_batch(step, stage.rank, stage.world)  # (B*V,3,H,W), (B,L)
        dropped = torch.rand(ids.shape[0])[:, None] < cfg.cfg_drop
        ids = torch.where(dropped, model.empty_caption(ids), ids).to(stage.device)
        x = x.to(stage.device).contiguous(memory_format=torch.channels_last)
        with model.autocast(stage.device):
            loss = model.v_loss(net, x, ids, run.frames, run.frames > 1, t_power)
        model.check_finite(loss, step, path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.trainable, 1.0)
        opt.step()
        with torch.no_grad():
            for p, e in zip(run.trainable, ema):
                e.lerp_(p, 1 - run.ema)

        # log a running mean of the loss on the bar
        if avg is None:
            avg = loss.item()
        else:
            avg = 0.98 * avg + 0.02 * loss.item()
        speed = (step + 1 - start) * x.shape[0] * stage.world / (time.time() - t0)
        bar.set_postfix(loss=f"{avg:.4f}", img_s=f"{speed:.0f}", refresh=False)

        # checkpoint: the weights, their EMA and AdamW's moments, every ckpt_every steps and last
        if stage.rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == run.steps):
            tensors = {f"p{i}": p for i, p in enumerate(run.trainable)} | model.adam_state(opt)
            tensors |= {f"ema{i}": e for i, e in enumerate(ema)}
            info = dict(step=step + 1, seconds=round(before + time.time() - t0))
            model.save_checkpoint(path, tensors, f"{run.name}_state", conf, **info)

        # samples, every sample_every steps
        if stage.rank == 0 and (step + 1) % cfg.sample_every == 0:
            run.on_sample(step + 1)
    # the EMA weights are the result
    with torch.no_grad():
        for p, e in zip(run.trainable, ema):
            p.copy_(e)
    if stage.world > 1:
        dist.barrier()
    return before + time.time() - t0


# ------------------------------------------------------------------------------------- evaluation
def sample_orbits(cfg, net, captions, firsts, guidance, stage):
    """Orbits (N,V,3,H,W) in [-1,1] from clean first views (N,3,H,W) and their captions, 16 at a
    time: chunk k starts from the noise of seed + k, the same for every model."""
    ids = net.text.tokenize(captions)[0]
    shape = (stage.views, 3, stage.res, stage.res)
    how = dict(steps=cfg.sample_steps, guidance=guidance, temperature=cfg.temperature)
    out = []
    for k, (i, first) in enumerate(zip(ids.split(16), firsts.split(16))):
        noise = torch.randn(len(i), *shape, generator=torch.Generator().manual_seed(cfg.seed + k))
        out.append(model.sample(net, i.to(stage.device), noise, first.to(stage.device), **how))
    return torch.cat(out).cpu()


def save_samples(cfg, unet, videos, captions, stage, name, step):
    """The video phases' on_sample (all but step fixed by partial): orbits from the first views of
    `videos` and their captions, each beside the true one -> samples/<name>_<step>.png."""
    g = sample_orbits(cfg, unet, captions, videos[:, 0], cfg.video_guidance, stage)
    pairs = [torch.cat([a, b], -1).add(1).div(2) for a, b in zip(g, videos)]
    save_grid(stage.out / f"samples/{name}_{step:06d}.png", pairs)


def save_grid(path, rows, scale=3):
    """rows: list of (N,3,H,W) in [0,1], each a row of the grid -> PNG."""
    grid = torch.cat([torch.cat(list(r), -1) for r in rows], -2)
    render.save_png(path, F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0])


def caption_faithfulness(cfg, unet, prompts, device, grid=None, clf=None):
    """Share of samples whose dominant colour is their caption's first (the body's) and, with a
    classifier, whose category is the caption's; the first 32 go to the PNG `grid` -> dict."""
    one = prompts[: cfg.n_faithful]
    imgs = []
    for k, ids in enumerate(unet.text.tokenize(one)[0].split(32)):
        g = torch.Generator().manual_seed(cfg.seed + k)
        noise = torch.randn(len(ids), 1, 3, unet.config.res, unet.config.res, generator=g)
        x = model.sample(unet, ids.to(device), noise, steps=cfg.sample_steps, guidance=cfg.guidance)
        imgs.append((x[:, 0].cpu() + 1) / 2)
    imgs = torch.cat(imgs)  # (N,3,H,W) in [0,1]
    if grid:
        save_grid(grid, [imgs[i : i + 8] for i in range(0, min(len(imgs), 32), 8)])
    hits = [model.dominant_colour(im) == render.caption_labels(p)[1] for im, p in zip(imgs, one)]
    faith = dict(caption_faithfulness=round(sum(hits) / len(hits), 3))
    if clf is None:
        return faith
    return faith | dict(caption_category=model.judge_views(clf, imgs, one)["category_acc"])


# ----------------------------------------------------------------------------------------- phases
def start_path(flag, cfg, name):
    """A model to start from: the flag's file if given, else out/1_video's, else the shipped one."""
    return Path(flag) if flag else model.find_weights(cfg.out, cfg.preset, name)


def phase_image(cfg, stage):
    """The stand-in for Emu: a text-to-image UNet on stage 0's single views."""
    imgs, caps = load_images(stage.data, stage.res)
    vocab = sorted({w for c in caps for w in c.split()})
    conf = model.UNetConfig(vocab, ints(cfg.channels), ints(cfg.attn_res), stage.res, cfg.text_dim)
    unet = model.UNet(conf).to(stage.device).to(memory_format=torch.channels_last)
    ids, _ = unet.text.tokenize(caps)
    prompts = (stage.data / "prompts.txt").read_text().splitlines()

    def on_sample(step):
        """Samples -> samples/image_<step>.png, and their caption faithfulness."""
        grid = stage.out / f"samples/image_{step:06d}.png"
        faith = caption_faithfulness(cfg, unet, prompts, stage.device, grid)
        tqdm.write(f"step {step}: caption faithfulness {faith['caption_faithfulness']:.2f}")

    batches = batcher(imgs, ids, cfg.image_batch, 1)
    how = dict(steps=cfg.image_steps, lr=cfg.image_lr, ema=cfg.image_ema, frames=1)
    run = Run("image_model", "image", list(unet.parameters()), batches, on_sample, **how)
    secs = train(cfg, unet, run, stage)
    if stage.rank == 0:
        grid = stage.out / "samples/image_final.png"
        faith = caption_faithfulness(cfg, unet, prompts, stage.device, grid)["caption_faithfulness"]
        info = dict(steps=cfg.image_steps, seconds=round(secs), caption_faithfulness=faith)
        info |= dict(device=str(stage.device))
        path = stage.out / "image_model.safetensors"
        model.save_checkpoint(path, unet.state_dict(), "image_model", conf, **info)
        print(f"image model: caption faithfulness {faith:.2f}, {secs / 60:.1f} min -> {path}")


def augment(views, gen):
    """Training views (B,3,H,W) in [0,1], each mirrored at random (a mirrored mug is a mug) and
    blurred by a random amount (generated and rendered views are softer than stage 0's)."""
    flip = torch.rand(len(views), generator=gen) < 0.5
    views = torch.where(flip[:, None, None, None], views.flip(-1), views)
    soft = F.avg_pool2d(views, 3, 1, 1, count_include_pad=False)
    return torch.lerp(views, soft, torch.rand(len(views), 1, 1, 1, generator=gen))


def phase_classifier(cfg, stage):
    """The stand-in for the paper's perception models: a classifier of category and main colour,
    trained on the single views but the last tenth, which validates it (also by azimuth)."""
    imgs, caps = load_images(stage.data, stage.res)
    views = (imgs + 1) / 2
    labels = torch.tensor([render.caption_labels(c) for c in caps])  # (N,2): category, colour
    n_val = max(1, int(len(views) * cfg.classifier_holdout))
    conf = model.ClassifierConfig(stage.res, cfg.classifier_width)
    clf = model.Classifier(conf).to(stage.device)
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.classifier_lr, weight_decay=0.05)
    steps = cfg.classifier_steps
    t0 = time.time()
    for step in render.progress(range(steps), desc="phase classifier", disable=stage.rank != 0):
        lr = model.learning_rate(step, steps, cfg.classifier_lr, min(cfg.warmup, steps // 10))
        model.set_learning_rate(opt, lr)
        gen = torch.Generator().manual_seed(model.step_seed(cfg.seed, step))
        idx = torch.randint(len(views) - n_val, (cfg.classifier_batch,), generator=gen)
        category, colour = clf(augment(views[idx], gen).to(stage.device))
        y = labels[idx].to(stage.device)
        loss = F.cross_entropy(category, y[:, 0]) + F.cross_entropy(colour, y[:, 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf = clf.cpu().eval()
    stage0 = render.read_world(cfg.out, cfg.preset)
    scores = validate_classifier(stage0, clf, views[-n_val:], labels[-n_val:], len(views) - n_val)
    if stage.rank == 0:
        info = dict(steps=steps, seconds=round(time.time() - t0), trained_on=len(views) - n_val)
        path = stage.out / "classifier.safetensors"
        model.save_checkpoint(path, clf.state_dict(), "classifier", conf, **info, **scores)
        by = " ".join(f"{k}:{v:.2f}" for k, v in scores["category_acc_by_azimuth"].items())
        print(f"classifier: held-out category {scores['category_acc']:.3f}, colour "
              f"{scores['color_acc']:.3f}; category by azimuth {by} -> {path}")  # fmt: skip


def validate_classifier(stage0, clf, views, labels, first):
    """Held-out views (ids first..), labels -> category, colour accuracy; category by azimuth."""
    category, colour = model.classify(clf, views)
    hit = (category == labels[:, 0]).float()
    # the single views' camera sits at azimuth 0, the object's front at its facing angle
    ids = range(first, first + len(views))
    facing = torch.tensor([render.world_object(stage0, "images", i)["facing"] for i in ids])
    bucket = ((-facing % 360) / 45).round().long() % 8
    by = {f"{45 * int(b)}": round(hit[bucket == b].mean().item(), 3) for b in bucket.unique()}
    colour_hit = (colour == labels[:, 1]).float().mean().item()
    scores = dict(category_acc=round(hit.mean().item(), 4), color_acc=round(colour_hit, 4))
    return scores | dict(category_acc_by_azimuth=by)


def image_with_temporal(cfg, stage):
    """The image model with zero-initialised temporal layers inserted: at first exactly the image
    model frame by frame. out/1_video keeps the image model, for the later stages."""
    src = start_path(cfg.image_model, cfg, "image_model")
    own = stage.out / "image_model.safetensors"
    mv = ints(cfg.mv_attn_res)
    unet, _ = model.load_unet(src, "image_model", HINT_IMAGE, frames=stage.views, mv_attn_res=mv)
    if stage.rank == 0 and src.resolve() != own.resolve():
        render.atomic_write(own, lambda t: shutil.copyfile(src, t))
    return unet


def same_spatial(a, b):
    """Whether two UNets share every spatial and text weight, byte for byte."""
    theirs = b.state_dict()
    mine = {k: v for k, v in a.state_dict().items() if not k.startswith("temporal.")}
    return all(k in theirs and torch.equal(v, theirs[k]) for k, v in mine.items())


def freeze_spatial(unet, train_spatial=False):
    """Sec. 3.1: only the temporal layers train (train_spatial: every weight) -> those weights."""
    for n, p in unet.named_parameters():
        p.requires_grad = train_spatial or n.startswith("temporal.")
    return [p for p in unet.parameters() if p.requires_grad]


@torch.no_grad()
def held_out_loss(unet, clips, ids, frames, seed):
    """The v-loss on held-out clips (frame 0 clean) with and without the temporal layers -> dict."""
    bare = copy.deepcopy(unet)
    bare.temporal = None
    out = {}
    for name, net in (("held_out_loss", unet), ("held_out_loss_image_model", bare)):
        model.seed_all(seed)
        loss = model.v_loss(net.eval(), clips.flatten(0, 1), ids, frames, clean_first=True)
        out[name] = round(loss.item(), 5)
    return out


def phase_pretrain(cfg, stage):
    """The video prior (EMU Video's step): on web clips, which follow no orbit, the temporal layers
    learn how things look as a camera moves; phase video then teaches them the orbit."""
    unet = image_with_temporal(cfg, stage)
    params = freeze_spatial(unet)
    unet = unet.to(stage.device).to(memory_format=torch.channels_last)
    hint = "python render.py --n_videos 6000"
    clips, caps = load_videos(folders(stage.data / "videos", hint), stage.views, stage.res, False)
    ids, _ = unet.text.tokenize(caps)
    n_val = max(1, int(len(clips) * cfg.pretrain_holdout))  # the last clips: held out
    on_sample = partial(save_samples, cfg, unet, clips[-4:], caps[-4:], stage, "pretrain")
    batches = batcher(clips[:-n_val], ids[:-n_val], cfg.pretrain_batch, stage.views)
    how = dict(steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, ema=cfg.pretrain_ema)
    run = Run("pretrained_video", "pretrain", params, batches, on_sample, frames=stage.views, **how)
    secs = train(cfg, unet, run, stage)
    if stage.rank == 0:
        on_sample(cfg.pretrain_steps)
        val = slice(len(clips) - min(n_val, 64), None)  # 64 held-out clips at most
        val_clips = clips[val].to(stage.device)
        scores = held_out_loss(unet, val_clips, ids[val].to(stage.device), stage.views, cfg.seed)
        info = dict(steps=cfg.pretrain_steps, seconds=round(secs), clips=len(clips) - n_val)
        info |= scores
        path = stage.out / "pretrained_video.safetensors"
        model.save_checkpoint(path, unet.state_dict(), "pretrained_video", unet.config, **info)
        base = scores["held_out_loss_image_model"]
        print(f"video prior: held-out loss {scores['held_out_loss']:.4f} (the image model frame")
        print(f"by frame: {base:.4f}), {secs / 60:.1f} min -> {path}")


def starting_model(cfg, stage):
    """Phase video's start: the prior, or with --from_image_model the image model -> UNet, name."""
    image = image_with_temporal(cfg, stage)
    if cfg.from_image_model:
        return image, "image_model"
    path = start_path(cfg.pretrained, cfg, "pretrained_video")
    unet, _ = model.load_unet(path, "pretrained_video", HINT_PRETRAIN)
    if unet.config.frames != stage.views or not same_spatial(image, unet):
        why = f"not a video prior of this image model and {stage.views} frames"
        raise render.DataError(f"{path}: {why}; run `{HINT_PRETRAIN}`, or pass --from_image_model")
    return unet, "pretrained_video"


def phase_video(cfg, stage):
    """Sec. 3.1: the starting model's temporal layers fine-tuned on the real assets' orbits, frame 0
    given clean, every other weight frozen (--train_spatial: all of them, as the paper does not)."""
    unet, start = starting_model(cfg, stage)
    params = freeze_spatial(unet, cfg.train_spatial)
    unet = unet.to(stage.device).to(memory_format=torch.channels_last)
    orbits, caps = load_videos(folders(stage.data / "assets/train"), stage.views, stage.res)
    ids, unknown = unet.text.tokenize(caps)
    if unknown:
        print(f"warning: caption words unknown to the image model map to <unk>: {sorted(unknown)}")
    test, test_caps = load_videos(render.test_folders(stage.data, 2), stage.views, stage.res)
    on_sample = partial(save_samples, cfg, unet, test, test_caps, stage, "video")
    batches = batcher(orbits, ids, cfg.video_batch, stage.views, cfg.video_shift)
    how = dict(steps=cfg.video_steps, lr=cfg.video_lr, ema=cfg.video_ema, frames=stage.views)
    run = Run("video_model", "video", params, batches, on_sample, **how)
    secs = train(cfg, unet, run, stage)
    if stage.rank == 0:
        on_sample(cfg.video_steps)
        path = stage.out / "video_model.safetensors"
        info = dict(steps=cfg.video_steps, seconds=round(secs), start=start)
        model.save_checkpoint(path, unet.state_dict(), "video_model", unet.config, **info)
        which = "all" if cfg.train_spatial else "temporal"
        print(f"video model: {sum(p.numel() for p in params) / 1e6:.2f}M {which} parameters "
              f"trained from the {start}, {secs / 60:.1f} min -> {path}")  # fmt: skip


def eval_models(cfg, stage):
    """The models phase eval compares, each with its guidance: video model, video prior, image."""
    video, _ = model.load_unet(stage.out / "video_model.safetensors", "video_model", HINT_VIDEO)
    image, _ = model.load_unet(stage.out / "image_model.safetensors", "image_model", HINT_IMAGE)
    nets = {"video_model": (video, cfg.video_guidance)}
    path = start_path(cfg.pretrained, cfg, "pretrained_video")
    prior = model.load_unet(path, "pretrained_video", HINT_PRETRAIN)[0] if path.is_file() else None
    if prior is not None and prior.config.frames == stage.views and same_spatial(image, prior):
        nets["pretrained_video"] = (prior, cfg.video_guidance)
    else:
        print(f"note: no video prior of this image model ({path}): its row is left out")
    nets["image_model_per_frame"] = (image, cfg.guidance)
    return {name: (net.to(stage.device).eval(), g) for name, (net, g) in nets.items()}


def phase_eval(cfg, stage):
    """Orbits of held-out assets from (view 0, caption) by eval_models (the same noise), a copy of
    view 0 and white, scored over views 1..V-1 and the far ones -> metrics.json and pictures."""
    if stage.rank != 0:
        return
    nets = eval_models(cfg, stage)
    held_out = render.test_folders(stage.data, cfg.n_eval)  # seen categories, then unseen
    true, caps = load_videos(held_out, stage.views, stage.res)  # (N,V,3,H,W)
    gens = {}
    for name, (net, guidance) in render.progress(nets.items(), desc="phase eval", leave=False):
        gens[name] = sample_orbits(cfg, net, caps, true[:, 0], guidance, stage)
    gens |= dict(copy_input=true[:, :1].expand_as(true), white=torch.ones_like(true))  # baselines
    clf = model.find_classifier(cfg.out, cfg.preset)

    def score(idx):
        """Each method's rows over the held-out objects idx (model.orbit_rows)."""
        rows = {}
        for name, g in gens.items():
            pred = (g[idx] + 1) / 2
            rows |= model.orbit_rows(name, pred, (true[idx] + 1) / 2, clf, [caps[i] for i in idx])
        return rows

    scores = render.rows_by_split(held_out, score)
    prompts = (stage.data / "prompts.txt").read_text().splitlines()
    image = nets["image_model_per_frame"][0]
    faith = caption_faithfulness(cfg, image, prompts, stage.device, clf=clf)
    scores["rows"]["image_model_per_frame"] |= faith
    # the video model's first 8 orbits beside the truth: eval_grid.png (a row each), eval.gif
    pairs = [torch.cat([g, t], -1).add(1).div(2) for g, t in zip(gens["video_model"][:8], true)]
    save_grid(stage.out / "eval_grid.png", pairs)
    frames = torch.stack([torch.cat([p[v] for p in pairs], -2) for v in range(stage.views)])
    render.save_gif(stage.out / "eval.gif", frames.clamp(0, 1), 3, duration=0.25)
    seconds = round(time.time() - stage.start, 1)
    metrics = dict(stage="finetune_video", preset=cfg.preset, seconds=seconds, n_objects=len(true))
    render.save_json(stage.out / "metrics.json", metrics | scores)
    render.print_table(scores["rows"])


# ------------------------------------------------------------------------------------------- main
PHASES = dict(image=phase_image, classifier=phase_classifier, pretrain=phase_pretrain)
PHASES |= dict(video=phase_video, eval=phase_eval)


def for_this_world(path):
    """Whether a model file exists and was made for this code's world."""
    version = render.load_tensors(path)[1].get("world_version") if path.is_file() else None
    return version == str(render.WORLD_VERSION)


def phases_to_run(cfg):
    """--phase auto: image, classifier, pretrain where this world lacks them; then video, eval."""
    if cfg.phase != "auto":
        if cfg.phase not in PHASES:
            raise render.DataError(f"--phase {cfg.phase}: pick auto or one of {', '.join(PHASES)}")
        return [cfg.phase]
    phases = []
    path = start_path(cfg.image_model, cfg, "image_model")
    if not for_this_world(path):
        if path.is_file():
            print(f"note: {path} is for another world; phase image trains one for it first")
        phases.append("image")
    if model.find_classifier(cfg.out, cfg.preset) is None:
        phases.append("classifier")
    prior = for_this_world(start_path(cfg.pretrained, cfg, "pretrained_video"))
    if not cfg.from_image_model and ("image" in phases or not prior):
        phases.append("pretrain")
    return phases + ["video", "eval"]


def main():
    """Stage 1: stage 0's size, then each phase in turn, then meta.json and the run page."""
    cfg = render.parse_config(Config, PRESETS)
    device, rank, world = model.setup(cfg)
    data = Path(cfg.out) / "0_data"
    stage0 = render.read_world(cfg.out, cfg.preset)
    views = stage0.views
    res = stage0.res
    stage = Stage(data, Path(cfg.out) / "1_video", views, res, device, rank, world, time.time())
    (stage.out / "samples").mkdir(parents=True, exist_ok=True)
    phases = phases_to_run(cfg)
    for name in phases:
        PHASES[name](cfg, stage)
    if rank == 0:
        meta = dict(stage="finetune_video", preset=cfg.preset, config=dataclasses.asdict(cfg))
        meta |= dict(views=views, res=res, phases=phases, versions=dict(torch=torch.__version__))
        render.save_json(stage.out / "meta.json", meta | dict(world_version=render.WORLD_VERSION))
        render.write_index(cfg.out)
        minutes = (time.time() - stage.start) / 60
        print(f"stage 1 ({', '.join(phases)}) done in {minutes:.1f} min -> {stage.out}")
        after = "finetune_video.py" if phases == ["pretrain"] else "generate_views.py"
        print(f"next: python {after}")
    model.teardown(world)


if __name__ == "__main__":
    render.run_cli(main)
