import math

import pytest
import torch
import torch.nn.functional as F

from lossport import losses as L


def test_mse_mae_huber_values_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    y = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    # element errors 1, 0, 2, 4 -> squared 1, 0, 4, 16
    assert L.mse(x, y).item() == pytest.approx((1 + 0 + 4 + 16) / 4)
    assert L.mae(x, y).item() == pytest.approx((1 + 0 + 2 + 4) / 4)
    assert torch.allclose(L.mse(x, y, reduction="none"), torch.tensor([0.5, 10.0]))
    assert L.mse(x, y, reduction="sum").item() == pytest.approx(21.0)
    # huber delta 1: |d|=1 -> 0.5, 0 -> 0, 2 -> 1.5, 4 -> 3.5
    assert L.huber(x, y).item() == pytest.approx((0.5 + 0 + 1.5 + 3.5) / 4)
    assert L.Huber(delta=2.0)(x, y).item() == pytest.approx((0.5 + 0 + 2 + 6) / 4)


def test_missing_regression_targets_are_masked_per_element():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]])
    y = torch.tensor([[0.0, float("nan")], [1.0, 1.0], [float("nan"), float("nan")]])
    # labelled elements: (1-0)^2 = 1, (3-1)^2 = 4, (5-1)^2 = 16
    assert L.mse(x, y).item() == pytest.approx(21 / 3)
    per = L.mse(x, y, reduction="none")
    assert per[0].item() == pytest.approx(1.0) and per[1].item() == pytest.approx(10.0)
    assert math.isnan(per[2].item())
    # gradient does not flow through masked elements and is finite
    x.requires_grad_(True)
    L.mse(x, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad[2].abs().sum() == 0


def test_sample_weights_give_a_weighted_mean():
    x = torch.tensor([1.0, 2.0, 3.0])
    y = torch.zeros(3)
    sw = torch.tensor([1.0, 0.0, 3.0])
    assert L.mse(x, y, sample_weight=sw).item() == pytest.approx((1 * 1 + 3 * 9) / 4)


def test_cross_entropy_index_matches_torch_with_ignore_and_class_weights():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    t = torch.tensor([0, 3, -100, 2, 1, 3])
    cw = torch.tensor([1.0, 2.0, 0.5, 3.0])
    ours = L.cross_entropy(logits, t, class_weights=cw)
    ref = F.cross_entropy(logits, t, weight=cw, ignore_index=-100)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(L.cross_entropy(logits, t), F.cross_entropy(logits, t), atol=1e-6)


def test_cross_entropy_index_from_probabilities_and_float_targets_with_nan():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    p = logits.softmax(1)
    t = torch.tensor([0.0, float("nan")])
    v = L.cross_entropy(p, t, from_logits=False)
    assert v.item() == pytest.approx(-math.log(p[0, 0].item()), rel=1e-5)


def test_cross_entropy_probabilities_and_binary_by_hand():
    logits = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[0.25, 0.75]])
    assert L.cross_entropy(logits, q, form="probabilities").item() == pytest.approx(math.log(2))
    z = torch.tensor([0.0, 2.0])
    y = torch.tensor([1.0, 0.0])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert L.cross_entropy(z, y, form="binary").item() == pytest.approx(expected, rel=1e-6)
    p = torch.sigmoid(z)
    assert L.cross_entropy(p, y, form="binary", from_logits=False).item() == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_is_stable_on_extreme_logits():
    logits = torch.tensor([[1000.0, -1000.0, 0.0]], requires_grad=True)
    v = L.cross_entropy(logits, torch.tensor([1]))
    assert v.item() == pytest.approx(2000.0)
    v.backward()
    assert torch.isfinite(logits.grad).all()
    b = L.cross_entropy(torch.tensor([500.0]), torch.tensor([0.0]), form="binary")
    assert b.item() == pytest.approx(500.0)


def test_cross_entropy_errors_name_the_problem():
    with pytest.raises(ValueError, match="0..2"):
        L.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="whole numbers"):
        L.cross_entropy(torch.zeros(2, 3), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="class_weights"):
        L.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), class_weights=[1.0, 2.0])


def test_shape_mismatch_is_an_error_but_b_vs_b1_is_reshaped():
    with pytest.raises(ValueError, match="shape"):
        L.mse(torch.zeros(4, 1), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="shape"):
        L.mse(torch.zeros(4, 1), torch.zeros(1, 4))
    x = torch.tensor([[1.0], [2.0]])
    assert L.mse(x, torch.tensor([0.0, 0.0])).item() == pytest.approx(2.5)


def test_contrastive_wolfram_meaning():
    d = torch.tensor([0.1, 0.2, 0.9])
    maximise = torch.tensor([True, False, True])
    # True: max(0, 0.5 - d)^2 ; False: d^2
    expected = ((0.5 - 0.1) ** 2 + 0.2**2 + 0.0) / 3
    assert L.contrastive(d, maximise).item() == pytest.approx(expected)
    assert L.Contrastive(margin=1.0)(d, maximise).item() == pytest.approx(((0.9) ** 2 + 0.04 + 0.01) / 3)


def test_modules_wrap_functions_and_aliases():
    x, y = torch.randn(3, 2), torch.randn(3, 2)
    assert torch.equal(L.MSE()(x, y), L.mse(x, y))
    assert torch.equal(L.MAE()(x, y), L.mae(x, y))
    assert isinstance(L.from_alias("ce"), L.CrossEntropy) and L.from_alias("bce").form == "binary"
    assert set(L.ALIASES) == {"mse", "mae", "huber", "ce", "bce", "contrastive"}
