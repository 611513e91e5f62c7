"""Feature trees, the content store and the non-pickled training state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth_templates.training.checkpoint import (
    flatten_optimizer_state,
    rng_state,
    set_rng_state,
    unflatten_optimizer_state,
)
from diffsynth_templates.training.feature_cache import ContentStore, FeatureCacheError
from diffsynth_templates.training.features import FeatureError, flatten_features, unflatten_features
from diffsynth_templates.training.objective import draw_noise, noise_seed


def test_features_round_trip_through_flat_tensors_and_json():
    features = {
        "emb": torch.randn(2, 3),
        "scales": [0.5, 1],
        "nested": {"ids": (torch.arange(3), "a")},
        "flag": None,
    }
    tensors: dict = {}
    structure = flatten_features(features, tensors, "s/")
    assert sorted(tensors) == ["s/0", "s/1"]
    back = unflatten_features(structure, tensors.__getitem__)
    assert torch.equal(back["emb"], features["emb"]) and back["scales"] == [0.5, 1] and back["flag"] is None
    assert isinstance(back["nested"]["ids"], tuple) and torch.equal(back["nested"]["ids"][0], torch.arange(3))


def test_uncacheable_features_are_named():
    with pytest.raises(FeatureError, match=r"features\['cond'\]\[1\] is a Image.*convert images to tensors"):
        flatten_features({"cond": [1, Image.new("RGB", (4, 4))]}, {}, "")
    with pytest.raises(FeatureError, match="ndarray"):
        flatten_features({"x": np.zeros(3)}, {}, "")


def test_content_store_is_atomic_and_reports_damage(tmp_path):
    store = ContentStore(tmp_path)
    store.put("text", "ab12", torch.ones(2, 2))
    assert store.has("text", "ab12") and torch.equal(store.get("text", "ab12"), torch.ones(2, 2))
    assert not list(tmp_path.rglob("*.tmp*"))
    store.path("text", "ab12").write_bytes(b"truncated")
    with pytest.raises(FeatureCacheError, match="rerun --task data_process"):
        store.get("text", "ab12")


def test_optimizer_state_round_trips_without_pickle():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=0.1, betas=(0.8, 0.95))
    for _ in range(2):
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
    tensors, meta = flatten_optimizer_state(optimizer.state_dict())
    restored = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1.0)
    restored.load_state_dict(unflatten_optimizer_state(tensors, meta))
    a, b = optimizer.state_dict(), restored.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key, value in a["state"][i].items():
            assert torch.equal(value, b["state"][i][key])


def test_rng_state_round_trips():
    tensors, meta = rng_state()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(tensors, meta)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_noise_depends_only_on_its_seed():
    seed = noise_seed(0, 5, 1, "abc")
    assert seed == noise_seed(0, 5, 1, "abc") != noise_seed(0, 5, 0, "abc")
    torch.manual_seed(123)  # global RNG state must not matter
    sigma, noise = draw_noise(seed, (1, 4, 2, 2))
    torch.manual_seed(7)
    sigma2, noise2 = draw_noise(seed, (1, 4, 2, 2))
    assert torch.equal(noise, noise2) and sigma == sigma2 and 0 <= float(sigma) <= 1
