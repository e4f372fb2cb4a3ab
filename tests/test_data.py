import numpy as np
import torch

import lossport
from lossport.data import MultiDigitsNet, _digits, _source_split, multidigits, multiregression


def test_source_images_never_shared_between_splits():
    _, labels = _digits()
    s = {k: set(_source_split(labels, k).tolist()) for k in ("train", "val", "test")}
    assert not (s["train"] & s["val"]) and not (s["train"] & s["test"]) and not (s["val"] & s["test"])
    assert sum(len(v) for v in s.values()) == 1797


def test_multidigits_keys_shapes_and_composition():
    d = multidigits("val")
    assert d["image"].shape == (1000, 1, 10, 10) and d["image"].dtype == torch.float32
    assert d["left"].shape == (1000,) and d["right"].dtype == torch.int64
    assert 0 <= float(d["image"].min()) and float(d["image"].max()) <= 1
    images, labels = _digits()
    # the top-left 2x2 corner only holds digit A, the bottom-right only digit B: find the sources back
    src = _source_split(labels, "val")
    img0 = (d["image"][0, 0] * 16).round().numpy().astype(np.uint8)
    a_cands = [i for i in src if np.array_equal(images[i][:2, :2], img0[:2, :2]) and labels[i] == d["left"][0]]
    b_cands = [i for i in src if np.array_equal(images[i][6:, 6:], img0[8:, 8:]) and labels[i] == d["right"][0]]
    assert a_cands and b_cands
    assert float(d["ink"][0]) == float(img0.astype(np.float64).sum()) / 16


def test_multidigits_deterministic_and_seeded():
    a, b, c = multidigits("test"), multidigits("test"), multidigits("test", seed=1)
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])
    assert len(multidigits("train")["left"]) == 4000
    assert len(multidigits("train", size=10)["left"]) == 10


def test_ink_is_on_another_scale_than_the_class_losses():
    d = multidigits("train", size=256)
    torch.manual_seed(0)
    losses = lossport.Objective()(MultiDigitsNet(), d)
    assert losses.parts["ink"].item() > 100 * losses.parts["left"].item()


def test_multiregression_scales_and_determinism():
    d = multiregression("train")
    assert d["x"].shape == (2000, 8)
    assert d["linear"].std() > 30 * d["smooth"].std() > 30 * d["count"].std()
    assert torch.equal(d["linear"], multiregression("train")["linear"])
    assert not torch.equal(d["x"], multiregression("train", seed=2)["x"])
