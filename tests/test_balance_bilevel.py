"""LDC-MTL (lossport.balance.bilevel): the authors' penalised objective, stepped by hand over three steps."""

import math

import pytest
import torch
from torch import nn

import lossport
from lossport.balance import LDCMTL, resolve
from lossport.balance.bilevel import discrepancy_objective

NAMES = ["a", "b", "c"]
SPEC = dict.fromkeys(NAMES, "mse")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleDict({k: nn.Linear(8, 1) for k in NAMES})

    def forward(self, x):
        h = self.trunk(x)
        return {k: m(h) for k, m in self.heads.items()}


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return {"x": x, "a": x[:, :1], "b": 20 * x[:, 1:2] + 3, "c": 0.1 * torch.randn(n, 1, generator=g)}


def reference_run(normalization, lamb, steps=3, lr_net=0.05, lr_router=0.1):
    """The authors' loop (one backward of F, the net and the router stepped on it), with the net's gradient
    times T (lossport's factor) and the router's own Adam."""
    net = Net()
    r = torch.zeros(3, requires_grad=True)
    opt_net = torch.optim.SGD(net.parameters(), lr=lr_net)
    opt_r = torch.optim.Adam([r], lr=lr_router)
    init = None
    for s in range(steps):
        x = batch(s)
        out = net(x["x"])
        L = torch.stack([((out[k] - x[k]) ** 2).mean() for k in NAMES])
        if init is None:
            init = L.detach().clone()
        if normalization == "initial":
            lt = L / (init / init.min())
        elif normalization == "log":
            lt = torch.log(L / init)
        else:
            lt = L
        F = discrepancy_objective(torch.softmax(r, 0), lt, lamb)
        opt_net.zero_grad()
        opt_r.zero_grad()
        (3 * F).backward()  # the net's gradient times T ...
        r.grad /= 3  # ... the router's as the authors'
        opt_net.step()
        opt_r.step()
    return net, r.detach()


@pytest.mark.parametrize("normalization", ["initial", "log", "none"])
def test_three_steps_match_the_authors_update(normalization):
    ref_net, ref_r = reference_run(normalization, lamb=0.5)
    net = Net()
    bal = LDCMTL(lamb=0.5, normalization=normalization, lr=0.1)
    obj = lossport.Objective(SPEC, balance=bal)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for s in range(3):
        losses = obj(net, batch(s))
        assert losses.extra["ldc_mtl/router"].item() == 0.0
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        obj.step(net, batch(s))
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    got_r = torch.tensor([bal.values[k] for k in NAMES])
    assert torch.allclose(got_r, ref_r, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got_r, torch.zeros(3))  # the router moved


def test_weights_by_hand():
    """sigma uniform, Lt = L (normalization none): c_i = sigma_i (1 + lamb (s_i - s_{i-1})) with s_j the sign of
    the j-th consecutive difference; b = T c."""
    bal = LDCMTL(lamb=0.2, normalization="none")
    vals = {"a": 3.0, "b": 1.0, "c": 2.0}
    losses = lossport.Losses(
        parts={k: torch.tensor(v, requires_grad=True) for k, v in vals.items()}, weights=dict.fromkeys(vals, 1.0)
    )
    w = bal(losses).weights
    # wl = (1, 1/3, 2/3): s_1 = sign(1 - 1/3) = +1, s_2 = sign(1/3 - 2/3) = -1
    third = 1 / 3
    expected = {
        "a": 3 * third * (1 + 0.2 * (1 - 0)),
        "b": 3 * third * (1 + 0.2 * (-1 - 1)),
        "c": 3 * third * (1 + 0.2 * (0 + 1)),
    }
    assert w == pytest.approx(expected)
    assert bal.info["ldc_mtl/discrepancy"] == pytest.approx((3 - 1) / 3 + (2 - 1) / 3)


def test_state_round_trip_keeps_router_adam_and_initial_losses():
    net = Net()
    bal = resolve("ldc_mtl", lamb=0.3, lr=0.05)
    obj = lossport.Objective(SPEC, balance=bal)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for s in range(3):
        losses = obj(net, batch(s))
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        obj.step(net, batch(s))
    twin = resolve("ldc_mtl", lamb=0.3, lr=0.05)
    twin.load_state_dict(bal.state_dict())
    obj2 = lossport.Objective(SPEC, balance=twin)
    for s in range(3, 6):
        l1, l2 = obj(net, batch(s)), obj2(net, batch(s))
        assert l1.weights == l2.weights
        l1.total.backward()
        l2.total.backward()
        obj.step(net, batch(s))
        obj2.step(net, batch(s))
        net.zero_grad()
        assert bal.values == twin.values


def test_missing_part_and_errors():
    net = Net()
    b = batch()
    b["b"] = torch.full((16, 1), float("nan"))
    bal = LDCMTL()
    w = lossport.Objective(SPEC, balance=bal)(net, b).weights
    assert set(w) == {"a", "c"}
    assert sum(bal.info[f"ldc_mtl/sigma/{k}"] for k in ("a", "c")) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"needs finite losses > 0.*'a'"):
        LDCMTL()(lossport.Losses(parts={"a": torch.tensor(0.0), "b": torch.tensor(1.0)}, weights={"a": 1.0, "b": 1.0}))
    with pytest.raises(ValueError, match="lamb"):
        LDCMTL(lamb=-1.0)
    with pytest.raises(ValueError, match="normalization"):
        LDCMTL(normalization="ema")


def test_train_three_steps_with_finite_weights():
    data = {k: torch.cat([batch(s)[k] for s in range(3)]) for k in ("x", *NAMES)}
    net = Net()
    r = lossport.train(
        net, data, SPEC, balance="ldc_mtl", epochs=1, batch_size=16, shuffle=False, progress=False, seed=0
    )
    assert len(r.history.batch_values("loss")) == 3
    assert all(math.isfinite(r.history[f"weight/{k}"][-1]) for k in NAMES)
    assert all(torch.isfinite(p).all() for p in net.parameters())
