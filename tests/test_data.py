import numpy as np
import pytest
import torch

import lossport
from lossport.data import MultiDigitsNet, _digits, _source_split, multidigits, multilabel, multiregression


def test_source_images_never_shared_between_splits():
    _, labels = _digits()
    s = {k: set(_source_split(labels, k).tolist()) for k in ("train", "val", "test")}
    assert not (s["train"] & s["val"]) and not (s["train"] & s["test"]) and not (s["val"] & s["test"])
    assert sum(len(v) for v in s.values()) == 1797


def test_multidigits_keys_shapes_and_composition():
    d = multidigits("val")
    assert d["image"].shape == (1000, 1, 10, 10) and d["image"].dtype == torch.float32
    assert d["left"].shape == (1000,) and d["right"].dtype == torch.int64
    assert float(d["image"].min()) >= 0 and float(d["image"].max()) <= 1
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


def test_multilabel_shapes_kinds_and_determinism():
    d = multilabel(200, labels=16, features=12, seed=3)
    assert set(d) == {"x", *(f"task{t}" for t in range(16))}
    assert d["x"].shape == (200, 12) and d["x"].dtype == torch.float32
    assert d["task15"].shape == (200, 1) and d["task15"].dtype == torch.float32
    ys = torch.cat([d[f"task{t}"] for t in range(16)], 1)
    assert set(ys.unique().tolist()) == {0.0, 1.0}
    assert 0.3 < float(ys.mean()) < 0.7  # about half positives
    assert torch.equal(d["task3"], multilabel(200, labels=16, features=12, seed=3)["task3"])
    assert not torch.equal(d["x"], multilabel(200, labels=16, features=12, seed=4)["x"])
    r = multilabel(50, labels=1024, kind="regression")
    assert len(r) == 1025 and r["task1023"].shape == (50, 1)


def test_multilabel_targets_share_a_low_rank_structure():
    d = multilabel(2000, labels=32, rank=4, kind="regression", seed=1)
    Y = torch.cat([d[f"task{t}"] for t in range(32)], 1).double()
    ev = torch.linalg.eigvalsh(torch.cov(Y.T)).flip(0)
    assert float(ev[:4].sum() / ev.sum()) > 0.95  # 4 latent features carry the targets (noise 0.1)
    # binary labels of correlated scores are correlated too: some pair well away from independence
    b = multilabel(2000, labels=8, rank=2, seed=1)
    B = torch.cat([b[f"task{t}"] for t in range(8)], 1).double()
    assert float((torch.corrcoef(B.T) - torch.eye(8)).abs().max()) > 0.3


def test_multilabel_rejects_bad_arguments_naming_them():
    for kwargs, word in (({"labels": 0}, "labels"), ({"n": 0}, "n"), ({"rank": 1.5}, "rank"), ({"kind": "x"}, "kind")):
        with pytest.raises(ValueError, match=word):
            multilabel(**kwargs)


def test_multilabel_trains_with_one_loss_per_task():
    d = multilabel(64, labels=5, features=6, seed=0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = torch.nn.Linear(6, 8)
            self.heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(5)])

        def forward(self, x):
            h = torch.relu(self.trunk(x))
            return {f"task{t}": torch.sigmoid(head(h)) for t, head in enumerate(self.heads)}

    net = Net()
    losses = lossport.Objective()(net, d)
    assert sorted(losses.parts) == sorted(f"task{t}" for t in range(5))
    assert all(bool(torch.isfinite(v)) for v in losses.parts.values())
