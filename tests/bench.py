"""Benchmarks: the speed figures the issues ask for, printed as one table.

Run:  python tests/bench.py                 (everything; a few minutes on a 2-core laptop)
      python tests/bench.py --only render   (one group: render, volume)
Stage timings that need a full tiny run read the stage's own meta/metrics files when --out holds them.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model  # noqa: E402
import render  # noqa: E402
import train_lrm  # noqa: E402


def timed(fn, repeat=3):
    """Best wall time of `repeat` calls after one warm-up call, seconds."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_render(rows):
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        subprocess.run([sys.executable, "render.py", "--preset", "tiny", "--out", tmp], cwd=ROOT, check=True, capture_output=True)
        rows.append(("stage 0 wall time, tiny preset", time.perf_counter() - t, "s"))
    cfg = render.Config()
    objs = [render.make_object(render.object_seed(cfg, "train", i)) for i in range(12)]
    c2w, K = render.orbit(8)
    packed, idx = render.pack(objs), torch.arange(12).repeat_interleave(8)
    sec = timed(lambda: render.render_views(packed, idx, c2w.repeat(12, 1, 1), K.repeat(12, 1, 1), 32))
    rows.append(("exact renderer (sphere tracing, 32x32, 2x2 rays)", 96 / sec, "views/s"))


def bench_volume(rows):
    """Volume rendering through the tiny LRM's triplane field: 8 objects x 4 views x 16x16 crops."""
    cfg = train_lrm.Config()
    lrm = model.LRM(res=32, **{k: getattr(cfg, k) for k in train_lrm.ARCH})
    B, V = cfg.batch, cfg.views
    planes = torch.randn(B, 3, cfg.plane_ch, 32, 32, requires_grad=True)
    c2w, K = render.orbit(V)
    cams = (c2w[None].expand(B, V, 4, 4), K[None].expand(B, V, 3, 3))
    points = B * V * cfg.crop**2 * (cfg.n_coarse + cfg.n_fine)

    def fwd():
        with torch.no_grad():
            lrm.render(planes, *cams, 32, (8, 8, cfg.crop), cfg.n_coarse, cfg.n_fine)

    def fwd_bwd():
        rgb, acc = lrm.render(planes, *cams, 32, (8, 8, cfg.crop), cfg.n_coarse, cfg.n_fine)
        (rgb.mean() + acc.mean()).backward()

    rows.append(("volume rendering, forward (tiny LRM field)", points / timed(fwd), "points/s"))
    rows.append(("volume rendering, forward + backward", points / timed(fwd_bwd), "points/s"))


GROUPS = {"render": bench_render, "volume": bench_volume}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups: " + ", ".join(GROUPS))
    args = p.parse_args()
    rows = []
    for name in args.only.split(","):
        GROUPS[name](rows)
    print(f"\n{'benchmark':56s} {'value':>12s}  unit   (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for name, value, unit in rows:
        print(f"{name:56s} {value:12,.1f}  {unit}")


if __name__ == "__main__":
    main()
