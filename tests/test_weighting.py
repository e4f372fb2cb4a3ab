"""Gramian weightings against closed forms (T = 2), optimality conditions, scipy and TorchJD 0.18."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import least_squares, minimize
from torchjd.aggregation import (
    AlignedMTLWeighting,
    ConFIG,
    DualProjWeighting,
    FairGradWeighting,
    GradVacWeighting,
    IMTLGWeighting,
    MGDAWeighting,
    PCGradWeighting,
    UPGradWeighting,
)

from lossport.balance import weighting as W
from lossport.solvers import SolverWarning


def jac(T, r, seed, spread=2.0):
    """A T x r Jacobian of rank min(T, r) whose singular values spread over ``spread`` decades."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, r, generator=g, dtype=torch.float64) * torch.logspace(0, spread, r, dtype=torch.float64)


def gram(T, r, seed, spread=2.0):
    A = jac(T, r, seed, spread)
    return A @ A.T


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# full rank, rank-deficient (r < T), ill-conditioned (spread 2 -> singular values over 2 decades, condition
# number 1e4 of G; spread 5 -> 1e10)
CASES = [
    (2, 2, 2.0),
    (3, 3, 2.0),
    (5, 5, 2.0),
    (6, 3, 2.0),
    (8, 8, 2.0),
    (10, 4, 2.0),
    (16, 16, 2.0),
    (7, 7, 5.0),
]


@pytest.mark.parametrize("T,r,spread", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_against_torchjd(T, r, spread, seed):
    """Same weights as TorchJD 0.18 (factor 1: ``weighting.py`` returns the papers' / TorchJD's weights)."""
    J = jac(T, r, seed, spread) * 3.0  # trace of G well above TorchJD's 1e-4 threshold (see upgrad's docstring)
    G = J @ J.T
    assert rel(W.upgrad(G), UPGradWeighting()(G)) < 1e-5
    assert rel(W.dualproj(G), DualProjWeighting()(G)) < 1e-5
    assert rel(W.imtl_g(G), IMTLGWeighting()(G)) < 1e-5
    for mode in ("min", "median", "rmse"):
        assert rel(W.aligned_mtl(G, mode), AlignedMTLWeighting(scale_mode=mode)(G)) < 1e-5
    # ConFIG is an aggregator of the Jacobian in TorchJD: compare the update J^T w
    assert rel(J.T @ W.config(G), ConFIG()(J)) < 1e-5


@pytest.mark.parametrize("T,r,spread", [(64, 64, 1.0), (64, 256, 0.0), (48, 12, 2.0), (40, 40, 5.0)])
def test_upgrad_many_parts_against_torchjd(T, r, spread):
    """The sizes where box_qp starts from ADMM (full rank, rank-deficient, condition number 1e10)."""
    G = gram(T, r, T + r, spread) * 9.0
    assert rel(W.upgrad(G), UPGradWeighting()(G)) < 1e-5
    assert rel(W.dualproj(G), DualProjWeighting()(G)) < 1e-5


@pytest.mark.parametrize(
    "T,r,spread", [(8, 8, 2.0), (10, 4, 2.0), (7, 7, 5.0), (48, 48, 1.0), (64, 16, 2.0), (40, 40, 5.0)]
)
def test_warm_started_upgrad_along_a_run_equals_torchjd_and_the_cold_solve(T, r, spread):
    """Along a sequence of drifting Gramians (a training run's), each step started from the previous step's
    projections: TorchJD's weights to 1e-5 and the cold solve's to 1e-9 (full rank, rank-deficient,
    ill-conditioned)."""
    J = jac(T, r, T + r, spread) * 3.0
    g = torch.Generator().manual_seed(T)
    V = None
    for _ in range(5):
        J = J + 0.05 * J.abs().mean() * torch.randn(J.shape, generator=g, dtype=torch.float64)
        G = J @ J.T
        w, V = W.upgrad_warm(G, V)
        assert rel(w, UPGradWeighting()(G)) < 1e-5
        assert rel(w, W.upgrad(G)) < 1e-9
        assert torch.allclose(V.sum(0), w)


def test_warm_start_of_the_wrong_size_is_refused():
    G = gram(5, 5, 0)
    with pytest.raises(ValueError, match="upgrad_warm: start has 4 columns for a Gramian of 5 parts"):
        W.upgrad_warm(G, torch.zeros(4, 4, dtype=torch.float64))


def orders_like_torchjd_pcgrad(T, seed):
    torch.manual_seed(seed)
    return [[j for j in torch.randperm(T).tolist() if j != i] for i in range(T)]


def orders_like_torchjd_gradvac(T, seed):
    torch.manual_seed(seed)
    out = []
    for i in range(T):
        others = [j for j in range(T) if j != i]
        out.append([others[p] for p in torch.randperm(T - 1).tolist()])
    return out


@pytest.mark.parametrize("T,r,spread", CASES)
def test_order_dependent_methods_against_torchjd_with_the_same_orders(T, r, spread):
    G = gram(T, r, 2, spread)
    order = orders_like_torchjd_pcgrad(T, 5)
    torch.manual_seed(5)
    assert rel(W.pcgrad(G, order), PCGradWeighting()(G)) < 1e-5
    # GradVac: two consecutive calls (the EMA targets are state), same permutations as TorchJD draws
    tj = GradVacWeighting(beta=0.5)
    tgt = torch.zeros(T, T, dtype=torch.float64)
    for call in range(2):
        order = orders_like_torchjd_gradvac(T, 10 + call)
        w, tgt = W.gradvac(G * (1 + call), order, tgt, beta=0.5)
        torch.manual_seed(10 + call)
        assert rel(w, tj(G * (1 + call))) < 1e-5


@pytest.mark.parametrize("T,r,spread", [(3, 3, 1.0), (5, 5, 1.0), (8, 8, 1.0)])
def test_fairgrad_against_torchjd_least_squares(T, r, spread):
    G = gram(T, r, 4, spread)
    G = G / torch.linalg.matrix_norm(G)
    for alpha in (1.0, 2.0):
        ref = FairGradWeighting(alpha=alpha)(G)
        ours = W.fairgrad(G, alpha)
        assert rel(ours, ref) < 1e-5
        assert rel(G @ ours, ours ** (-1 / alpha)) < 1e-11  # the root to (near) float64 precision


def authors_fairgrad(G, alpha, tight=False):
    """The FairGrad authors' solve: scipy ``least_squares`` on ``G w - w^(-1/alpha)`` from ``1/T``, bounds
    ``[0, inf)`` (default tolerances; ``tight``: 1e-15 and 10,000 evaluations). Returns ``(w, status)``."""
    A = G.numpy()
    kw = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15, "max_nfev": 10_000} if tight else {}
    res = least_squares(
        lambda x: A @ x - np.power(1 / x, 1 / alpha), np.ones(len(A)) / len(A), bounds=(0, np.inf), **kw
    )
    return torch.from_numpy(res.x), res.status


@pytest.mark.parametrize("T,r,seed", [(4, 2, 0), (6, 3, 1), (8, 5, 2), (3, 3, 3)])
def test_fairgrad_equals_the_authors_least_squares_on_random_and_rank_deficient_gramians(T, r, seed):
    """Fewer independent directions than parts (r < T) but a common descent direction (every gradient has a
    positive first coordinate), so the root exists; the authors' solver converges there and we agree."""
    J = jac(T, r, seed, spread=1.0)
    J[:, 0] = J[:, 0].abs() + 0.5
    G = J @ J.T
    for alpha in (1.0, 2.0, 5.0):
        with warnings.catch_warnings():
            warnings.simplefilter("error", SolverWarning)
            ours = W.fairgrad(G, alpha)
        ref, status = authors_fairgrad(G, alpha)
        assert status > 0 and rel(ours, ref) < 1e-5, (alpha, ours, ref)
        assert rel(G @ ours, ours ** (-1 / alpha)) < 1e-10


def test_nash_mtl_and_fairgrad_accept_any_bound():
    """A bound of 1e300 or inf (never bound the root) gives the root itself on a regular Gramian."""
    G = gram(4, 4, 6, spread=1.0)
    for bound in (1e300, float("inf")):
        assert torch.allclose(W.fairgrad(G, 2.0, bound=bound), W.fairgrad(G, 2.0), rtol=1e-12)
        assert torch.allclose(W.nash_mtl(G, bound=bound), W.nash_mtl(G), rtol=1e-12)


def toy_gramian(x1, x2):
    from lossport import toy

    x = torch.tensor([x1, x2], dtype=torch.float64, requires_grad=True)
    l1, l2 = toy.losses(x)
    J = torch.stack([torch.autograd.grad(l1, x, retain_graph=True)[0], torch.autograd.grad(l2, x)[0]])
    return J @ J.T


# points of the toy problem above its Pareto set (x2*(x1) + delta): nearly opposite gradients whose norms differ
# by up to 1e3 (1 + cos from 3e-5 down to 1e-9)
FRONT = [(-3.0, -8.3705), (0.0, -8.3551), (3.0, -8.3705), (5.0, -8.3969)]


@pytest.mark.parametrize("x1,x2", FRONT)
def test_fairgrad_near_the_front_is_the_root_the_authors_solver_approaches(x1, x2):
    """Near the front FairGrad's root is large (weights 1e4-1e6) and the authors' least_squares stops early
    (its default tolerances; relative residual 0.1-0.7 there); with tight tolerances it reaches the root we
    return. Closer still (1 + cos ~ 1e-9: the weighted gradients cancel to 1e-4 of their size) the root is
    replaced by the bounded one, with a warning."""
    for delta in (0.1, 0.01):
        G = toy_gramian(x1, x2 + delta)
        with warnings.catch_warnings():
            warnings.simplefilter("error", SolverWarning)
            ours = W.fairgrad(G, 2.0)
        resid = rel(G @ ours, ours**-0.5)
        assert resid < 1e-8
        tight, status = authors_fairgrad(G, 2.0, tight=True)
        assert status > 0 and rel(ours, tight) < 1e-7, (delta, ours, tight)
        default, _ = authors_fairgrad(G, 2.0)
        assert resid < 1e-6 * rel(G @ default, default**-0.5)
    with pytest.warns(SolverWarning, match="no bounded positive root"):
        w = W.fairgrad(toy_gramian(x1, x2 + 1e-3), 2.0)
    assert torch.isfinite(w).all() and float(w.min()) > 0


def test_batched_weightings_equal_one_by_one():
    Gs = torch.stack([gram(6, r, s) for s, r in enumerate((6, 6, 3, 6))])
    for fn in (W.mgda, W.upgrad, W.dualproj, W.imtl_g, W.config, lambda G: W.aligned_mtl(G, "median")):
        batch = fn(Gs)
        for b in range(4):
            assert torch.allclose(batch[b], fn(Gs[b]), rtol=1e-9, atol=1e-12)
    full = Gs[[0, 1, 3]]  # Nash-MTL needs a non-singular G (else G a = 1/a has no positive root)
    for b in range(3):
        assert torch.allclose(W.nash_mtl(full)[b], W.nash_mtl(full[b]), rtol=1e-9)
        assert torch.allclose(W.fairgrad(full, 2.0)[b], W.fairgrad(full[b], 2.0), rtol=1e-9)
    with pytest.warns(SolverWarning, match="no bounded positive root"):
        W.nash_mtl(Gs[2])
    G2 = torch.stack([gram(2, 2, s) for s in range(3)])
    for b in range(3):
        assert torch.allclose(W.nash_mtl(G2)[b], W.nash_mtl(G2[b]))
        assert torch.allclose(W.mgda(G2)[b], W.mgda(G2[b]))


def test_upgrad_kkt_of_each_projection():
    """Each v_i = argmin_{v >= e_i/T} v^T G v: v >= e_i/T, G v >= 0, (v - e_i/T)_j (G v)_j = 0."""
    from lossport.solvers import box_qp

    G = gram(9, 9, 13)
    Gn = G / G.trace() + 1e-4 * torch.eye(9, dtype=torch.float64)
    U = torch.eye(9, dtype=torch.float64) / 9
    V = box_qp(Gn, None, U)
    Y = V @ Gn
    assert float((U - V).max()) <= 1e-15 and float((-Y).max()) <= 1e-12
    assert float(((V - U) * Y).abs().max()) <= 1e-14
    assert torch.allclose(V.sum(0), W.upgrad(G))


@pytest.mark.parametrize("T,r", [(3, 3), (5, 5), (8, 8)])
def test_mgda_exact_where_torchjd_frank_wolfe_is_approximate(T, r):
    """Deliberate difference: TorchJD's MGDA runs Frank-Wolfe to a tolerance; ours solves the QP exactly.
    So we compare with scipy's SLSQP and check we are never worse than TorchJD."""
    G = gram(T, r, 3)
    w = W.mgda(G)
    Gn = G.numpy()
    res = minimize(
        lambda v: v @ Gn @ v,
        np.ones(T) / T,
        jac=lambda v: 2 * Gn @ v,
        constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}],
        bounds=[(0, None)] * T,
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    assert float(w @ G @ w) <= res.fun * (1 + 1e-8) + 1e-12
    tj = MGDAWeighting()(G)
    assert float(w @ G @ w) <= float(tj @ G @ tj) + 1e-12
    assert abs(float(w.sum()) - 1) < 1e-12 and float(w.min()) >= 0


def test_closed_forms_for_two_tasks():
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([-0.5, 2.0], dtype=torch.float64)
    J = torch.stack([g1, g2])
    G = J @ J.T
    G11, G12, G22 = G[0, 0], G[0, 1], G[1, 1]
    # MGDA (Sener & Koltun Eq. 4)
    a = ((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2))).clamp(0, 1)
    assert torch.allclose(W.mgda(G), torch.stack([a, 1 - a]))
    # PCGrad: d = (1 - G12/G11) g1 + (1 - G12/G22) g2 ... weights on (g1, g2)
    assert torch.allclose(W.pcgrad(G, [[1], [0]]), torch.stack([1 - G12 / G11, 1 - G12 / G22]))
    # UPGrad = PCGrad with mean reduction (up to TorchJD's 1e-4 regularisation of the normalised G)
    assert torch.allclose(W.upgrad(G, eps=0.0), W.pcgrad(G, [[1], [0]]) / 2, atol=1e-9)
    # IMTL-G and Nash-MTL: d bisects the unit gradients
    u1, u2 = g1 / g1.norm(), g2 / g2.norm()
    d = J.T @ W.imtl_g(G)
    assert abs(float(d @ u1 - d @ u2)) < 1e-12
    nash = J.T @ W.nash_mtl(G)
    cos = float(u1 @ u2)
    assert torch.allclose(nash, (u1 + u2) / (1 + cos) ** 0.5, atol=1e-9)


def test_no_conflict_means_no_change():
    G = gram(4, 4, 5)
    G = G.abs()  # all inner products positive
    assert torch.allclose(
        W.pcgrad(G, [[j for j in range(4) if j != i] for i in range(4)]), torch.ones(4, dtype=torch.float64)
    )
    assert torch.allclose(4 * W.upgrad(G, eps=0.0), torch.ones(4, dtype=torch.float64), atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(2, 8), r=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_upgrad_is_non_conflicting_and_kkt(T, r, seed):
    G = gram(T, min(r, T), seed, spread=1.0)
    w = W.upgrad(G, eps=0.0)
    # d = J^T w has a non-negative inner product with every gradient: G w >= 0
    assert float((G @ w).min()) >= -1e-8 * float(G.diagonal().max())


def test_nash_and_fairgrad_optimality():
    G = gram(6, 6, 7)
    a = W.nash_mtl(G)
    assert float(a.min()) > 0 and rel(G @ a, 1 / a) < 1e-8
    for alpha in (0.5, 2.0, 5.0):
        w = W.fairgrad(G, alpha)
        assert rel(G @ w, w ** (-1 / alpha)) < 1e-8
    assert torch.allclose(W.fairgrad(G, 1.0), a, rtol=1e-7)


def test_cagrad_limits_and_objective():
    G = gram(4, 4, 8)
    # c = 0: plain mean gradient
    assert torch.allclose(W.cagrad(G, 0.0), torch.full((4,), 0.25, dtype=torch.float64))
    # the dual solution w* minimises F(w) = w^T G 1/T + c ||g0|| sqrt(w^T G w) on the simplex (scipy)
    c = 0.5
    T = 4
    avg = np.ones(T) / T
    Gn = G.numpy()
    g0 = np.sqrt(avg @ Gn @ avg)

    def F(w):
        return w @ Gn @ avg + c * g0 * np.sqrt(max(w @ Gn @ w, 1e-30))

    res = minimize(
        F,
        avg,
        constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}],
        bounds=[(0, None)] * T,
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    ours = W.cagrad(G, c) * (1 + c * c)
    # recover w*: ours = avg + (c g0/||g_w||) w*
    wstar = ours.numpy() - avg
    wstar = wstar / wstar.sum()
    assert F(wstar) <= res.fun + 1e-8 * abs(res.fun)


def test_config_direction_has_equal_cosines():
    g = torch.Generator().manual_seed(9)
    J = torch.randn(3, 6, generator=g, dtype=torch.float64)
    G = J @ J.T
    d = J.T @ W.config(G)
    U = J / J.norm(dim=1, keepdim=True)
    cos = U @ d / d.norm()
    assert torch.allclose(cos, cos.mean().expand(3), atol=1e-10)
    # length: sum of the gradients' projections on the direction
    assert abs(float(d.norm()) - float((J @ (d / d.norm())).sum())) < 1e-10


def test_pcgrad_gramian_matches_explicit_projection_with_torchjd():
    G = gram(5, 5, 11)
    tj = PCGradWeighting()(G)  # TorchJD: random order internally; compare sums of conflicting structure
    ours = W.pcgrad(G, [[j for j in range(5) if j != i] for i in range(5)])
    J = torch.linalg.cholesky(G + 1e-12 * torch.eye(5, dtype=torch.float64))  # rows with Gramian G
    # explicit PCGrad with the same (fixed) order
    out = torch.zeros(5, dtype=torch.float64)
    for i in range(5):
        gi = J[i].clone()
        for j in [j for j in range(5) if j != i]:
            dot = gi @ J[j]
            if dot < 0:
                gi = gi - dot / (J[j] @ J[j]) * J[j]
        out += gi
    assert torch.allclose(J.T @ ours, out, atol=1e-9)
    assert tj.shape == ours.shape


def test_gradvac_with_zero_targets_is_pcgrad():
    G = gram(4, 4, 12)
    order = [[j for j in range(4) if j != i] for i in range(4)]
    w, tgt = W.gradvac(G, order, torch.zeros(4, 4, dtype=torch.float64), beta=0.5)
    assert torch.allclose(w, W.pcgrad(G, order), atol=1e-10)
    assert tgt.abs().sum() > 0


# -- scale, degenerate Gramians (issue 17) and the authors' Nash-MTL / FairGrad scaling (issue 15) -----------
INVARIANT = {
    "mgda": W.mgda,
    "pcgrad": lambda G: W.pcgrad(G, [[j for j in range(G.shape[0]) if j != i] for i in range(G.shape[0])]),
    "imtl_g": W.imtl_g,
    "cagrad": W.cagrad,
    "upgrad": W.upgrad,
    "dualproj": W.dualproj,
    "aligned_mtl": W.aligned_mtl,
    "config": W.config,
    "gradvac": lambda G: W.gradvac(G, [[1, 2], [2, 0], [0, 1]], torch.full((3, 3), 0.5))[0],
}


@pytest.mark.parametrize("c", [1e-300, 1e-150, 1e-20, 1e20, 1e150, 1e300])
def test_weights_follow_the_scale_of_the_gramian_exactly(c):
    G = gram(3, 3, 21, spread=1.0)
    G = G / G.diagonal().max()
    for name, fn in INVARIANT.items():
        assert rel(fn(G * c), fn(G)) < 1e-9, name
    assert rel(W.nash_mtl(G * c), W.nash_mtl(G) / c**0.5) < 1e-9  # a(cG) = a(G) / sqrt(c)
    for alpha in (0.5, 2.0):
        assert rel(W.fairgrad(G * c, alpha), W.fairgrad(G, alpha) * c ** (-alpha / (1 + alpha))) < 1e-9


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_nash_mtl_and_fairgrad_solve_the_raw_gramian(scale):
    """The authors' Nash-MTL puts ||G||_F back in its constraint, the FairGrad code never normalises: the root
    of G a = a^(-1/alpha) on G itself, not on G / ||G||_F."""
    G = gram(4, 4, 3, spread=1.0) * scale
    a = W.nash_mtl(G)
    assert rel(G @ a, 1 / a) < 1e-12
    w = W.fairgrad(G, 2.0)
    assert rel(G @ w, w**-0.5) < 1e-12
    Gn = G / torch.linalg.matrix_norm(G)
    assert rel(W.nash_mtl(Gn), a * torch.linalg.matrix_norm(G) ** 0.5) < 1e-9  # the old weights differ by this


@pytest.mark.parametrize("fn", [*list(INVARIANT.values()), W.nash_mtl, W.fairgrad])
def test_non_finite_gramian_is_a_floating_point_error(fn):
    G = gram(3, 3, 4)
    for bad in (float("nan"), float("inf")):
        H = G.clone()
        H[0, 1] = H[1, 0] = bad
        with pytest.raises(FloatingPointError, match="NaN or inf"):
            fn(H)
    H = G.clone()
    H[2, 2] = -1.0
    with pytest.raises(ValueError, match="negative diagonal"):
        fn(H)


def opposite(dtype=torch.float64):
    g = torch.tensor([1.0, 2.0, 0.5, -1.0], dtype=dtype)
    g3 = torch.tensor([0.3, -0.1, 0.4, 0.2], dtype=dtype)
    return torch.stack([g, -g, g3])


@pytest.mark.parametrize("name", ["nash_mtl", "fairgrad", "cagrad"])
def test_exactly_opposite_gradients_give_bounded_weights_and_a_warning(name):
    """g, -g, g3: Nash-MTL / FairGrad have no root (weights were ~1e8 / ~3e10), CAGrad's coefficient is
    infinite (~2e6); in float32 the applied update lost g3. Now: bounded, warned, g3 kept."""
    fn = getattr(W, name)
    for dtype in (torch.float32, torch.float64):
        J = opposite(dtype)
        G = (J @ J.T).double()
        with pytest.warns(SolverWarning, match=r"\['a', 'b', 'c'\].*\[.*\]") as rec:
            w = fn(G, names=["a", "b", "c"])
        assert "opposite" in str(rec[0].message)
        norms = G.diagonal().sqrt()
        if name == "cagrad":  # (1/T + k w*) / (1 + c^2) with k capped at 1e4 (was ~1e7)
            assert float(w.max()) <= (1 / 3 + W.BOUND) / 1.16 + 1e-9
        else:  # scale-free weights bounded by 100 sqrt(T) (were ~1e8 and ~1e11)
            assert float((w * norms).max()) < 100 * 3**0.5
        d = J.T @ w.to(dtype)
        g3 = J[2].double()
        # the pair cancels: the update is along g3's component off g (float32 included)
        g = J[0].double()
        off = g3 - (g3 @ g) / (g @ g) * g
        assert float(d.double() @ off) > 0.1 * float(off @ off) * float(w[2])


def test_nash_mtl_two_opposite_gradients():
    J = opposite()[:2]
    with pytest.warns(SolverWarning, match="no bounded positive root"):
        a = W.nash_mtl(J @ J.T, names=["a", "b"])
    assert torch.allclose(a * J.norm(dim=1), torch.full((2,), 100.0, dtype=torch.float64), rtol=1e-6)
    # nearly opposite but with a root of moderate size: the exact closed form, no warning
    J2 = torch.stack([J[0], -J[0] + 0.05 * torch.tensor([2.0, -1.0, 0.0, 0.0], dtype=torch.float64)])
    G = J2 @ J2.T
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        a = W.nash_mtl(G)
    assert rel(G @ a, 1 / a) < 1e-12


def test_zero_gradients():
    J = torch.stack([opposite()[2], torch.zeros(4, dtype=torch.float64), opposite()[0]])
    G = J @ J.T
    with pytest.warns(SolverWarning, match=r"zero gradients: \['part 1'\]"):
        a = W.nash_mtl(G)
    assert torch.isfinite(a).all() and float(a[1]) == float(a.max())
    assert rel((G @ a)[[0, 2]], 1 / a[[0, 2]]) < 1e-12  # the others keep their exact root
    Z = torch.zeros(3, 3, dtype=torch.float64)
    for fn in (W.nash_mtl, W.fairgrad, W.mgda, W.upgrad, W.cagrad, W.imtl_g, W.config, W.aligned_mtl):
        assert torch.isfinite(fn(Z)).all()


def test_gradvac_on_identical_gradients_stays_real_and_finite():
    """Issue 17.3: identical gradients round the cosine to 1 + 1e-16 and drive the EMA target to 1."""
    g = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    J = torch.stack([g, g * (1 + 1e-15)])
    G = J @ J.T
    up, down = G.clone(), G.clone()
    up[0, 1] = up[1, 0] = G[0, 1] * (1 + 1e-15)  # cosine slightly above 1 ...
    down[0, 1] = down[1, 0] = G[0, 1] * (1 - 1e-15)  # ... then slightly below the target
    tgt = torch.zeros(2, 2, dtype=torch.float64)
    for step in range(60):
        w, tgt = W.gradvac(up if step < 40 else down, [[1], [0]], tgt, beta=0.5)
        assert torch.isfinite(w).all() and float(tgt.max()) <= 1.0
    assert torch.allclose(w, torch.ones(2, dtype=torch.float64))  # (almost) no correction between identical ones
    # a gradient that falls below a target of 1: a finite (bounded) correction
    J3 = torch.stack([g, torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)])
    w, _ = W.gradvac(J3 @ J3.T, [[1], [0]], torch.ones(2, 2, dtype=torch.float64), beta=0.5)
    n = J3.norm(dim=1)
    assert torch.isfinite(w).all() and float((w - 1).abs().max()) <= 708 * float(n.max() / n.min())
