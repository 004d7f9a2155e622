"""Meshes in and out (issue #24): our marching cubes against scikit-image's, the user's meshes
rendered into object folders (render.py --meshes), the mesh renderer against the exact one, and
the GLB writer (render.write_glb, infer.py's) read back."""

import json
import struct

import numpy as np
import pytest
import torch
from skimage.measure import marching_cubes as skimage_marching_cubes

import model
import render
from conftest import one_line_error, run_script

RES = 48  # grid of the marching-cubes fields, voxels per side
G = torch.linspace(-1, 1, RES)
P = torch.stack(torch.meshgrid(G, G, G, indexing="ij"), -1)  # (RES,RES,RES,3)
HALF = torch.tensor([0.5, 0.3, 0.4])  # the box's half sizes
FIELDS = {  # inside positive, the surface at 0
    "sphere": 0.6 - P.norm(dim=-1),
    "torus": 0.2 - torch.stack([P[..., :2].norm(dim=-1) - 0.5, P[..., 2]], -1).norm(dim=-1),
    "box": -((P.abs() - HALF).clamp(min=0).norm(dim=-1) + (P.abs() - HALF).amax(-1).clamp(max=0)),
}


def area_and_volume(v, f):
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    area = torch.linalg.cross(b - a, c - a).norm(dim=-1).sum() / 2
    volume = (a * torch.linalg.cross(b, c)).sum() / 6  # positive when the faces wind outwards
    return area.item(), volume.item()


def is_watertight(f):
    """Every directed edge once and its reverse once: closed, and consistently wound."""
    e = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    n = int(f.max()) + 1
    key, back = e[:, 0] * n + e[:, 1], e[:, 1] * n + e[:, 0]
    return len(torch.unique(key)) == len(key) and torch.isin(back, key).all().item()


def test_marching_cubes_table_is_complete_and_symmetric():
    counts = (render.MC_TABLE[..., 0] >= 0).sum(1)  # triangles per case
    assert counts[0] == 0 and counts[255] == 0 and (counts[1:255] > 0).all()
    assert counts[1] == 1 and counts[3] == 2  # one corner: a triangle; an edge: a quad
    # a field and its negation, about the same level, give one surface, wound the other way
    vol = FIELDS["torus"]
    v1, f1 = render.marching_cubes(vol, 0.0)
    v2, f2 = render.marching_cubes(-vol, 0.0)
    assert len(v1) == len(v2) and torch.allclose(v1, v2, atol=1e-5)
    a1, vol1 = area_and_volume(v1, f1)
    a2, vol2 = area_and_volume(v2, f2)
    assert abs(a1 - a2) < 1e-3 * a1 and vol1 > 0 and abs(vol1 + vol2) < 1e-2 * vol1


@pytest.mark.parametrize("name", list(FIELDS))
def test_marching_cubes_agrees_with_scikit_image(name):
    vol = FIELDS[name]
    v, f = render.marching_cubes(vol, 0.0)
    sv, sf, _, _ = skimage_marching_cubes(vol.numpy(), 0.0)
    sv, sf = torch.from_numpy(sv.copy()).float(), torch.from_numpy(sf.astype(np.int64))
    area, volume = area_and_volume(v, f)
    s_area, s_volume = area_and_volume(sv, sf)
    assert abs(area - s_area) < 0.01 * s_area
    assert abs(abs(volume) - abs(s_volume)) < 0.01 * abs(s_volume) and volume > 0
    chamfer, _ = model.chamfer_fscore(v, sv)  # in voxels
    assert chamfer < 0.1
    assert is_watertight(f)


def test_extract_mesh_is_in_world_units_and_winds_outwards():
    v, f = render.extract_mesh(lambda p: 0.5 - p.norm(dim=-1), 40, 0.0)
    assert (v.norm(dim=-1) - 0.5).abs().max() < 2 / 39
    _, volume = area_and_volume(v, f)
    assert abs(volume - 4 / 3 * np.pi * 0.125) < 0.02 and is_watertight(f)


def test_coarse_to_fine_extraction_finds_the_same_surface():
    # two spheres, the small one (radius 0.08) just wide enough that a coarse point (every 0.085)
    # lies inside it: only the points near the surface are read at full resolution, and the mesh
    # is the full grid's
    calls = []

    def density(p):
        calls.append(len(p))
        big = 0.5 - p.norm(dim=-1)
        small = 0.08 - (p - torch.tensor([0.6, 0.6, 0.6])).norm(dim=-1)
        return torch.maximum(big, small)

    v, f = render.extract_mesh(density, 48, 0.0)
    full = sum(calls)
    calls.clear()
    cv, cf = render.extract_mesh_coarse(density, 48, 0.0, 2)
    assert sum(calls) < full / 2
    assert torch.allclose(cv, v, atol=1e-6) and torch.equal(cf, f)


def test_ray_triangles_known_hit():
    tri = torch.tensor(
        [[[0.0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0.0, 0, -2], [1, 0, -2], [0, 1, -2]]]
    )
    o = torch.tensor([[0.25, 0.5, 3.0], [2.0, 2.0, 3.0]])
    d = torch.tensor([[0.0, 0, -1], [0.0, 0, -1]])
    t, idx, w = render.ray_triangles(o, d, tri)
    assert t[0].item() == pytest.approx(3.0) and idx[0] == 0  # the nearer of the two
    assert torch.allclose(w[0], torch.tensor([0.25, 0.25, 0.5]))
    assert torch.isinf(t[1])


def test_mesh_renderer_agrees_with_the_exact_renderer():
    """A world object as a fine mesh (marching cubes of its distance, 128^3) gives the views of
    the exact renderer: above 30 dB at 32x32."""
    cfg = render.Config()
    c2w, K = render.orbit(8)
    for i in (0, 3):  # a house and a teapot: parts turned, front unlike back
        obj = render.world_object(cfg, "test_unseen", i)
        packed = render.pack([obj])

        def sdf(p):
            return render.scene_sdf(
                p, render.pair_up(torch.zeros(len(p), dtype=torch.long), packed)
            )

        v, f = render.extract_mesh(lambda p: -sdf(p)[0], 128, 0.0)
        rgb = render.PALETTE[sdf(v)[1]]
        exact, _ = render.render_views(packed, torch.zeros(8, dtype=torch.long), c2w, K, 32)
        mesh = render.render_mesh(v, f, rgb, c2w, K, 32)
        white = [x[:, :3] * x[:, 3:] + 1 - x[:, 3:] for x in (exact, mesh)]
        psnr = -10 * torch.log10(((white[0] - white[1]) ** 2).mean())
        assert psnr > 30, f"{obj['category']}: {psnr:.1f} dB"


def test_ascii_ply_with_a_quad_and_uchar_colours(tmp_path):
    head = "ply\nformat ascii 1.0\nelement vertex 4\n"
    head += "".join(f"property float {a}\n" for a in "xyz")
    head += "".join(f"property uchar {c}\n" for c in ("red", "green", "blue"))
    head += "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
    body = "0 0 0 255 0 0\n1 0 0 0 255 0\n1 1 0 0 0 255\n0 1 0 255 255 255\n4 0 1 2 3\n"
    (tmp_path / "quad.ply").write_text(head + body)
    v, f, rgb = render.read_ply(tmp_path / "quad.ply")
    assert v.shape == (4, 3) and f.tolist() == [[0, 1, 2], [0, 2, 3]]
    assert torch.equal(rgb[0], torch.tensor([1.0, 0, 0])) and torch.equal(rgb[3], torch.ones(3))


def write_meshes(folder):
    """A ball with vertex colours (PLY), a box a thousand times too large and off centre (OBJ,
    +y up, no colours), and three files that are not usable."""
    folder.mkdir()
    v, f = render.extract_mesh(lambda p: 0.5 - p.norm(dim=-1), 20, 0.0)
    render.write_ply(folder / "ball.ply", v, f, (v + 1) / 2)
    (folder / "ball.txt").write_text("a rainbow ball\n")
    b, bf = render.extract_mesh(
        lambda p: 0.3 - (p.abs() - torch.tensor([0.5, 0.1, 0.2])).amax(-1), 16, 0
    )
    lines = [f"v {x} {y} {z}" for x, y, z in (b * 1000 + 5000).tolist()]
    lines += [f"f {i + 1} {j + 1} {k + 1}" for i, j, k in bf.tolist()]
    (folder / "big_box.obj").write_text("\n".join(lines) + "\n")
    (folder / "notes.obj").write_text("this is not a mesh\nv 1 2 x\n")
    (folder / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    (folder / "broken.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 9\n")
    return v, f


def test_meshes_become_framed_object_folders(tmp_path):
    write_meshes(tmp_path / "in")
    out = tmp_path / "run"
    p = run_script("render.py", "--preset", "micro", "--meshes", tmp_path / "in", "--out", out)
    skipped = [line for line in p.stdout.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 3 and all(any(n in s for s in skipped) for n in ("notes", "points"))
    root = out / "0_data/meshes"
    assert sorted(x.name for x in root.iterdir()) == ["ball", "big_box"]
    for name in ("ball", "big_box"):
        ob = render.load_object(root / name, views=4)
        surf, _ = render.load_tensors(root / name / "surface.safetensors")
        assert surf["points"].norm(dim=-1).max() < render.FRAME_FILL + 1e-3  # framed as the world
        assert surf["points"].norm(dim=-1).max() > 0.9 * render.FRAME_FILL
        assert 0.05 < ob["masks"].mean() < 0.9  # in view, on white
    ball = render.load_object(root / "ball")
    assert (
        ball["prompt"] == "a rainbow ball"
        and render.load_object(root / "big_box")["prompt"] == "big box"
    )
    surf, _ = render.load_tensors(root / "ball/surface.safetensors")
    x, y, z = (surf["points"] * 0.5 / render.FRAME_FILL).unbind(-1)  # back in the file's frame
    assert torch.allclose(surf["colors"], (torch.stack([x, z, -y], -1) + 1) / 2, atol=0.03)
    box = render.load_tensors(root / "big_box/surface.safetensors")[0]["points"]
    extent = box.amax(0) - box.amin(0)
    assert extent[2] < extent[1] < extent[0]  # +y up in the file: its thin side stands up as z
    info = json.loads((root / "ball/object.json").read_text())
    assert info["split"] == "meshes" and info["source"].endswith("ball.ply")
    again = run_script("render.py", "--preset", "micro", "--meshes", tmp_path / "in", "--out", out)
    assert "0 rendered now" in again.stdout


def test_meshes_bad_inputs(tmp_path):
    missing = run_script(
        "render.py", "--meshes", tmp_path / "nowhere", "--out", tmp_path, check=False
    )
    assert one_line_error(missing) and "nowhere" in missing.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/a.obj").write_text("v 0 0 0\n")
    none = run_script("render.py", "--meshes", tmp_path / "bad", "--out", tmp_path, check=False)
    assert none.returncode != 0 and "none of its 1 meshes" in none.stderr
    big = run_script(
        "render.py",
        "--preset",
        "micro",
        "--meshes",
        tmp_path / "bad",
        "--max_faces",
        "10",
        check=False,
    )
    assert big.returncode != 0


def read_glb(path):
    data = path.read_bytes()
    magic, version, length = struct.unpack("<III", data[:12])
    assert magic == 0x46546C67 and version == 2 and length == len(data)
    n_json, kind = struct.unpack("<II", data[12:20])
    assert kind == 0x4E4F534A and n_json % 4 == 0
    gltf = json.loads(data[20 : 20 + n_json])
    rest = data[20 + n_json :]
    if not rest:
        return gltf, None
    n_bin, kind = struct.unpack("<II", rest[:8])
    assert kind == 0x004E4942 and n_bin % 4 == 0 and 8 + n_bin == len(rest)
    return gltf, rest[8:]


def test_glb_parses_back_with_one_colour_per_vertex(tmp_path):
    v, f = render.extract_mesh(lambda p: 0.5 - p.norm(dim=-1), 12, 0.0)
    v = v * torch.tensor([1.0, 1.0, 1.5])  # taller along +z, our up
    rgb = (v.clamp(-1, 1) + 1) / 2
    render.write_glb(tmp_path / "m.glb", v, f, rgb)
    gltf, blob = read_glb(tmp_path / "m.glb")
    prim = gltf["meshes"][0]["primitives"][0]
    acc = gltf["accessors"]
    pos_acc, col_acc, idx_acc = (
        acc[prim["attributes"]["POSITION"]],
        acc[prim["attributes"]["COLOR_0"]],
        acc[prim["indices"]],
    )
    assert pos_acc["count"] == col_acc["count"] == len(v) and idx_acc["count"] == 3 * len(f)
    assert prim["material"] == 0 and gltf["buffers"][0]["byteLength"] == len(blob)

    def read(accessor, dtype, width):
        view = gltf["bufferViews"][accessor["bufferView"]]
        raw = blob[view["byteOffset"] : view["byteOffset"] + view["byteLength"]]
        return np.frombuffer(raw, dtype).reshape(-1, width)

    pos, col = read(pos_acc, "<f4", 3), read(col_acc, "<f4", 3)
    idx = read(idx_acc, "<u4", 3)
    assert np.allclose(pos_acc["min"], pos.min(0)) and np.allclose(pos_acc["max"], pos.max(0))
    assert np.ptp(pos[:, 1]) > 1.4 * np.ptp(pos[:, 2])  # +y up: our z is glTF's y
    assert (idx == f.numpy()).all()
    srgb = np.where(col <= 0.0031308, col * 12.92, 1.055 * col ** (1 / 2.4) - 0.055)  # back to sRGB
    assert np.allclose(srgb, rgb.numpy(), atol=1e-4)
    render.write_glb(
        tmp_path / "empty.glb",
        torch.zeros(0, 3),
        torch.zeros(0, 3, dtype=torch.long),
        torch.zeros(0, 3),
    )
    gltf, blob = read_glb(tmp_path / "empty.glb")
    assert gltf["scenes"][0]["nodes"] == [] and blob is None
