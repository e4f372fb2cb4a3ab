import math

import pytest
import torch
from torch import nn

import lossport
from lossport.balance import DBMTL, GradDrop, resolve
from lossport.balance.surgery import purity_sign, sign_purity_keep, stacked
from lossport.graph import shared_parameters


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.a, self.b, self.c = nn.Linear(8, 1), nn.Linear(8, 1), nn.Linear(8, 1)

    def forward(self, x):
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h), "c": self.c(h), "h": h}


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(32, 4, generator=g),
        "a": torch.randn(32, 1, generator=g),
        "b": 30 * torch.randn(32, 1, generator=g),
        "c": torch.randn(32, 1, generator=g) - 2,
    }


SPEC = {"a": "mse", "b": "mse", "c": "mse"}
NAMES = ["a", "b", "c"]


def shared(net):
    """The trunk's parameters in the order the balancer's Jacobian columns use (the autograd graph's)."""
    parts = lossport.Objective(SPEC)(net, batch()).parts
    return shared_parameters([parts[k] for k in NAMES])


def heads(net):
    return [p for m in (net.a, net.b, net.c) for p in m.parameters()]


def per_part_grads(net, x, spec=SPEC, wrt=None):
    """Each part's gradient on ``wrt`` (default: the trunk parameters), flattened: rows a, b, c."""
    parts = lossport.Objective(spec)(net, x).parts
    wrt = shared(net) if wrt is None else wrt
    rows = []
    for k in NAMES:
        gs = torch.autograd.grad(parts[k], wrt, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows), parts


def grads_of(losses, params):
    gs = torch.autograd.grad(losses.total, params, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in gs])


# ------------------------------------------------------------------------------------------------ GradDrop
def test_sign_purity_masks_by_hand():
    S = torch.tensor([[1.0, -1.0, 2.0, 0.0], [1.0, 3.0, -2.0, 0.0]])
    U = torch.tensor([0.5, 0.9, 0.3, 0.5])
    # purity per column: 1, 0.75, 0.5, (no gradient) 0.5
    # col 0: P > U keeps positives (both); col 1: P < U keeps negatives (part 0); col 2: P > U keeps part 0
    keep = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert torch.equal(sign_purity_keep(S, U), keep)
    tie = torch.tensor([[1.0], [-1.0]])  # purity 0.5 = U: nobody keeps it
    assert not sign_purity_keep(tie, torch.tensor([0.5])).any()


@pytest.mark.parametrize("seed", range(4))
def test_sign_purity_keep_and_the_dropped_entries_equal_their_definition(seed):
    """The arithmetic forms (``S * sign(P - U) > 0``; dropped = ``J - sign * relu(sign * J)``) equal the
    comparisons of Algorithm 1 (``sign(S_i) == (+1 if P > U, -1 if P < U, none if P = U)``) and
    ``where(keep, 0, J)``, on ties (``P = U``), zero columns, zero entries and infinities."""
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(5, 400, generator=g).round()  # many zeros
    S[:, :20] = 0.0
    S[seed, 20:25] = float("inf")
    P = 0.5 * (1 + S.sum(0) / S.abs().sum(0))
    U = torch.rand(400, generator=g)
    U[30:80] = P[30:80].nan_to_num(0.5)  # ties
    chosen = torch.where(P > U, 1.0, torch.where(P < U, -1.0, float("nan")))
    keep = S.sign() == chosen
    assert torch.equal(sign_purity_keep(S, U), keep)
    sign = purity_sign(S, U)
    kept = torch.mul(S, sign).clamp_min_(0.0).mul_(sign)
    finite = slice(25, None)
    assert torch.equal(torch.sub(S, kept)[:, finite], torch.where(keep, 0.0, S)[:, finite])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_graddrop_direction_matches_torchjd(seed):
    torchjd = pytest.importorskip("torchjd.aggregation")
    J = torch.randn(4, 200, generator=torch.Generator().manual_seed(seed))
    J[:, :10] = J[:, :10].abs()  # some columns without conflict
    leak = torch.tensor([0.0, 0.1, 0.5, 1.0])
    torch.manual_seed(seed)
    expected = torchjd.GradDrop(leak=leak)(J)
    torch.manual_seed(seed)
    U = torch.rand(J.shape[1:])
    keep = sign_purity_keep(J, U)
    got = ((leak[:, None] + (1 - leak[:, None]) * keep) * J).sum(0)
    assert torch.allclose(got, expected, atol=1e-6)


def test_graddrop_params_mode_gives_the_masked_gradient_to_the_trunk_and_the_plain_one_to_heads():
    net, x = Net(), batch()
    bal = GradDrop(seed=4)
    draws = torch.Generator().manual_seed(4)
    losses = lossport.Objective(SPEC, balance=bal)(net, x)
    assert losses.weights == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert losses.extra["graddrop/shared"].item() == 0.0
    J, parts = per_part_grads(net, x)
    keep = sign_purity_keep(J, torch.rand(J.shape[1:], generator=draws))
    assert 0 < keep.float().mean() < 1  # conflicting coordinates were dropped
    assert torch.allclose(grads_of(losses, shared(net)), (keep * J).sum(0), atol=1e-5)
    plain = sum(parts.values())
    expected_heads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(plain, heads(net))])
    assert torch.allclose(grads_of(losses, heads(net)), expected_heads, atol=1e-6)
    assert math.isclose(losses.total.item(), plain.item(), rel_tol=1e-6)
    assert {"norm/a", "cos/a/b"} <= set(bal.info)


def test_graddrop_with_full_leak_is_the_weighted_sum():
    net, x = Net(), batch()
    spec = {"a": "mse", "b": lossport.Scaled("mse", 0.01), "c": "mse"}
    losses = lossport.Objective(spec, weights={"a": 2.0, "b": 1.0, "c": 1.0}, balance=GradDrop(leak=1.0))(net, x)
    plain = lossport.Objective(spec, weights={"a": 2.0, "b": 1.0, "c": 1.0})(net, x)
    assert losses.weights == plain.weights
    params = list(net.parameters())
    assert torch.allclose(grads_of(losses, params), grads_of(plain, params), atol=1e-6)


def test_graddrop_static_weights_scale_each_parts_kept_gradient():
    net, x = Net(), batch()
    s = torch.tensor([2.0, 0.01, 1.0])
    losses = lossport.Objective(SPEC, weights={"a": 2.0, "b": 0.01, "c": 1.0}, balance=GradDrop(seed=1))(net, x)
    J, _ = per_part_grads(net, x)
    keep = sign_purity_keep(J, torch.rand(J.shape[1:], generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(grads_of(losses, shared(net)), (s[:, None] * keep * J).sum(0), atol=1e-5)


def test_graddrop_features_mode_drops_whole_features_by_batch_sign_statistic():
    net, x = Net(), batch()
    bal = GradDrop(gramian="features", features="h", seed=2)
    losses = lossport.Objective(SPEC, balance=bal)(net, x)
    z = losses.outputs["h"]
    Jz = torch.stack([torch.autograd.grad(losses.parts[k], z, retain_graph=True)[0] for k in NAMES])  # 3 x B x 8
    S = (Jz * z.detach().sign()).sum(1)
    keep = sign_purity_keep(S, torch.rand(8, generator=torch.Generator().manual_seed(2)))
    dz = (keep[:, None, :] * Jz).sum(0)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(z, shared(net), dz, retain_graph=True)])
    assert torch.allclose(grads_of(losses, shared(net)), expected, atol=1e-5)
    plain = sum(losses.parts.values())
    expected_heads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(plain, heads(net), retain_graph=True)])
    assert torch.allclose(grads_of(losses, heads(net)), expected_heads, atol=1e-6)


def test_graddrop_every_k_runs_on_every_kth_call_and_sums_in_between():
    net = Net()
    obj = lossport.Objective(SPEC, balance=GradDrop(every=2))
    calls = [obj(net, batch(s)) for s in range(4)]
    assert ["graddrop/shared" in c.extra for c in calls] == [True, False, True, False]
    assert calls[3].weights == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_graddrop_failed_step_leaves_the_draws_unchanged():
    net = Net()
    bal = GradDrop(seed=3)
    nan_grad = {
        **SPEC,
        "c": lossport.CustomLoss(lambda y, t: torch.sqrt((y * 0).sum()) + ((y - t) ** 2).mean(), target=True),
    }
    state = bal.generator.get_state()
    with pytest.raises(FloatingPointError, match="state is unchanged"):
        lossport.Objective(nan_grad, balance=bal)(net, batch())
    assert torch.equal(bal.generator.get_state(), state)
    lossport.Objective(SPEC, balance=bal)(net, batch())
    assert not torch.equal(bal.generator.get_state(), state)


def test_graddrop_arguments_are_checked():
    with pytest.raises(ValueError, match="leak"):
        GradDrop(leak=1.5)
    assert isinstance(resolve("graddrop"), GradDrop)


# ------------------------------------------------------------------------------------------------ DB-MTL
def test_db_mtl_follows_algorithm_1_over_several_steps():
    net = Net()
    beta, eps = 0.9, 1e-8
    obj = lossport.Objective(SPEC, balance=DBMTL(beta=beta, beta_sigma=0.5))
    h = torch.zeros(3, sum(p.numel() for p in shared(net)))
    for k in range(1, 4):
        x = batch(k)
        losses = obj(net, x)
        J, parts = per_part_grads(net, x)
        vals = torch.tensor([parts[n].item() for n in NAMES])
        g = J / (vals[:, None] + eps)
        rate = beta / k**0.5
        h = g + rate * (h - g)
        n = h.norm(dim=1)
        d = (n.max() / (n + 1e-8))[:, None].mul(h).sum(0)
        assert torch.allclose(grads_of(losses, shared(net)), d, rtol=1e-4, atol=1e-6)
        log_total = sum(torch.log(parts[n_] + eps) for n_ in NAMES)
        expected_heads = torch.cat([g_.reshape(-1) for g_ in torch.autograd.grad(log_total, heads(net))])
        assert torch.allclose(grads_of(losses, heads(net)), expected_heads, rtol=1e-4, atol=1e-7)
        assert losses.weights == pytest.approx({n_: 1 / (parts[n_].item() + eps) for n_ in NAMES})


def scaled_mse(factor):
    return lossport.CustomLoss(lambda y, t: factor * ((y - t) ** 2).mean(), target=True)


def test_db_mtl_is_invariant_to_the_scale_of_each_loss():
    """The log transform removes each loss's scale and the norm rescaling each gradient's: multiplying a
    loss by 1000 changes neither the trunk's update nor the heads'."""
    net = Net()
    spec2 = {"a": scaled_mse(1000.0), "b": "mse", "c": scaled_mse(1e-3)}
    o1 = lossport.Objective(SPEC, balance="db_mtl")
    o2 = lossport.Objective(spec2, balance="db_mtl")
    params = list(net.parameters())
    for s in range(3):
        g1 = grads_of(o1(net, batch(s)), params)
        g2 = grads_of(o2(net, batch(s)), params)
        assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-7)


def test_db_mtl_features_mode_averages_norms_and_every_k_reuses_scales():
    net, x = Net(), batch()
    bal = DBMTL(gramian="features", features="h", every=2)
    obj = lossport.Objective(SPEC, balance=bal)
    losses = obj(net, x)
    z = losses.outputs["h"]
    vals = {k: losses.parts[k].item() + 1e-8 for k in NAMES}
    gz = torch.stack([torch.autograd.grad(losses.parts[k], z, retain_graph=True)[0] / vals[k] for k in NAMES])
    n = 0.1 * gz.flatten(1).norm(dim=1)  # first update from zero: (1 - beta) ||g||
    a = n.max() / (n + 1e-8)
    dz = (a[:, None, None] * gz).sum(0)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(z, shared(net), dz, retain_graph=True)])
    assert torch.allclose(grads_of(losses, shared(net)), expected, rtol=1e-4, atol=1e-7)
    between = obj(net, batch(1))  # every=2: no Jacobian, last scales on the log-loss gradients
    assert not between.extra
    expected_w = {k: float(a[i]) / (between.parts[k].item() + 1e-8) for i, k in enumerate(NAMES)}
    assert between.weights == pytest.approx(expected_w, rel=1e-5)


def test_db_mtl_state_round_trip_and_a_failed_step_leaves_the_state_unchanged():
    net = Net()
    bal = DBMTL()
    obj = lossport.Objective(SPEC, balance=bal)
    for s in range(2):
        obj(net, batch(s))
    twin = DBMTL()
    twin.load_state_dict(bal.state_dict())
    obj2 = lossport.Objective(SPEC, balance=twin)
    params = list(net.parameters())
    assert torch.equal(grads_of(obj(net, batch(5)), params), grads_of(obj2(net, batch(5)), params))

    before = {k: v.clone() for k, v in twin.state_dict()["avg"].items()}
    k_before = twin.state_dict()["k"]
    nan_grad = {
        **SPEC,
        "c": lossport.CustomLoss(lambda y, t: torch.sqrt((y * 0).sum()) + ((y - t) ** 2).mean(), target=True),
    }
    with pytest.raises(FloatingPointError, match=r"gradients of \['c'\].*state is unchanged"):
        lossport.Objective(nan_grad, balance=twin)(net, batch(6))
    assert twin.state_dict()["k"] == k_before
    assert twin.state_dict()["calls"] == 3  # the failed call is not counted (every=K schedules stay in place)
    assert all(torch.equal(before[k], v) for k, v in twin.state_dict()["avg"].items())


def test_db_mtl_single_part_batch_gets_its_log_loss_gradient():
    net = Net()
    x = batch()
    x["b"] = torch.full_like(x["b"], float("nan"))
    x["c"] = torch.full_like(x["c"], float("nan"))
    losses = lossport.Objective(SPEC, balance="db_mtl")(net, x)
    assert losses.names == ["a"] and not losses.extra
    assert losses.weights["a"] == pytest.approx(1 / losses.parts["a"].item())


def test_db_mtl_arguments_are_checked():
    with pytest.raises(ValueError, match="beta"):
        DBMTL(beta=1.0)
    with pytest.raises(ValueError, match="eps"):
        DBMTL(eps=0.0)
    assert isinstance(resolve("dbmtl"), DBMTL) and isinstance(resolve("db-mtl"), DBMTL)


@pytest.mark.parametrize("name", ["graddrop", "db_mtl"])
@pytest.mark.parametrize("mode", ["params", "features"])
def test_trains_by_name_in_each_mode(name, mode):
    net = Net()
    kw = {"gramian": "features", "features": "h"} if mode == "features" else {}
    obj = lossport.Objective(SPEC, balance=resolve(name, **kw))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    first = sum(v.item() for v in obj(net, batch(0)).parts.values())
    for step in range(30):
        losses = obj(net, batch(step % 3))
        opt.zero_grad()
        losses.total.backward()
        opt.step()
    assert sum(v.item() for v in obj(net, batch(0)).parts.values()) < first


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_train_reports_or_skips_a_non_finite_gradient(on_nonfinite):
    data = {k: torch.cat([batch(s)[k] for s in range(2)]) for k in batch(0)}
    nan_grad = {
        **SPEC,
        "c": lossport.CustomLoss(lambda y, t: torch.sqrt((y * 0).sum()) + ((y - t) ** 2).mean(), target=True),
    }
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    kw = {"balance": "graddrop", "epochs": 1, "batch_size": 32, "progress": False, "on_nonfinite": on_nonfinite}
    if on_nonfinite == "raise":
        with pytest.raises(lossport.NonFiniteLossError, match="non-finite gradient"):
            lossport.train(net, data, nan_grad, **kw)
    else:
        r = lossport.train(net, data, nan_grad, **kw)
        assert r.history.rounds[-1]["skipped"] == 2
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_a_skipped_batch_keeps_the_accumulated_gradient():
    """accumulate=2 with the second of four batches skipped: the net ends as if that batch had not been
    there (batches 0 and 2 make one step, batch 3 the last)."""

    def mse_or_nan_gradient(y, t):
        loss = ((y - t) ** 2).mean()
        return loss + torch.sqrt((y * 0).sum()) if bool(t.max() > 50) else loss

    data = {k: torch.cat([batch(s)[k][:8] for s in range(4)]) for k in batch(0)}
    data["c"][8:16] = 99.0  # batch 1: a finite loss whose gradient is NaN
    spec = {**SPEC, "c": lossport.CustomLoss(mse_or_nan_gradient, target=True)}
    kw = {"balance": "graddrop", "epochs": 1, "batch_size": 8, "shuffle": False, "progress": False, "accumulate": 2}
    skipped = Net()
    r = lossport.train(skipped, data, spec, on_nonfinite="skip", optimizer="sgd", lr=0.1, **kw)
    assert r.history.rounds[-1]["skipped"] == 1
    reference = Net()
    lossport.train(
        reference, {k: torch.cat([v[:8], v[16:]]) for k, v in data.items()}, spec, optimizer="sgd", lr=0.1, **kw
    )
    assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(skipped.parameters(), reference.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(skipped.parameters(), Net().parameters()))


def test_stacked_reads_consecutive_rows_of_one_tensor_without_a_copy():
    Y = torch.randn(4, 6)
    rows = list(Y.unbind(0))
    view = stacked(rows)
    assert torch.equal(view, Y) and view.data_ptr() == Y.data_ptr()
    assert stacked(rows[1:]).data_ptr() == rows[1].data_ptr() and torch.equal(stacked(rows[1:]), Y[1:])
    for other in ([rows[1], rows[0]], [rows[0], rows[2]], [r.clone() for r in rows], [Y[:, 0], Y[:, 1]]):
        out = stacked(other)
        assert torch.equal(out, torch.stack(other)) and out.data_ptr() != Y.data_ptr()
