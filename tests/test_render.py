"""Stage 0 and the geometry in render.py: cameras, the world, the exact renderer, volume rendering,
meshes, metrics, and the folder contract."""

import json
import math

import numpy as np
import pytest
import torch

import model
import render
from conftest import one_line_error, run_script


def sphere_object(r, centre=(0.0, 0.0, 0.0), colour=5):
    return dict(
        kind=np.array([0]),
        colour=np.array([colour]),
        params=np.array([[r, 0, 0]], np.float32),
        centre=np.array([centre], np.float32),
        rot=np.eye(3, dtype=np.float32)[None],
        caption="a blue sphere",
        category="sphere",
    )


def test_orbit_cameras_look_at_origin_with_z_up():
    c2w, K = render.orbit(8)
    R = c2w[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(8, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(8), atol=1e-5)
    o, d = render.camera_rays(c2w, K, 2)  # 2x2 image: the centre is the shared corner
    centre_dir = d.mean((1, 2))
    to_origin = torch.nn.functional.normalize(-c2w[:, :3, 3], dim=-1)
    assert torch.allclose(torch.nn.functional.normalize(centre_dir, dim=-1), to_origin, atol=1e-4)
    assert (R[:, 2, 1] > 0).all(), "camera +y (image up) must point towards world +z"
    assert torch.allclose(
        c2w[:, 2, 3],
        torch.full((8,), render.RADIUS * math.sin(math.radians(render.ELEVATION))),
        atol=1e-5,
    )


def test_projection_lands_on_the_pixel_the_renderer_draws():
    obj = render.make_object(3, 2)
    c2w, K = render.orbit(4)
    res = 24
    rgba, pts = render.render_views(
        render.pack([obj]), torch.zeros(4, dtype=torch.long), c2w, K, res, supersample=1
    )
    for v in range(4):
        rows, cols = torch.nonzero(rgba[v, 3] > 0.5, as_tuple=True)
        assert len(rows) > 20
        uv, depth = render.project(pts[v, rows, cols], c2w[v], K[v], res)
        assert (depth > 0).all()
        assert torch.equal(uv[:, 0].floor().long(), cols)
        assert torch.equal(uv[:, 1].floor().long(), rows)


def test_sphere_silhouette_matches_the_analytic_circle():
    r, res = 0.6, 64
    c2w, K = render.orbit(1)
    rgba, _ = render.render_views(
        render.pack([sphere_object(r)]),
        torch.zeros(1, dtype=torch.long),
        c2w,
        K,
        res,
        supersample=4,
    )
    D = render.RADIUS
    radius_px = K[0, 0, 0] * math.tan(math.asin(r / D)) * res  # circle radius on the image plane
    yy, xx = torch.meshgrid(torch.arange(res) + 0.5, torch.arange(res) + 0.5, indexing="ij")
    dist = ((xx - res / 2) ** 2 + (yy - res / 2) ** 2).sqrt()
    alpha = rgba[0, 3]
    assert (alpha[dist < radius_px - 1] == 1).all() and (alpha[dist > radius_px + 1] == 0).all()
    assert abs(alpha.sum().item() - math.pi * radius_px**2) / (math.pi * radius_px**2) < 0.02


@pytest.mark.parametrize("sigma", [0.5, 2.0, 8.0])
def test_volume_rendering_of_a_constant_slab(sigma):
    colour = torch.tensor([0.2, 0.4, 0.8])

    def field(p):  # slab |z| < 0.5 of density sigma
        inside = (p[..., 2].abs() < 0.5).float()
        return sigma * inside, colour.expand(*p.shape[:-1], 3)

    o = torch.tensor([[0.1, -0.2, 3.0]]).repeat(64, 1)
    d = torch.tensor([[0.0, 0.0, -1.0]]).repeat(64, 1)
    rgb, acc, depth = model.volume_render(field, o, d, n_coarse=256, n_fine=128)
    expect = 1 - math.exp(-sigma * 1.0)
    assert torch.allclose(acc, torch.full_like(acc, expect), atol=0.015)
    assert torch.allclose(rgb, colour * acc[:, None] + 1 - acc[:, None], atol=1e-5)
    assert ((depth > 2.5 - 0.02) & (depth < 3.5 + 0.02)).all()
    o_miss = torch.tensor([[3.0, 3.0, 3.0]])
    rgb, acc, _ = model.volume_render(field, o_miss, torch.tensor([[0.0, 0.0, 1.0]]), 16, 16)
    assert acc.item() == 0 and torch.allclose(rgb, torch.ones(1, 3))


def test_volume_rendering_gradients_flow():
    w = torch.tensor(2.0, requires_grad=True)

    def field(p):
        return w * torch.ones(p.shape[:-1]), torch.full((*p.shape[:-1], 3), 0.5)

    o, d = torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[0.0, 0.0, -1.0]])
    _, acc, _ = model.volume_render(field, o, d, 32, 32)
    acc.sum().backward()
    assert w.grad is not None and w.grad.item() > 0


def test_marching_cubes_of_a_sphere_has_the_right_radius():
    res, r = 64, 0.6
    v, f = render.extract_mesh(lambda p: 5 * (r - p.norm(dim=-1)), res, 0.0)
    radii = v.norm(dim=-1)
    assert len(f) > 1000 and (radii - r).abs().max() < 2 / (res - 1)
    pts, _ = render.sample_mesh(v, f, 5000)
    assert (pts.norm(dim=-1) - r).abs().max() < 2 / (res - 1)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    normals = torch.cross(b - a, c - a, dim=-1)
    assert ((normals * (a + b + c)).sum(-1) > 0).float().mean() > 0.99, "faces must wind outwards"


def read_obj(path):
    v, f = [], []
    for line in open(path):
        parts = line.split()
        if parts and parts[0] == "v":
            v.append([float(x) for x in parts[1:7]])
        elif parts and parts[0] == "f":
            f.append([int(x.split("/")[0]) - 1 for x in parts[1:4]])
    v = np.array(v)
    return v[:, :3], np.array(f), v[:, 3:]


def read_ply(path):
    data = open(path, "rb").read()
    head, body = data.split(b"end_header\n", 1)
    nv = int(head.split(b"element vertex ")[1].split(b"\n")[0])
    nf = int(head.split(b"element face ")[1].split(b"\n")[0])
    vert = np.frombuffer(body[: nv * 15], dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    face = np.frombuffer(body[nv * 15 :], dtype=[("n", "u1"), ("i", "<i4", 3)], count=nf)
    assert (face["n"] == 3).all()
    return vert["p"], face["i"], vert["c"]


def test_obj_and_ply_round_trip(tmp_path):
    v, f = render.extract_mesh(lambda p: 1 - p.norm(dim=-1) / 0.5, 24, 0.0)
    rgb = (v + 1) / 2
    render.write_obj(tmp_path / "m.obj", v, f, rgb)
    render.write_ply(tmp_path / "m.ply", v, f, rgb)
    ov, of, oc = read_obj(tmp_path / "m.obj")  # +Y up: (x, y, z) written as (x, z, -y)
    assert (
        np.allclose(ov, (v[:, [0, 2, 1]] * torch.tensor([1.0, 1.0, -1.0])).numpy(), atol=1e-6)
        and (of == f.numpy()).all()
        and np.allclose(oc, rgb.numpy(), atol=1e-4)
    )
    pv, pf, pc = read_ply(tmp_path / "m.ply")
    assert (
        np.allclose(pv, v.numpy())
        and (pf == f.numpy()).all()
        and np.abs(pc / 255 - rgb.numpy()).max() < 1 / 255 + 1e-6
    )


def test_chamfer_and_fscore():
    pts = torch.rand(500, 3)
    assert model.chamfer_fscore(pts, pts) == (0.0, 1.0)
    cd, fs = model.chamfer_fscore(pts, pts + torch.tensor([0.1, 0, 0]), tau=0.05)
    assert 0 < cd <= 0.1 + 1e-6 and fs < 1


def test_captions_name_the_category_and_its_actual_colours():
    names = list(render.COLOURS)
    for seed in range(160):
        o = render.make_object(seed, seed % len(render.CATEGORIES))
        words = o["caption"].split()
        assert o["category"] in words
        colour_words = [w for w in words if w in render.COLOURS]
        assert set(colour_words) == {names[c] for c in o["colour"]}, "every colour worn is named"
        # in the order of the recipe's colour roles (the first: the body's), each its own colour
        assert colour_words == [names[c] for c in o["slots"]]
        assert len(colour_words) == len(set(colour_words))
        assert " a a" not in f" {o['caption']}" and " a o" not in f" {o['caption']}"


def test_the_world_has_a_long_tail_of_categories():
    cats = render.CATEGORIES
    assert len(cats) >= 16 and len(set(render.CATEGORY_NAMES)) == len(cats)
    assert sum(c.asymmetric for c in cats) >= len(cats) / 2
    default = render.Config().categories_3d
    assert default == 6 and sum(c.asymmetric for c in cats[:default]) >= 3
    assert all(p.shape in render.SHAPE_NAMES for c in cats for p in c.parts)


def test_a_turned_part_renders_as_the_part_it_turns_into():
    # a box long along x, turned 90 degrees about z, is the same box long along y
    def box(size, turn):
        rot = render.rotation(turn).astype(np.float32)[None]
        params = np.array([size], np.float32)
        return dict(kind=np.array([1]), colour=np.array([2]), params=params, rot=rot,
                    centre=np.zeros((1, 3), np.float32))  # fmt: skip

    c2w, K = render.orbit(4)
    owner = torch.zeros(4, dtype=torch.long)
    turned, _ = render.render_views(
        render.pack([box((0.5, 0.1, 0.2), (0, 0, 90))]), owner, c2w, K, 24
    )
    plain, _ = render.render_views(
        render.pack([box((0.1, 0.5, 0.2), (0, 0, 0))]), owner, c2w, K, 24
    )
    assert (turned - plain).abs().max() < 0.02


def test_splits_keep_unseen_categories_out_of_3d_training():
    cfg = render.Config()  # the tiny world
    seen = set(render.CATEGORY_NAMES[: cfg.categories_3d])

    def cats(split):
        n = getattr(cfg, "n_" + split)
        return [render.world_object(cfg, split, i)["category"] for i in range(n)]

    assert set(cats("train")) == seen and set(cats("test_seen")) == seen
    assert set(cats("test_unseen")) == set(render.CATEGORY_NAMES) - seen, "every unseen category"
    assert len(cats("test_seen")) >= 30 and len(cats("test_unseen")) >= 30
    images = {render.world_object(cfg, "images", i)["category"] for i in range(64)}
    assert images == set(render.CATEGORY_NAMES), "the 2D data covers every category"


def test_objects_fit_the_box_and_fill_the_frame():
    c2w, K = render.orbit(4)
    objs = [render.make_object(s, s % len(render.CATEGORIES)) for s in range(40)]
    rgba, pts = render.render_views(
        render.pack(objs),
        torch.arange(40).repeat_interleave(4),
        c2w.repeat(40, 1, 1),
        K.repeat(40, 1, 1),
        32,
    )
    hits = pts[~pts.isnan().any(-1)]
    assert hits.abs().max() <= 1.0
    cover = rgba[:, 3].mean((1, 2))
    assert cover.min() > 0.02 and cover.mean() > 0.15, (
        f"objects too small in the frame: mean coverage {cover.mean():.2f}"
    )
    assert (rgba[:, 3, 0, :] == 0).all() and (rgba[:, 3, -1, :] == 0).all(), (
        "objects must not be cut by the frame"
    )


def test_micro_dataset_follows_the_folder_contract(micro):
    root = micro / "0_data"
    meta = json.loads((root / "meta.json").read_text())
    cfg = render.Config(**render.PRESETS["micro"])
    assert (
        meta["stage"] == "render"
        and meta["preset"] == "micro"
        and meta["world_version"] == render.WORLD_VERSION
    )
    train = sorted((root / "assets/train").iterdir())
    test = render.test_folders(root)
    assert len(train) == cfg.n_train and len(test) == cfg.n_test_seen + cfg.n_test_unseen
    assert meta["categories"] == list(render.CATEGORY_NAMES)
    assert meta["categories_3d"] == list(render.CATEGORY_NAMES[: cfg.categories_3d])
    for folder in train + test:
        category = json.loads((folder / "object.json").read_text())["category"]
        assert (category in meta["categories_3d"]) == (render.split_of(folder) != "unseen")
        assert category in (folder / "prompt.txt").read_text()
    assert (root / "categories.png").is_file()
    for folder in train[:3] + test[:1]:
        ob = render.load_object(folder, cfg.res, cfg.views)
        assert ob["images"].shape == (cfg.views, 3, cfg.res, cfg.res)
        assert ob["masks"].shape == (cfg.views, 1, cfg.res, cfg.res)
        assert (
            ob["c2w"].shape == (cfg.views, 4, 4)
            and ob["K"].shape == (cfg.views, 3, 3)
            and ob["prompt"]
        )
        assert (
            torch.allclose(ob["c2w"], render.orbit(cfg.views)[0])
            and abs(ob["K"][0, 0, 2].item() - 0.5) < 1e-6
        )
        surf, _ = render.load_tensors(folder / "surface.safetensors")
        assert surf["points"].shape == (cfg.surface_points, 3)
        assert surf["colors"].shape == (cfg.surface_points, 3)
        assert (ob["images"][:, :, 0, 0] == 1).all(), "background is white"
    caps = (root / "images/captions.txt").read_text().splitlines()
    assert len(caps) == cfg.n_images and len(list((root / "images").glob("*.png"))) == cfg.n_images
    assert len((root / "prompts.txt").read_text().splitlines()) == cfg.n_prompts
    test_caps = {(f / "prompt.txt").read_text() for f in test}
    seeds = {
        render.object_seed(cfg, s, i)
        for s, n in (("train", cfg.n_train), ("images", cfg.n_images), ("prompts", cfg.n_prompts))
        for i in range(n)
    }
    held_out = {
        render.object_seed(cfg, s, i) for s in ("test_seen", "test_unseen") for i in range(4)
    }
    assert not seeds & held_out, "test objects appear nowhere else"
    assert test_caps and (root / "preview.png").is_file()


def test_web_clips_are_videos_not_3d_assets(micro):
    """A clip holds frames and a caption, never a camera or a surface, and no test object."""
    root = micro / "0_data"
    cfg = render.Config(**render.PRESETS["micro"])
    clips = sorted(p for p in (root / "videos").iterdir() if p.is_dir())
    assert len(clips) == cfg.n_videos and (root / "videos.png").is_file()
    frames = [f"{k:03d}.png" for k in range(cfg.views)]
    for clip in clips:
        assert sorted(f.name for f in clip.iterdir()) == [*frames, "prompt.txt"]
        assert render.caption_labels((clip / "prompt.txt").read_text())[0] >= 0
    assert not list((root / "videos").rglob("*.safetensors")), "videos come without cameras"
    # no test object: the clips' seeds are their own, and no frame is a test asset's view
    tests = [p for s in ("test_seen", "test_unseen") for p in (root / "assets" / s).iterdir()]
    held_out = {render.object_seed(cfg, p.parent.name, int(p.name)) for p in tests}
    mine = {render.object_seed(cfg, "videos", i) for i in range(cfg.n_videos)}
    assert mine and not mine & held_out
    views = torch.stack([render.load_object(p)["images"] for p in tests]).flatten(0, 1)
    for clip in clips:
        seen = render.load_object(clip, cameras=False)["images"]  # (V,3,H,W)
        gap = (seen[:, None] - views[None]).abs().flatten(2).mean(-1)  # (V, tests' views)
        assert gap.min() > 0.01


def test_clip_cameras_follow_no_orbit():
    """Elevation drifts, azimuth steps unevenly over less than a turn, the distance changes."""
    for seed in range(20):
        c2w, K = render.clip_cameras(seed, 8)
        eye = c2w[:, :3, 3]
        radius = eye.norm(dim=-1)
        elevation = torch.rad2deg(torch.asin(eye[:, 2] / radius))
        azimuth = torch.rad2deg(torch.atan2(eye[:, 1], eye[:, 0]))
        steps = (azimuth.diff() + 180) % 360 - 180  # degrees turned between frames
        assert elevation.max() - elevation.min() > 0.5
        assert radius.max() - radius.min() > 0.01 or not torch.allclose(K[0], K[-1]), "framing"
        assert steps.abs().sum() < 355 and steps.abs().max() - steps.abs().min() > 1
        assert (steps > 0).all() or (steps < 0).all(), "one way round"
        # the camera still looks at the object: the origin projects inside every frame
        uv, depth = render.project(torch.zeros(1, 3), c2w[0], K[0], 1)
        assert (0 < uv).all() and (uv < 1).all() and depth > 0


def test_same_seed_same_bytes_and_rerun_completes(tmp_path, micro):
    run_script("render.py", "--preset", "micro", "--out", tmp_path)
    a, b = micro / "0_data", tmp_path / "0_data"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "meta.json")
    assert files and files == sorted(
        p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "meta.json"
    )
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    # damage the second copy: a missing asset view, a missing image; the rest must stay untouched
    (b / "assets/train/00001/002.png").unlink()
    (b / "images/00003.png").unlink()
    keep = {f: (b / f).stat().st_mtime_ns for f in files if (b / f).exists()}
    p = run_script("render.py", "--preset", "micro", "--out", tmp_path)
    assert "1 rendered now" in p.stdout
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    changed = [
        str(f)
        for f, t in keep.items()
        if (b / f).stat().st_mtime_ns != t and not str(f).startswith("assets/train/00001")
    ]
    # the sheets are drawn again (the same bytes) when anything was rendered; nothing else
    assert set(changed) <= {"preview.png", "categories.png", "videos.png"}, changed


def test_bad_inputs_get_one_line_errors(tmp_path, micro):
    with pytest.raises(render.DataError, match="no views"):
        render.load_object(tmp_path)
    folder = micro / "0_data/assets/train/00000"
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "001.png").write_bytes(b"not a png")
    with pytest.raises(render.DataError, match="001.png: not a readable image"):
        render.load_object(bad)
    with pytest.raises(render.DataError, match="expected 32x32"):
        render.load_object(folder, res=32)
    (bad / "cameras.safetensors").write_bytes(b"garbage")
    (bad / "001.png").write_bytes((folder / "001.png").read_bytes())
    with pytest.raises(render.DataError, match="cameras.safetensors: not a readable safetensors"):
        render.load_object(bad)
    (tmp_path / "file").write_text("x")
    assert one_line_error(
        run_script("render.py", "--preset", "micro", "--out", tmp_path / "file", check=False)
    )
    # another config is already in place
    p = run_script("render.py", "--preset", "tiny", "--out", micro, check=False)
    assert one_line_error(p) and "another config" in p.stderr
    assert one_line_error(
        run_script("render.py", "--preset", "huge", "--out", tmp_path, check=False)
    )


def test_the_pairing_equals_the_plain_padded_union():
    """scene_sdf over (ray, part) pairs gives scene_sdf_padded's distances and colours."""
    objs = [render.make_object(s, s % len(render.CATEGORIES)) for s in range(16)]
    packed = render.pack(objs)
    obj = torch.arange(16).repeat_interleave(200)
    pts = torch.rand(len(obj), 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fast = render.scene_sdf(pts, render.pair_up(obj, packed))
    plain = render.scene_sdf_padded(pts, obj, packed)
    assert torch.allclose(fast[0], plain[0], atol=1e-6) and torch.equal(fast[1], plain[1])
