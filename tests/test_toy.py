"""The toy problem of CAGrad / Nash-MTL / FAMO and the behaviours the papers report (reference section 3.3).

The authors run Adam with lr 1e-3 for 35,000-50,000 steps; these tests use lr 2e-2 for 1,500 steps (the same
distance) and check the behaviours that show at that budget."""

import functools
import math
import warnings

import pytest
import torch

from lossport import toy
from lossport.balance import weighting as W


def test_values_minima_and_pareto_point():
    # individual minima of the unscaled losses at (+-7, -8.4345), value -19.989 (reference 3.1)
    l1, l2 = toy.losses(torch.tensor([7.0, -8.4345], dtype=torch.float64), scale=1.0)
    assert l1.item() == pytest.approx(-19.989, abs=1e-3)
    l1, l2 = toy.losses(torch.tensor([-7.0, -8.4345], dtype=torch.float64), scale=1.0)
    assert l2.item() == pytest.approx(-19.989, abs=1e-3)
    # the balanced point of the front: (0, -8.3551), both losses -15.092 unscaled
    l1, l2 = toy.losses(torch.tensor([0.0, -8.3551], dtype=torch.float64), scale=1.0)
    assert l1.item() == pytest.approx(-15.092, abs=1e-3) and l2.item() == pytest.approx(-15.092, abs=1e-3)
    assert toy.pareto_residual(torch.tensor([0.0, -8.3551]), scale=1.0) < 1e-3
    assert toy.pareto_residual(torch.tensor([5.0, 0.5])) > 0.1  # on the conflicting slope above the front
    # scale multiplies L1 only
    a, b = toy.losses(torch.tensor([1.0, 2.0], dtype=torch.float64), scale=0.1)
    c, d = toy.losses(torch.tensor([1.0, 2.0], dtype=torch.float64), scale=1.0)
    assert a.item() == pytest.approx(0.1 * c.item()) and b.item() == pytest.approx(d.item())


def test_gradients_match_finite_differences_and_move_at_the_origin():
    for p in ([1.3, 2.1], [-4.0, -3.0], [8.0, 0.5]):
        x = torch.tensor(p, dtype=torch.float64, requires_grad=True)
        for i in range(2):
            (g,) = torch.autograd.grad(toy.losses(x)[i], x)
            for j in range(2):
                e = torch.zeros(2, dtype=torch.float64)
                e[j] = 1e-6
                fd = (toy.losses(x.detach() + e)[i] - toy.losses(x.detach() - e)[i]) / 2e-6
                assert g[j].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(sum(toy.losses(x)), x)
    assert g.abs().sum() > 0  # the clamps pass the gradient at x2 = 0 (reference 3.1, gradient note)


def run(method, start):
    return toy.run(method, start, steps=1500, lr=2e-2)


def test_equal_weighting_fails_from_the_rightmost_start_and_favours_l2():
    stuck = run(None, (9.0, 9.0))
    assert stuck.end[1] > 0 and toy.pareto_residual(stuck.end) > 0.1  # never leaves the upper half-plane
    l1, l2 = run(None, (0.0, 0.0)).ls[-1].tolist()
    assert l2 < -19.0 and l1 > -0.5  # controlled by the larger gradient of l2: an imbalanced end point


def test_cagrad_fails_from_the_rightmost_start_and_pcgrad_favours_l2():
    assert toy.pareto_residual(run("cagrad", (9.0, 9.0)).end) > 0.1
    l1, l2 = run("pcgrad", (0.0, 0.0)).ls[-1].tolist()
    assert l2 < -18.0 and l1 > -1.5


def test_mgda_is_inclined_towards_the_task_with_the_smallest_gradient():
    for start in ((0.0, 0.0), (9.0, -1.0)):
        l1, l2 = run("mgda", start).ls[-1].tolist()
        assert l1 < -1.95  # l1 (scaled by 0.1, the smaller gradient) near its minimum -1.999
        assert l2 > -5.0


def test_nash_mtl_reaches_the_balanced_point_whatever_the_scale():
    t = run("nash_mtl", (0.0, 0.0))
    l1, l2 = t.ls[-1].tolist()
    assert l1 / 0.1 == pytest.approx(l2, rel=0.01)
    assert toy.pareto_residual(t.end) < 1e-3


def test_famo_escapes_where_equal_weighting_is_stuck_and_balances():
    t = run("famo", (9.0, 9.0))
    assert t.end[1] < 0 and toy.pareto_residual(t.end) < 0.05
    l1, l2 = run("famo", (0.0, 0.0)).ls[-1].tolist()
    assert l1 / 0.1 == pytest.approx(l2, rel=0.15)  # a balanced decrease despite the 10x scale


def test_famo_heads_for_the_balanced_part_of_the_front_from_all_five_starts():
    """FAMO's authors' toy (gamma = 0, 50,000 steps at lr 1e-3) ends on the front with x1 in [-0.95, 1.75] from
    the five starts (BENCHMARKS.md); the cheap protocol has not crossed the flat region yet, but every run has left
    the upper half-plane towards that balanced stretch (the sum ends at x1 = -5.73 or stays stuck)."""
    for start in toy.STARTS:
        end = toy.run("famo", start, steps=1000, lr=3.5e-2).end
        assert float(end[1]) < -5.0 and abs(float(end[0])) < 2.5, (start, end.tolist())


def test_plot_and_run_all_shapes(tmp_path):
    trajs = {"sum": [toy.run(None, s, steps=20) for s in toy.STARTS[:2]]}
    assert trajs["sum"][0].xs.shape == (21, 2) and trajs["sum"][0].ls.shape == (21, 2)
    fig = toy.plot(trajs, path=str(tmp_path / "toy.png"))
    assert (tmp_path / "toy.png").exists() and len(fig.axes) == 1
    assert not math.isnan(float(trajs["sum"][0].ls[-1].sum()))


# -- the papers' protocol, five starts at once (issue 15) -----------------------------------------------------
def pcgrad2(G):
    """PCGrad for two parts, batched: ``W.pcgrad`` with the only orders ``[[1], [0]]`` (sum reduction): each
    gradient loses its component along the other when they conflict."""
    g01 = G[..., 0, 1]
    w = torch.stack([1 - g01 / G[..., 0, 0], 1 - g01 / G[..., 1, 1]], -1)
    return torch.where((g01 < 0)[..., None], w, torch.ones_like(w))


# the weights of the registered balancers from the Gramians (S x 2 x 2) of the five starts and the previous
# weights (warm start; None at the first step), in lossport's convention (as the balancer applies them)
WEIGH = {
    "nash_mtl": W.nash_mtl,
    "fairgrad": lambda G, x0: W.fairgrad(G, 2.0, x0),
    "mgda": lambda G, x0: 2 * W.mgda(G),
    "pcgrad": lambda G, x0: pcgrad2(G),
    "ew": lambda G, x0: torch.ones(G.shape[:-1], dtype=torch.float64),
}


def run_starts(method, steps, lr, starts=toy.STARTS, scale=0.1, record=None):
    """The five starts at once, as :func:`lossport.toy.run` with the balancer ``method`` (Gramian of the two
    gradients on ``x``, warm-started weights from :mod:`lossport.balance.weighting`, ``x.grad = J^T w``, Adam;
    Adam is element-wise, so one optimiser over the stacked starts is five independent ones). Returns the end
    points (S x 2) and the number of steps that warned; ``record`` (a list) receives the points every
    ``steps // 1000`` steps."""
    weigh = WEIGH[method]
    x = torch.tensor(starts, dtype=torch.float64).T.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    warm, warned = None, 0
    every = max(1, steps // 1000)
    for step in range(steps):
        if record is not None and step % every == 0:
            record.append(x.detach().T.clone())
        l1, l2 = toy.losses(x, scale)
        (g1,) = torch.autograd.grad(l1.sum(), x, retain_graph=True)
        (g2,) = torch.autograd.grad(l2.sum(), x)
        J = torch.stack([g1.T, g2.T], 1)  # J[s, i]: gradient of loss i at start s
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            warm = weigh(J @ J.mT, warm)
        warned += bool(rec)
        x.grad = (J.mT @ warm.unsqueeze(-1)).squeeze(-1).T
        opt.step()
    if record is not None:
        record.append(x.detach().T.clone())
    return x.detach().T, warned


def test_batched_runner_is_the_balancer():
    """The runner above takes the same steps as ``toy.run`` with the registered balancer."""
    for method in WEIGH:
        ends, _ = run_starts(method, 40, 1e-2, starts=[(9.0, 9.0), (-7.5, -0.5)])
        for end, start in zip(ends, [(9.0, 9.0), (-7.5, -0.5)]):
            assert torch.allclose(end, toy.run(method, start, steps=40, lr=1e-2).end, rtol=1e-12, atol=1e-12)


# The authors' protocol is Adam lr 1e-3 for 35,000 steps (`python tests/test_toy.py`, ~10 min per method on a
# loaded machine); CI runs this cheaper one (the same distance, lr x steps). Both protocols, all five starts
# (figures in BENCHMARKS.md, "The two-task toy problem"): Nash-MTL, FairGrad and PCGrad from the four left or
# lower starts, and MGDA from all five, reach the Pareto set in the authors' protocol; in the cheap one Nash-MTL
# and FairGrad do too, MGDA and PCGrad are still creeping towards it in the flat region below the x-axis (their
# steps shrink there) from three starts. Where on the front a run ends differs between the protocols (runs keep
# drifting along the front: Nash-MTL by up to 0.9 in x1; FairGrad's runs all end at l1's end, x1 = 7, after
# 35,000 steps, between -3.5 and 6.5 after 1,000), so the tests below assert what both protocols give.
CHEAP = {"steps": 1000, "lr": 3.5e-2}


@functools.cache
def cheap_ends(method):
    ends, _ = run_starts(method, **CHEAP)
    return ends


def scaled_losses(end):
    l1, l2 = toy.losses(end)
    return float(l1) / 0.1, float(l2)


@pytest.mark.parametrize("method", ["nash_mtl", "fairgrad"])
def test_nash_mtl_and_fairgrad_reach_the_front_from_every_start(method):
    """Nash-MTL's old weights stalled at (5.27, -1.99) from (9, 9); FairGrad's steps near the front took ~0.1 s
    each (Newton ran to its iteration limit at the rounding level) and were left out of CI."""
    for start, end in zip(toy.STARTS, cheap_ends(method)):
        assert toy.pareto_residual(end) < 1e-3, (start, end)  # Pareto-stationary
        assert -7.05 < float(end[0]) < 7.05 and float(end[1]) < -8.3


def test_nash_mtl_ends_are_balanced_and_symmetric():
    """(0, 0) ends at the balanced point (L1/0.1 = L2 = -15.09); the mirror starts (-8.5, 7.5) and (9, 9) end at
    mirror points of the front (35,000 steps: x1 = -2.94 and 2.94; here -3.77 and 3.83)."""
    ends = cheap_ends("nash_mtl")
    l1, l2 = scaled_losses(ends[1])
    assert l1 == pytest.approx(-15.092, abs=1e-3) and l2 == pytest.approx(-15.092, abs=1e-3)
    assert float(ends[0][0]) < -2.5 and float(ends[2][0]) > 2.5
    assert float(ends[0][0]) + float(ends[2][0]) == pytest.approx(0.0, abs=0.2)


def test_mgda_from_every_start_favours_the_smaller_gradient():
    """Nash-MTL paper (Fig. 1): MGDA is inclined towards l1, the task with the smaller gradient. From the three
    starts right of the valley l1 ends within 0.2 of its minimum (-19.99 unscaled) in both protocols; every
    run leaves the upper half-plane towards the Pareto set."""
    ends = cheap_ends("mgda")
    for start, end in zip(toy.STARTS, ends):
        assert float(end[1]) < -6.0 and toy.pareto_residual(end) < 0.05, (start, end)
    for i in (1, 2, 4):  # (0, 0), (9, 9), (9, -1)
        assert scaled_losses(ends[i])[0] < -19.8, (toy.STARTS[i], ends[i])


def test_pcgrad_from_every_start_fails_from_the_rightmost_and_favours_l2():
    """Nash-MTL paper (Fig. 1): PCGrad is controlled by l2's larger gradient (imbalanced ends) and fails to
    converge from the rightmost start (9, 9) (35,000 steps: stuck at (5.78, 0.67))."""
    ends = cheap_ends("pcgrad")
    assert toy.pareto_residual(ends[2]) > 0.1  # (9, 9)
    for i in (0, 1, 3):  # the left and centre starts: l2 near its minimum, l1 far from its own
        l1, l2 = scaled_losses(ends[i])
        assert l2 < -18.5 and l1 > -9.5, (toy.STARTS[i], l1, l2)
    assert toy.pareto_residual(ends[4]) < 1e-3  # (9, -1) reaches the front


def test_methods_with_extra_or_meta_batches_run_on_the_toy_where_every_batch_is_the_same():
    """The toy's losses have no data: SDMGrad's and MoDo's extra batches are the same two losses, so their cross
    matrix is the Gramian and the three-batch trajectory is the one-batch one, exactly."""
    for name in ("sdmgrad", "modo"):
        three = toy.run(name, (9.0, 9.0), steps=150, lr=2e-2)
        one = toy.run(name, (9.0, 9.0), steps=150, lr=2e-2, batches=1)
        assert torch.equal(three.xs, one.xs), name
    for name in ("auto_lambda", "moml", "forum"):
        t = toy.run(name, (-8.5, 7.5), steps=150, lr=2e-2)
        assert bool(torch.isfinite(t.xs).all()) and not torch.equal(t.xs[-1], t.xs[0]), name


if __name__ == "__main__":  # the protocol figures: python tests/test_toy.py [steps lr [methods [figure.png]]]
    import sys
    import time

    torch.set_num_threads(1)
    steps, lr = (int(sys.argv[1]), float(sys.argv[2])) if len(sys.argv) > 2 else (35_000, 1e-3)
    trajectories = {}
    for m in sys.argv[3].split(",") if len(sys.argv) > 3 else WEIGH:
        t0 = time.time()
        points = []
        ends, warned = run_starts(m, steps, lr, record=points)
        xs = torch.stack(points, 1)  # S x K x 2
        trajectories[m] = [
            toy.Trajectory(m, s, xs[i], torch.stack(toy.losses(xs[i].T), -1)) for i, s in enumerate(toy.STARTS)
        ]
        for start, end in zip(toy.STARTS, ends):
            l1, l2 = toy.losses(end)
            print(
                f"{m} {steps} steps lr {lr:g} from {start}: ({float(end[0]):.4f}, {float(end[1]):.4f}) "
                f"L1/0.1 {float(l1) / 0.1:.4f} L2 {float(l2):.4f} residual {toy.pareto_residual(end):.1e}"
            )
        print(f"{m}: {warned} steps warned, {time.time() - t0:.0f} s", flush=True)
    if len(sys.argv) > 4:
        toy.plot(trajectories, path=sys.argv[4], cols=3)
        print(f"figure: {sys.argv[4]}")
