"""GramianBalancer: the engine options (params / features / every), diagnostics, state and the applied update."""

import math

import pytest
import torch
from torch import nn

from lossport import Losses
from lossport.balance.gramian_base import GramianBalancer, diagnostics
from lossport.gramian import gramian_reference
from lossport.graph import shared_parameters


class Recorder(GramianBalancer):
    """Weights 1 / (1 + t) scaled by call count; keeps every G it was given."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def weigh(self, G, losses):
        self.seen.append(G.clone())
        T = G.shape[0]
        return torch.arange(1, T + 1, dtype=torch.float64) * len(self.seen)


class Net(nn.Module):
    def __init__(self, T=3):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(T)])

    def forward(self, x):
        h = self.trunk(x)
        return {"h": h, **{f"y{t}": head(h).squeeze(1) for t, head in enumerate(self.heads)}}


def losses_of(net, seed=0, T=3, missing=()):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(7, 4, generator=g), torch.randn(7, T, generator=g)
    out = net(x)
    parts = {f"l{t}": (out[f"y{t}"] - y[:, t]).pow(2).mean() for t in range(T) if f"l{t}" not in missing}
    return Losses(parts=parts, weights=dict.fromkeys(parts, 1.0), outputs=out)


def test_params_mode_gramian_is_that_of_the_shared_parameters():
    net = Net()
    bal = Recorder()
    losses = losses_of(net)
    w = bal.balance(losses)
    parts = [losses.parts[k] for k in losses.names]
    shared = shared_parameters(parts)
    assert {id(p) for p in shared} == {id(p) for p in net.trunk.parameters()}
    G = bal.seen[0]
    R = gramian_reference(parts, shared)
    assert torch.allclose(G, R, rtol=1e-5, atol=1e-9)
    assert w == {"l0": 1.0, "l1": 2.0, "l2": 3.0}
    # diagnostics: norms and cosines of the same G
    assert math.isclose(bal.info["norm/l1"], float(R[1, 1].sqrt()), rel_tol=1e-5)
    assert math.isclose(bal.info["cos/l0/l2"], float(R[0, 2] / (R[0, 0] * R[2, 2]).sqrt()), rel_tol=1e-4)


def test_given_params_restrict_the_gramian():
    net = Net()
    last = list(net.trunk[2].parameters())
    bal = Recorder(params=last)
    losses = losses_of(net)
    bal.balance(losses)
    parts = [losses.parts[k] for k in losses.names]
    assert torch.allclose(bal.seen[0], gramian_reference(parts, last), rtol=1e-5, atol=1e-9)


def feature_reference(losses, z):
    rows = [torch.autograd.grad(losses.parts[k], z, retain_graph=True)[0].reshape(-1) for k in losses.names]
    J = torch.stack(rows).double()
    return J @ J.T


def test_features_mode_by_output_name_and_by_module():
    net = Net()
    by_name = Recorder(gramian="features", features="h")
    losses = losses_of(net)
    by_name.balance(losses)
    assert torch.allclose(by_name.seen[0], feature_reference(losses, losses.outputs["h"]), rtol=1e-5, atol=1e-10)

    by_module = Recorder(gramian="features", features=net.trunk)
    by_module.attach(net)
    losses = losses_of(net, seed=1)
    by_module.balance(losses)
    assert torch.allclose(by_module.seen[0], feature_reference(losses, losses.outputs["h"]), rtol=1e-5, atol=1e-10)
    assert by_module._records == []  # the forward's graph is not kept past the step
    # a forward that is never balanced is dropped at the start of the next forward of the net
    losses_of(net, seed=2)
    losses = losses_of(net, seed=3)
    by_module.balance(losses)
    assert torch.allclose(by_module.seen[1], feature_reference(losses, losses.outputs["h"]), rtol=1e-5, atol=1e-10)
    by_module.close()
    losses_of(net, seed=4)
    assert by_module._records == []


def test_every_k_reuses_weights_and_state_round_trips():
    net = Net()
    bal = Recorder(every=3)
    ws = [bal.balance(losses_of(net, seed=s)) for s in range(4)]
    assert len(bal.seen) == 2  # calls 0 and 3
    assert ws[0] == ws[1] == ws[2] != ws[3]
    twin = Recorder(every=3)
    twin.load_state_dict(bal.state_dict())
    twin.seen = list(bal.seen)
    for s in range(4, 7):
        assert twin.balance(losses_of(net, seed=s)) == bal.balance(losses_of(net, seed=s))
    assert len(bal.seen) == len(twin.seen) == 3  # call 6
    # a part missing from the batch forces a recomputation on the parts present
    w = bal.balance(losses_of(net, seed=9, missing=("l1",)))
    assert set(w) == {"l0", "l2"} and bal.seen[-1].shape == (2, 2)


def test_update_is_the_weighted_sum_heads_get_weighted_gradients():
    net = Net()
    bal = Recorder()
    losses = losses_of(net)
    out = bal(losses)
    w = {k: float(v) for k, v in out.weights.items()}
    per_part = {
        k: torch.autograd.grad(losses.parts[k], list(net.parameters()), retain_graph=True, allow_unused=True)
        for k in losses.names
    }
    out.total.backward()
    for i, p in enumerate(net.parameters()):
        expected = sum(w[k] * (g[i] if g[i] is not None else 0) for k, g in per_part.items())
        assert torch.allclose(p.grad, expected, rtol=1e-5, atol=1e-7)
    head1 = net.heads[1].weight
    g1 = per_part["l1"][[id(p) for p in net.parameters()].index(id(head1))]
    assert torch.allclose(head1.grad, w["l1"] * g1, rtol=1e-6)


def test_single_part_gets_weight_one_without_a_gramian():
    net = Net(T=1)
    bal = Recorder()
    assert bal.balance(losses_of(net, T=1)) == {"l0": 1.0}
    assert bal.seen == []


def test_compute_jacobian_both_modes():
    net = Net()
    losses = losses_of(net)
    J, params = Recorder().compute_jacobian(losses)
    parts = [losses.parts[k] for k in losses.names]
    assert params == shared_parameters(parts) and J.shape[1] == sum(p.numel() for p in params)
    assert torch.allclose((J.double() @ J.double().T), gramian_reference(parts, params), rtol=1e-5)
    Jf, zs = Recorder(gramian="features", features="h").compute_jacobian(losses)
    assert len(zs) == 1 and zs[0] is losses.outputs["h"]
    assert torch.allclose(Jf.double() @ Jf.double().T, feature_reference(losses, losses.outputs["h"]), rtol=1e-5)


def test_diagnostics_zero_gradient_gives_nan_cosine():
    G = torch.tensor([[4.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    info = diagnostics(G, ["a", "b"])
    assert info["norm/a"] == 2.0 and info["norm/b"] == 0.0 and math.isnan(info["cos/a/b"])


class BadShape(GramianBalancer):
    def weigh(self, G, losses):
        return torch.ones(G.shape[0] + 1)


class NaNs(GramianBalancer):
    """Moves its own state on, then fails: the failed call must leave the state as it was."""

    def __init__(self, **engine):
        super().__init__(**engine)
        self.moves = 0

    def weigh(self, G, losses):
        self.moves += 1
        return torch.full((G.shape[0],), float("nan"))

    def state_dict(self):
        return {**super().state_dict(), "moves": self.moves}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.moves = state["moves"]


def test_misconfiguration_raises_with_a_fix():
    with pytest.raises(ValueError, match="gramian must be one of"):
        Recorder(gramian="jacobian")
    with pytest.raises(ValueError, match="needs features="):
        Recorder(gramian="features")
    with pytest.raises(ValueError, match="only used with gramian='features'"):
        Recorder(features="h")
    with pytest.raises(ValueError, match="only used with gramian='params'"):
        Recorder(gramian="features", features="h", params=[nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="positive integer"):
        Recorder(every=0)
    with pytest.raises(ValueError, match="params= is empty"):
        Recorder(params=[])
    net = Net()
    with pytest.raises(ValueError, match="not an output of the net"):
        Recorder(gramian="features", features="z").balance(losses_of(net))
    with pytest.raises(ValueError, match="not a submodule"):
        Recorder(gramian="features", features=nn.Linear(2, 2)).attach(net)
    with pytest.raises(ValueError, match="did not run"):
        Recorder(gramian="features", features=nn.Linear(2, 2)).balance(losses_of(net))
    with pytest.raises(RuntimeError, match="expected a tensor of shape"):
        BadShape().balance(losses_of(net))
    nans = NaNs()
    with pytest.raises(FloatingPointError, match="state is unchanged"):
        nans.balance(losses_of(net))
    assert nans.moves == 0 and nans.state_dict()["calls"] == 0
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    x = torch.randn(3, 2)
    parts = {"a": a(x).sum(), "b": b(x).sum()}
    with pytest.raises(ValueError, match="share nothing"):
        Recorder().balance(Losses(parts=parts, weights={"a": 1.0, "b": 1.0}))


def test_features_module_that_did_not_run_names_the_modules_that_did():
    net = Net()
    net.spare = nn.Linear(6, 6)  # a submodule the forward never calls
    bal = Recorder(gramian="features", features=net.spare)
    bal.attach(net)
    ran = r"did not run .*\(modules that ran: trunk\.0, trunk\.1, trunk\.2, trunk\.3, trunk, heads\.0"
    with pytest.raises(ValueError, match=ran) as err:
        bal.balance(losses_of(net))
    assert "spare" not in str(err.value).split("modules that ran")[1]
    bal.close()
    assert not bal._ran_hooks


def test_features_module_returning_a_dict_of_tensors_is_concatenated():
    class Levels(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return {"p1": self.a(x), "p2": self.b(x)}

    class FPNNet(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.levels = Levels()
            self.heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(2)])

        def forward(self, x):
            z = self.levels(x)
            h = torch.tanh(torch.cat([z["p1"], z["p2"]], dim=1))
            return {"y0": self.heads[0](h).squeeze(1), "y1": self.heads[1](h).squeeze(1), **z}

    net = FPNNet()
    bal = Recorder(gramian="features", features=net.levels)
    bal.attach(net)
    losses = losses_of(net, T=2)
    zs = [losses.outputs["p1"], losses.outputs["p2"]]
    J = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses.parts[k], zs, retain_graph=True)])
            for k in losses.names
        ]
    ).double()
    bal.balance(losses)
    torch.testing.assert_close(bal.seen[0], J @ J.T)


def test_gram64_equals_the_float64_product():
    """gram64 (chunks of columns cast to float64) equals the Gramian of the float64 copy, for float32 and float64
    inputs and a width that is not a multiple of the chunk."""
    from lossport.balance.gramian_base import gram64

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        Y = torch.randn(5, 1000, generator=g).to(dtype)
        ref = Y.double() @ Y.double().T
        out = gram64(Y, chunk=300)
        assert out.dtype == torch.float64
        assert torch.allclose(out, ref, rtol=1e-13, atol=1e-12)
