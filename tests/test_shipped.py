"""The models in weights/ still score what they scored when they were shipped (their metadata's
"check", written by tests/ship_models.py), so a code change that breaks one fails here."""

import json

import pytest

import model
import render
import ship_models
from conftest import ROOT

# How far a figure may move (another CPU may round a few predictions the other way).
TOLERANCE = dict(psnr=0.1, ssim=0.005, color_err=0.005, chamfer_l1=0.005, fscore=0.02)
TOLERANCE |= dict(category_acc=0.03, color_acc=0.03)
TOLERANCE |= dict(caption_faithfulness=0.07, caption_category=0.07)  # 2 of 32 samples


@pytest.mark.parametrize(
    "kind", ["image_model", "classifier", "pretrained_video", "video_model", "lrm"]
)
def test_shipped_model_scores_as_recorded(kind):
    path = ROOT / "weights" / f"{kind}_tiny.safetensors"
    assert path.is_file(), f"{path}: missing; ship it with tests/ship_models.py"
    meta = render.load_tensors(path)[1]
    assert int(meta["world_version"]) == render.WORLD_VERSION
    recorded = json.loads(meta["check"])
    clf = model.load_classifier(ROOT / "weights/classifier_tiny.safetensors")
    now = ship_models.check(kind, path, clf)
    for key, value in recorded.items():
        assert abs(now[key] - value) <= TOLERANCE[key], f"{kind} {key}: {now[key]} != {value}"


def test_weights_stay_small():
    total = sum(p.stat().st_size for p in (ROOT / "weights").glob("*.safetensors"))
    assert total < 40e6, f"weights/ holds {total / 1e6:.1f} MB"
