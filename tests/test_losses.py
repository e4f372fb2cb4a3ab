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
    with pytest.raises(ValueError, match=r"0..2"):
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


# ------------------------------------------------------------------------------------------ class dimension


def test_cross_entropy_class_dim_minus_one_on_token_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, 5, generator=g)
    t = torch.randint(0, 5, (4, 7), generator=g)
    ref = F.cross_entropy(logits.permute(0, 2, 1), t)
    assert torch.allclose(L.CrossEntropy(class_dim=-1)(logits, t), ref, atol=1e-6)
    assert torch.allclose(L.cross_entropy(logits, t, class_dim=2), ref, atol=1e-6)
    # inferred: only the last dim fits (4, 7) targets
    assert torch.allclose(L.cross_entropy(logits, t), ref, atol=1e-6)
    per = L.cross_entropy(logits, t, class_dim=-1, reduction="none")
    assert per.shape == (4,) and torch.allclose(per.mean(), ref, atol=1e-6)


def test_cross_entropy_ambiguous_layout_is_an_error_and_class_dim_chooses():
    # B=1, T=K=2: logits[t][k]; row 0 = [0, ln 3] (p = 1/4, 3/4), row 1 = [0, 0]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    t = torch.tensor([[1, 1]])
    with pytest.raises(ValueError, match=r"class_dim=1.*class_dim=-1"):
        L.cross_entropy(logits, t)
    # classes last: -log(3/4) and -log(1/2)
    last = (math.log(4 / 3) + math.log(2)) / 2
    assert L.CrossEntropy(class_dim=-1)(logits, t).item() == pytest.approx(last, rel=1e-6)
    # classes on dim 1: position 0 scores [0, 0] -> log 2; position 1 scores [ln 3, 0] -> -log(1/4)
    first = (math.log(2) + math.log(4)) / 2
    assert L.CrossEntropy(class_dim=1)(logits, t).item() == pytest.approx(first, rel=1e-6)


def test_resolve_class_dim_rules():
    assert L.resolve_class_dim((8, 3), (8,), None, "index") == 1
    assert L.resolve_class_dim((2, 4, 6, 6), (2, 6, 6), None, "index") == 1  # segmentation (B, C, H, W)
    assert L.resolve_class_dim((2, 6, 4), (2, 6), None, "index") == 2  # token logits (B, T, K)
    assert L.resolve_class_dim((2, 6, 4), (2, 6), -1, "index") == 2
    assert L.resolve_class_dim((2, 6, 6), (2, 6, 6), None, "probabilities") == 1
    with pytest.raises(ValueError, match="out of range"):
        L.resolve_class_dim((2, 6), (2,), 3, "index")


# --------------------------------------------------------------------------------------------- TorchLoss


def _batch(seed=0, n=6, c=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randn(n, c, generator=g), torch.rand(n, c, generator=g)


def test_torch_losses_equal_their_own_reduction_on_full_labels():
    x, y, p = _batch()
    t = torch.tensor([0, 3, 2, 2, 1, 3])
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    logp, q = x.log_softmax(1), y.softmax(1)
    cases = [
        (torch.nn.MSELoss(), x, y),
        (torch.nn.MSELoss(reduction="sum"), x, y),
        (torch.nn.L1Loss(), x, y),
        (torch.nn.HuberLoss(delta=0.5), x, y),
        (torch.nn.SmoothL1Loss(beta=0.3), x, y),
        (torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((4,), 2.0), weight=w), x, p),
        (torch.nn.BCELoss(), p.clamp(0.05, 0.95), p),
        (torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.2), x, t),
        (torch.nn.CrossEntropyLoss(weight=w), x, q),
        (torch.nn.NLLLoss(weight=w), logp, t),
        (torch.nn.KLDivLoss(reduction="batchmean"), logp, q),
        (torch.nn.KLDivLoss(reduction="sum"), logp, q),
        (torch.nn.PoissonNLLLoss(), x, p),
    ]
    for module, a, b in cases:
        ours = L.TorchLoss(module)(a, b)
        assert torch.allclose(ours, module(a, b), atol=1e-6, rtol=1e-6), module
        assert module.reduction in ("mean", "sum", "batchmean")  # the given module is never changed


def test_torch_cross_entropy_class_weight_denominator_and_ignore_index_by_hand():
    # scores [0, ln 3] -> p = (1/4, 3/4); class weights (1, 3); the third label is missing (-100)
    logits = torch.tensor([[0.0, math.log(3.0)]] * 3)
    t = torch.tensor([0, 1, -100])
    ce = L.TorchLoss(torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0])))
    expected = (1 * math.log(4) + 3 * math.log(4 / 3)) / (1 + 3)
    assert ce(logits, t).item() == pytest.approx(expected, rel=1e-6)
    per = ce(logits, t, reduction="none")
    assert per[0].item() == pytest.approx(math.log(4)) and per[1].item() == pytest.approx(math.log(4 / 3))
    assert math.isnan(per[2].item())
    # sample weights (2, 1, 5): sum_i s_i w_yi l_i / sum_i s_i w_yi
    sw = torch.tensor([2.0, 1.0, 5.0])
    weighted = (2 * 1 * math.log(4) + 1 * 3 * math.log(4 / 3)) / (2 * 1 + 1 * 3)
    assert ce(logits, t, sample_weight=sw).item() == pytest.approx(weighted, rel=1e-6)
    # float class targets with NaN for missing, as lossport's own cross-entropy takes them
    tf = torch.tensor([0.0, 1.0, float("nan")])
    assert ce(logits, tf).item() == pytest.approx(expected, rel=1e-6)


def test_torch_mse_masks_nan_targets_and_weights_examples_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([[0.0, float("nan")], [1.0, 1.0], [float("nan"), float("nan")]])
    mse = L.TorchLoss(torch.nn.MSELoss())
    # labelled squared errors: example 0: 1; example 1: 4, 16; example 2: none
    assert mse(x, y).item() == pytest.approx(21 / 3)
    per = mse(x, y, reduction="none")
    assert per[:2].tolist() == pytest.approx([1.0, 10.0]) and math.isnan(per[2].item())
    sw = torch.tensor([1.0, 2.0, 5.0])
    v = mse(x, y, sample_weight=sw)
    assert v.item() == pytest.approx((1 * 1 + 2 * 4 + 2 * 16) / (1 + 2 + 2))
    v.backward()
    assert torch.isfinite(x.grad).all() and x.grad[2].abs().sum() == 0 and x.grad[0, 1] == 0
    summed = L.TorchLoss(torch.nn.MSELoss(reduction="sum"))
    assert summed(x, y, sample_weight=sw).item() == pytest.approx(1 + 2 * 20)


def test_torch_kl_batchmean_counts_only_labelled_examples():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]]))
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5], [float("nan"), float("nan")]])
    kl = L.TorchLoss(torch.nn.KLDivLoss(reduction="batchmean"))
    # example 0: 0; example 1: 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75); example 2 missing
    ex1 = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert kl(logp, q).item() == pytest.approx(ex1 / 2, rel=1e-6)
    assert kl(logp, q, sample_weight=torch.tensor([1.0, 3.0, 1.0])).item() == pytest.approx(3 * ex1 / 4, rel=1e-6)


def test_torch_loss_b_vs_b1_is_reshaped_not_broadcast():
    x = torch.tensor([[1.0], [2.0]])
    assert L.TorchLoss(torch.nn.MSELoss())(x, torch.tensor([0.0, 0.0])).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match=r"broadcast to \(2, 3\)"):
        L.TorchLoss(torch.nn.MSELoss())(x, torch.zeros(2, 3))
    # a legitimately different target shape (class indices for MultiMarginLoss) is left to the module
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    margin = torch.nn.MultiMarginLoss()
    assert torch.allclose(L.TorchLoss(margin)(scores, torch.tensor([0, 0])), margin(scores, torch.tensor([0, 0])))


def test_torch_loss_class_dim_moves_token_logits_and_double_weights_follow_the_input():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 4, (3, 5), generator=g)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])  # float32 weights, float64 logits
    ref = F.cross_entropy(logits.permute(0, 2, 1), t, weight=w.double())
    module = torch.nn.CrossEntropyLoss(weight=w)
    ce = L.TorchLoss(module)
    assert torch.allclose(ce(logits, t), ref)  # only the last dim fits (3, 5) targets
    assert torch.allclose(ce.adapted(class_dim=-1)(logits, t), ref)
    assert module.weight is w and module.weight.dtype == torch.float32  # the given module is left as it was


def test_torch_loss_shares_a_learned_loss_parameters_and_takes_a_label_column():
    class LearnedScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.reduction = "mean"
            self.log_s = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, input, target):
            v = (input - target).pow(2) * self.log_s.exp()
            return v.mean() if self.reduction == "mean" else v

    module = LearnedScale()
    loss = L.TorchLoss(module)
    loss(torch.ones(2, 1), torch.zeros(2, 1)).backward()
    assert module.log_s.grad is not None and module.log_s.grad.item() == pytest.approx(math.exp(0.5))
    assert module.reduction == "mean"
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    column = torch.tensor([[1], [0]])
    ce = L.TorchLoss(torch.nn.CrossEntropyLoss())(logits, column)
    assert ce.item() == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, rel=1e-6)


def test_torch_loss_errors_say_what_to_do():
    with pytest.raises(ValueError, match="reduction='mean'"):
        L.TorchLoss(torch.nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match=r"takes \(input1, input2, target\)"):
        L.TorchLoss(torch.nn.CosineEmbeddingLoss())

    class Scalar(torch.nn.Module):
        reduction = "mean"

        def forward(self, input, target):
            return (input - target).pow(2).mean()  # ignores its reduction

    with pytest.raises(ValueError, match="no per-example values"):
        L.TorchLoss(Scalar())(torch.zeros(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"one weight per example"):
        L.TorchLoss(torch.nn.CrossEntropyLoss())(torch.zeros(3, 2), torch.ones(3, 2) / 2, torch.ones(3, 2))


def test_torch_loss_of_specs():
    assert isinstance(L.torch_loss(torch.nn.L1Loss()), L.TorchLoss)
    assert isinstance(L.torch_loss(F.cross_entropy).inner, torch.nn.CrossEntropyLoss)
    assert L.torch_loss(lambda o, t: o) is None and L.torch_loss(L.MSE()) is None
    assert not L.is_torch_loss(L.MSE()) and not L.is_torch_loss(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------- ports


def test_port_loss_sums_per_example_and_averages_over_the_batch():
    v = torch.tensor([[1.0, 4.0], [9.0, 16.0]])  # per-example sums 5 and 25
    value, per = L.port_loss("p", v, 2)
    assert value.item() == pytest.approx(15.0) and per.tolist() == [5.0, 25.0]
    assert L.port_loss("p", v, 2, torch.tensor([1.0, 3.0]))[0].item() == pytest.approx((5 + 75) / 4)
    assert L.port_loss("p", torch.tensor(2.5), 2)[0].item() == 2.5
    assert L.port_loss("p", torch.tensor([1.0, 2.0, 3.0]), 2)[0].item() == 6.0  # no batch dimension: summed
    with pytest.raises(ValueError, match="sample weights"):
        L.port_loss("p", torch.tensor(2.5), 2, torch.ones(2))


def test_torch_cross_entropy_probability_targets_mask_a_row_with_nan():
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, -5.0]])
    q = torch.tensor([[0.5, 0.5], [float("nan"), float("nan")]])
    ce = L.TorchLoss(torch.nn.CrossEntropyLoss())
    # row 0: -(0.5 log 1/4 + 0.5 log 3/4); row 1 missing
    assert ce(logits, q).item() == pytest.approx(0.5 * math.log(4) + 0.5 * math.log(4 / 3), rel=1e-6)
    assert math.isnan(ce(logits, q, reduction="none")[1].item())
