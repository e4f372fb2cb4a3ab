"""Loss specs people already have: torch.nn losses, torch.nn.functional losses, Keras-order callables, token
logits, array-valued loss outputs (issue 13)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lossport.spec
from lossport import CustomLoss, LossSpecError, Objective


class Heads(nn.Module):
    """digit: Softmax head, flag: Sigmoid head, size: linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.digit = nn.Sequential(nn.Linear(8, 3), nn.Softmax(dim=1))
        self.flag = nn.Sequential(nn.Linear(8, 1), nn.Sigmoid())
        self.size = nn.Linear(8, 2)

    def forward(self, x):
        h = self.trunk(x)
        return {"digit": self.digit(h), "flag": self.flag(h), "size": self.size(h)}


class Functional(nn.Module):
    """The same heads through torch.softmax / torch.sigmoid (no module to take the logits from)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.digit = nn.Linear(4, 3)
        self.flag = nn.Linear(4, 1)

    def forward(self, x):
        return {"digit": torch.softmax(self.digit(x), 1), "flag": torch.sigmoid(self.flag(x))}


class Identity(nn.Module):
    def forward(self, x):
        return x * 1.0


def batch(n=6):
    g = torch.Generator().manual_seed(3)
    return {
        "x": torch.randn(n, 4, generator=g),
        "digit": torch.randint(0, 3, (n,), generator=g),
        "flag": torch.randint(0, 2, (n, 1), generator=g).float(),
        "size": torch.randn(n, 2, generator=g),
    }


# ------------------------------------------------------------------------------------------- torch.nn losses


def test_torch_loss_modules_are_specs_and_equal_torch():
    net, b = Heads(), batch()
    out = net(b["x"])
    mse, l1 = nn.MSELoss(), nn.L1Loss()
    losses = Objective({"size": [mse, l1]})(net, b)
    assert torch.allclose(losses.parts["size/mseloss"], F.mse_loss(out["size"], b["size"]))
    assert torch.allclose(losses.parts["size/l1loss"], F.l1_loss(out["size"], b["size"]))
    assert mse.reduction == "mean" and l1.reduction == "mean"  # the user's modules are unchanged
    single = Objective(nn.HuberLoss(delta=0.5))(nn.Linear(4, 2), (b["x"], b["size"]))
    assert single.names == ["out"] and torch.isfinite(single.total)


def test_torch_loss_module_masks_missing_labels_and_weights_examples():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]])
    y = torch.tensor([[0.0, float("nan")], [1.0, 1.0], [float("nan"), float("nan")]])
    sw = torch.tensor([1.0, 2.0, 5.0])
    obj = Objective({"out": nn.MSELoss()})
    losses = obj(Identity(), {"x": x, "out": y, "out_weight": sw}, per_example=True)
    assert losses.parts["out"].item() == pytest.approx((1 * 1 + 2 * 4 + 2 * 16) / 5)
    assert losses.counts["out"] == 2
    per = losses.per_example["out"]
    assert per[:2].tolist() == pytest.approx([1.0, 10.0]) and math.isnan(per[2].item())
    assert "nn.MSELoss" in obj.describe()


def test_torch_loss_module_errors_name_the_output_and_the_fix():
    net, b = Heads(), batch()
    with pytest.raises(LossSpecError, match=r"'size'.*reduction='mean'"):
        Objective({"size": nn.MSELoss(reduction="none")})(net, b)
    with pytest.raises(LossSpecError, match=r"'size'.*input1, input2, target"):
        Objective({"size": nn.CosineEmbeddingLoss()})(net, b)
    with pytest.raises(LossSpecError, match=r"MSELoss\(\), not the class"):
        Objective({"size": nn.MSELoss})(net, b)
    with pytest.raises(LossSpecError, match="CustomLoss"):
        Objective({"size": nn.Linear(2, 2)})(net, b)


# ------------------------------------------------------------------------------ cross-entropy on probabilities


@pytest.mark.parametrize("spec", [F.cross_entropy, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.1)])
def test_torch_cross_entropy_on_a_softmax_output_gets_the_logits(spec):
    net, b = Heads(), batch()
    obj = Objective({"digit": spec})
    losses = obj(net, b)
    logits = net.digit[0](net.trunk(b["x"]))
    smoothing = getattr(spec, "label_smoothing", 0.0)
    ref = F.cross_entropy(logits, b["digit"], label_smoothing=smoothing)
    assert torch.allclose(losses.parts["digit"], ref, atol=1e-6)
    double = F.cross_entropy(logits.softmax(1), b["digit"], label_smoothing=smoothing)  # softmax applied twice
    assert not torch.allclose(losses.parts["digit"], double, atol=1e-3)
    assert "from the logits entering 'digit.1'" in obj.describe()


@pytest.mark.parametrize("spec", [F.binary_cross_entropy_with_logits, nn.BCEWithLogitsLoss()])
def test_torch_bce_with_logits_on_a_sigmoid_output_gets_the_logits(spec):
    net, b = Heads(), batch()
    losses = Objective({"flag": spec})(net, b)
    logits = net.flag[0](net.trunk(b["x"]))
    assert torch.allclose(losses.parts["flag"], F.binary_cross_entropy_with_logits(logits, b["flag"]), atol=1e-6)


def test_torch_cross_entropy_on_functional_softmax_and_sigmoid_uses_the_probabilities():
    net, b = Functional(), batch()
    losses = Objective({"digit": F.cross_entropy, "flag": nn.BCEWithLogitsLoss()})(net, b)
    ce = F.cross_entropy(net.digit(b["x"]), b["digit"])
    bce = F.binary_cross_entropy_with_logits(net.flag(b["x"]), b["flag"])
    assert torch.allclose(losses.parts["digit"], ce, atol=1e-5)
    assert torch.allclose(losses.parts["flag"], bce, atol=1e-5)


def test_torch_cross_entropy_on_a_softmax_over_the_last_dim_of_token_logits():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.lin = nn.Linear(3, 5)
            self.act = nn.Softmax(dim=-1)

        def forward(self, x):
            return self.act(self.lin(x))  # (B, T, K) probabilities

    net, x = Tagger(), torch.randn(2, 5, 3)  # T == K == 5: only the softmax says where the classes are
    t = torch.randint(0, 5, (2, 5))
    losses = Objective(nn.CrossEntropyLoss())(net, (x, t))
    assert torch.allclose(losses.total, F.cross_entropy(net.lin(x).permute(0, 2, 1), t), atol=1e-6)


def test_logit_loss_on_the_wrong_activation_is_an_error():
    net, b = Heads(), batch()
    with pytest.raises(LossSpecError, match=r"'flag' holds sigmoid probabilities.*nn.CrossEntropyLoss"):
        Objective({"flag": nn.CrossEntropyLoss()})(net, b)
    with pytest.raises(LossSpecError, match=r"'digit' holds softmax probabilities.*nn.BCEWithLogitsLoss"):
        Objective({"digit": nn.BCEWithLogitsLoss()})(net, b)
    with pytest.raises(LossSpecError, match=r"'digit' holds softmax.*nn.NLLLoss expects log-probabilities"):
        Objective({"digit": nn.NLLLoss()})(net, b)
    with pytest.raises(LossSpecError, match=r"'digit' holds softmax.*log-probabilities.*LogSoftmax"):
        Objective({"digit": F.nll_loss})(Functional(), b)


# ------------------------------------------------------------------------------------------------ Keras order


def test_keras_order_callables_get_target_then_prediction():
    x = torch.tensor([[2.0], [0.0], [5.0]])  # the output (Identity net)
    y = torch.ones(3, 1)

    def over(y_true, y_pred):  # penalises over-prediction only
        return (y_pred - y_true).clamp_min(0).mean()

    def over_torch_order(output, target):
        return (output - target).clamp_min(0).mean()

    def ambiguous(a, b):
        return (a - b).clamp_min(0).mean()

    # relu(o - t) = 1, 0, 4 -> 5/3; swapped it would be relu(t - o) = 0, 1, 0 -> 1/3
    assert Objective(over)(Identity(), (x, y)).total.item() == pytest.approx(5 / 3)
    assert Objective(over_torch_order)(Identity(), (x, y)).total.item() == pytest.approx(5 / 3)
    assert Objective(ambiguous)(Identity(), (x, y)).total.item() == pytest.approx(5 / 3)  # (output, target)
    assert Objective(lambda y_true, y_pred: (y_pred - y_true).clamp_min(0).mean())(
        Identity(), (x, y)
    ).total.item() == pytest.approx(5 / 3)
    declared = CustomLoss(over, target=True)
    assert Objective(declared)(Identity(), (x, y)).total.item() == pytest.approx(5 / 3)
    obj = Objective({"out": over})
    obj(Identity(), (x, y))
    assert "Keras order" in obj.describe()


def test_keras_order_names():
    assert lossport.spec.keras_order(lambda y_true, y_pred: 0)
    assert lossport.spec.keras_order(lambda target, output, sample_weight=None: 0)
    assert lossport.spec.keras_order(lambda labels, logits: 0)
    assert not lossport.spec.keras_order(lambda output, target: 0)
    assert not lossport.spec.keras_order(lambda input, target: 0)
    assert not lossport.spec.keras_order(lambda a, b: 0)
    assert not lossport.spec.keras_order(lambda y_pred, y_true: 0)
    assert not lossport.spec.keras_order(max)  # no signature: today's order


# ----------------------------------------------------------------------------------------------- token logits


class TokenHead(nn.Module):
    def __init__(self, k):
        super().__init__()
        torch.manual_seed(5)
        self.lin = nn.Linear(3, k)

    def forward(self, x):
        return self.lin(x)  # (B, T, K) logits, as a Hugging Face token-classification head


def test_ce_alias_recognises_token_logits():
    net, x = TokenHead(4), torch.randn(2, 7, 3)
    t = torch.randint(0, 4, (2, 7))
    t[0, 3] = -100  # a padding token
    ref = F.cross_entropy(net(x).permute(0, 2, 1), t)
    assert torch.allclose(Objective("ce")(net, (x, t)).total, ref, atol=1e-6)


def test_ce_alias_on_ambiguous_token_logits_is_an_error_that_says_how_to_choose():
    from lossport.losses import CrossEntropy

    net, x = TokenHead(5), torch.randn(2, 5, 3)
    t = torch.randint(0, 5, (2, 5))
    with pytest.raises(LossSpecError, match=r"output 'out'.*CrossEntropy\(class_dim=1\).*class_dim=-1"):
        Objective("ce")(net, (x, t))
    last = Objective(CrossEntropy(class_dim=-1))(net, (x, t)).total
    assert torch.allclose(last, F.cross_entropy(net(x).permute(0, 2, 1), t), atol=1e-6)
    first = Objective(CrossEntropy(class_dim=1))(net, (x, t)).total
    assert torch.allclose(first, F.cross_entropy(net(x), t), atol=1e-6)


def test_auto_on_a_softmax_over_the_last_dim_uses_that_dim():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = TokenHead(5)
            self.act = nn.Softmax(dim=-1)

        def forward(self, x):
            return self.act(self.head(x))

    net, x = Tagger(), torch.randn(2, 5, 3)
    t = torch.randint(0, 5, (2, 5))
    ref = F.cross_entropy(net.head(x).permute(0, 2, 1), t)
    assert torch.allclose(Objective("auto")(net, (x, t)).total, ref, atol=1e-6)
    assert torch.allclose(Objective("ce")(net, (x, t)).total, ref, atol=1e-6)


# ------------------------------------------------------------------------------------------- array-valued ports


class Penalised(nn.Module):
    def forward(self, x):
        return {"pred": x * 2, "penalty": x**2}


def test_array_port_is_summed_per_example_and_averaged_over_the_batch():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # penalty rows sum to 5 and 25
    losses = Objective("penalty")(Penalised(), {"x": x}, per_example=True)
    assert losses.total.item() == pytest.approx(15.0)
    assert losses.per_example["penalty"].tolist() == [5.0, 25.0]
    weighted = Objective("penalty")(Penalised(), {"x": x, "penalty_weight": torch.tensor([1.0, 3.0])})
    assert weighted.total.item() == pytest.approx((5 + 75) / 4)
    # the value (and so the gradient scale) does not grow with the batch
    eight = Objective("penalty")(Penalised(), {"x": torch.tensor([[1.0, 2.0]]).repeat(8, 1)})
    assert eight.total.item() == pytest.approx(5.0)


def test_port_without_batch_dimension_is_summed_and_scalar_port_refuses_sample_weights():
    class Components(nn.Module):
        def forward(self, x):
            return {"pred": x, "terms": torch.stack([x.mean(), x.std(), x.abs().max()]), "reg": x.pow(2).mean()}

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # batch of 2, a (3,) vector of loss terms
    losses = Objective("terms")(Components(), {"x": x})
    assert losses.total.item() == pytest.approx(2.5 + torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item() + 4.0)
    with pytest.raises(LossSpecError, match=r"'reg'.*sample weights"):
        Objective("reg")(Components(), {"x": x, "reg_weight": torch.ones(2)})


def test_ce_alias_on_a_functional_softmax_over_the_last_dim_and_auto_mse_hint():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = TokenHead(5)

        def forward(self, x):
            return torch.softmax(self.head(x), dim=-1)  # T == K == 5: the softmax's dim says where the classes are

    net, x = Tagger(), torch.randn(2, 5, 3)
    t = torch.randint(0, 5, (2, 5))
    ref = F.cross_entropy(net.head(x).permute(0, 2, 1), t)
    assert torch.allclose(Objective("ce")(net, (x, t)).total, ref, atol=1e-5)
    # auto on plain token logits chooses MSE (Wolfram's rule); the shape error points to 'ce'
    with pytest.raises(LossSpecError, match="class indices: give this output the loss 'ce'"):
        Objective("auto")(TokenHead(4), (x, torch.randint(0, 4, (2, 5))))


def test_auto_on_a_functional_log_softmax_over_the_last_dim_of_a_3d_output():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = TokenHead(4)

        def forward(self, x):
            return torch.log_softmax(self.head(x), dim=-1)

    net, x = Tagger(), torch.randn(2, 6, 3)
    t = torch.randint(0, 4, (2, 6))
    ref = F.cross_entropy(net.head(x).permute(0, 2, 1), t)
    assert torch.allclose(Objective("auto")(net, (x, t)).total, ref, atol=1e-5)


HEADS = {
    "linear": lambda: nn.Linear(4, 3),
    "softmax": lambda: nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1)),
    "sigmoid": lambda: nn.Sequential(nn.Linear(4, 1), nn.Sigmoid()),
    "functional": lambda: Functional(),
}
TARGETS = {
    "classes": lambda g: torch.randint(0, 3, (5,), generator=g),
    "binary": lambda g: torch.randint(0, 2, (5, 1), generator=g).float(),
    "values": lambda g: torch.randn(5, 3, generator=g),
}
TORCH_SPECS = [
    nn.MSELoss(),
    nn.L1Loss(reduction="sum"),
    nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0])),
    nn.BCEWithLogitsLoss(),
    nn.BCELoss(),
    nn.NLLLoss(),
    nn.KLDivLoss(reduction="batchmean"),
    F.cross_entropy,
    F.mse_loss,
    F.binary_cross_entropy_with_logits,
]


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_torch_loss_on_every_head_gives_a_finite_value_or_a_loss_spec_error(head, target):
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(5, 4, generator=g), TARGETS[target](g)
    net = HEADS[head]()
    for spec in TORCH_SPECS:
        try:
            out = Objective(spec)(net, (x, y) if head != "functional" else {"x": x, "digit": y, "flag": y})
        except LossSpecError:
            continue
        except Exception as e:  # anything else escaping is a bug
            pytest.fail(f"{spec!r} on a {head} head with {target} targets raised {type(e).__name__}: {e}")
        assert torch.isfinite(out.total) or any(math.isnan(v) for v in out.as_dict().values()), spec
