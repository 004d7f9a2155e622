"""Ship trained tiny models in weights/, each with what it scores on a fixed check set written
into its metadata ("check"), so that tests/test_shipped.py fails when a code change breaks one.

Run:  python tests/ship_models.py OUT      (after `bash run_all.sh tiny OUT`)
Copies OUT/1_video/image_model, classifier, pretrained_video and video_model, and
OUT/4_finetune/lrm (experiment C) to weights/<name>_tiny.safetensors, each that exists.

The check set: the first 2 assets of test_seen and of test_unseen of the tiny world, rendered by
stage 0's own code; for the classifier, 128 held-out single views; for the image model, the
first 32 prompts.
"""

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import finetune_video  # noqa: E402
import model  # noqa: E402
import render  # noqa: E402

N_ASSETS, N_VIEWS, N_PROMPTS = 2, 128, 32  # the check set's sizes


def check_assets(root):
    """The first N_ASSETS assets of each test split of the tiny world, as stage 0 writes them."""
    cfg = dataclasses.replace(render.Config(), n_test_seen=N_ASSETS, n_test_unseen=N_ASSETS)
    for split in ("test_seen", "test_unseen"):
        render.render_split(cfg, split, Path(root) / "assets" / split)
    return render.test_folders(root)


def held_out_views():
    """The last N_VIEWS single views of the tiny world (the classifier's held-out tenth), rendered
    here -> views (N,3,H,W) on white, captions."""
    cfg = render.Config()
    objs = [render.world_object(cfg, "images", cfg.n_images - 1 - i) for i in range(N_VIEWS)]
    c2w, K = render.orbit(1)
    cams = (c2w.expand(N_VIEWS, 4, 4), K.expand(N_VIEWS, 3, 3))
    rgba, _ = render.render_views(render.pack(objs), torch.arange(N_VIEWS), *cams, cfg.res)
    return render.on_white(rgba), [o["caption"] for o in objs]


@torch.no_grad()
def check(kind, path, clf):
    """What the model at `path` scores on the check set -> {metric: value}."""
    cfg = finetune_video.Config()
    if kind == "classifier":
        return model.judge_views(model.load_classifier(path), *held_out_views())
    if kind == "image_model":
        unet, _ = model.load_unet(path, kind, "x")
        world = render.Config()
        prompts = [render.world_object(world, "prompts", i)["caption"] for i in range(N_PROMPTS)]
        cfg.n_faithful = N_PROMPTS
        return finetune_video.caption_faithfulness(cfg, unet.eval(), prompts, "cpu", clf=clf)
    with tempfile.TemporaryDirectory() as tmp:
        folders = check_assets(tmp)
        if kind == "lrm":
            lrm, _ = model.load_lrm(path, "x")
            return model.evaluate_lrm(lrm, folders, "cpu", clf=clf)[0]["rows"]["lrm"]
        unet, _ = model.load_unet(path, kind, "x")
        views = unet.config.frames
        res = unet.config.res
        true, caps = finetune_video.load_videos(folders, views, res)
        stage = finetune_video.Stage(None, None, views, res, torch.device("cpu"), 0, 1, 0.0)
        gen = finetune_video.sample_orbits(cfg, unet.eval(), caps, true[:, 0], 1.0, stage)
        rows = model.orbit_rows("video", (gen + 1) / 2, (true + 1) / 2, clf, caps)
        return rows["video"]


def main():
    out = Path(sys.argv[1])
    sources = dict(image_model="1_video", classifier="1_video", pretrained_video="1_video")
    sources |= dict(video_model="1_video", lrm="4_finetune")
    clf_path = out / "1_video/classifier.safetensors"
    clf = model.load_classifier(clf_path) if clf_path.is_file() else None
    for kind, stage in sources.items():
        src = out / stage / f"{kind}.safetensors"
        if not src.is_file():
            continue
        tensors, meta = render.load_tensors(src)
        meta["check"] = json.dumps({k: round(v, 4) for k, v in check(kind, src, clf).items()})
        dst = ROOT / "weights" / f"{kind}_tiny.safetensors"
        render.save_tensors(dst, tensors, meta)
        print(f"{src} -> {dst} ({dst.stat().st_size / 1e6:.1f} MB): check {meta['check']}")


if __name__ == "__main__":
    main()
