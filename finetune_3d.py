"""Stage 4: fine-tune the stage-3 LRM on the real 3D assets (VFusion3D Sec. 3.2, 3D fine-tuning).

Real renders are exactly consistent, so the pixel loss comes back (pixel + SSIM + opacity), with a
lower learning rate and crops at full resolution. It imports train_lrm.py and runs its loop
(train_lrm.run) with other data and defaults. --from_scratch trains the same model on the real
assets alone from random weights (experiment A of the paper's comparison), with stage 3's
schedule and as many steps as stages 3 and 4 together. --mix N also trains on N synthetic orbits
of every category (rehearsal, not in the paper: the fine-tune on a few categories forgets part of
the others). --table then gathers the experiment: (A), (B) stage 3 alone and (C) over test_seen,
test_unseen and both, the scaling curve and the pictures.

Reads:  out/3_lrm/lrm.safetensors, out/0_data/assets/train/ (or --data), out/0_data/assets/test_*/
Writes: out/4_finetune/ (or out/4_from_scratch/): lrm.safetensors, lrm_state.safetensors,
        samples/, metrics.json, meta.json
        --table: out/table/ metrics.json, table.md, scaling.md (+ scaling.png with matplotlib),
        scaling_scarce.md after `run_all.sh scarce`, compare_*.gif (input | A | C | truth; and
        compare_scarce_*.gif)
Run:    python finetune_3d.py                             (tiny: 1,200 steps, 9.3 min at one thread)
        python finetune_3d.py --preset micro --out /tmp/run
        python finetune_3d.py --from_scratch                  (experiment A)
        python finetune_3d.py --mix 400 --stage_dir 4_mix     (C with rehearsal)
        python finetune_3d.py --table                         (after run_all.sh's runs)
        torchrun --nproc_per_node=4 finetune_3d.py --preset small --device cuda
"""

import dataclasses
from pathlib import Path

import torch

import model
import render
import train_lrm


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass
class Config(train_lrm.Config):
    data: str = ""  # real assets ("" = <out>/0_data/assets/train)
    init: str = ""  # the LRM to fine-tune ("" = <out>/3_lrm/lrm.safetensors)
    stage_dir: str = ""  # "" = 4_finetune (or 4_from_scratch)
    from_scratch: bool = False  # experiment A: random weights, real assets only, stage 3 + 4 steps
    steps: int = 1200  # optimizer steps [1..]
    lr: float = 1e-3  # peak learning rate, half of stage 3's [0..]
    warmup: int = 30  # linear warm-up steps [1..]
    low_frac: float = 0.0  # no low-resolution stage: the model already knows coarse shapes [0..1]
    w_pixel: float = 1.0  # the pixel loss is back: real views are exactly consistent [0..]
    cam_noise: float = 0.0  # real cameras are exact [0..]
    table: bool = False  # train nothing: gather out/table from the experiment's stage folders


PRESETS = {name: dict(p) for name, p in train_lrm.PRESETS.items()}
PRESETS["micro"].update(steps=4, low_frac=0.0, warmup=1)
PRESETS["small"].update(steps=10000, lr=1e-4)
PRESETS["paper"].update(steps=20000, lr=4e-5)


# ----------------------------------------------------------------------------- the experiment table
# The table's rows and the stage folder (under --out) of the run that makes each.
RUNS = {
    "A_3d_only": "4_from_scratch",
    "B_synthetic_only": "3_lrm",
    "C_synthetic_then_3d": "4_finetune",
    "C_synthetic_sixteenth": "scaling/sixteenth/4_finetune",
    "C_synthetic_quarter": "scaling/quarter/4_finetune",
    "C_synthetic_half": "scaling/half/4_finetune",
    # `run_all.sh scarce`: 1/4 of the real assets
    "A_3d_only_scarce": "4_from_scratch_scarce",
    "C_synthetic_then_3d_scarce": "4_finetune_scarce",
    "C_synthetic_sixteenth_scarce": "scaling/sixteenth/4_finetune_scarce",
    "C_synthetic_quarter_scarce": "scaling/quarter/4_finetune_scarce",
    "C_synthetic_half_scarce": "scaling/half/4_finetune_scarce",
}


TABLE_SPLITS = {"all": "all test assets", "seen": "seen categories", "unseen": "unseen categories"}


def part_of(metrics, name):
    """A stage's metrics.json over all test assets ("all") or one split -> its n_objects, rows."""
    return metrics if name == "all" else metrics["splits"][name]


def cells(row):
    """A row's metrics as table cells, '-' where a metric does not apply."""
    return [f"{row[k]:.4f}" if k in row else "-" for k in render.METRIC_KEYS]


def collect_runs(root):
    """The `lrm` rows of each run made, then stage 4's baselines (copy the input, a sphere), over
    all test assets and the seen and unseen categories apart -> ({split: {"n_objects", "rows"}},
    each run's seconds, steps, train objects and folder)."""
    splits = {name: {"rows": {}} for name in TABLE_SPLITS}
    info = {}
    for row, stage in RUNS.items():
        path = root / stage / "metrics.json"
        if path.is_file():
            m = render.read_json(path, "bash run_all.sh")
            for name, split in splits.items():
                split["rows"][row] = part_of(m, name)["rows"]["lrm"]
            info[row] = dict(
                seconds=m["seconds"],
                steps=m.get("steps"),
                train_objects=m.get("train_objects"),
                stage_dir=stage,
            )
    if not {"A_3d_only", "B_synthetic_only", "C_synthetic_then_3d"} <= set(info):
        raise render.DataError(
            f"{root}: the experiment needs 4_from_scratch, 3_lrm and 4_finetune; "
            "run `bash run_all.sh` first"
        )
    base = render.read_json(root / "4_finetune/metrics.json", "python finetune_3d.py")
    for name, split in splits.items():
        of = part_of(base, name)
        split["n_objects"] = of["n_objects"]
        split["rows"] |= {baseline: of["rows"][baseline] for baseline in ("copy_input", "sphere")}
    return splits, info


def markdown(header, body):
    """A markdown table: the header's cells, then each row's -> its text."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def write_table(cfg, table, splits, info):
    """table/metrics.json and table/table.md (printed too): one table per split, '-' where a
    metric does not apply."""
    parts = []
    for name, split in splits.items():
        body = [[r, *cells(v)] for r, v in split["rows"].items()]
        title = f"{TABLE_SPLITS[name]} ({split['n_objects']})"
        parts.append(f"### {title}\n\n" + markdown(["row", *render.METRIC_KEYS], body))
    seconds = round(sum(i["seconds"] for i in info.values()), 1)
    metrics = dict(stage="table", preset=cfg.preset, n_objects=splits["all"]["n_objects"])
    metrics |= dict(seconds=seconds, rows=splits["all"]["rows"], runs=info)
    metrics["splits"] = {name: splits[name] for name in ("seen", "unseen")}
    render.save_json(table / "metrics.json", metrics)
    render.write_text(table / "table.md", "\n".join(parts))
    print("\n".join(parts), end="")


def experiment_table(cfg):
    """out/table: the paper's comparison (A 3D only, B synthetic only, C synthetic then 3D) and the
    scaling curve (C with 1/16, 1/4, 1/2 and all of the synthetic set), from each run's metrics;
    the same with a quarter of the real assets (`_scarce`) where `run_all.sh scarce` has run."""
    root = Path(cfg.out)
    table = root / "table"
    splits, info = collect_runs(root)
    write_table(cfg, table, splits, info)
    # the scaling curves: all of the real assets, then a quarter
    for real in ("", "_scarce"):
        parts = ("sixteenth", "quarter", "half", "then_3d")
        curve = [f"C_synthetic_{part}{real}" for part in parts]
        scaling_curve(cfg, table / f"scaling{real}", splits, info, curve)
        comparison_gifs(cfg, table, real)
    render.write_index(cfg.out)
    return splits["all"]["rows"]


def scaling_curve(cfg, name, splits, info, curve):
    """(C) against the number of synthetic objects it was pre-trained on, over all test assets and
    each split -> <name>.md, and <name>.png on the unseen categories, where the synthetic set
    matters."""
    pts = []
    for row in curve:
        if row in info:
            stage3 = Path(cfg.out) / Path(info[row]["stage_dir"]).parent / "3_lrm/metrics.json"
            pts.append((render.read_json(stage3, "bash run_all.sh scaling")["train_objects"], row))
    if not pts:  # that curve's runs have not been made
        return
    body = [
        [str(n), row, split, *cells(part["rows"][row])]
        for split, part in splits.items()
        for n, row in pts
    ]
    text = markdown(["synthetic objects", "row", "split", *render.METRIC_KEYS], body)
    render.write_text(name.with_suffix(".md"), text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    unseen = splits["unseen"]["rows"]
    for ax, k in zip(axes, ("ssim", "fscore", "chamfer_l1")):
        ax.plot([n for n, _ in pts], [unseen[row][k] for _, row in pts], "o-")
        ax.set_xlabel("synthetic objects")
        ax.set_title(f"{k}, unseen categories")
    fig.tight_layout()
    render.atomic_write(name.with_suffix(".png"), lambda p: fig.savefig(p, format="png", dpi=100))


@torch.no_grad()
def comparison_gifs(cfg, table, real="", n=4, frames=24):
    """Turntables of unseen-category test objects: input | (A) 3D only | (C) synthetic then 3D |
    ground truth -> compare{real}_*.gif (real: "" or "_scarce")."""
    root = Path(cfg.out)
    rows = (f"A_3d_only{real}", f"C_synthetic_then_3d{real}")
    paths = [root / RUNS[r] / "lrm.safetensors" for r in rows]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"table: no compare{real}_*.gif: {', '.join(missing)} not trained yet")
        return
    stage0 = render.read_world(root, cfg.preset)
    res = stage0.res
    models = [model.load_lrm(p, "python finetune_3d.py")[0] for p in paths]
    c2w, K = render.orbit(frames)
    cam = model.camera_vector(model.CANONICAL[None], K[:1])
    for i in range(min(n, stage0.n_test_unseen)):
        ob = render.load_object(root / f"0_data/assets/test_unseen/{i:05d}", res)
        packed = render.pack([render.world_object(stage0, "test_unseen", i)])
        first = torch.zeros(frames, dtype=torch.long)  # every view shows object 0
        rgba, _ = render.render_views(packed, first, c2w, K, res)
        cols = [ob["images"][:1].expand(frames, -1, -1, -1)]
        for m in models:
            planes = m(ob["images"][:1], cam)
            rgb, _ = m.render(planes, c2w[None], K[None], res, samples=(32, 32), stratified=False)
            cols.append(rgb[0])
        cols.append(render.on_white(rgba))
        render.save_gif(table / f"compare{real}_{i}.gif", torch.cat(cols, -1).clamp(0, 1), 3)


# ----------------------------------------------------------------------------- main
def from_scratch(cfg):
    """Experiment A: stage 3's schedule (learning rate, warm-up, number of low-resolution steps) on
    the real assets, for as many steps as stage 3 + stage 4 took, from random weights."""
    s3 = train_lrm.Config(**train_lrm.PRESETS[cfg.preset])
    folder = Path(cfg.out) / "3_lrm"
    if (folder / "meta.json").is_file():
        # match the stage-3 run that exists
        saved = render.read_meta(folder, "python train_lrm.py")["config"]
        names = {f.name for f in dataclasses.fields(train_lrm.Config)}
        s3 = train_lrm.Config(**{k: v for k, v in saved.items() if k in names})
    total = s3.steps + cfg.steps
    cfg.init = ""
    cfg.lr = s3.lr
    cfg.warmup = s3.warmup
    cfg.steps = total
    cfg.low_frac = s3.low_frac * s3.steps / total
    return cfg


def main():
    """Stage 4's data, starting weights and output folder, then stage 3's loop."""
    cfg = render.parse_config(Config, PRESETS)
    if cfg.table:
        return experiment_table(cfg)
    cfg.data = cfg.data or str(Path(cfg.out) / "0_data/assets/train")
    if cfg.from_scratch:
        cfg.stage_dir = cfg.stage_dir or "4_from_scratch"
        cfg = from_scratch(cfg)
    else:
        cfg.stage_dir = cfg.stage_dir or "4_finetune"
        cfg.init = cfg.init or str(Path(cfg.out) / "3_lrm/lrm.safetensors")
    train_lrm.run(cfg, stage="finetune_3d", hint="python render.py")


if __name__ == "__main__":
    render.run_cli(main)
