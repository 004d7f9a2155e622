"""Stage 1: the text encoder, the UNet with temporal layers, the diffusion sampler, and
finetune_video.py."""

import dataclasses
import json

import pytest
import torch

import finetune_video
import model
import render
from conftest import ROOT, kill_at_checkpoint, one_line_error, run_script

VOCAB = (
    "a small large red orange yellow green cyan blue purple pink sphere box cylinder cone torus "
    "capsule on top of next to"
).split()


def tiny_unet(frames=0):
    torch.manual_seed(0)
    config = model.UNetConfig(VOCAB, (16, 32), (8,), 16, 32, frames, mv_attn_res=(8,))
    return model.UNet(config).eval()


def noise(n, frames, seed):
    """The sampler's starting noise for tiny_unet's 16x16 images, from its own generator."""
    return torch.randn(n, frames, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_text_encoder_tokens_and_unknown_words():
    enc = model.TextEncoder(VOCAB, 32)
    ids, unknown = enc.tokenize(["a small red cone", "a shiny red cone", ""])
    assert ids.shape == (3, 32) and ids[0, 0] == model.START and ids[2, 1] == model.PAD
    assert unknown == {"shiny"} and ids[1, 2] == model.UNKNOWN
    tokens, pooled, pad = enc(ids)
    assert tokens.shape == (3, 32, 32) and pooled.shape == (3, 32) and pad[0, 5] and not pad[0, 4]


@pytest.mark.parametrize("frames", [1, 4])
def test_unet_shapes(frames):
    unet = tiny_unet(frames if frames > 1 else 0)
    ids, _ = unet.text.tokenize(["a small red cone"] * 2)
    out = unet(torch.randn(2 * frames, 3, 16, 16), torch.rand(2 * frames), ids, frames)
    assert out.shape == (2 * frames, 3, 16, 16)
    x = model.sample(unet, ids, noise(2, frames, 0), steps=2, guidance=2.0)
    assert x.shape == (2, frames, 3, 16, 16) and x.abs().max() <= 1


def test_zero_initialised_temporal_layers_leave_the_image_model_unchanged():
    image, video = tiny_unet(0), tiny_unet(4)
    missing = video.load_state_dict(image.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("temporal.") for k in missing)
    ids, _ = image.text.tokenize(["a small red cone on top of a large blue box", "a green torus"])
    x, t = torch.randn(8, 3, 16, 16), torch.rand(8)
    with torch.no_grad():
        per_frame = image(x, t, ids.repeat_interleave(4, 0), 1)
        as_video = video(x, t, ids, 4)
    assert torch.equal(per_frame, as_video)
    # and a trained temporal layer does change it
    with torch.no_grad():
        video.temporal[0].conv_out.weight.normal_()
        assert not torch.allclose(video(x, t, ids, 4), per_frame)


def test_sampler_is_deterministic_for_a_seed():
    unet = tiny_unet(4)
    ids, _ = unet.text.tokenize(["a small red cone"])
    first = torch.rand(1, 3, 16, 16) * 2 - 1
    a = model.sample(unet, ids, noise(1, 4, 7), first, steps=3, guidance=2.0)
    b = model.sample(unet, ids, noise(1, 4, 7), first, steps=3, guidance=2.0)
    c = model.sample(unet, ids, noise(1, 4, 8), first, steps=3, guidance=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(a[:, 0], first)
    # temperature 0: the seed no longer matters
    cold = [
        model.sample(unet, ids, noise(1, 4, s), first, steps=3, guidance=2.0, temperature=0.0)
        for s in (7, 8)
    ]
    assert torch.equal(*cold) and not torch.equal(cold[0], a)


@pytest.fixture(scope="module")
def stage1(micro1):
    return micro1, None


def test_micro_stage1_runs_all_three_phases(stage1):
    micro, p = stage1
    out = micro / "1_video"
    files = "image_model.safetensors pretrained_video.safetensors video_model.safetensors"
    files += " eval_grid.png eval.gif metrics.json"
    for f in files.split() + ["meta.json"]:
        assert (out / f).is_file(), f
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    for r in ("video_model", "pretrained_video", "image_model_per_frame", "copy_input", "white"):
        assert {"psnr", "ssim"} <= set(rows[r]) and {"psnr", "ssim"} <= set(rows[r + "_far"])
    assert "caption_faithfulness" in rows["image_model_per_frame"]
    assert {"category_acc", "color_acc"} <= set(rows["video_model_far"])  # the classifier's
    phases = ["image", "classifier", "pretrain", "video", "eval"]  # no micro model ships
    assert json.loads((out / "meta.json").read_text())["phases"] == phases


def test_both_video_steps_change_only_temporal_tensors(stage1):
    """The video prior (web clips) and the 3D fine-tune (orbits) train the temporal layers; every
    spatial and text weight stays the image model's, byte for byte, through both."""
    micro, _ = stage1
    image, _ = render.load_tensors(micro / "1_video/image_model.safetensors")
    prior, meta_prior = render.load_tensors(micro / "1_video/pretrained_video.safetensors")
    video, meta = render.load_tensors(micro / "1_video/video_model.safetensors")
    assert meta_prior["kind"] == "pretrained_video" and meta["kind"] == "video_model"
    assert json.loads(meta["start"]) == "pretrained_video"
    assert {"held_out_loss", "held_out_loss_image_model", "clips"} <= set(meta_prior)
    for k, v in image.items():
        assert v.dtype == prior[k].dtype and torch.equal(v, prior[k]), k
        assert v.dtype == video[k].dtype and torch.equal(v, video[k]), k
    temporal = [k for k in video if k.startswith("temporal.")]
    fresh = model.UNet(model.UNetConfig(**json.loads(meta["config"]))).state_dict()
    trained = [k for k in temporal if k.endswith("conv_out.weight")]
    assert temporal and any(not torch.equal(prior[k], fresh[k]) for k in trained)
    assert any(not torch.equal(video[k], prior[k]) for k in trained)


def test_stage1_starts_from_the_video_prior(tmp_path, stage1):
    """At learning rate 0 phase video keeps its start, the prior's temporal layers, to the byte."""
    micro, _ = stage1
    (tmp_path / "0_data").symlink_to(micro / "0_data")
    ours = micro / "1_video"
    flags = ["--phase", "video", "--image_model", ours / "image_model.safetensors"]
    flags += ["--pretrained", ours / "pretrained_video.safetensors", "--video_steps", "2"]
    run_script(
        "finetune_video.py", "--preset", "micro", "--out", tmp_path, *flags, "--video_lr", "0"
    )
    video, _ = render.load_tensors(tmp_path / "1_video/video_model.safetensors")
    prior, _ = render.load_tensors(ours / "pretrained_video.safetensors")
    assert video.keys() == prior.keys() and all(torch.equal(video[k], prior[k]) for k in video)


def micro_stage(micro, out):
    """finetune_video's Stage for the micro world, writing to out."""
    views, res = render.PRESETS["micro"]["views"], render.PRESETS["micro"]["res"]
    return finetune_video.Stage(micro / "0_data", out, views, res, torch.device("cpu"), 0, 1, 0.0)


def test_from_image_model_starts_from_zero_temporal_layers(tmp_path, stage1):
    """--from_image_model (the ablation): the image model with temporal layers that start at zero,
    so it is the image model frame by frame; the prior's start differs from it."""
    micro, _ = stage1
    image = micro / "1_video/image_model.safetensors"
    prior = micro / "1_video/pretrained_video.safetensors"
    cfg = finetune_video.Config(preset="micro", image_model=str(image), pretrained=str(prior))
    stage = micro_stage(micro, tmp_path)
    unet, start = finetune_video.starting_model(
        dataclasses.replace(cfg, from_image_model=True), stage
    )
    outs = [k for k in unet.state_dict() if k.startswith("temporal.") and k.endswith("_out.weight")]
    assert start == "image_model" and outs
    assert all((unet.state_dict()[k] == 0).all() for k in outs)
    unet, start = finetune_video.starting_model(cfg, stage)
    assert start == "pretrained_video" and any((unet.state_dict()[k] != 0).any() for k in outs)


def test_the_video_prior_needs_web_clips(tmp_path, stage1):
    micro, _ = stage1
    (tmp_path / "0_data").mkdir()
    (tmp_path / "0_data/videos").mkdir()  # no clip in it
    image = micro / "1_video/image_model.safetensors"
    cfg = finetune_video.Config(preset="micro", image_model=str(image))
    stage = micro_stage(micro, tmp_path / "1_video")
    stage.data = tmp_path / "0_data"
    with pytest.raises(render.DataError, match="--n_videos"):
        finetune_video.phase_pretrain(cfg, stage)


def test_train_spatial_trains_the_spatial_weights_too(tmp_path, stage1):
    micro, _ = stage1
    (tmp_path / "0_data").symlink_to(micro / "0_data")
    (tmp_path / "1_video").mkdir()
    image = micro / "1_video/image_model.safetensors"
    flags = ["--phase", "video", "--image_model", image, "--train_spatial", "true"]
    flags += ["--pretrained", micro / "1_video/pretrained_video.safetensors"]
    p = run_script("finetune_video.py", "--preset", "micro", "--out", tmp_path, *flags)
    assert "all parameters trained" in p.stdout
    before, _ = render.load_tensors(image)
    after, _ = render.load_tensors(tmp_path / "1_video/video_model.safetensors")
    assert sum(not torch.equal(v, after[k]) for k, v in before.items()) > len(before) // 2


def test_resume_after_sigkill_gives_the_same_weights(tmp_path, stage1):
    micro, _ = stage1

    def args(name):
        root = tmp_path / name
        root.mkdir()
        (root / "0_data").symlink_to(micro / "0_data")
        flags = "--phase image --image_steps 30 --ckpt_every 5 --n_faithful 8".split()
        return root, ["finetune_video.py", "--preset", "micro", "--out", root, *flags]

    killed, cmd = args("killed")
    assert 10 <= kill_at_checkpoint(cmd, killed / "1_video/image_model_state.safetensors", 10) < 30
    # resumes from the last checkpoint
    run_script(*cmd)
    resumed, _ = render.load_tensors(killed / "1_video/image_model.safetensors")
    straight_root, cmd = args("straight")
    run_script(*cmd)
    straight, _ = render.load_tensors(straight_root / "1_video/image_model.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)


def test_resume_refuses_other_training_settings_but_not_sampling_ones(tmp_path, micro):
    (tmp_path / "0_data").symlink_to(micro / "0_data")
    flags = "--phase image --image_steps 6 --ckpt_every 3".split()
    cmd = ["finetune_video.py", "--preset", "micro", "--out", tmp_path, *flags]
    run_script(*cmd)
    # sampling settings, and phase video's, in one run
    other = ["--sample_steps", "3", "--temperature", "0.5", "--video_lr", "0.01"]
    assert "resuming image_model from step 6" in run_script(*cmd, *other).stdout
    p = run_script(*cmd, "--image_lr", "0.001", check=False)
    assert one_line_error(p) and "from another config" in p.stderr


def test_missing_or_mismatched_stage0_gets_a_one_line_hint(tmp_path, micro):
    p = run_script("finetune_video.py", "--preset", "micro", "--out", tmp_path, check=False)
    assert one_line_error(p) and "python render.py" in p.stderr
    p = run_script(
        "finetune_video.py", "--preset", "tiny", "--out", micro, "--phase", "video", check=False
    )
    assert one_line_error(p) and "preset" in p.stderr
    not_a_model = micro / "0_data/assets/train/00000/cameras.safetensors"
    flags = ["--phase", "video", "--image_model", not_a_model]
    p = run_script("finetune_video.py", "--preset", "micro", "--out", micro, *flags, check=False)
    assert one_line_error(p) and "checkpoint" in p.stderr


def test_shipped_image_model_matches_the_tiny_config():
    path = ROOT / "weights/image_model_tiny.safetensors"
    assert path.is_file(), "the pretrained stand-in must ship with the repository"
    unet, meta = model.load_unet(path, "image_model", "python finetune_video.py --phase image")
    cfg = __import__("finetune_video").Config()
    assert list(unet.config.channels) == [int(c) for c in cfg.channels.split(",")]
    assert unet.config.res == render.Config().res
    assert unet.config.frames == 0 and int(meta["world_version"]) == render.WORLD_VERSION
    assert float(meta["caption_faithfulness"]) >= 0.8
