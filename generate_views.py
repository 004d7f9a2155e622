"""Stage 2: the data engine (VFusion3D Sec. 3.1-3.2). Prompts -> first frame (the stage-1 image
model, text-to-image) -> orbit video (the stage-1 video model, image + text to video) -> one object
folder per prompt, in exactly the format of the real assets, so train_lrm.py reads both with one
loader. Images can be prompts too (--images DIR): they become the first frames.

The filter stands in for the paper's DINO-feature classifier: it rejects orbits whose views are
almost all background, flooded with colour, whose object area jumps between neighbouring views, or
whose object colour drifts away from the first frame's, and, with stage 1's category classifier,
orbits whose views stop showing the prompt's category or main colour (--no_filter: off).

Reads:  out/0_data/prompts.txt (or --prompts FILE, or --images DIR), out/1_video/*.safetensors
Writes: out/2_views/<id>/ (000.png.., cameras.safetensors, prompt.txt), <id>.rejected markers,
        meta.json (counts, settings, time, filter statistics), metrics.json, preview.png
Run:    python generate_views.py           (tiny: 1000 prompts, 11.6 min at one thread)
        python generate_views.py --preset micro --out /tmp/run
        torchrun --nproc_per_node=4 generate_views.py --preset small --device cuda
        (ranks split the prompts; put `--` before the script's flags to pass --num, which
        torchrun takes for its own --numa-binding)
"""

import dataclasses
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import model
import render


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    preset: str = "tiny"  # micro | tiny | small | paper
    out: str = "out"  # root holding the numbered stage folders
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0  # repeatable runs on one machine [0..]
    prompts: str = ""  # text prompts, one a line ("" = <out>/0_data/prompts.txt)
    video_model: str = ""  # stage-1 video model ("" = <out>/1_video's; weights/ has a shipped one)
    image_model: str = ""  # its image model ("" = <out>/1_video's, else the shipped one)
    images: str = ""  # folder of PNG/JPG images used as first frames instead (+ captions.txt)
    num: int = 1000  # prompts to turn into orbits (the first `num` of the file) [1..]
    batch: int = 25  # orbits generated together [1..]
    steps: int = 8  # DDIM steps of both samplers [1..]
    guidance: float = 3.0  # classifier-free guidance of the text-to-image first frame [0..]
    video_guidance: float = 1.0  # guidance of the orbit (1 = off, half the cost) [0..]
    temperature: float = 0.2  # orbit sampler's start-noise scale (1 = DDIM) [0..]
    filter: bool = True  # reject bad orbits (--no_filter keeps everything)
    min_area: float = 0.01  # filter: smallest object share of any view [0..1]
    max_area: float = 0.75  # filter: largest object share of any view [0..1]
    max_jump: float = 0.6  # filter: largest relative change of area between neighbours [0..]
    max_drift: float = 0.25  # filter: largest mean-colour distance from the first frame [0..]
    min_category: float = 0.5  # filter: least share of views showing the prompt's category [0..1]
    min_color: float = 0.5  # filter: the same for its main colour (needs the classifier) [0..1]
    n_eval: int = 50  # held-out assets whose (view 0, caption) orbits are scored [1..]


PRESETS = {
    # micro models draw noise: keep it all
    "micro": dict(num=8, batch=4, steps=3, n_eval=2, filter=False),
    "tiny": {},
    "small": dict(num=50000, batch=256, steps=25, n_eval=100),
    "paper": dict(num=4000000, batch=1024, steps=50, n_eval=1000),
}

# what judge() can return
REASONS = "empty_view flooded_view area_jump colour_drift wrong_category wrong_colour".split()


# ----------------------------------------------------------------------------- data
MAX_CAPTION = 300  # characters of a caption kept (the text encoder reads 31 words)


def read_prompts(cfg, data, res):
    """-> list of (id, caption, first frame (3,H,W) in [0,1] or None): the prompts file's lines,
    or with --images its images (read_images)."""
    if cfg.images:
        return read_images(cfg, Path(cfg.images), res)
    path = Path(cfg.prompts or data / "prompts.txt")
    if not path.is_file():
        raise render.DataError(f"{path}: no such prompts file; pass --prompts FILE")
    lines = [line.strip() for line in render.read_text(path, "user").splitlines() if line.strip()]
    if not lines:
        raise render.DataError(f"{path}: no prompts in it; write one caption a line")
    if any(len(line) > MAX_CAPTION for line in lines):
        print(f"warning: {path}: prompts past {MAX_CAPTION} characters are cut there")
    return [(f"{i:05d}", c[:MAX_CAPTION], None) for i, c in enumerate(lines[: cfg.num])]


def read_images(cfg, folder, res):
    """--images DIR: each image a first frame, named by its file (made safe and unique), captioned
    by captions.txt beside them; an image that cannot be used is skipped with a line."""
    if not folder.is_dir():
        raise render.DataError(f"{folder}: not a folder of images; pass --images DIR")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise render.DataError(f"{folder}: holds no .png/.jpg images")
    captions = read_captions(folder / "captions.txt")
    items = []
    for path in files[: cfg.num]:
        try:
            frame = load_first_frame(path, res)
        except render.DataError as e:
            print(f"skipped {e}")
            continue
        name = render.safe_name(path.stem, [name for name, _, _ in items])
        items.append((name, captions.get(path.stem, "")[:MAX_CAPTION], frame))
    if not items:
        raise render.DataError(f"{folder}: none of its images could be used (see above)")
    return items


def read_captions(path):
    """captions.txt beside the images, `<image name>\\t<caption>` a line -> {name: caption}."""
    if not path.is_file():
        return {}
    lines = render.read_text(path, "user").splitlines()
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


def load_first_frame(path, res):
    """Any image -> (3,res,res) in [0,1]: RGBA composited on white, other sizes resized (with a
    warning)."""
    rgb, _ = render.load_png(path, made_by="user")
    if rgb.shape[-1] != res or rgb.shape[-2] != res:
        print(f"warning: {path} is {rgb.shape[-1]}x{rgb.shape[-2]}, resized to {res}x{res}")
        rgb = F.interpolate(rgb[None], size=(res, res), mode="area")[0]
    return rgb


@dataclass
class Engine:
    """What load() reads: the stage folders, the orbit's size, both stage-1 models, the prompts."""

    data: Path  # out/0_data
    out: Path  # out/2_views
    views: int  # views per orbit (stage 0's)
    res: int  # image size, pixels (stage 0's)
    image_unet: torch.nn.Module  # the stage-1 image model: caption -> first frame
    video_unet: torch.nn.Module  # the stage-1 video model: first frame + caption -> orbit
    items: list  # read_prompts(): (id, caption, first frame or None)
    clf: torch.nn.Module | None  # the category classifier (stage 1's or the shipped one)


def stage1_models(cfg):
    """The paths of the two stage-1 models: --video_model, else out/1_video's (whose meta.json must
    be of this preset); --image_model, else out/1_video's, else the shipped one."""
    own = Path(cfg.out) / "1_video"
    video = Path(cfg.video_model) if cfg.video_model else own / "video_model.safetensors"
    if not video.is_file():
        shipped = f"weights/video_model_{cfg.preset}.safetensors"
        raise render.DataError(
            f"{video}: missing; run `python finetune_video.py` first, "
            f"or pass --video_model {shipped} to start from the shipped one"
        )
    if not cfg.video_model:
        render.read_stage(own, cfg.preset, "python finetune_video.py")
    image = Path(cfg.image_model or model.find_weights(cfg.out, cfg.preset, "image_model"))
    return image, video


def load(cfg, device, rank):
    """Stage 0's meta (the same preset, the orbit's size), the two models, the prompts."""
    data = Path(cfg.out) / "0_data"
    stage0 = render.read_world(cfg.out, cfg.preset)
    views = stage0.views  # the orbit's size
    res = stage0.res
    hint = "python finetune_video.py" + (f" --preset {cfg.preset}" if cfg.preset != "tiny" else "")
    image_path, path = stage1_models(cfg)
    image_unet = model.load_unet(image_path, "image_model", hint)[0].to(device).eval()
    video_unet = model.load_unet(path, "video_model", hint)[0].to(device).eval()
    if video_unet.config.res != res or video_unet.config.frames != views:
        raise render.DataError(
            f"{path}: made for {video_unet.config.frames} views of {video_unet.config.res} px, "
            f"stage 0 has {views} of {res}; rerun `{hint}`"
        )
    items = read_prompts(cfg, data, res)
    unknown = set().union(*(video_unet.text.tokenize([c])[1] for _, c, _ in items[:2000]))
    if unknown and rank == 0:
        words = ", ".join(sorted(unknown)[:8])
        print(f"warning: words the text encoder has never seen map to <unk>: {words}")
    clf = model.find_classifier(cfg.out, cfg.preset)
    if clf is None and rank == 0:
        print("note: no classifier (finetune_video.py --phase classifier): no category checks")
    return Engine(data, Path(cfg.out) / "2_views", views, res, image_unet, video_unet, items, clf)


# ----------------------------------------------------------------------------- the filter
def judge(views, cfg, clf=None, caption=""):
    """views (V,3,H,W) in [0,1] of a caption -> None if kept, else the reason for rejecting the
    orbit. With the classifier clf, the views must go on showing what the caption names."""
    mask = render.object_mask(views)  # (V,H,W) object pixels
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
    if clf is None:
        return None
    named = render.caption_labels(caption)  # -1: the caption names no category (or colour)
    seen = model.judge_views(clf, views[None], [caption])
    if named[0] >= 0 and seen["category_acc"] < cfg.min_category:
        return "wrong_category"
    if named[1] >= 0 and seen["color_acc"] < cfg.min_color:
        return "wrong_colour"
    return None


# ----------------------------------------------------------------------------- generation
def prompt_noise(seed, names, frames, res):
    """Each prompt's starting noise comes from its own name (seed * SEED_STRIDE + crc32(name)), so
    an orbit does not depend on its batch, its rank or a resume -> (B,frames,3,res,res)."""
    noise = []
    for name in names:
        g = torch.Generator().manual_seed(seed * model.SEED_STRIDE + zlib.crc32(name.encode()))
        noise.append(torch.randn(frames, 3, res, res, generator=g))
    return torch.stack(noise)


@torch.no_grad()
def generate(cfg, image_unet, video_unet, names, captions, firsts, device):
    """Captions (+ optional first frames in [0,1]) -> orbits (B,V,3,H,W) in [0,1], V and the size
    those of the video model."""
    views = video_unet.config.frames
    res = video_unet.config.res
    ids, _ = video_unet.text.tokenize(captions)
    ids = ids.to(device)
    # one frame of noise for the first frame, V for the orbit (its frame 0 becomes the first frame)
    noise = prompt_noise(cfg.seed, names, views + 1, res)  # (B,1+V,3,H,W)
    if firsts is None:
        # text -> first frame (factorised generation)
        first = model.sample(image_unet, ids, noise[:, :1], steps=cfg.steps, guidance=cfg.guidance)
        firsts = (first[:, 0].cpu() + 1) / 2
    how = dict(steps=cfg.steps, guidance=cfg.video_guidance, temperature=cfg.temperature)
    orbit = model.sample(video_unet, ids, noise[:, 1:], (firsts * 2 - 1).to(device), **how)
    return ((orbit.cpu() + 1) / 2).clamp(0, 1)


def done(out, name, views):
    """Is this prompt done? Yes when its folder is complete (the last view and prompt.txt are
    there) or when a <name>.rejected marker says the filter dropped it. A restarted run (after a
    kill, or with a larger --num) generates only the prompts that are not done."""
    folder = out / name
    complete = (folder / f"{views - 1:03d}.png").is_file() and (folder / "prompt.txt").is_file()
    return complete or (out / f"{name}.rejected").is_file()


def check_outputs(out, items):
    """A rerun may add to 2_views, never pass off another run's orbits as its own: every finished
    orbit and rejected marker there must be of this run's prompt of the same id."""
    captions = {name: caption for name, caption, _ in items}
    made = {f.name: render.read_text(f / "prompt.txt") for f in render.object_folders(out)}
    marks = {m.stem: m.read_text(errors="replace").split("\n") for m in out.glob("*.rejected")}
    made |= {name: (lines + [""])[1] for name, lines in marks.items()}
    stale = sorted(name for name, caption in made.items() if captions.get(name) != caption.strip())
    if stale:
        raise render.DataError(
            f"{out}: holds orbits of other prompts ({stale[0]} and {len(stale) - 1} more); "
            "delete it or pick another --out"
        )


def run_engine(cfg, engine, device, rank, world):
    """This rank's share of the prompts that are not done -> orbits, each kept as an object folder
    or rejected by the filter with a <id>.rejected marker naming the reason -> (orbits made,
    seconds)."""
    out = engine.out
    out.mkdir(parents=True, exist_ok=True)
    todo = [it for k, it in enumerate(engine.items) if k % world == rank]
    todo = [it for it in todo if not done(out, it[0], engine.views)]
    c2w, K = render.orbit(engine.views)
    t0 = time.time()
    made = 0
    desc = f"stage 2 rank {rank}" if world > 1 else "stage 2"
    bar = render.progress(total=len(todo), desc=desc, unit="orbit", disable=rank != 0 and world > 1)
    for start in range(0, len(todo), cfg.batch):
        chunk = todo[start : start + cfg.batch]
        names = [i for i, _, _ in chunk]
        captions = [c for _, c, _ in chunk]
        firsts = torch.stack([f for _, _, f in chunk]) if cfg.images else None
        orbits = generate(
            cfg, engine.image_unet, engine.video_unet, names, captions, firsts, device
        )
        for (i, caption, _), orbit in zip(chunk, orbits):
            reason = judge(orbit, cfg, engine.clf, caption) if cfg.filter else None
            if reason is None:
                render.write_object(out / i, orbit, c2w, K, caption)
            else:
                marker = f"{reason}\n{caption}\n"  # why, and of which prompt
                render.atomic_write(out / f"{i}.rejected", lambda t: t.write_text(marker))
        made += len(chunk)
        bar.update(len(chunk))
        bar.set_postfix(orbits_per_min=f"{made / (time.time() - t0) * 60:.0f}", refresh=False)
    bar.close()
    return made, time.time() - t0


# ----------------------------------------------------------------------------- evaluation
def evaluate(cfg, engine, device):
    """The engine on held-out assets: orbits from (true view 0, caption) against the true views,
    over all of them and over the seen and unseen categories apart -> {"rows", "splits"}."""
    dirs = render.test_folders(engine.data, cfg.n_eval)
    objs = [render.load_object(d, engine.res, engine.views) for d in dirs]
    true = torch.stack([o["images"] for o in objs])
    gen = []
    for i in range(0, len(objs), cfg.batch):
        names = [d.name for d in dirs[i : i + cfg.batch]]
        captions = [o["prompt"] for o in objs[i : i + cfg.batch]]
        firsts = true[i : i + cfg.batch, 0]
        gen.append(
            generate(cfg, engine.image_unet, engine.video_unet, names, captions, firsts, device)
        )
    gen = torch.cat(gen)

    def score(idx):
        """The rows over the objects idx: all views but the input, and the far ones alone."""
        caps = [objs[i]["prompt"] for i in idx]
        return model.orbit_rows("synthetic", gen[idx], true[idx], engine.clf, caps)

    return render.rows_by_split(dirs, score)


def rejected_by_category(engine):
    """The share of each category's prompts whose orbit the filter rejected -> {name: share}."""
    rejected = {p.stem for p in engine.out.glob("*.rejected")}
    counts = {}  # category -> [prompts, rejected]
    for name, caption, _ in engine.items:
        k = render.caption_labels(caption)[0]
        count = counts.setdefault(render.CATEGORY_NAMES[k] if k >= 0 else "other", [0, 0])
        count[0] += 1
        count[1] += name in rejected
    return {k: round(r / n, 3) for k, (n, r) in sorted(counts.items())}


def summarise(cfg, engine, made, seconds, device):
    """Rank 0, after every rank: the counts, the filter's statistics, the held-out evaluation ->
    meta.json, metrics.json, preview.png and a short report."""
    out = engine.out
    kept = [f.name for f in render.object_folders(out)]
    reasons = [p.read_text(errors="replace").split("\n")[0] for p in out.glob("*.rejected")]
    stats = {r: reasons.count(r) for r in REASONS}
    scores = evaluate(cfg, engine, device)
    n = sum(s["n_objects"] for s in scores["splits"].values())
    head = dict(stage="generate_views", preset=cfg.preset, seconds=round(seconds, 1))
    render.save_json(out / "metrics.json", head | dict(n_objects=n) | scores)
    meta = head | dict(config=dataclasses.asdict(cfg), views=engine.views, res=engine.res)
    meta["counts"] = dict(prompts=len(engine.items), kept=len(kept), rejected=len(reasons))
    meta |= dict(filter=stats, rejected_by_category=rejected_by_category(engine))
    meta["orbits_per_minute"] = round(made / max(seconds, 1e-6) * 60, 1)
    meta |= dict(world_version=render.WORLD_VERSION, versions=dict(torch=torch.__version__))
    render.save_json(out / "meta.json", meta)
    if kept:
        render.contact_sheet(out / "preview.png", [out / k for k in kept[:8]])
    else:
        print(f"warning: the filter kept no orbit ({stats}); stage 3 has nothing to train on")
    print(
        f"stage 2 done in {seconds / 60:.1f} min: {len(kept)} orbits kept, "
        f"{len(reasons)} rejected {stats} -> {out}"
    )
    print("the engine on the held-out assets (view 0 + caption), seen and unseen categories:")
    render.print_table(scores["rows"])
    render.write_index(cfg.out)
    print("next: python train_lrm.py")


def main():
    cfg = render.parse_config(Config, PRESETS)
    device, rank, world = model.setup(cfg)
    engine = load(cfg, device, rank)
    with render.locked(engine.out, rank):
        check_outputs(engine.out, engine.items)
        made, seconds = run_engine(cfg, engine, device, rank, world)
        if world > 1:
            dist.barrier()
        if rank == 0:
            summarise(cfg, engine, made, seconds, device)
    model.teardown(world)


if __name__ == "__main__":
    render.run_cli(main)
