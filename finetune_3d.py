"""Stage 4: fine-tune the stage-3 LRM on the real 3D assets (VFusion3D Sec. 3.2, 3D fine-tuning).

Real renders are exactly consistent, so the pixel loss comes back (pixel + SSIM + opacity), with a
lower learning rate and crops at full resolution. It imports train_lrm.py and runs its loop
(train_lrm.run) with other data and defaults. --from_scratch trains the same model on the real
assets alone from random weights (experiment A of the paper's comparison), with stage 3's
schedule and as many steps as stages 3 and 4 together.

Reads:  out/3_lrm/lrm.safetensors, out/0_data/assets/train/ (or --data), out/0_data/assets/test_*/
Writes: out/4_finetune/ (or out/4_from_scratch/): lrm.safetensors, samples/, metrics.json, meta.json
Run:    python finetune_3d.py                             (tiny: 1,200 steps, 9.3 min at one thread)
        python finetune_3d.py --preset micro --out /tmp/run
        python finetune_3d.py --from_scratch                  (experiment A)
        torchrun --nproc_per_node=4 finetune_3d.py --preset small --device cuda
"""

import dataclasses
from pathlib import Path

import render
import train_lrm


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass
class Config(train_lrm.Config):
    data: str = ""  # real assets ("" = <out>/0_data/assets/train)
    init: str = ""  # the LRM to fine-tune ("" = <out>/3_lrm/lrm.safetensors)
    stage_dir: str = ""  # "" = 4_finetune (or 4_from_scratch)
    from_scratch: bool = False  # experiment A: random weights, real assets only, stage 3 + 4 steps
    steps: int = 1200  # optimizer steps
    lr: float = 1e-3  # peak learning rate, half of stage 3's
    warmup: int = 30  # linear warm-up steps
    low_frac: float = 0.0  # no low-resolution stage: the model already knows coarse shapes
    w_pixel: float = 1.0  # the pixel loss is back: real views are exactly consistent
    cam_noise: float = 0.0  # real cameras are exact


PRESETS = {name: dict(p) for name, p in train_lrm.PRESETS.items()}
PRESETS["micro"].update(steps=4, low_frac=0.0, warmup=1)
PRESETS["small"].update(steps=10000, lr=1e-4)
PRESETS["paper"].update(steps=20000, lr=4e-5)


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
