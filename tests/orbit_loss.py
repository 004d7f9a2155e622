"""How much of the video prior's knowledge survives the 3D fine-tune: the held-out denoising loss
(v-prediction, frame 0 given clean, frames 1..V-1 scored) of stage-1 models on the test assets'
orbits, seen and unseen categories apart, with the same draws of noise level and noise for every
model. A video prior is also scored without its temporal layers (the image model frame by frame).

    python tests/orbit_loss.py --out out weights/pretrained_video_tiny.safetensors \
        out/1_video/video_model.safetensors other_run/1_video/video_model.safetensors

A few minutes at tiny on one thread; docs/results.md has the figures.
"""

import copy
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402
import render  # noqa: E402


def load(path):
    """A stage-1 checkpoint (a video prior or a fine-tuned video model) -> {label: UNet}."""
    try:
        with safe_open(str(path), framework="pt") as f:  # the header only: load_unet reads the rest
            kind = (f.metadata() or {}).get("kind", "")
    except Exception as e:
        raise render.DataError(f"{path}: not a readable safetensors file ({type(e).__name__})")
    if kind not in ("pretrained_video", "video_model"):
        raise render.DataError(f"{path}: a {kind or 'unknown'} file, not a video model")
    unet = model.load_unet(path, kind, "python finetune_video.py")[0].eval()
    nets = {f"{path} ({kind})": unet}
    if kind == "pretrained_video":
        bare = copy.deepcopy(unet)
        bare.temporal = None
        nets[f"{path} without its temporal layers"] = bare
    return nets


@torch.no_grad()
def orbit_loss(net, videos, ids, draws):
    """Mean v-loss over `draws` seeded draws of noise level and noise -> (mean, lowest, highest)."""
    losses = []
    for seed in range(draws):
        model.seed_all(seed)
        x = videos.flatten(0, 1)  # (N*V,3,H,W)
        losses.append(model.v_loss(net, x, ids, videos.shape[1], clean_first=True).item())
    return sum(losses) / len(losses), min(losses), max(losses)


def main():
    parser = render.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="stage-1 .safetensors files")
    parser.add_argument("--out", default="out", help="the run whose 0_data holds the test assets")
    parser.add_argument("--draws", type=int, default=8, help="seeded draws of noise per model")
    args = parser.parse_args()
    nets = {}
    for path in args.models:
        nets |= load(path)
    for split in ("test_seen", "test_unseen"):
        folders = render.object_folders(Path(args.out) / "0_data/assets" / split)
        objs = [render.load_object(f) for f in folders]
        videos = torch.stack([o["images"] for o in objs]) * 2 - 1  # (N,V,3,H,W) in [-1,1]
        for name, net in nets.items():
            ids, _ = net.text.tokenize([o["prompt"] for o in objs])
            mean, low, high = orbit_loss(net, videos, ids, args.draws)
            print(f"{split:12s} {mean:.4f} ({low:.4f}-{high:.4f})  {name}", flush=True)


if __name__ == "__main__":
    render.run_cli(main)
