"""The toy problem of CAGrad / Nash-MTL / FAMO and the behaviours the papers report (reference section 3.3).

The authors run Adam with lr 1e-3 for 35,000-50,000 steps; these tests use lr 2e-2 for 1,500 steps (the same
distance) and check the behaviours that show at that budget."""

import math

import pytest
import torch

from lossport import toy


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


def test_plot_and_run_all_shapes(tmp_path):
    trajs = {"sum": [toy.run(None, s, steps=20) for s in toy.STARTS[:2]]}
    assert trajs["sum"][0].xs.shape == (21, 2) and trajs["sum"][0].ls.shape == (21, 2)
    fig = toy.plot(trajs, path=str(tmp_path / "toy.png"))
    assert (tmp_path / "toy.png").exists() and len(fig.axes) == 1
    assert not math.isnan(float(trajs["sum"][0].ls[-1].sum()))
