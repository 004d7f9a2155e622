"""Stage 3: train the LRM (image -> triplane NeRF) on the synthetic views (VFusion3D Sec. 3.2).

The paper's strategies for imperfect generated views, each behind a flag for the ablation:
multi-stage training (--low_frac: whole views at --low_res first, then --crop crops at full
resolution), an image-level loss (--w_ssim; SSIM stands in for LPIPS, which needs downloaded
weights), an opacity loss against the object mask (--w_mask), noise on the source camera
(--cam_noise), and the pixel loss as an option (--w_pixel, off for synthetic data as in the paper).

Reads:  out/2_views/<id>/ (or any folder of object folders, --data), out/0_data/assets/test_*/
Writes: out/3_lrm/ lrm.safetensors, lrm_state.safetensors, samples/, metrics.json, meta.json
Run:    python train_lrm.py                              (tiny: 3,400 steps, 23.5 min at one thread)
        python train_lrm.py --preset micro --out /tmp/run    (seconds)
        torchrun --nproc_per_node=4 train_lrm.py --preset small --device cuda
"""

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import model
import render


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass
class Config(model.LRMConfig):
    """The network's fields (model.LRMConfig) come first, then the run's."""

    res: int = 0  # input image size, pixels (0 = stage 0's; the planes have it too) [0..]
    plane_skip: int = 16  # channels of a pixel-aligned skip into the planes (0 = the paper's) [0..]
    # the run
    preset: str = "tiny"  # micro | tiny | small | paper
    out: str = "out"  # root holding the numbered stage folders
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0  # repeatable runs on one machine [0..]
    data: str = ""  # folder of object folders ("" = <out>/2_views)
    max_objects: int = 0  # only the first N objects of --data (0 = all; the scaling curve) [0..]
    mix: int = 0  # also train on the first N orbits of <out>/2_views (stage 4 rehearsal) [0..]
    init: str = ""  # checkpoint to start from ("" = random weights)
    stage_dir: str = "3_lrm"  # output folder under --out
    resume: bool = True  # continue from <stage_dir>/lrm_state.safetensors if present
    # training
    steps: int = 3400  # optimizer steps [1..]
    batch: int = 8  # objects per step (global, over all ranks) [1..]
    views: int = 4  # target views per object [1..]
    input_target: bool = True  # the input view is always one of the targets
    random_source: bool = True  # any view of an orbit may be the input (canonicalised)
    lr: float = 2e-3  # peak learning rate (AdamW, betas 0.9/0.95) [0..]
    warmup: int = 100  # linear warm-up steps, then cosine decay to 10% [1..]
    weight_decay: float = 0.05  # AdamW weight decay (not on biases, norms, tokens, pos) [0..]
    low_res: int = 16  # multi-stage: render resolution of the first stage (whole views) [1..]
    low_frac: float = 0.5  # share of the steps in the low-resolution stage (0 = none) [0..1]
    crop: int = 16  # second stage: crop size rendered at full resolution, pixels [1..]
    n_coarse: int = 16  # coarse samples per ray (no gradient: they place the fine ones) [2..]
    n_fine: int = 8  # importance samples per ray [0..]
    stratified: bool = True  # jitter the coarse samples
    bf16: bool = False  # bf16 autocast on the CPU too (1.16x at tiny with native bf16)
    w_pixel: float = 0.0  # pixel MSE weight (the paper drops it for synthetic views) [0..]
    w_ssim: float = 1.0  # image-level (1 - SSIM) loss weight [0..]
    w_mask: float = 1.0  # opacity loss weight (against alpha or the non-white pixels) [0..]
    cam_noise: float = 0.02  # std of the noise added to the 16-number source camera [0..]
    # evaluation and checkpoints
    n_eval: int = 50  # held-out assets evaluated at the end [1..]
    mesh_res: int = 64  # marching-cubes grid for the evaluation meshes [4..]
    mesh_level: float = 5.0  # density level of the mesh surface [0..]
    sample_every: int = 250  # steps between sample renders [1..]
    ckpt_every: int = 100  # steps between resumable checkpoints [1..]


# Each preset in three parts: the network (LRMConfig's fields), the training, the evaluation.
PRESETS = {
    "micro": dict(enc_dim=32, enc_layers=1, dim=32, layers=1, tokens=4, plane_ch=8, hidden=16)
    | dict(steps=6, batch=4, views=2, warmup=2, low_res=8, crop=8, n_coarse=8, n_fine=8)
    | dict(n_eval=2, mesh_res=24, sample_every=3, ckpt_every=2),
    "tiny": {},
    "small": dict(enc_dim=384, enc_layers=8, dim=512, layers=8, heads=8, tokens=16, plane_ch=48)
    | dict(steps=30000, batch=32, low_res=32, crop=32, n_coarse=48, n_fine=48)
    | dict(n_eval=100),
    "paper": dict(patch=8, enc_dim=768, enc_layers=12, dim=1024, layers=16, heads=16, tokens=32)
    | dict(plane_ch=80, plane_skip=0)
    | dict(steps=100000, batch=256, low_res=128, crop=128, n_coarse=64, n_fine=64)
    | dict(n_eval=1000, mesh_res=256),
}

# The sort key of the source view among the others' uniform [0, 1) keys when picking targets.
SOURCE_FIRST = -1  # below every key: the source is always the first target (--input_target)
SOURCE_LAST = 2  # above every key: the source is a target only when every view is


def lrm_config(cfg, res):
    """The LRM's hyperparameters: the Config's own (model.LRMConfig's fields) at the images' size
    res, which every size flag must fit."""
    fits = dict(patch=res % cfg.patch == 0, tokens=res % cfg.tokens == 0)
    fits |= dict(low_res=res % cfg.low_res == 0, crop=cfg.crop <= res, res=cfg.res in (0, res))
    fits["token_init"] = cfg.token_init in ("image", "learned")
    for flag, ok in fits.items():
        if not ok:
            raise render.DataError(f"--{flag} {getattr(cfg, flag)}: does not fit {res}px images")
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(model.LRMConfig)}
    return model.LRMConfig(**fields | dict(res=res))


def resume_key(cfg):
    """The Config fields a saved state must share with this run to resume it (the training's)."""
    ignored = ("device", "resume", "n_eval", "sample_every", "ckpt_every", "mesh_res", "mesh_level")
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignored}


@dataclasses.dataclass
class Job:
    """Where one training run writes, and on which of the processes it is."""

    stage: str  # train_lrm | finetune_3d: names the checkpoint kinds and the messages
    out: Path  # the stage folder
    data: Path  # the training objects' folder
    device: torch.device  # where the LRM trains
    rank: int  # this process (rank 0 writes the files)
    world: int  # processes in all (torchrun)


def check_data(folder, preset, hint, required):
    """A data folder's meta.json (its own, or stage 0's for assets/train) must match the preset; a
    folder of the user's own (--data) may have none."""
    found = [c for c in (folder, folder.parent.parent) if (c / "meta.json").is_file()]
    if not found and not required:
        return
    render.read_stage(found[0] if found else folder, preset, hint)


def load_set(folder, res, hint, limit=None, dirs=None):
    """Every object folder under `folder` (or the list dirs) -> dict of tensors: images
    (N,V,3,H,W) in [0,1] on white, masks (N,V,1,H,W) (alpha where known, else the non-white
    pixels), c2w (N,V,4,4), K (N,V,3,3), and the folders (dirs)."""
    dirs = dirs or render.object_folders(folder, limit)
    if not dirs:
        raise render.DataError(f"{folder}: no object folders (000.png, ...); run `{hint}` first")
    bar = render.progress(dirs, desc=f"loading {folder}", leave=False)
    objs = [render.load_object(d, res) for d in bar]
    views = {len(o["images"]) for o in objs}
    if len(views) != 1:
        raise render.DataError(f"{folder}: objects of different view counts {sorted(views)}")
    for o in objs:
        if o["masks"] is None:
            # no alpha channel: the non-white pixels
            o["masks"] = render.object_mask(o["images"])[:, None].float()  # (V,1,H,W)
    stacked = {k: torch.stack([o[k] for o in objs]) for k in ("images", "masks", "c2w", "K")}
    return stacked | {"dirs": dirs}


def crop_views(x, top, left, size):
    """One size x size crop per view: x (B,T,C,H,W), top and left (B*T,) -> (B,T,C,size,size)."""
    B, T = x.shape[:2]
    rows = (top[:, None] + torch.arange(size))[:, :, None]  # (B*T,size,1)
    cols = (left[:, None] + torch.arange(size))[:, None, :]  # (B*T,1,size)
    picked = x.flatten(0, 1)[torch.arange(B * T)[:, None, None], :, rows, cols]  # (B*T,s,s,C)
    return picked.permute(0, 3, 1, 2).unflatten(0, (B, T))


def make_batch(cfg, data, step, res):
    """The global batch of step `step` (same for any number of ranks): inputs, canonical cameras,
    targets (whole views at low resolution in the first stage, random crops later)."""
    g = torch.Generator().manual_seed(model.step_seed(cfg.seed, step))
    N, V = data["images"].shape[:2]
    B = cfg.batch  # objects
    T = min(cfg.views, V)  # target views per object
    idx = torch.randint(N, (B,), generator=g)
    src = torch.randint(V, (B,), generator=g) if cfg.random_source else torch.zeros(B).long()
    key = SOURCE_FIRST if cfg.input_target else SOURCE_LAST
    order = torch.rand(B, V, generator=g).masked_fill(F.one_hot(src, V).bool(), key).argsort(1)
    tgt = order[:, :T]  # (B,T)
    c2w, _ = model.canonicalise(data["c2w"][idx, src], data["c2w"][idx[:, None], tgt])  # (B,T,4,4)
    K = data["K"][idx[:, None], tgt]
    cam = model.camera_vector(model.CANONICAL.expand(B, 4, 4), data["K"][idx, src])
    cam = cam + cfg.cam_noise * torch.randn(B, 16, generator=g)
    img = data["images"][idx[:, None], tgt]  # (B,T,3,H,W)
    mask = data["masks"][idx[:, None], tgt]  # (B,T,1,H,W)
    if step < cfg.low_frac * cfg.steps:
        # stage 1: whole views, rendered at low resolution
        f = res // cfg.low_res
        img = F.avg_pool2d(img.flatten(0, 1), f).unflatten(0, (B, T))
        mask = F.avg_pool2d(mask.flatten(0, 1), f).unflatten(0, (B, T))
        crop = None
        res = cfg.low_res
    else:
        # stage 2: random crops at full resolution
        top, left = torch.randint(res - cfg.crop + 1, (2, B * T), generator=g)
        img = crop_views(img, top, left, cfg.crop)
        mask = crop_views(mask, top, left, cfg.crop)
        crop = (top, left, cfg.crop)
    src_img = data["images"][idx, src]  # (B,3,H,W)
    return dict(src=src_img, cam=cam, c2w=c2w, K=K, target=img, mask=mask, crop=crop, res=res)


def shard(batch, rank, world):
    """This rank's slice of the global batch."""
    n = batch["src"].shape[0]
    sl = slice(rank * n // world, (rank + 1) * n // world)
    out = {k: (v[sl] if torch.is_tensor(v) else v) for k, v in batch.items()}
    if batch["crop"] is not None:
        t = batch["c2w"].shape[1]
        top, left, size = batch["crop"]
        out["crop"] = (top[sl.start * t : sl.stop * t], left[sl.start * t : sl.stop * t], size)
    return out


def build(cfg, job, hint, config):
    """The training set (checked against the preset), the held-out test assets, and the LRM of
    config: fresh, or with the weights of the --init checkpoint."""
    res = config.res
    check_data(job.data, cfg.preset, hint, required=not cfg.data)
    data = load_set(job.data, res, hint, cfg.max_objects or None)
    if cfg.mix:
        # rehearsal: synthetic orbits of every category beside the real assets of a few
        more = load_set(Path(cfg.out) / "2_views", res, "python generate_views.py", cfg.mix)
        for k in data:
            data[k] = data[k] + more[k] if k == "dirs" else torch.cat([data[k], more[k]])
    held_out = render.test_folders(Path(cfg.out) / "0_data", cfg.n_eval)  # seen, then unseen
    test = load_set(Path(cfg.out) / "0_data/assets", res, "python render.py", dirs=held_out)
    lrm = model.LRM(config)
    if cfg.init:
        init, _ = model.load_lrm(cfg.init, "python train_lrm.py")
        if init.config != config:
            there = dataclasses.asdict(init.config)
            here = dataclasses.asdict(config)
            changed = [k for k in here if there[k] != here[k]]
            diff = ", ".join(f"{k} {there[k]} there, {here[k]} here" for k in changed)
            raise render.DataError(f"{cfg.init}: an LRM of another config ({diff}); pass its flags")
        lrm.load_state_dict(init.state_dict())
    return data, test, lrm.to(job.device).train()


def make_optimizer(cfg, lrm):
    """AdamW, weight decay on weight matrices and the cls token (not biases, norms, tokens, pos)."""
    decay = []
    nodecay = []
    for name, p in lrm.named_parameters():
        matrix = p.ndim >= 2 and "tokens" not in name and "pos" not in name
        (decay if matrix else nodecay).append(p)
    wd = cfg.weight_decay
    groups = [{"params": decay, "weight_decay": wd}, {"params": nodecay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def resume(cfg, job, lrm, opt):
    """If --resume, load lrm_state.safetensors (weights, AdamW's moments) -> first step, losses."""
    path = job.out / "lrm_state.safetensors"
    if not (cfg.resume and path.is_file()):
        return 0, []
    kind = job.stage + "_state"
    tensors, saved, meta = model.load_checkpoint(path, kind, f"python {job.stage}.py")
    if saved != resume_key(cfg):
        raise render.DataError(f"{path}: from another config; delete it or pass --resume false")
    start = model.saved_step(meta, path, cfg.steps)
    try:
        losses = list(json.loads(meta.get("losses", "[]")))
    except (ValueError, TypeError):
        raise render.DataError(f"{path}: damaged; delete it or pass --resume false") from None
    model.load_weights(lrm, tensors, path, prefix="w.")
    model.restore_adam_state(opt, tensors, start)
    print(f"resuming {job.stage} from step {start}")
    return start, losses


# ----------------------------------------------------------------------------- loop
def loss_fn(cfg, lrm, b, device):
    """Pixel + image-level (SSIM) + opacity losses on the rendered targets -> total, parts."""
    inputs = [b[k].to(device) for k in ("src", "cam", "c2w", "K")]
    samples = (cfg.n_coarse, cfg.n_fine)
    rgb, acc = lrm(*inputs, b["res"], b["crop"], samples=samples, stratified=cfg.stratified)
    target = b["target"].to(device)  # (B,T,3,h,w), as rgb
    mask = b["mask"].to(device)  # (B,T,1,h,w), as acc, the opacity
    pixel = F.mse_loss(rgb, target)
    ssim = model.ssim_loss(rgb.flatten(0, 1), target.flatten(0, 1))
    opacity = F.mse_loss(acc, mask)
    total = cfg.w_pixel * pixel + cfg.w_ssim * ssim + cfg.w_mask * opacity
    return total, {"pixel": pixel, "ssim": ssim, "mask": opacity}


@torch.no_grad()
def save_samples(path, lrm, test, device, n=4):
    """Grid: per held-out object, the input view | rendered orbit | true orbit."""
    rows = []
    res = test["images"].shape[-1]
    for i in range(min(n, len(test["images"]))):
        c2w, _ = model.canonicalise(test["c2w"][i, :1], test["c2w"][i][None])
        cam = model.camera_vector(c2w[:, 0], test["K"][i, :1]).to(device)
        img = test["images"][i, :1].to(device)
        K = test["K"][i][None].to(device)
        rgb, _ = lrm(img, cam, c2w.to(device), K, res, stratified=False)
        orbit = torch.cat(list(rgb[0].float().cpu()), -1)
        truth = torch.cat(list(test["images"][i]), -1)
        rows.append(torch.cat([test["images"][i, 0], orbit, truth], -1))
    grid = torch.cat(rows, -2)[None]
    render.save_png(path, F.interpolate(grid, scale_factor=3, mode="nearest")[0])


def train(cfg, job, lrm, opt, data, test, start, losses):
    """Steps start..cfg.steps (appending to `losses`), state and samples now and then -> seconds."""
    net = torch.nn.parallel.DistributedDataParallel(lrm) if job.world > 1 else lrm
    if job.rank == 0:
        (job.out / "samples").mkdir(parents=True, exist_ok=True)
        objects = f"{len(data['images'])} objects from {job.data}"
        millions = sum(p.numel() for p in lrm.parameters()) / 1e6
        print(f"{job.stage}: {objects}, LRM {millions:.2f}M parameters, {cfg.steps} steps")
    steps = range(start, cfg.steps)
    quiet = job.rank != 0  # one progress bar: rank 0's
    bar = render.progress(steps, desc=job.stage, initial=start, total=cfg.steps, disable=quiet)
    state = job.out / "lrm_state.safetensors"  # what resume() reads
    t0 = time.time()
    avg = None
    for step in bar:
        # one optimiser step on this rank's share of the global batch
        model.seed_all(model.step_seed(cfg.seed, step, job.rank, job.world))
        model.set_learning_rate(opt, model.learning_rate(step, cfg.steps, cfg.lr, cfg.warmup))
        b = shard(make_batch(cfg, data, step, lrm.config.res), job.rank, job.world)
        with model.autocast(job.device, cfg.bf16):
            loss, parts = loss_fn(cfg, net, b, job.device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(lrm.parameters()), 1.0)
        opt.step()

        # log the loss, averaged over the ranks, and its running mean on the bar
        shown = loss.detach().clone()
        if job.world > 1:
            dist.all_reduce(shown, op=dist.ReduceOp.AVG)
        model.check_finite(shown, step, state)
        losses.append(round(shown.item(), 6))
        if avg is None:
            avg = shown.item()
        else:
            avg = 0.95 * avg + 0.05 * shown.item()
        speed = (step + 1 - start) * cfg.batch / (time.time() - t0)
        ssim = 1 - parts["ssim"].item()
        bar.set_postfix(loss=f"{avg:.4f}", ssim=f"{ssim:.3f}", obj_s=f"{speed:.1f}", refresh=False)

        # checkpoint: weights, AdamW's moments and the losses, every ckpt_every steps and at the end
        if job.rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
            tensors = {"w." + k: v for k, v in lrm.state_dict().items()} | model.adam_state(opt)
            meta = dict(step=step + 1, losses=losses)
            model.save_checkpoint(state, tensors, job.stage + "_state", resume_key(cfg), **meta)

        # samples: renders of held-out objects, every sample_every steps
        if job.rank == 0 and (step + 1) % cfg.sample_every == 0:
            lrm.eval()
            save_samples(job.out / f"samples/step_{step + 1:06d}.png", lrm, test, job.device)
            lrm.train()
    return time.time() - t0


def finish(cfg, job, lrm, data, test, seconds):
    """Rank 0: the final LRM and samples, its evaluation (metrics.json), meta.json."""
    lrm.eval()
    info = dict(stage=job.stage, steps=cfg.steps, data=str(job.data), n_objects=len(data["images"]))
    model.save_checkpoint(job.out / "lrm.safetensors", lrm.state_dict(), "lrm", lrm.config, **info)
    save_samples(job.out / "samples/final.png", lrm, test, job.device)
    clf = model.find_classifier(cfg.out, cfg.preset)
    scores, _ = model.evaluate_lrm(lrm, test["dirs"], job.device, cfg.mesh_res, cfg.mesh_level, clf)
    head = dict(stage=job.stage, preset=cfg.preset)
    sizes = dict(n_objects=len(test["dirs"]), train_objects=len(data["images"]), steps=cfg.steps)
    metrics = head | dict(seconds=round(seconds, 1)) | sizes | scores
    render.save_json(job.out / "metrics.json", metrics)
    made = dict(config=dataclasses.asdict(cfg), res=lrm.config.res)
    versions = dict(versions=dict(torch=torch.__version__), world_version=render.WORLD_VERSION)
    render.save_json(job.out / "meta.json", head | made | versions)
    render.write_index(cfg.out)
    render.print_table(scores["rows"])


def run(cfg, stage="train_lrm", hint="python generate_views.py"):
    """Train (or fine-tune) an LRM as cfg says: build (data, model), optimiser, loop, finish."""
    if not cfg.stage_dir or Path(cfg.stage_dir).is_absolute() or ".." in Path(cfg.stage_dir).parts:
        raise render.DataError(f"--stage_dir {cfg.stage_dir!r}: give a folder inside --out")
    if cfg.mix and stage == "train_lrm":
        raise render.DataError("--mix is finetune_3d.py's: stage 3 already trains on 2_views")
    config = lrm_config(cfg, render.read_world(cfg.out, cfg.preset).res)  # the flags checked
    device, rank, world = model.setup(cfg)
    data_dir = Path(cfg.data or Path(cfg.out) / "2_views")
    job = Job(stage, Path(cfg.out) / cfg.stage_dir, data_dir, device, rank, world)
    with render.locked(job.out, rank):
        data, test, lrm = build(cfg, job, hint, config)
        opt = make_optimizer(cfg, lrm)
        start, losses = resume(cfg, job, lrm, opt)
        seconds = train(cfg, job, lrm, opt, data, test, start, losses)
        if rank == 0:
            finish(cfg, job, lrm, data, test, seconds)
            done = cfg.steps - start
            speed = f"{done * cfg.batch / seconds:.1f} objects/s"
            print(f"{stage} done: {done} steps in {seconds / 60:.1f} min ({speed}) -> {job.out}")
    model.teardown(world)
    return job.out


if __name__ == "__main__":
    render.run_cli(lambda: run(render.parse_config(Config, PRESETS)))
