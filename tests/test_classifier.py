"""The category classifier (issue #21): shapes, a safetensors round trip, the labels captions
give, the shipped model against its record, and the data engine's filter with it."""

import json

import pytest
import torch

import generate_views
import model
import render
from conftest import ROOT

SHIPPED = ROOT / "weights/classifier_tiny.safetensors"


def test_captions_name_their_category_and_main_colour():
    assert render.caption_labels("an orange mug with a blue handle") == (0, 1)
    assert render.caption_labels("a small robot") == (-1, -1)
    cfg = render.Config()
    for i in range(32):  # every world caption names its category and leads with slot 0's colour
        obj = render.world_object(cfg, "prompts", i)
        category, colour = render.caption_labels(obj["caption"])
        assert render.CATEGORY_NAMES[category] == obj["category"] and colour == obj["slots"][0]


def test_classifier_shapes_and_safetensors_round_trip(tmp_path):
    clf = model.Classifier(model.ClassifierConfig(res=16, width=8)).eval()
    views = torch.rand(5, 3, 16, 16)
    category, colour = clf(views)
    assert category.shape == (5, len(render.CATEGORIES)) and colour.shape == (
        5,
        len(render.COLOURS),
    )
    assert clf(torch.rand(2, 3, 32, 32))[0].shape == (2, len(render.CATEGORIES))  # resized to 16
    path = tmp_path / "classifier.safetensors"
    model.save_checkpoint(path, clf.state_dict(), "classifier", clf.config)
    again = model.load_classifier(path)
    assert torch.equal(again(views)[0], category) and torch.equal(again(views)[1], colour)
    with pytest.raises(render.DataError):
        model.load_lrm(path, "x")  # a classifier is not an LRM


def test_shipped_classifier_met_its_targets_on_held_out_views():
    """Its record (tests/test_shipped.py checks that it still scores so)."""
    meta = render.load_tensors(SHIPPED)[1]
    assert float(meta["category_acc"]) >= 0.95 and float(meta["color_acc"]) >= 0.9
    by_azimuth = json.loads(meta["category_acc_by_azimuth"])
    assert len(by_azimuth) == 8 and min(by_azimuth.values()) >= 0.85


def test_filter_rejects_an_orbit_of_two_categories_and_keeps_a_true_one():
    clf = model.load_classifier(SHIPPED)
    cfg = generate_views.Config(max_jump=10.0, max_drift=10.0)  # only the classifier's checks
    world = render.Config()
    c2w, K = render.orbit(8)
    mug, car = (
        render.world_object(world, "test_seen", 0),
        render.world_object(world, "test_seen", 2),
    )
    assert (mug["category"], car["category"]) == ("mug", "car")
    rgba, _ = render.render_views(
        render.pack([mug, car]),
        torch.arange(2).repeat_interleave(8),
        c2w.repeat(2, 1, 1),
        K.repeat(2, 1, 1),
        32,
    )
    views = render.on_white(rgba).view(2, 8, 3, 32, 32)
    assert generate_views.judge(views[0], cfg, clf, mug["caption"]) is None
    mixed = torch.cat([views[0, :3], views[1, 3:]])  # the mug turns into a car
    assert generate_views.judge(mixed, cfg, clf, mug["caption"]) == "wrong_category"
    recoloured = views[0].flip(1)  # RGB -> BGR: a mug of another colour
    reason = generate_views.judge(recoloured, cfg, clf, mug["caption"])
    assert reason == "wrong_colour" or mug["slots"][0] == list(render.COLOURS).index("green")
