"""Hostile inputs (issue #40), a test or a few for each class. The house rule: bad input gets ONE
line on stderr starting with `error:` that names the file or flag and says what to do, a non-zero
exit, no traceback, and nothing already written is damaged; in a folder of inputs one bad file is
skipped with a line and the rest go on; a result that comes out empty is said out loud.

1. names are data, never paths (`..obj`, `...png`, two files that map to one folder name);
2. one error path (flag ranges and types, devices, checkpoint metadata, resume states, text
   encodings, camera files, a 10 MB prompt, advice that fits a user's own file, one bad file in a
   folder, two runs on one folder);
3. never silently wrong (NaN cameras, losses and weights, OBJ colours in 0-255, degenerate or
   absurdly scaled meshes, CRLF PLY, 16-bit PNG, a huge PNG, leftover temporary folders, stale
   orbits on a rerun, a FIFO, a corrupt metrics.json under the run page).

Most cases call the code that reads the input, in this process; one command-line run per class
checks the whole path, to the one `error:` line and the exit status."""

import json
import math
import os
import resource
import signal
import struct
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import finetune_3d
import finetune_video
import generate_views
import infer
import model
import render
import train_lrm
from conftest import ROOT, linked_world, one_line_error, run_script

LRM = ROOT / "weights/lrm_tiny.safetensors"


# ----------------------------------------------------------------------------- helpers
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


def huge_png(path, side):
    """A side x side white 1-bit PNG of a few kilobytes, made without ever holding its pixels."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" + b"\xff" * ((side + 7) // 8)  # filter byte, then white pixels
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    head = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    png = chunk(b"IHDR", head) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    return path


def refused(p, *names):
    """One `error:` line on stderr naming each of `names`, a non-zero exit, no traceback."""
    return one_line_error(p) and all(n in p.stderr for n in names)


def lrm_with(path, change_meta=None, change_tensors=None):
    """The shipped LRM, its metadata and/or tensors changed, saved at path."""
    tensors, meta = render.load_tensors(LRM)
    if change_tensors:
        tensors = change_tensors(tensors)
    save_file(tensors, str(path), metadata=change_meta(dict(meta)) if change_meta else meta)
    return path


def raises(fn, *names):
    """fn() raises a DataError whose one line names each of `names` -> its message."""
    with pytest.raises(render.DataError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in names), message
    return message


# ============================================================ 1. names are data, never paths
@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    """One `render.py --meshes` over a folder of hostile files: names that are paths (..obj,
    ...obj), two files that map to one folder (sub/y.obj, sub_y.obj), OBJ colours in 0-255 beside
    the same cube as PLY, a CRLF PLY, a cube at 1e38, zero-area triangles, a broken link, a caption
    that is not UTF-8; earlier files in 0_data must survive it."""
    root = tmp_path_factory.mktemp("mesh_run")
    src = root / "in"
    for name in ("..obj", "...obj", "sub/y.obj", "sub_y.obj"):
        cube_obj(src / name)
    cube_obj(src / "colour_obj.obj", rgb=RGB255)
    cube_ply(src / "colour_ply.ply", RGB255)
    cube_ply(src / "crlf.ply", RGB255, eol="\r\n")
    cube_obj(src / "huge.obj", scale=1e38)
    (src / "flat.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\nf 1 1 2\n")
    (src / "lost.obj").symlink_to(root / "on_a_drive_not_mounted.obj")
    cube_obj(src / "cafe.obj")
    (src / "cafe.txt").write_bytes("un caf\xe9\n".encode("latin-1"))
    out = root / "out"
    keep = [out / "0_data/keep.txt", out / "0_data/meshes/earlier/000.png"]
    for k in keep:
        k.parent.mkdir(parents=True, exist_ok=True)
        k.write_text("written before")
    p = run_script("render.py", "--preset", "micro", "--meshes", src, "--out", out)
    return p, out / "0_data/meshes", keep


def test_mesh_names_stay_inside_and_apart(mesh_run):
    p, root, keep = mesh_run
    assert all(k.is_file() for k in keep), "an earlier file was deleted"
    sources = [json.loads(f.read_text())["source"] for f in root.glob("*/object.json")]
    for name in ("..obj", "...obj", "sub/y.obj", "sub_y.obj"):
        assert any(name in s for s in sources), f"{name} not imported"
    assert all(not d.name.startswith(".") for d in root.iterdir() if d.is_dir())
    assert "sub_y_2" in p.stdout, "the collision and its suffix are said"


def test_names_from_users_become_safe_folder_names(tmp_path):
    assert render.safe_name("..") == render.safe_name("...") == "unnamed"
    assert render.safe_name("../../etc") == "etc" and render.safe_name("a b/c") == "a_b_c"
    assert render.safe_name("x", taken={"x", "x_2"}) == "x_3"
    cfg = infer.Config(name="..")
    assert infer.output_name(cfg) == "unnamed"
    assert infer.output_name(infer.Config(), tmp_path / "...png") == "unnamed"
    for name in ("..png", "...png", "good.png"):
        photo(tmp_path / "photos" / name)
    items = generate_views.read_images(generate_views.Config(), tmp_path / "photos", 32)
    assert sorted(name for name, _, _ in items) == ["good", "unnamed", "unnamed_2"]
    raises(lambda: render.write_object(tmp_path / "..", [], None, None, "x"), "..")


def test_a_stage_folder_is_locked_while_a_run_writes_it(tmp_path):
    with render.locked(tmp_path / "2_views"):
        raises(lambda: render.locked(tmp_path / "2_views").__enter__(), "another run")
    assert not (tmp_path / "2_views/.lock").exists()
    (tmp_path / "2_views/.lock").write_text("999999999")  # left by a run that was killed
    with render.locked(tmp_path / "2_views"):
        pass


# ============================================================ 2. one error path
RANGES = [  # script, flags, the flag that must be named
    (render, ["--views", "0"], "--views"),
    (generate_views, ["--batch", "0"], "--batch"),
    (generate_views, ["--num", "-3"], "--num"),
    (generate_views, ["--steps", "-5"], "--steps"),
    (train_lrm, ["--low_res", "0"], "--low_res"),
    (train_lrm, ["--lr", "nan"], "--lr"),
    (infer, ["--mesh_res", "0"], "--mesh_res"),
    (infer, ["--turntable", "0"], "--turntable"),
    (finetune_video, ["--cfg_drop", "2"], "--cfg_drop"),
    (finetune_video, ["--resume", "flase"], "--resume"),
    (train_lrm, ["--steps", "abc"], "--steps"),
    (infer, ["--wings", "4"], "--wings"),
    (finetune_3d, ["--warmup", "0"], "--warmup"),  # a subclass's field keeps its range
]


@pytest.mark.parametrize("script, flags, flag", RANGES)
def test_flags_are_checked_before_any_work(script, flags, flag):
    raises(lambda: render.parse_config(script.Config, script.PRESETS, flags), flag)


def test_flags_that_must_fit_the_images_or_name_a_choice(tmp_path):
    cfg = render.parse_config(train_lrm.Config, train_lrm.PRESETS, ["--crop", "64"])
    raises(lambda: train_lrm.lrm_config(cfg, 32), "--crop")
    cfg = render.parse_config(train_lrm.Config, train_lrm.PRESETS, ["--token_init", "magic"])
    raises(lambda: train_lrm.lrm_config(cfg, 32), "--token_init")
    raises(lambda: finetune_video.phases_to_run(finetune_video.Config(phase="vidoe")), "--phase")
    cfg = render.parse_config(train_lrm.Config, train_lrm.PRESETS, ["--stage_dir", "../x"])
    raises(lambda: train_lrm.run(cfg), "--stage_dir")


@pytest.mark.parametrize("device", ["cuda", "nosuch"])
def test_a_device_that_is_not_there_is_refused_naming_those_that_are(device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    raises(lambda: model.setup(SimpleNamespace(device=device, seed=0)), device, "cpu")


def test_the_command_line_gives_one_line_and_writes_nothing(tmp_path, micro):
    p = run_script(
        "render.py", "--preset", "micro", "--out", tmp_path / "a", "--views", "0", check=False
    )
    assert refused(p, "--views") and not (tmp_path / "a").exists(), p.stderr
    image = photo(tmp_path / "in.png")
    p = run_script(
        "infer.py", "--image", image, "--out", tmp_path / "b", "--device", "nosuch", check=False
    )
    assert refused(p, "--device") and not (tmp_path / "b/5_infer").exists(), p.stderr


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
def test_a_checkpoint_with_bad_metadata_is_refused(tmp_path, case):
    path = lrm_with(tmp_path / f"{case}.safetensors", CHECKPOINTS[case])
    raises(lambda: model.load_lrm(path, "x"), path.name)


def test_a_broken_checkpoint_on_the_command_line(tmp_path):
    path = lrm_with(tmp_path / "bad.safetensors", unknown_field)
    image = photo(tmp_path / "in.png")
    p = run_script("infer.py", "--image", image, "--out", tmp_path, "--model", path, check=False)
    assert refused(p, "bad.safetensors"), p.stderr


@pytest.mark.parametrize("step", ["two", None, "-3", "99"])
def test_a_resume_state_with_a_broken_step_is_refused(step):
    meta = {} if step is None else {"step": step}
    raises(lambda: model.saved_step(meta, "lrm_state.safetensors", 10), "lrm_state")


LATIN1 = "un caf\xe9 cr\xe8me\n".encode("latin-1")  # not UTF-8


def test_text_that_is_not_utf8(tmp_path, mesh_run):
    (tmp_path / "prompts.txt").write_bytes(LATIN1)
    cfg = generate_views.Config(prompts=str(tmp_path / "prompts.txt"))
    raises(lambda: generate_views.read_prompts(cfg, tmp_path, 32), "prompts.txt", "UTF-8")
    (tmp_path / "captions.txt").write_bytes(b"cup\t" + LATIN1)
    raises(lambda: generate_views.read_captions(tmp_path / "captions.txt"), "captions.txt")
    p, root, _ = mesh_run  # a mesh whose caption is not UTF-8: imported, its name the caption
    assert "cafe.txt" in p.stdout and (root / "cafe/prompt.txt").read_text().strip() == "cafe"


CAMERAS = {  # four views a micro object
    "no_intrinsics": lambda c: {"c2w": c["c2w"]},
    "no_c2w": lambda c: {"intrinsics": c["intrinsics"]},
    "c2w_3x4": lambda c: c | {"c2w": c["c2w"][:, :3]},
    "intrinsics_4x4": lambda c: c | {"intrinsics": torch.eye(4).expand(len(c["c2w"]), 4, 4)},
    "nan": lambda c: c | {"c2w": c["c2w"].clone().index_fill_(0, torch.tensor([1]), math.nan)},
}


def broken_object(micro, tmp_path, change):
    """A copy of a micro training asset whose cameras.safetensors went through change()."""
    folder = tmp_path / "zz_broken"
    folder.mkdir()
    for f in (micro / "0_data/assets/train/00000").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cams, meta = render.load_tensors(folder / "cameras.safetensors")
    tensors = {k: v.contiguous() for k, v in change(cams).items()}
    save_file(tensors, str(folder / "cameras.safetensors"), metadata=meta)
    return folder


@pytest.mark.parametrize("case", list(CAMERAS))
def test_a_camera_file_missing_a_key_of_another_shape_or_not_finite(tmp_path, micro, case):
    folder = broken_object(micro, tmp_path, CAMERAS[case])
    raises(lambda: render.load_object(folder), "zz_broken")


def test_nan_cameras_stop_a_training_run_on_the_command_line(tmp_path, micro):
    data = tmp_path / "data"
    for name in ("00000", "00001"):
        linked = data / name
        linked.parent.mkdir(exist_ok=True)
        linked.symlink_to(micro / "0_data/assets/train" / name)
    broken_object(micro, data, CAMERAS["nan"])
    out = linked_world(tmp_path / "run", micro, stages=("0_data",))
    args = ["--preset", "micro", "--out", out, "--data", data, "--steps", "2"]
    p = run_script("train_lrm.py", *args, check=False)
    assert refused(p, "zz_broken"), p.stderr
    with pytest.raises(render.DataError, match="step 3"):
        model.check_finite(torch.tensor(math.nan), 3, "state")


def test_a_ten_megabyte_prompt_is_cut_and_said(tmp_path, capsys):
    (tmp_path / "long.txt").write_text("a red mug " * 1_000_000 + "\na blue car\n")
    cfg = generate_views.Config(prompts=str(tmp_path / "long.txt"))
    items = generate_views.read_prompts(cfg, tmp_path, 32)
    assert len(items[0][1]) <= generate_views.MAX_CAPTION and items[1][1] == "a blue car"
    assert "long.txt" in capsys.readouterr().out


def test_a_users_own_file_gets_advice_for_a_users_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    cfg = infer.Config(image=str(tmp_path / "bad.png"))
    message = raises(lambda: infer.read_inputs(cfg, 32, "cpu"), "bad.png")
    assert not any(word in message for word in ("rerun", "stage", "--out")), message
    (tmp_path / "lost.obj").symlink_to(tmp_path / "nowhere.obj")
    message = raises(lambda: render.load_mesh(tmp_path / "lost.obj", 100, "y"), "lost.obj")
    assert "--out" not in message


def test_one_bad_file_in_a_folder_is_skipped_and_the_rest_go_on(tmp_path, capsys, mesh_run):
    photo(tmp_path / "in/good.png")
    (tmp_path / "in/bad.png").write_bytes(b"\x89PNG not really")
    got = infer.read_inputs(infer.Config(image=str(tmp_path / "in")), 32, "cpu")
    assert [name for name, _ in got] == ["good"] and "bad.png" in capsys.readouterr().out
    items = generate_views.read_images(generate_views.Config(), tmp_path / "in", 32)
    assert [name for name, _, _ in items] == ["good"] and "bad.png" in capsys.readouterr().out
    p, root, _ = mesh_run
    assert "lost.obj" in p.stdout and (root / "colour_obj").is_dir()


# ============================================================ 3. never silently wrong
def test_an_all_nan_checkpoint_is_refused(tmp_path):
    def nan(tensors):
        return {k: torch.full_like(v, math.nan) if v.is_floating_point() else v
                for k, v in tensors.items()}  # fmt: skip

    path = lrm_with(tmp_path / "nan.safetensors", change_tensors=nan)
    raises(lambda: model.load_lrm(path, "x"), "nan.safetensors", "NaN")


def test_obj_colours_in_0_255_read_like_ply(mesh_run):
    _, root, _ = mesh_run
    want = torch.tensor(RGB255) / 255
    for name in ("colour_ply", "colour_obj"):
        colours = render.load_tensors(root / name / "surface.safetensors")[0]["colors"]
        assert torch.allclose(colours.mean(0), want, atol=0.02), f"{name}: {colours.mean(0)}"


def test_a_crlf_ply_loads_and_broken_meshes_are_said(mesh_run):
    p, root, _ = mesh_run
    assert (root / "crlf").is_dir(), p.stdout
    assert "Traceback" not in p.stderr
    for name in ("huge", "flat"):  # skipped with a line, or rendered: never blank in silence
        if (root / name).is_dir():
            views = render.load_object(root / name)["images"]
            assert (views < 0.9).any(), f"{name}: blank views, nothing said"
        else:
            assert f"{name}.obj" in p.stdout, f"{name}: dropped, nothing said"


def test_any_valid_ply_loads(tmp_path):
    """Binary big-endian, with a quad beside a triangle (faces of different sizes)."""
    v = np.array([(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 0, 1)], ">f4")
    head = ["ply", "format binary_big_endian 1.0", "element vertex 5"]
    head += [f"property float {a}" for a in "xyz"]
    head += ["element face 2", "property list uchar int vertex_indices", "end_header", ""]
    faces = bytes([4]) + np.array([0, 1, 2, 3], ">i4").tobytes()
    faces += bytes([3]) + np.array([0, 1, 4], ">i4").tobytes()
    (tmp_path / "be.ply").write_bytes("\n".join(head).encode() + v.tobytes() + faces)
    verts, tris, _ = render.read_ply(tmp_path / "be.ply")
    assert torch.equal(verts, torch.tensor(v.astype(np.float32)))
    assert tris.tolist() == [[0, 1, 2], [0, 2, 3], [0, 1, 4]]


def test_16_bit_grey_png_reads_right(tmp_path):
    grey = np.full((32, 32), 65535, np.uint16)  # white, and a 25% grey square
    grey[8:24, 8:24] = 16384
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")  # really 16 bits
    rgb, _ = render.load_png(tmp_path / "grey16.png")
    assert abs(rgb[0, 16, 16].item() - 0.25) < 0.02 and rgb[0, 0, 0] > 0.98


def test_a_huge_png_is_refused_before_it_is_decoded(tmp_path):
    """12000 x 12000: refused from its header, so a run capped at 3 GiB (its pixels as floats
    would take 2.1 GiB) still answers in one line."""
    image = huge_png(tmp_path / "huge.png", 12000)

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    cmd = [sys.executable, "infer.py", "--out", tmp_path, "--image", image]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=cap)
    assert refused(p, "huge.png"), p.stderr


def test_a_fifo_is_not_read(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    signal.alarm(10)  # a read would wait for a writer forever
    try:
        raises(lambda: render.load_png(fifo), "pipe.png")
    finally:
        signal.alarm(0)


def test_a_leftover_temporary_folder_is_never_read_as_an_object(tmp_path, micro):
    for name in ("00000", ".00001.tmp12345"):  # a writer killed before its rename
        (tmp_path / name).symlink_to(micro / "0_data/assets/train/00000")
    assert [f.name for f in render.object_folders(tmp_path)] == ["00000"]


def test_a_rerun_with_other_prompts_does_not_pass_off_old_orbits(tmp_path):
    (tmp_path / "00000").mkdir()
    (tmp_path / "00000/000.png").write_bytes(b"")
    (tmp_path / "00000/prompt.txt").write_text("a red mug\n")
    (tmp_path / "00001.rejected").write_text("wrong_category\na blue car\n")
    same = [("00000", "a red mug", None), ("00001", "a blue car", None)]
    generate_views.check_outputs(tmp_path, same + [("00002", "a green tree", None)])
    other = [("00000", "a green tree", None), ("00001", "a blue car", None)]
    raises(lambda: generate_views.check_outputs(tmp_path, other), "other prompts")


METRICS = {
    "not_json": "{ half written",
    "no_rows": '{"stage": "finetune_video"}',
    "rows_not_numbers": '{"rows": {"video": {"psnr": "n/a"}}}',
}


@pytest.mark.parametrize("case", list(METRICS))
def test_a_corrupt_metrics_json_does_not_break_the_run_page(tmp_path, micro, case):
    out = linked_world(tmp_path / "run", micro, stages=("0_data",))
    (out / "1_video").mkdir()
    (out / "1_video/eval_grid.png").write_bytes((micro / "0_data/preview.png").read_bytes())
    (out / "1_video/metrics.json").write_text(METRICS[case])
    render.write_index(out)
    page = (out / "index.html").read_text()
    assert "0_data/preview.png" in page and "1_video/eval_grid.png" in page and "unreadable" in page
