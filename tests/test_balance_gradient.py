import math

import pytest
import torch
from torch import nn

import lossport
from lossport.balance import resolve
from lossport.gramian import gramian_reference
from lossport.graph import shared_parameters

METHODS = [
    "mgda",
    "pcgrad",
    "cagrad",
    "imtl_g",
    "aligned_mtl",
    "upgrad",
    "dualproj",
    "nash_mtl",
    "fairgrad",
    "config",
    "gradvac",
]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.a, self.b, self.c = nn.Linear(16, 1), nn.Linear(16, 1), nn.Linear(16, 1)

    def forward(self, x):
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h), "c": self.c(h), "h": h}


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(32, 4, generator=g),
        "a": torch.randn(32, 1, generator=g),
        "b": 30 * torch.randn(32, 1, generator=g),
        "c": torch.randn(32, 1, generator=g),
    }


SPEC = {"a": "mse", "b": "mse", "c": "mse"}


@pytest.mark.parametrize("name", METHODS)
def test_method_trains_by_name_and_weights_follow_gramian(name):
    net = Net()
    obj = lossport.Objective(SPEC, balance=name)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    first = None
    for step in range(25):
        losses = obj(net, batch(step % 3))
        if first is None:
            first = sum(v.item() for v in losses.parts.values())
        assert math.isclose(
            losses.total.item(),
            sum(float(losses.weights[k]) * losses.parts[k].item() for k in losses.parts),
            rel_tol=1e-5,
        )
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        obj.step(net, batch(step % 3))
    last = sum(v.item() for v in obj(net, batch(0)).parts.values())
    assert last < first
    info = obj.balancer.info
    assert {"norm/a", "norm/b", "norm/c", "cos/a/b"} <= set(info)


@pytest.mark.parametrize("name", METHODS)
def test_state_round_trip_gives_identical_weights(name):
    net = Net()
    bal = resolve(name)
    obj = lossport.Objective(SPEC, balance=bal)
    for s in range(3):
        obj(net, batch(s))
    state = bal.state_dict()
    twin = resolve(name)
    twin.load_state_dict(state)
    obj2 = lossport.Objective(SPEC, balance=twin)
    for s in range(3, 6):
        w1 = obj(net, batch(s)).weights
        w2 = obj2(net, batch(s)).weights
        assert w1 == w2


def test_weights_use_the_shared_parameter_gramian():
    net = Net()
    obj = lossport.Objective(SPEC)
    losses = obj(net, batch())
    parts = [losses.parts[k] for k in losses.names]
    G = gramian_reference(parts, shared_parameters(parts))
    from lossport.balance import weighting as W

    expected = 3 * W.upgrad(G)
    got = resolve("upgrad")(obj(net, batch())).weights
    assert torch.allclose(torch.tensor([got[k] for k in "abc"], dtype=torch.float64), expected, rtol=1e-6)


def test_every_k_reuses_weights_and_features_mode():
    net = Net()
    bal = lossport.balance.MGDA(every=3)
    obj = lossport.Objective(SPEC, balance=bal)
    ws = [obj(net, batch(s)).weights for s in range(4)]
    assert ws[0] == ws[1] == ws[2] and ws[3] != ws[0]
    feat = lossport.Objective(SPEC, balance=lossport.balance.UPGrad(gramian="features", features="h"))
    w = feat(net, batch()).weights
    assert abs(sum(w.values()) - 3) < 3 and all(v > 0 for v in w.values())
    mod = lossport.balance.MGDA(gramian="features", features=net.trunk)
    w2 = lossport.Objective(SPEC, balance=mod)(net, batch()).weights
    w3 = lossport.Objective(SPEC, balance=lossport.balance.MGDA(gramian="features", features="h"))(net, batch()).weights
    assert w2 == pytest.approx(w3)
    mod.close()


def test_missing_part_is_left_out_and_errors_are_clear():
    net = Net()
    b = batch()
    b["c"] = torch.full((32, 1), float("nan"))
    losses = lossport.Objective(SPEC, balance="upgrad")(net, b)
    assert losses.missing == ("c",) and set(losses.weights) == {"a", "b"}
    with pytest.raises(ValueError, match="features="):
        lossport.balance.UPGrad(gramian="features")
    with pytest.raises(ValueError, match="not an output"):
        lossport.Objective(SPEC, balance=lossport.balance.UPGrad(gramian="features", features="zz"))(net, batch())
    with pytest.raises(ValueError, match="unknown balancer"):
        resolve("upgradd")


def test_nash_mtl_norm_clipping_and_argument_errors():
    net = Net()
    obj = lossport.Objective(SPEC)
    losses = obj(net, batch())
    parts = [losses.parts[k] for k in losses.names]
    G = gramian_reference(parts, shared_parameters(parts)).to(torch.float64)
    free = resolve("nash_mtl")(obj(net, batch())).weights
    a = torch.tensor([free[k] for k in "abc"], dtype=torch.float64)
    norm = float((a @ G @ a).sqrt())
    clipped = resolve("nash_mtl", max_norm=norm / 2)(obj(net, batch())).weights
    b = torch.tensor([clipped[k] for k in "abc"], dtype=torch.float64)
    assert torch.allclose(b, a / 2, rtol=1e-6)  # ||J^T b|| = max_norm
    loose = resolve("nash_mtl", max_norm=2 * norm)(obj(net, batch())).weights
    assert loose == pytest.approx(free)
    with pytest.raises(ValueError, match="max_norm"):
        resolve("nash_mtl", max_norm=-1.0)
    with pytest.raises(ValueError, match="rtol"):
        resolve("aligned_mtl", rtol=2.0)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_in_features_mode_and_every_k(name):
    """Features mode: the weights are the method's weights on the Gramian of the representation's gradients;
    every=K: recomputed on calls 0, K, 2K, ... only."""
    net = Net()
    bal = resolve(name, gramian="features", features="h", every=2)
    obj = lossport.Objective(SPEC, balance=bal)
    calls = [obj(net, batch(s)) for s in range(2)]
    before = bal.state_dict()  # random order, EMA targets, warm start: as the third call finds them
    calls.append(obj(net, batch(2)))
    assert calls[0].weights == calls[1].weights != calls[2].weights
    losses = lossport.Objective(SPEC)(net, batch(2))
    z = losses.outputs["h"]
    J = torch.stack([torch.autograd.grad(losses.parts[k], z, retain_graph=True)[0].reshape(-1) for k in "abc"]).double()
    twin = resolve(name, gramian="features", features="h")
    twin.load_state_dict(before)
    expected = twin.weigh(J @ J.T, losses)
    got = torch.tensor([calls[2].weights[k] for k in "abc"], dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "nash_mtl"])
def test_a_non_finite_gradient_leaves_the_state_unchanged(name):
    net = Net()
    bal = resolve(name)
    obj = lossport.Objective(SPEC, balance=bal)
    obj(net, batch(0))
    before = bal.state_dict()
    nan_grad = {
        **SPEC,
        "c": lossport.CustomLoss(lambda y, t: torch.sqrt((y * 0).sum()) + ((y - t) ** 2).mean(), target=True),
    }
    with pytest.raises(FloatingPointError, match="state is unchanged"):
        lossport.Objective(nan_grad, balance=bal)(net, batch(1))
    after = bal.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        if isinstance(before[k], torch.Tensor):
            assert torch.equal(after[k], before[k])
        else:
            assert after[k] == before[k]


class ManyHeads(nn.Module):
    """18 one-output heads on a shared trunk: enough parts for the UPGrad solver's ADMM start (n >= 16)."""

    def __init__(self, T=18):
        super().__init__()
        torch.manual_seed(1)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])

    def forward(self, x):
        h = self.trunk(x)
        return {f"t{i}": head(h) for i, head in enumerate(self.heads)}


def many_batch(step, T=18):
    g = torch.Generator().manual_seed(step % 4)
    x = torch.randn(16, 4, generator=g)
    mix = torch.randn(4, T, generator=torch.Generator().manual_seed(99))
    y = torch.tanh(x @ mix) + 0.3 * torch.randn(16, T, generator=g)
    return {"x": x, **{f"t{i}": y[:, i : i + 1] for i in range(T)}}


def test_warm_started_upgrad_resumes_bit_identically(tmp_path):
    """The solver's warm start (the previous step's projections) is declared state: a run stopped after 4 steps
    and resumed from saved net, optimizer and balancer state gives exactly the weights of the uninterrupted run;
    every step's weights equal the cold solve's to solver tolerance."""
    spec = {f"t{i}": "mse" for i in range(18)}

    def setup():
        net = ManyHeads()
        bal = lossport.balance.UPGrad()
        return net, bal, lossport.Objective(spec, balance=bal), torch.optim.SGD(net.parameters(), lr=0.2)

    def step(net, bal, obj, opt, s):
        losses = obj(net, many_batch(s))
        losses.total.backward()
        opt.step()
        opt.zero_grad()
        return torch.stack([torch.as_tensor(losses.weights[k]) for k in spec])

    net, bal, obj, opt = setup()
    full = []
    for s in range(8):
        full.append(step(net, bal, obj, opt, s))
        if s == 3:
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "bal": bal.state_dict()}, tmp_path / "ck.pt")
    assert bal.state_dict()["start"] is not None and bal.state_dict()["start_names"] == list(spec)
    net2, bal2, obj2, opt2 = setup()
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    net2.load_state_dict(ck["net"])
    opt2.load_state_dict(ck["opt"])
    bal2.load_state_dict(ck["bal"])
    for s in range(4, 8):
        assert torch.equal(step(net2, bal2, obj2, opt2, s), full[s])
    # a cold balancer (no start) on the same net and batch: the same weights to solver tolerance
    cold_bal = lossport.balance.UPGrad()
    losses = lossport.Objective(spec, balance=cold_bal)(net2, many_batch(8))
    warm_losses = obj2(net2, many_batch(8))
    wc = torch.stack([torch.as_tensor(losses.weights[k]) for k in spec])
    ww = torch.stack([torch.as_tensor(warm_losses.weights[k]) for k in spec])
    assert torch.allclose(wc, ww, rtol=1e-9, atol=1e-12)
    assert not torch.equal(full[3], full[4])  # the weights do move along the run


def test_upgrad_state_without_warm_start_loads_and_solves_cold():
    """A checkpoint written before the warm start (no 'start' entry) loads; the next step starts cold."""
    bal = lossport.balance.UPGrad()
    old = {k: v for k, v in bal.state_dict().items() if not k.startswith("start")}
    bal.load_state_dict(old)
    assert bal._start is None and bal._start_names == []
    with pytest.raises(ValueError, match="DualProj's"):
        bal.load_state_dict(lossport.balance.DualProj().state_dict())


def test_upgrad_starts_each_step_from_the_previous_projections_of_the_same_parts(monkeypatch):
    """The balancer hands the solver the previous step's projections when the parts are the same, none when they
    differ."""
    from lossport.balance import weighting

    starts = []
    real = weighting.box_qp

    def spy(*args, **kwargs):
        starts.append(kwargs.get("start"))
        return real(*args, **kwargs)

    monkeypatch.setattr(weighting, "box_qp", spy)
    spec = {f"t{i}": "mse" for i in range(18)}
    bal = lossport.balance.UPGrad()
    obj = lossport.Objective(spec, balance=bal)
    net = ManyHeads()
    obj(net, many_batch(0))
    first = bal._start.clone()
    obj(net, many_batch(1))
    assert starts[0] is None and torch.equal(starts[1], first)
    bal._start_names = [*bal._start_names[:-1], "other"]  # the previous step weighed other parts
    obj(net, many_batch(2))
    assert starts[2] is None and bal._start_names == list(spec)
