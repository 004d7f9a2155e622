"""Hostile inputs (issue #40), one test or a few per class, each script driven only through its
command line. The house rule: bad input gets ONE line on stderr starting with `error:` that names
the file or flag and says what to do, a non-zero exit, no traceback, and nothing already written
is damaged; in a folder of inputs one bad file is skipped with a line and the rest go on; a
result that comes out empty is said out loud.

1. names are data, never paths (`..obj`, `...png`, two meshes that map to one folder name);
2. one error path (flag values, devices, checkpoint metadata, resume states, text encodings,
   camera files, a 10 MB prompt, advice that fits a user's own file, one bad file in a folder);
3. never silently wrong (NaN cameras and weights, OBJ colours in 0-255, degenerate or absurdly
   scaled meshes, CRLF PLY, 16-bit PNG, a huge PNG, leftover temporary folders, stale orbits on
   a rerun, a FIFO, a corrupt metrics.json under the run page).

Stage 2 runs on its own small world (stage 0 at --preset micro, at the shipped models' 32 px and
8 views) with the shipped tiny models, so these tests need no stage-1 training."""

import json
import math
import os
import resource
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import render
from conftest import ROOT, kill_at_checkpoint, linked_world, one_line_error, run_script

LRM = ROOT / "weights/lrm_tiny.safetensors"
INFER = ["infer.py", "--preset", "micro", "--model", LRM, "--mesh_res", "8"]
INFER += ["--turntable", "2", "--views", "1", "--samples", "4"]
GENERATE = ["generate_views.py", "--preset", "micro", "--steps", "1", "--n_eval", "1"]
GENERATE += ["--video_model", ROOT / "weights/video_model_tiny.safetensors", "--batch", "2"]
GENERATE += ["--image_model", ROOT / "weights/image_model_tiny.safetensors", "--guidance", "1"]
TRAIN = ["train_lrm.py", "--preset", "micro", "--n_eval", "1", "--mesh_res", "8"]
TRAIN += ["--sample_every", "100"]


# ----------------------------------------------------------------------------- helpers
def lines(p):
    """Every line a run printed (stdout, then stderr), progress bars left out."""
    text = p.stdout + "\n" + p.stderr
    return [line for line in text.splitlines() if line.strip() and "%|" not in line]


def refused(p, *names):
    """One `error:` line on stderr naming each of `names`, a non-zero exit, no traceback."""
    return one_line_error(p) and all(n in p.stderr for n in names)


def said(p, name):
    """A successful run (exit 0, no traceback) with a line that names `name`."""
    return (
        p.returncode == 0 and "Traceback" not in p.stderr and any(name in line for line in lines(p))
    )


def refused_or_said(p, name):
    """Either refused in one line naming `name`, or went on and said so in a line naming it."""
    return refused(p, name) or said(p, name)


def user_advice(p):
    """The error line's advice fits a file of the user's own: not "rerun the stage" or --out."""
    line = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    return not any(word in line for word in ("rerun", "stage", "--out"))


def photo(path, size=32):
    """A small photo of an object on white: a red square in the middle."""
    img = np.full((size, size, 3), 255, np.uint8)
    img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (200, 30, 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="PNG")  # "..png" has no suffix for PIL to go by
    return path


# a cube of side 2: vertex x * 4 + y * 2 + z for x, y, z in {0, 1}, two triangles a face
CUBE_V = [(x, y, z) for x in (-1.0, 1.0) for y in (-1.0, 1.0) for z in (-1.0, 1.0)]
CUBE_F = [(0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1)]
CUBE_F += [(2, 3, 7), (2, 7, 6), (0, 2, 6), (0, 6, 4), (1, 5, 7), (1, 7, 3)]
RGB255 = (200, 100, 50)


def cube_obj(path, scale=1.0, rgb=None):
    colour = "" if rgb is None else " " + " ".join(map(str, rgb))
    text = "".join(f"v {x * scale} {y * scale} {z * scale}{colour}\n" for x, y, z in CUBE_V)
    text += "".join(f"f {i + 1} {j + 1} {k + 1}\n" for i, j, k in CUBE_F)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def cube_ply(path, rgb, eol="\n"):
    """An ascii PLY cube with uchar vertex colours, lines ended by `eol`."""
    head = ["ply", "format ascii 1.0", f"element vertex {len(CUBE_V)}"]
    head += [f"property float {a}" for a in "xyz"]
    head += [f"property uchar {c}" for c in ("red", "green", "blue")]
    head += [f"element face {len(CUBE_F)}", "property list uchar int vertex_indices", "end_header"]
    body = [f"{x} {y} {z} {rgb[0]} {rgb[1]} {rgb[2]}" for x, y, z in CUBE_V]
    body += [f"3 {i} {j} {k}" for i, j, k in CUBE_F]
    path.write_bytes(eol.join(head + body).encode() + eol.encode())
    return path


def views_blank(folder):
    """Whether every view of an object folder is empty (alpha 0, or all white)."""
    for view in sorted(folder.glob("[0-9][0-9][0-9].png")):
        rgba = np.asarray(Image.open(view).convert("RGBA"))
        if (rgba[..., 3] > 0).any() and (rgba[..., :3] < 235).any():
            return False
    return True


def copy_object(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_cameras(folder, change):
    """cameras.safetensors of an object folder -> change(dict of tensors), saved back."""
    path = folder / "cameras.safetensors"
    cams, meta = render.load_tensors(path)
    save_file({k: v.contiguous() for k, v in change(cams).items()}, str(path), metadata=meta)


def run_limited(args, memory_gb, timeout):
    """`python args...` from the repository root with its address space capped."""

    def cap():
        limit = memory_gb << 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [sys.executable, *map(str, args)]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, preexec_fn=cap
    )


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(path, side):
    """A side x side white 1-bit PNG of a few kilobytes: made without ever holding its pixels."""
    row = b"\x00" + b"\xff" * ((side + 7) // 8)  # filter byte, then white pixels
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    head = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    png = png_chunk(b"IHDR", head) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    return path


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world32(tmp_path_factory):
    """A small stage 0 (--preset micro, but at the shipped models' 32 px and 8 views) that stage 2
    can run on with weights/*_tiny.safetensors."""
    out = tmp_path_factory.mktemp("world32")
    sizes = ["--n_train", 1, "--n_test_seen", 1, "--n_test_unseen", 0, "--n_images", 1]
    sizes += ["--n_prompts", 2, "--n_videos", 0, "--res", 32, "--views", 8]
    run_script("render.py", "--preset", "micro", "--out", out, *sizes)
    return out


@pytest.fixture(scope="module")
def train_data(micro, tmp_path_factory):
    """Three of the micro world's training assets, in a folder of their own (for --data)."""
    data = tmp_path_factory.mktemp("train_data")
    for name in ("00000", "00001", "00002"):
        copy_object(micro / "0_data/assets/train" / name, data / name)
    return data


def gv_world(tmp_path, world32, copy=False):
    """A fresh --out for stage 2 on world32's stage 0 (linked, or copied when it may be hurt)."""
    out = tmp_path / "run"
    if copy:
        out.mkdir()
        shutil.copytree(world32 / "0_data", out / "0_data")
        return out
    return linked_world(out, world32, stages=("0_data",))


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    """One `render.py --meshes` over meshes each of which is read wrong or silently blank today:
    OBJ colours in 0-255 beside the same cube as PLY, a CRLF PLY, a cube at 1e38 and a mesh of
    degenerate triangles only."""
    root = tmp_path_factory.mktemp("mesh_run")
    src = root / "in"
    cube_obj(src / "colour_obj.obj", rgb=RGB255)
    cube_ply(src / "colour_ply.ply", RGB255)
    cube_ply(src / "crlf.ply", RGB255, eol="\r\n")
    cube_obj(src / "huge.obj", scale=1e38)
    (src / "flat.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\nf 1 1 2\n")
    out = root / "out"
    p = run_script("render.py", "--preset", "micro", "--meshes", src, "--out", out, check=False)
    return p, out / "0_data/meshes"


# ============================================================ 1. names are data, never paths
@pytest.mark.parametrize("name", ["..obj", "...obj"])
def test_mesh_file_names_never_reach_outside_meshes(tmp_path, name):
    src = tmp_path / "in"
    cube_obj(src / name)
    out = tmp_path / "run"
    keep = [out / "0_data/keep.txt", out / "0_data/meshes/earlier/000.png"]
    for k in keep:
        k.parent.mkdir(parents=True, exist_ok=True)
        k.write_text("written before")
    p = run_script("render.py", "--preset", "micro", "--meshes", src, "--out", out, check=False)
    gone = [str(k.relative_to(out)) for k in keep if not k.is_file()]
    assert not gone, f"{name}: deleted {gone}\n{p.stdout[-800:]}{p.stderr[-800:]}"
    assert p.returncode == 0 or one_line_error(p), p.stderr[-2000:]


@pytest.mark.parametrize("name", ["..png", "...png"])
def test_image_file_names_never_reach_outside_2_views(tmp_path, world32, name):
    out = gv_world(tmp_path, world32, copy=True)
    keep = [out / "2_views/keep.txt", out / "3_lrm/keep.txt", out / "0_data/meta.json"]
    for k in keep[:2]:
        k.parent.mkdir(parents=True, exist_ok=True)
        k.write_text("written before")
    photo(tmp_path / "photos" / name)
    p = run_script(*GENERATE, "--out", out, "--images", tmp_path / "photos", check=False)
    gone = [str(k.relative_to(out)) for k in keep if not k.is_file()]
    assert not gone, f"{name}: deleted {gone}\n{p.stdout[-800:]}{p.stderr[-800:]}"
    assert p.returncode == 0 or one_line_error(p), p.stderr[-2000:]


@pytest.mark.parametrize("name", ["..png", "...png"])
def test_infer_output_names_stay_under_5_infer(tmp_path, name):
    out = tmp_path / "run"
    image = photo(tmp_path / name)
    p = run_script(*INFER, "--out", out, "--image", image, check=False)
    assert p.returncode == 0 or one_line_error(p), p.stderr[-2000:]
    stray = [f for f in ("input.png", "mesh.obj", "views") if (out / f).exists()]
    stray += [f"5_infer/{f}" for f in ("input.png", "mesh.obj") if (out / "5_infer" / f).exists()]
    assert not stray, f"{name}: wrote {stray} outside its own folder under 5_infer"


def test_mesh_names_that_collide_both_kept_and_said(tmp_path):
    src = tmp_path / "in"
    first, second = cube_obj(src / "sub/y.obj"), cube_obj(src / "sub_y.obj", scale=0.5)
    out = tmp_path / "run"
    p = run_script("render.py", "--preset", "micro", "--meshes", src, "--out", out)
    root = out / "0_data/meshes"
    sources = {json.loads((d / "object.json").read_text())["source"] for d in root.iterdir()}
    assert sources == {str(first), str(second)}, f"one overwrote the other: {sources}"
    said_it = [line for line in lines(p) if "sub_y" in line and not line.startswith("next:")]
    assert said_it, "the collision (and the suffix it got) is not said:\n" + p.stdout


# ============================================================ 2. one error path
RANGE_CASES = {  # id: (script's flags, flag, value, the folder no work may create)
    "gv_batch_0": ("gv", "--batch", "0", "2_views"),
    "gv_num_-3": ("gv", "--num", "-3", "2_views"),
    "gv_steps_-5": ("gv", "--steps", "-5", "2_views"),
    "train_crop_too_large": ("train", "--crop", "64", "3_lrm"),
    "train_low_res_0": ("train", "--low_res", "0", "3_lrm"),
    "infer_mesh_res_0": ("infer", "--mesh_res", "0", "5_infer"),
    "infer_turntable_0": ("infer", "--turntable", "0", "5_infer"),
    "render_views_0": ("render", "--views", "0", "0_data"),
}


@pytest.mark.parametrize("case", list(RANGE_CASES))
def test_flag_out_of_range_refused_before_any_work(tmp_path, case, request):
    script, flag, value, folder = RANGE_CASES[case]
    out = tmp_path / "run"
    if script == "gv":
        out = gv_world(tmp_path, request.getfixturevalue("world32"))
        (tmp_path / "prompts.txt").write_text("a red mug\na blue car\na green tree\nan apple\n")
        args = [*GENERATE, "--prompts", tmp_path / "prompts.txt"]
    elif script == "train":
        linked_world(out, request.getfixturevalue("micro"), stages=("0_data",))
        args = [*TRAIN, "--steps", "2", "--data", request.getfixturevalue("train_data")]
    elif script == "infer":
        args = [*INFER, "--image", photo(tmp_path / "in.png")]
    else:
        args = ["render.py", "--preset", "micro", "--n_train", "1", "--n_images", "1"]
    p = run_script(*args, "--out", out, flag, value, check=False, timeout=300)
    assert refused(p, flag), f"{flag} {value}: rc {p.returncode}\n{p.stderr[-2000:]}"
    assert not (out / folder).exists() or (out / folder).is_symlink(), f"{folder} written"


@pytest.mark.parametrize("device", ["cuda", "nosuch"])
def test_device_that_is_not_there_refused_naming_the_ones_that_are(tmp_path, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    image = photo(tmp_path / "in.png")
    p = run_script(*INFER, "--out", out, "--image", image, "--device", device, check=False)
    assert refused(p, "--device", "cpu"), p.stderr[-2000:]
    assert not (out / "5_infer").exists()


def lrm_with(path, change_meta=None, change_tensors=None):
    """The shipped LRM, its metadata and/or tensors changed, saved at path."""
    tensors, meta = render.load_tensors(LRM)
    if change_tensors:
        tensors = change_tensors(tensors)
    meta = change_meta(dict(meta)) if change_meta else meta
    save_file(tensors, str(path), metadata=meta)
    return path


def unknown_field(meta):
    return meta | {"config": json.dumps(json.loads(meta["config"]) | {"wings": 4})}


CHECKPOINTS = {
    "no_metadata": lambda meta: None,
    "no_config": lambda meta: {k: v for k, v in meta.items() if k != "config"},
    "config_not_json": lambda meta: meta | {"config": "{'res': 32,"},
    "config_not_a_dict": lambda meta: meta | {"config": "[32, 4]"},
    "unknown_config_field": unknown_field,
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_checkpoint_with_bad_metadata_refused(tmp_path, case):
    path = lrm_with(tmp_path / f"{case}.safetensors", CHECKPOINTS[case])
    image = photo(tmp_path / "in.png")
    p = run_script(*INFER, "--out", tmp_path, "--image", image, "--model", path, check=False)
    assert refused(p, path.name), f"{case}: rc {p.returncode}\n{p.stderr[-2000:]}"


@pytest.fixture(scope="module")
def resume_state(micro, train_data, tmp_path_factory):
    """A stage-3 run killed at its first checkpoint -> (its --out, the state file's bytes)."""
    out = linked_world(tmp_path_factory.mktemp("resume"), micro, stages=("0_data",))
    state = out / "3_lrm/lrm_state.safetensors"
    cmd = [*TRAIN, "--out", out, "--data", train_data, "--ckpt_every", "1"]
    assert kill_at_checkpoint(cmd, state, 1) >= 1
    return out, state.read_bytes()


STEPS = {"not_a_number": "two", "missing": None, "negative": "-3"}


@pytest.mark.parametrize("case", list(STEPS))
def test_resume_state_with_a_broken_step_refused(resume_state, train_data, case):
    out, good = resume_state
    state = out / "3_lrm/lrm_state.safetensors"
    state.write_bytes(good)
    tensors, meta = render.load_tensors(state)
    meta = {k: v for k, v in meta.items() if k != "step"}
    if STEPS[case] is not None:
        meta["step"] = STEPS[case]
    save_file(tensors, str(state), metadata=meta)
    p = run_script(*TRAIN, "--out", out, "--data", train_data, check=False)
    assert refused(p, state.name), f"step {STEPS[case]}: rc {p.returncode}\n{p.stderr[-2000:]}"


LATIN1 = "un caf\xe9 cr\xe8me\n".encode("latin-1")  # not UTF-8


@pytest.mark.parametrize("where", ["prompts_file", "captions_txt", "mesh_caption"])
def test_text_files_that_are_not_utf8(tmp_path, where, request):
    if where == "mesh_caption":
        src = tmp_path / "in"
        cube_obj(src / "cube.obj")
        (src / "cube.txt").write_bytes(LATIN1)
        args = ["--meshes", src, "--out", tmp_path / "o"]
        p = run_script("render.py", "--preset", "micro", *args, check=False)
        assert refused_or_said(p, "cube.txt"), f"rc {p.returncode}\n{p.stderr[-2000:]}"
        return
    out = gv_world(tmp_path, request.getfixturevalue("world32"))
    if where == "prompts_file":
        (tmp_path / "prompts.txt").write_bytes(LATIN1)
        args, name = ["--prompts", tmp_path / "prompts.txt"], "prompts.txt"
    else:
        photo(tmp_path / "photos/cup.png")
        (tmp_path / "photos/captions.txt").write_bytes(b"cup\t" + LATIN1)
        args, name = ["--images", tmp_path / "photos"], "captions.txt"
    p = run_script(*GENERATE, "--out", out, "--num", "1", *args, check=False)
    assert refused_or_said(p, name), f"rc {p.returncode}\n{p.stderr[-2000:]}"


CAMERAS = {  # four views a micro object
    "no_intrinsics": lambda c: {"c2w": c["c2w"]},
    "no_c2w": lambda c: {"intrinsics": c["intrinsics"]},
    "c2w_3x4": lambda c: c | {"c2w": c["c2w"][:, :3]},
    "intrinsics_4x4": lambda c: c | {"intrinsics": torch.eye(4).expand(len(c["c2w"]), 4, 4)},
}


@pytest.mark.parametrize("case", list(CAMERAS))
def test_camera_file_missing_a_key_or_of_another_shape(tmp_path, micro, train_data, case):
    data = tmp_path / "data"
    shutil.copytree(train_data, data)
    bad = copy_object(data / "00000", data / "zz_broken_cams")
    rewrite_cameras(bad, CAMERAS[case])
    out = linked_world(tmp_path / "run", micro, stages=("0_data",))
    p = run_script(*TRAIN, "--steps", "2", "--out", out, "--data", data, check=False)
    assert refused_or_said(p, "zz_broken_cams"), f"{case}: rc {p.returncode}\n{p.stderr[-2000:]}"


def test_ten_megabyte_prompt_line(tmp_path, world32):
    out = gv_world(tmp_path, world32)
    line = "a red mug with a blue handle " * (10_000_000 // 29)
    (tmp_path / "long.txt").write_text(line + "\na blue car\n")
    args = ["--prompts", tmp_path / "long.txt", "--num", "2"]
    p = run_script(*GENERATE, "--out", out, *args, check=False)
    warned = any(line.startswith("warning") for line in lines(p))
    ok = refused(p, "long.txt") or (p.returncode == 0 and "Traceback" not in p.stderr and warned)
    assert ok, f"rc {p.returncode}, no error or warning\n{p.stdout[-1500:]}{p.stderr[-1500:]}"


@pytest.mark.parametrize("kind", ["photo", "folder_of_photos", "mesh"])
def test_an_unreadable_user_file_gets_advice_for_a_user_file(tmp_path, kind, request):
    """The user's own photo or mesh is not "rerun the stage that wrote it" or "check --out"."""
    out = tmp_path / "run"
    if kind == "mesh":
        (tmp_path / "in").mkdir()
        (tmp_path / "in/lost.obj").symlink_to(tmp_path / "on_a_drive_not_mounted.obj")
        args, name = ["render.py", "--preset", "micro", "--meshes", tmp_path / "in"], "lost.obj"
    else:
        (tmp_path / "photos").mkdir()
        (tmp_path / "photos/bad.png").write_bytes(b"\x89PNG not really")
        name = "bad.png"
        args = [*INFER, "--image", tmp_path / "photos/bad.png"]
        if kind == "folder_of_photos":
            out = gv_world(tmp_path, request.getfixturevalue("world32"))
            args = [*GENERATE, "--images", tmp_path / "photos", "--num", "1"]
    p = run_script(*args, "--out", out, check=False)
    assert one_line_error(p) and any(name in line for line in lines(p)), p.stderr[-2000:]
    assert user_advice(p), f"advice for a stage's file, not the user's:\n{p.stderr}"


@pytest.mark.parametrize("script", ["infer", "generate_views", "render_meshes"])
def test_one_bad_file_in_a_folder_is_skipped_and_the_rest_go_on(tmp_path, script, request):
    src = tmp_path / "in"
    out = tmp_path / "run"
    if script == "render_meshes":
        cube_obj(src / "good.obj")
        (src / "lost.obj").symlink_to(tmp_path / "on_a_drive_not_mounted.obj")
        args, bad = ["render.py", "--preset", "micro", "--meshes", src], "lost.obj"
        made = out / "0_data/meshes/good/prompt.txt"
    else:
        photo(src / "good.png")
        (src / "bad.png").write_bytes(b"\x89PNG not really")
        bad = "bad.png"
        if script == "infer":
            args, made = [*INFER, "--image", src], out / "5_infer/good/mesh.obj"
        else:
            out = gv_world(tmp_path, request.getfixturevalue("world32"))
            args, made = [*GENERATE, "--images", src, "--num", "2"], out / "2_views/good/prompt.txt"
    p = run_script(*args, "--out", out, check=False)
    assert said(p, bad), f"rc {p.returncode}\n{p.stdout[-1500:]}{p.stderr[-1500:]}"
    assert made.is_file(), f"the good file was not processed: no {made.relative_to(out)}"


# ============================================================ 3. never silently wrong
def test_nan_cameras_in_one_training_object_stop_the_run(tmp_path, micro, train_data):
    data = tmp_path / "data"
    shutil.copytree(train_data, data)
    bad = copy_object(data / "00001", data / "zz_nan_cams")

    def nan(cams):
        cams["c2w"][1] = float("nan")
        return cams

    rewrite_cameras(bad, nan)
    out = linked_world(tmp_path / "run", micro, stages=("0_data",))
    p = run_script(*TRAIN, "--steps", "2", "--out", out, "--data", data, check=False)
    assert refused(p, "zz_nan_cams"), f"rc {p.returncode}\n{p.stdout[-1500:]}{p.stderr[-1500:]}"


def test_all_nan_checkpoint_refused(tmp_path):
    def nan(tensors):
        return {k: torch.full_like(v, math.nan) if v.is_floating_point() else v
                for k, v in tensors.items()}  # fmt: skip

    path = lrm_with(tmp_path / "nan.safetensors", change_tensors=nan)
    image = photo(tmp_path / "in.png")
    p = run_script(
        *INFER, "--out", tmp_path / "run", "--image", image, "--model", path, check=False
    )
    assert refused(p, "nan.safetensors"), f"rc {p.returncode}\n{p.stdout[-1000:]}{p.stderr[-1000:]}"


def test_obj_vertex_colours_in_0_255_read_like_ply(mesh_run):
    p, root = mesh_run
    want = torch.tensor(RGB255) / 255
    for name in ("colour_ply", "colour_obj"):
        assert (root / name).is_dir(), f"{name} not imported:\n{p.stdout[-1500:]}"
        colours = render.load_tensors(root / name / "surface.safetensors")[0]["colors"]
        assert torch.allclose(colours.mean(0), want, atol=0.02), f"{name}: {colours.mean(0)}"


def test_crlf_ascii_ply_loads(mesh_run):
    p, root = mesh_run
    assert (root / "crlf").is_dir(), f"a valid CRLF PLY was not imported:\n{p.stdout[-1500:]}"
    assert not views_blank(root / "crlf")


@pytest.mark.parametrize("name", ["huge", "flat"])
def test_meshes_never_give_blank_views_silently(mesh_run, name):
    """A cube at 1e38 (finite, but its size overflows) and a mesh of zero-area triangles: rendered
    so that something shows, or skipped with a line naming the file, never blank in silence."""
    p, root = mesh_run
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    if (root / name).is_dir():
        assert not views_blank(root / name), f"{name}: blank views, nothing said"
    else:
        assert any(f"{name}.obj" in line for line in lines(p)), f"{name}: dropped, nothing said"


def test_16_bit_grey_png_reads_right(tmp_path):
    grey = np.full((32, 32), 65535, np.uint16)  # white, and a 25% grey square
    grey[8:24, 8:24] = 16384
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")  # really 16 bits
    out = tmp_path / "run"
    p = run_script(*INFER, "--out", out, "--image", tmp_path / "grey16.png", check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    seen = np.asarray(Image.open(out / "5_infer/grey16/input.png").convert("L"), np.float32)
    assert abs(seen[16, 16] - 64) < 16 and seen[0, 0] > 240, (seen[16, 16], seen[0, 0])


def test_huge_png_refused_before_decoding(tmp_path):
    """12000 x 12000 (PIL only warns below 179 M pixels): refused from its header, so a run capped
    at 3 GiB (its pixels as floats take 2.1 GiB) still answers in one line."""
    image = huge_png(tmp_path / "huge.png", 12000)
    assert image.stat().st_size < 100_000
    args = [*INFER, "--out", tmp_path / "run", "--image", image]
    p = run_limited(args, memory_gb=3, timeout=120)
    assert refused(p, "huge.png"), f"rc {p.returncode}\n{p.stderr[-1500:]}"


def test_leftover_temporary_folder_is_never_read_as_an_object(tmp_path, micro, train_data):
    data = tmp_path / "data"
    shutil.copytree(train_data, data)
    shutil.rmtree(data / "00002")
    copy_object(data / "00001", data / ".00002.tmp12345")  # a writer killed before its rename
    out = linked_world(tmp_path / "run", micro, stages=("0_data",))
    p = run_script(*TRAIN, "--steps", "2", "--out", out, "--data", data, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    n = json.loads((out / "3_lrm/metrics.json").read_text())["train_objects"]
    assert n == 2, f"trained on {n} objects: the temporary folder was read as one"


def test_rerun_with_other_prompts_does_not_pass_off_old_orbits(tmp_path, world32):
    out = gv_world(tmp_path, world32)
    old, new = ["a red mug", "a blue car"], ["a green tree", "a yellow chair"]
    (tmp_path / "old.txt").write_text("\n".join(old) + "\n")
    (tmp_path / "new.txt").write_text("\n".join(new) + "\n")
    run_script(*GENERATE, "--out", out, "--prompts", tmp_path / "old.txt", "--num", "2")
    p = run_script(
        *GENERATE, "--out", out, "--prompts", tmp_path / "new.txt", "--num", "2", check=False
    )
    if p.returncode != 0:  # refusing to mix the two sets is fine too
        assert one_line_error(p), p.stderr[-2000:]
        return
    kept = [d / "prompt.txt" for d in (out / "2_views").iterdir() if (d / "prompt.txt").is_file()]
    prompts = sorted(f.read_text().strip() for f in kept)
    assert prompts == sorted(new), f"2_views holds {prompts} after a run with {new}"


def test_image_that_is_a_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    try:
        p = run_script(*INFER, "--out", tmp_path / "run", "--image", fifo, check=False, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("infer.py --image FIFO still waits after 20 s")
    assert refused(p, "pipe.png"), p.stderr[-2000:]


METRICS = {
    "not_json": "{ half written",
    "no_rows": '{"stage": "finetune_video"}',
    "rows_not_numbers": '{"rows": {"video": {"psnr": "n/a"}}}',
}


@pytest.mark.parametrize("case", list(METRICS))
def test_corrupt_metrics_json_does_not_break_the_run_page(tmp_path, micro, case):
    out = linked_world(tmp_path / "run", micro, stages=("0_data",))
    (out / "1_video").mkdir()
    shutil.copy(micro / "0_data/preview.png", out / "1_video/eval_grid.png")
    (out / "1_video/metrics.json").write_text(METRICS[case])
    p = run_script("render.py", "--preset", "micro", "--out", out, check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    page = (out / "index.html").read_text()
    assert "0_data/preview.png" in page and "1_video/eval_grid.png" in page
