"""The opt-in approximations of the Gramian balancers (``subset=``, ``sketch=``) and the diagnostics for many
parts: what each estimator estimates, its error, its seeded and resumable randomness, and the errors for bad
values."""

import math

import pytest
import torch
from torch import nn

from lossport import Losses
from lossport.balance import MGDA, GradDrop, PCGrad, UPGrad
from lossport.balance import weighting as W
from lossport.balance.approx import random_signs, restrict, sketch_jacobian, subset_indices
from lossport.balance.gramian_base import PAIR_COSINES_UP_TO, GramianBalancer, cosine_summary, diagnostics
from lossport.balance.robust import ExcessMTL
from lossport.balance.stochastic import CRMOGM
from lossport.gramian import gramian_reference, jacobian
from lossport.inspection import Monitor, figures_from_gramian


class Net(nn.Module):
    """Shared trunk, ``T`` one-output heads, in float64 (the estimators' tests compare to 1e-10)."""

    def __init__(self, T: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh()).double()
        self.heads = nn.ModuleList([nn.Linear(8, 1).double() for _ in range(T)])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"h": h, **{f"y{t}": head(h).squeeze(1) for t, head in enumerate(self.heads)}}


def losses_of(net: Net, seed: int = 0) -> Losses:
    T = len(net.heads)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, T, generator=g, dtype=torch.float64)
    out = net(x)
    parts = {f"l{t}": (out[f"y{t}"] - y[:, t]).pow(2).mean() for t in range(T)}
    return Losses(parts=parts, weights=dict.fromkeys(parts, 1.0), outputs=out)


def parts_params(net: Net, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    losses = losses_of(net, seed)
    return [losses.parts[k] for k in losses.names], list(net.trunk.parameters())


# ------------------------------------------------------------------------------------------------------------
# sketch
# ------------------------------------------------------------------------------------------------------------
def test_sketch_is_the_jacobian_times_the_drawn_signs_on_both_paths():
    net = Net()
    parts, params = parts_params(net)
    J = jacobian(parts, params)
    for chained in (False, True):
        ps = parts
        if chained:  # a part computed from another part: no split at the heads, the general double backward
            ps = [parts[0], parts[1] + 0.5 * parts[0], *parts[2:]]
            J = torch.stack(
                [torch.cat([g.reshape(-1) for g in torch.autograd.grad(p, params, retain_graph=True)]) for p in ps]
            )
        d = 7
        JS = sketch_jacobian(ps, params, d, torch.Generator().manual_seed(3))
        S = random_signs(params, d, torch.Generator().manual_seed(3))
        Sflat = torch.cat([s.reshape(d, -1) for s in S], dim=1)
        assert set(Sflat.abs().unique().tolist()) == {1 / math.sqrt(d)}
        torch.testing.assert_close(JS, J @ Sflat.T, rtol=1e-9, atol=1e-12)


def test_sketch_is_unbiased_and_its_error_shrinks_as_one_over_root_d():
    net = Net(T=4)
    parts, params = parts_params(net)
    G = gramian_reference(parts, params)
    gen = torch.Generator().manual_seed(0)
    bound = torch.outer(G.diagonal(), G.diagonal()) + G**2  # d * Var[G~] <= G_tt G_ss + G_ts^2
    rms = {}
    for d in (4, 64):
        draws = torch.stack([(lambda JS: JS @ JS.T)(sketch_jacobian(parts, params, d, gen)) for _ in range(300)])
        mse = (draws - G).pow(2).mean(0)
        assert float(mse.sum()) <= 1.15 * float(bound.sum()) / d  # the summed variance, 300 draws
        # the mean of 300 draws is within 4 standard errors of G, entry by entry
        assert bool(((draws.mean(0) - G).abs() <= 4 * (bound / d / 300).sqrt() + 1e-12).all())
        rms[d] = float(mse.sum().sqrt() / G.norm())
    assert rms[64] < rms[4] / 2.5  # 1 / sqrt(d): a factor 4 expected


def test_sketched_balancer_weighs_the_sketched_gramian_and_resumes_bit_identical():
    net = Net()
    a = UPGrad(sketch=16, approx_seed=5)  # 16 directions for 6 parts
    first = a(losses_of(net, 0)).weights
    state = a.state_dict()
    assert "approx_rng" in state
    nxt = a(losses_of(net, 1)).weights
    b = UPGrad(sketch=16, approx_seed=5)
    b.load_state_dict(state)
    assert b(losses_of(net, 1)).weights == nxt
    c = UPGrad(sketch=16, approx_seed=5)  # the same seed: the same first sketch
    assert c(losses_of(net, 0)).weights == first
    losses = losses_of(net, 0)
    parts, params = [losses.parts[k] for k in losses.names], UPGrad().shared(losses)  # in the balancer's order
    JS = sketch_jacobian(parts, params, 16, torch.Generator().manual_seed(5))
    expect = 6 * W.upgrad(JS @ JS.T)
    assert [first[k] for k in sorted(first)] == pytest.approx(expect.tolist(), rel=1e-9)
    assert UPGrad(sketch=16, approx_seed=6)(losses_of(net, 0)).weights != first


# ------------------------------------------------------------------------------------------------------------
# subset
# ------------------------------------------------------------------------------------------------------------
def test_subset_weighs_the_drawn_parts_and_gives_the_others_their_mean():
    net = Net(T=6)
    bal = MGDA(subset=3, approx_seed=2)
    losses = losses_of(net)
    w = bal(losses).weights
    drawn = [losses.names[i] for i in subset_indices(6, 3, torch.Generator().manual_seed(2))]
    parts = [losses.parts[k] for k in drawn]
    G = gramian_reference(parts, list(net.trunk.parameters()))
    expect = MGDA().weigh(G, restrict(losses, drawn))
    assert [w[k] for k in drawn] == pytest.approx(expect.tolist(), rel=1e-6)
    rest = [w[k] for k in losses.names if k not in drawn]
    assert len(rest) == 3 and rest == pytest.approx([float(expect.mean())] * 3, rel=1e-12)
    assert bal.last_names == drawn and bal.last_gramian.shape == (3, 3)
    assert set(bal.info) == {
        *(f"norm/{k}" for k in drawn),
        *(f"cos/{a}/{b}" for i, a in enumerate(drawn) for b in drawn[i + 1 :]),
    }


def test_subset_draws_every_part_at_rate_k_over_T_and_is_exact_without_conflicts():
    T, k, n = 8, 3, 400
    gen = torch.Generator().manual_seed(0)
    counts = [0] * T
    for _ in range(n):
        idx = subset_indices(T, k, gen)
        assert len(set(idx)) == k and idx == sorted(idx)
        for i in idx:
            counts[i] += 1
    rate = k / T
    sd = math.sqrt(n * rate * (1 - rate))
    assert all(abs(c - n * rate) < 4 * sd for c in counts)
    assert subset_indices(4, 9, gen) == [0, 1, 2, 3]
    # orthogonal gradients at h (no conflict): UPGrad gives 1 to every part of every subset, hence to every part
    bal = UPGrad(gramian="features", features="h", subset=3, approx_seed=1)
    net = Net(T=T)
    with torch.no_grad():
        for t, head in enumerate(net.heads):  # each head reads its own coordinate of h
            head.weight.zero_()
            head.weight[0, t] = 1.0
    x = torch.eye(8, 5, dtype=torch.float64)
    seen: set[str] = set()
    for _ in range(20):
        out = net(x)
        parts = {f"l{t}": out[f"y{t}"].sum() for t in range(T)}
        w = bal(Losses(parts=parts, weights=dict.fromkeys(parts, 1.0), outputs=out)).weights
        assert list(w.values()) == pytest.approx([1.0] * T, rel=1e-9)
        seen.update(bal.last_names)
    assert seen == {f"l{t}" for t in range(T)}


class Ranked(GramianBalancer):
    """Weights 1, 2, ..., k on the parts it is given (so that the drawn subset shows in the weights)."""

    fail = False

    def weigh(self, G, losses):
        if self.fail:
            raise RuntimeError("weigh failed")
        return torch.arange(1, G.shape[0] + 1, dtype=torch.float64)


def test_subset_resumes_bit_identical_and_a_failed_call_keeps_the_draws():
    net = Net()
    a = Ranked(subset=2, approx_seed=4)
    a(losses_of(net, 0))
    state = a.state_dict()
    a.fail = True
    with pytest.raises(RuntimeError, match="weigh failed"):
        a(losses_of(net, 1))
    a.fail = False
    after_failure = a(losses_of(net, 1)).weights
    b = Ranked(subset=2, approx_seed=4)
    b.load_state_dict(state)
    assert b(losses_of(net, 1)).weights == after_failure
    c = Ranked(subset=2, approx_seed=4)
    draws = {tuple(sorted(c(losses_of(net, s)).weights.items())) for s in range(6)}
    assert len(draws) > 1  # the weights do show the draws


def test_subset_with_every_reuses_the_last_weights():
    net = Net(T=4)
    bal = Ranked(subset=2, every=2)
    w0 = bal(losses_of(net, 0)).weights
    assert sorted(w0.values()) == [1.0, 1.5, 1.5, 2.0]
    assert bal(losses_of(net, 1)).weights == w0


# ------------------------------------------------------------------------------------------------------------
# bad values
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"subset": 1}, "subset= must be an integer of at least 2"),
        ({"subset": 0}, "subset="),
        ({"subset": True}, "subset="),
        ({"subset": 2.5}, "subset="),
        ({"sketch": 0}, "sketch= must be an integer of at least 1"),
        ({"sketch": "64"}, "sketch="),
        ({"sketch": 8, "gramian": "features", "features": "h"}, "sketch= .* needs gramian='params'"),
        ({"subset": 4, "approx_seed": "a"}, "approx_seed= must be an integer"),
    ],
)
def test_bad_approximation_values_name_the_option(kw, match):
    with pytest.raises(ValueError, match=match):
        UPGrad(**kw)


def test_a_sketch_below_the_number_of_parts_is_refused_at_the_step():
    bal = UPGrad(sketch=4)
    with pytest.raises(ValueError, match=r"sketch=4 is below the 6 parts .* rank at most 4"):
        bal(losses_of(Net(T=6)))
    assert bal.state_dict()["calls"] == 0  # the failed call counts nothing


def test_methods_that_need_the_gradients_refuse_the_approximations():
    with pytest.raises(ValueError, match=r"GradDrop uses the gradients themselves.*subset= and sketch="):
        GradDrop(subset=4)
    with pytest.raises(ValueError, match=r"ExcessMTL computes its Gramian from the Jacobian: sketch="):
        ExcessMTL(sketch=8)
    with pytest.raises(ValueError, match=r"give the engine options .*subset=.* to CRMOGM"):
        CRMOGM(base=UPGrad(subset=4))
    assert "subset=4" in repr(PCGrad(subset=4)) and "sketch=8" in repr(UPGrad(sketch=8))


# ------------------------------------------------------------------------------------------------------------
# diagnostics for many parts
# ------------------------------------------------------------------------------------------------------------
def test_diagnostics_summarise_the_cosines_above_the_pair_limit():
    T = PAIR_COSINES_UP_TO + 1
    g = torch.randn(T, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g[3] = 0.0  # a zero gradient: its pairs are left out of the summary
    G = g @ g.T
    names = [f"p{t}" for t in range(T)]
    info = diagnostics(G, names)
    assert not any(k.count("/") == 2 for k in info)
    assert info["norm/p5"] == pytest.approx(float(g[5].norm()))
    figs = figures_from_gramian(G, names)
    cos = [v for k, v in figs.items() if k.startswith("cos/") and not math.isnan(v)]
    assert len(cos) == (T - 1) * (T - 2) // 2
    assert info["cos/mean"] == pytest.approx(sum(cos) / len(cos))
    assert info["cos/min"] == pytest.approx(min(cos)) and info["cos/max"] == pytest.approx(max(cos))
    assert info["cos/conflicting"] == pytest.approx(sum(c < 0 for c in cos) / len(cos))
    small = diagnostics(G[:PAIR_COSINES_UP_TO, :PAIR_COSINES_UP_TO], names[:PAIR_COSINES_UP_TO])
    assert small["cos/p0/p1"] == pytest.approx(figs["cos/p0/p1"]) and "cos/mean" not in small
    assert all(math.isnan(v) for v in cosine_summary(torch.zeros(3, 3, dtype=torch.float64)).values())


def test_monitor_reads_every_cosine_from_the_balancers_last_gramian_for_many_parts():
    T = PAIR_COSINES_UP_TO + 2
    net = Net(T=T)
    bal = MGDA()
    losses = bal(losses_of(net))
    assert "cos/mean" in bal.info and "cos/l0/l1" not in bal.info
    figs = Monitor(every=1).observe(losses, bal)
    assert figs == figures_from_gramian(bal.last_gramian, losses.names)
    assert figs["cos/l0/l1"] == pytest.approx(
        float(bal.last_gramian[0, 1] / (bal.last_gramian[0, 0] * bal.last_gramian[1, 1]).sqrt())
    )
