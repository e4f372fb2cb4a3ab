import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lossport
from lossport import L1, L2, CustomLoss, LossSpecError, Objective, Scaled
from lossport.losses import PairDistance


class DictNet(nn.Module):
    """Shared trunk A -> B, heads: digit (softmax), size (linear), flag (sigmoid)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.digit = nn.Sequential(nn.Linear(8, 3), nn.Softmax(dim=1))
        self.size = nn.Linear(8, 1)
        self.flag = nn.Sequential(nn.Linear(8, 1), nn.Sigmoid())

    def forward(self, x):
        h = self.trunk(x)
        return {"digit": self.digit(h), "size": self.size(h), "flag": self.flag(h)}


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 1)

    def forward(self, x):
        return self.a(x), self.b(x)


class SingleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


def dict_batch(n=6):
    g = torch.Generator().manual_seed(3)
    return {
        "x": torch.randn(n, 4, generator=g),
        "digit": torch.randint(0, 3, (n,), generator=g),
        "size": torch.randn(n, 1, generator=g),
        "flag": torch.randint(0, 2, (n, 1), generator=g).float(),
    }


def outputs_of(net, batch):
    with torch.no_grad():
        return net(batch["x"])


def logits_of(net, x):
    return net.digit[0](net.trunk(x))


# ----------------------------------------------------------------------------------------- auto


def test_auto_chooses_by_producer_and_computes_from_logits():
    net, b = DictNet(), dict_batch()
    obj = Objective()
    losses = obj(net, b)
    assert losses.names == ["digit", "size", "flag"]
    h = net.trunk(b["x"])
    ce = F.cross_entropy(net.digit[0](h), b["digit"])
    mse = F.mse_loss(net.size(h), b["size"])
    bce = F.binary_cross_entropy_with_logits(net.flag[0](h), b["flag"])
    assert torch.allclose(losses.parts["digit"], ce, atol=1e-6)
    assert torch.allclose(losses.parts["size"], mse, atol=1e-6)
    assert torch.allclose(losses.parts["flag"], bce, atol=1e-6)
    assert torch.allclose(losses.total, ce + mse + bce, atol=1e-6)
    text = obj.describe()
    assert "Softmax" in text and "Sigmoid" in text and "MSE" in text


def test_auto_ce_is_stable_for_saturated_softmax():
    net, b = DictNet(), dict_batch()
    with torch.no_grad():
        net.digit[0].weight.mul_(1e4)
    losses = Objective({"digit": "auto"})(net, b)
    assert torch.isfinite(losses.parts["digit"])
    losses.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_auto_logsoftmax_functional_softmax_and_pair_distance():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.lsm = nn.LogSoftmax(dim=-1)
            self.pair = PairDistance(nn.Linear(3, 2))

        def forward(self, x, x2):
            z = self.lin(x)
            return {"a": self.lsm(z), "b": torch.softmax(z, dim=1), "d": self.pair(x, x2)}

    torch.manual_seed(0)
    net = Mixed()
    x, x2 = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.tensor([0, 1, 2, 3, 0])
    same = torch.tensor([True, False, True, False, False])
    obj = Objective()
    losses = obj(net, {"x": x, "x2": x2, "a": t, "b": t, "d": same})
    z = net.lin(x)
    ref = F.cross_entropy(z, t)
    assert torch.allclose(losses.parts["a"], ref, atol=1e-6)
    assert torch.allclose(losses.parts["b"], ref, atol=1e-5)
    d = net.pair(x, x2)
    contrast = torch.where(same, F.relu(0.5 - d) ** 2, d**2).mean()
    assert torch.allclose(losses.parts["d"], contrast, atol=1e-6)
    assert "probabilities" in obj.describe() and "contrastive" in obj.describe().lower()


def test_auto_uses_scalar_outputs_as_losses_and_nothing_else():
    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, labels):
            logits = self.lin(x)
            return {"logits": logits, "loss": F.cross_entropy(logits, labels)}

    net = HF()
    x, labels = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    losses = Objective()(net, {"x": x, "labels": labels})
    # an output named "loss" gives the part "loss/port": the key "loss" is the total's (result_types.TOTAL_KEY)
    assert losses.names == ["loss/port"]
    assert torch.allclose(losses.total, F.cross_entropy(net.lin(x), labels))
    # by name: the same
    assert Objective("loss")(net, {"x": x, "labels": labels}).names == ["loss/port"]


# ----------------------------------------------------------------------------------------- forms


def test_dict_form_with_none_scaled_and_weights():
    net, b = DictNet(), dict_batch()
    obj = Objective({"digit": "ce", "size": Scaled("mae", 3.0), "flag": None}, weights={"digit": 2.0, "size": 0.5})
    losses = obj(net, b)
    assert losses.names == ["digit", "size"]
    assert losses.weights == {"digit": 2.0, "size": 1.5}
    # the alias "ce" on an nn.Softmax output takes the logits that entered the softmax, as "auto" does
    h = net.trunk(b["x"])
    assert torch.allclose(losses.parts["digit"], F.cross_entropy(net.digit[0](h), b["digit"]), atol=1e-6)
    out = net(b["x"])
    mae = (out["size"] - b["size"]).abs().mean()
    assert torch.allclose(losses.parts["size"], mae, atol=1e-6)
    assert torch.allclose(losses.total, 2 * losses.parts["digit"] + 1.5 * mae, atol=1e-6)
    d = losses.as_dict()
    assert d["loss"] == pytest.approx(2 * d["digit"] + 1.5 * d["size"], rel=1e-6)


def test_list_form_with_port_names_pairs_and_regularization_total_identity():
    net, b = DictNet(), dict_batch()
    obj = Objective([("digit", "auto"), ("size", Scaled("mse", 2.0)), ("size", "mae"), L2(0.01), L1(0.001)])
    losses = obj(net, b)
    assert losses.names == ["digit", "size/mse", "size/mae"]
    assert set(losses.extra) == {"l2", "l1"}
    l2 = 0.01 * sum(p.pow(2).sum() for p in net.parameters() if p.dim() > 1)
    l1 = 0.001 * sum(p.abs().sum() for p in net.parameters() if p.dim() > 1)
    assert torch.allclose(losses.extra["l2"], l2) and torch.allclose(losses.extra["l1"], l1)
    d = losses.as_dict()
    total = d["digit"] + 2 * d["size/mse"] + d["size/mae"] + d["l2"] + d["l1"]
    assert d["loss"] == pytest.approx(total, rel=1e-6)


def test_regularization_parameter_patterns():
    net, b = DictNet(), dict_batch()
    losses = Objective(["digit", L2(1.0, params="trunk.*")])(net, b)
    expected = sum(p.pow(2).sum() for n, p in net.named_parameters() if n.startswith("trunk."))
    assert torch.allclose(losses.extra["l2"], expected)
    with pytest.raises(LossSpecError, match="no parameter name matches"):
        Objective(["digit", L2(1.0, params="nothing.*")])(net, b)


def test_output_name_is_a_loss_port_and_arrays_are_summed():
    class Two(nn.Module):
        def forward(self, x):
            return {"pred": x * 2, "penalty": (x**2)}

    x = torch.tensor([[1.0, 2.0]])
    losses = Objective("penalty")(Two(), {"x": x})
    assert losses.names == ["penalty"] and losses.total.item() == pytest.approx(5.0)


def test_single_output_loss_forms_and_list_of_losses_is_summed():
    net = SingleNet()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    out = net(x)
    assert torch.allclose(Objective("mse")(net, (x, y)).total, F.mse_loss(out, y))
    assert torch.allclose(Objective(lossport.losses.MAE())(net, (x, y)).total, F.l1_loss(out, y))
    both = Objective(["mse", Scaled("mae", 0.5)])(net, (x, y))
    assert both.names == ["out/mse", "out/mae"]
    # Keras uses only the first loss here; we sum every entry
    assert torch.allclose(both.total, F.mse_loss(out, y) + 0.5 * F.l1_loss(out, y))


def test_callables_one_and_two_inputs_and_declared():
    net = SingleNet()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    out = net(x)

    def two(o, t):
        return ((o - t) ** 2).mean()

    def one(o):
        return o.pow(2).mean()

    assert torch.allclose(Objective(two)(net, (x, y)).total, ((out - y) ** 2).mean())
    assert torch.allclose(Objective(one)(net, {"x": x}).total, out.pow(2).mean())
    lam = CustomLoss(lambda o, t=None: o.abs().mean(), target=False, name="absmean")
    assert torch.allclose(Objective(lam)(net, {"x": x}).total, out.abs().mean())


def test_per_example_callable_is_summed_over_features_and_averaged_over_batch():
    net = SingleNet()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    out = net(x)
    per = Objective(lambda o, t: (o - t) ** 2)(net, (x, y))
    assert torch.allclose(per.total, ((out - y) ** 2).sum(1).mean())
    sw = torch.tensor([1.0, 0.0, 2.0, 1.0])
    weighted = Objective(lambda o, t: (o - t) ** 2)(net, {"x": x, "out": y, "out_weight": sw})
    v = ((out - y) ** 2).sum(1)
    assert torch.allclose(weighted.total, (v * sw).sum() / sw.sum())


def test_dict_returning_loss_gives_one_part_per_key():
    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(3, 4)

        def forward(self, x):
            return {"recon": self.enc(x)}

    def vae_loss(o, t):
        return {"rec": ((o[:, :3] - t) ** 2).mean(), "kl": 0.5 * o[:, 3].pow(2).mean()}

    net, x = VAE(), torch.randn(5, 3)
    obj = Objective({"recon": vae_loss}, weights={"recon": 2.0})
    losses = obj(net, {"x": x, "recon": x})
    assert losses.names == ["recon/rec", "recon/kl"]
    o = net(x)["recon"]
    assert torch.allclose(losses.total, 2 * (((o[:, :3] - x) ** 2).mean() + 0.5 * o[:, 3].pow(2).mean()))
    assert obj.part_names == ["recon/rec", "recon/kl"]


def test_tuple_outputs_by_position_and_xy_pairs():
    net = TupleNet()
    x = torch.randn(4, 3)
    y0, y1 = torch.randn(4, 2), torch.randn(4, 1)
    obj = Objective(["mse", Scaled("mae", 2.0)])
    losses = obj(net, (x, (y0, y1)))
    a, b = net(x)
    assert losses.names == ["out0", "out1"]
    assert torch.allclose(losses.total, F.mse_loss(a, y0) + 2 * F.l1_loss(b, y1))
    assert torch.allclose(Objective([None, "mse"])(net, (x, (None, y1))).total, F.mse_loss(b, y1))
    # dict batch keys for tuple outputs
    assert torch.allclose(
        Objective()(net, {"x": x, "out0": y0, "out1": y1}).total, F.mse_loss(a, y0) + F.mse_loss(b, y1)
    )


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "spec, weights, match",
    [
        ("mse", None, "exactly one output"),  # single loss on a multi-output net (Keras broadcasts)
        ({"digt": "ce"}, None, "no output of that name"),
        ({"digit": "msee"}, None, "unknown loss"),
        ("msee", None, "neither an output name nor a loss alias"),
        (None, None, "no loss"),
        ({"digit": None, "size": None, "flag": None}, None, "no loss at all"),
        ({"digit": "ce", "size": "mse"}, [1.0], "2 losses"),  # wrong length
        ({"digit": "ce", "size": "mse"}, [1.0, 2.0, 3.0], "2 losses"),
        ({"digit": "ce", "size": "mse"}, {"zzz": 5.0, "digit": 1.0}, "not losses of this objective"),  # unknown
        ({"digit": "ce", "size": "mse"}, {"digit": 1.0}, "no weight for 'size'"),  # missing
        ({"digit": "ce", "size": "mse"}, 2.0, "single number"),  # float weight with several losses
        ({"digit": "ce", "size": "mse"}, {"digit": "a", "size": 1.0}, "must be a number"),
        ({"digit": "ce", "size": "mse"}, {"digit": float("nan"), "size": 1.0}, "finite"),
        (["mse", "mae"], None, "must say its output"),  # a list of bare losses on a multi-output net
    ],
)
def test_keras_quirks_are_errors(spec, weights, match):
    with pytest.raises(LossSpecError, match=match):
        Objective(spec, weights=weights)(DictNet(), dict_batch())


def test_short_list_on_tuple_net_is_an_error():
    with pytest.raises(LossSpecError, match="exactly one entry per output"):
        Objective(["mse"])(TupleNet(), (torch.randn(2, 3), (torch.randn(2, 2), torch.randn(2, 1))))


def test_missing_target_shape_and_clash_errors_name_the_output():
    net, b = DictNet(), dict_batch()
    del b["size"]
    with pytest.raises(LossSpecError, match=r"output 'size'.*no key 'size'"):
        Objective()(net, b)
    b = dict_batch()
    b["size"] = torch.randn(6, 3)
    with pytest.raises(LossSpecError, match=r"output 'size'.*shape"):
        Objective()(net, b)
    with pytest.raises(LossSpecError, match="needs input 'x'"):
        Objective()(net, {"inp": torch.randn(2, 4)})

    class Clash(nn.Module):
        def forward(self, x, y):
            return {"y": x + y}

    with pytest.raises(LossSpecError, match="also an input"):
        Objective({"y": "mse"})(Clash(), {"x": torch.zeros(2), "y": torch.zeros(2)})


def test_single_target_for_multi_output_net_is_an_error():
    with pytest.raises(LossSpecError, match="one target tensor"):
        Objective(["mse", "mse"])(TupleNet(), (torch.randn(2, 3), torch.randn(2, 2)))


# ----------------------------------------------------------------------------------------- labels


def test_missing_labels_masked_and_all_missing_part_is_reported_missing():
    net, b = DictNet(), dict_batch()
    b["digit"] = torch.tensor([0, -100, 2, -100, 1, -100])
    b["size"] = torch.full((6, 1), float("nan"))
    losses = Objective()(net, b)
    assert losses.missing == ("size",)
    assert "size" not in losses.parts
    assert losses.counts["digit"] == 3
    h = net.trunk(b["x"])
    keep = b["digit"] != -100
    ref = F.cross_entropy(net.digit[0](h)[keep], b["digit"][keep])
    assert torch.allclose(losses.parts["digit"], ref, atol=1e-6)
    assert math.isfinite(losses.total.item())


def test_per_example_losses_on_request():
    net, b = DictNet(), dict_batch()
    b["digit"][1] = -100
    losses = Objective()(net, b, per_example=True)
    ex = losses.per_example["digit"]
    assert ex.shape == (6,) and math.isnan(ex[1].item())
    labelled = ex[~torch.isnan(ex)]
    assert labelled.mean().item() == pytest.approx(losses.parts["digit"].item(), rel=1e-5)


def test_sample_weights_from_batch_key():
    net, b = DictNet(), dict_batch()
    sw = torch.tensor([1.0, 2.0, 0.0, 1.0, 1.0, 1.0])
    b["size_weight"] = sw
    losses = Objective({"size": "mse"})(net, b)
    err = (net(b["x"])["size"] - b["size"]).squeeze(1) ** 2
    assert torch.allclose(losses.total, (err * sw).sum() / sw.sum(), atol=1e-6)


def test_backward_reaches_only_the_layers_on_each_path():
    net, b = DictNet(), dict_batch()
    Objective({"size": "mse"})(net, b).total.backward()
    assert net.trunk[0].weight.grad is not None and net.size.weight.grad is not None
    assert net.digit[0].weight.grad is None and net.flag[0].weight.grad is None


def test_explicit_logit_cross_entropy_on_probabilities_is_an_error():
    net, b = DictNet(), dict_batch()
    with pytest.raises(LossSpecError, match="holds probabilities"):
        Objective({"digit": lossport.losses.CrossEntropy("index")})(net, b)
    ok = Objective({"digit": lossport.losses.CrossEntropy("index", from_logits=False)})(net, b)
    h = net.trunk(b["x"])
    assert torch.allclose(ok.total, F.cross_entropy(net.digit[0](h), b["digit"]), atol=1e-5)
    bce = Objective({"flag": "bce"})(net, b)
    ref = F.binary_cross_entropy_with_logits(net.flag[0](h), b["flag"])
    assert torch.allclose(bce.total, ref, atol=1e-6)


# ----------------------------------------------------------------------------------------- facade


def test_package_is_not_shadowed_and_evaluate_is_public():
    import importlib

    pkg = importlib.import_module("lossport.objective")
    assert isinstance(lossport.Objective, type) and pkg.Objective is lossport.Objective
    net, b = DictNet(), dict_batch()
    obj = Objective({"digit": "ce", "size": "mse"}, balance="uw")
    plain = obj.evaluate(net, b)  # static weights, no balancer
    assert plain.weights == {"digit": 1.0, "size": 1.0}
    assert torch.allclose(plain.total, plain.parts["digit"] + plain.parts["size"])
    balanced = obj(net, b)
    assert set(balanced.extra) and torch.allclose(balanced.parts["digit"], plain.parts["digit"])
    assert not hasattr(obj, "_evaluate")  # one public way
