"""The torch solvers: KKT conditions, scipy references, closed forms, batching, non-convergence warnings."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize, nnls

from lossport.solvers import (
    SolverWarning,
    box_qp,
    interior_qp,
    kkt_residual,
    min_norm_simplex,
    newton_positive,
    project_simplex,
    simplex_minimize,
)


def gram(T, r, seed, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(T, r, generator=g, dtype=torch.float64) * torch.logspace(0, spread, r, dtype=torch.float64)
    return A @ A.T


def assert_box_kkt(G, q, lower, v, tol=1e-9):
    """v >= lower, y = G v + q >= 0, y_i (v_i - lower_i) = 0 (relative to the problem's scale)."""
    y = v @ G + (0 if q is None else q)  # G symmetric
    scale = float(G.diagonal().abs().max()) * float(v.abs().max()) + (0 if q is None else float(q.abs().max()))
    assert float((lower - v).max()) <= tol * (1 + float(v.abs().max()))
    assert float((-y).max()) <= tol * scale
    assert float(((v - lower) * y).abs().max()) <= tol * scale * (1 + float(v.abs().max()))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), r=st.integers(1, 12), seed=st.integers(0, 10_000), k=st.integers(1, 4))
def test_box_qp_kkt_on_random_problems(n, r, seed, k):
    G = gram(n, min(r, n), seed, spread=1.0) + 1e-6 * torch.eye(n, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    lower = torch.randn(k, n, generator=g, dtype=torch.float64)
    q = torch.randn(k, n, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        v = box_qp(G, q, lower)
    for i in range(k):
        assert_box_kkt(G, q[i], lower[i], v[i])


def test_box_qp_matches_scipy_nnls_form():
    """min ||L^T v||^2 s.t. v >= 0 with a linear term is an NNLS after completing the square: compare with
    scipy's Lawson-Hanson NNLS on min ||A x - b|| (G = A^T A, q = -A^T b)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(15, 9, generator=g, dtype=torch.float64)
    b = torch.randn(15, generator=g, dtype=torch.float64)
    G = A.T @ A
    q = -(A.T @ b)
    v = box_qp(G, q.unsqueeze(0), torch.zeros(1, 9, dtype=torch.float64)).squeeze(0)
    ref, _ = nnls(A.numpy(), b.numpy())
    assert np.allclose(v.numpy(), ref, atol=1e-10)


def test_box_qp_batched_equals_one_by_one_and_shapes():
    Gs = torch.stack([gram(6, 6, s) for s in range(3)])
    g = torch.Generator().manual_seed(3)
    lower = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    V = box_qp(Gs, None, lower)
    assert V.shape == (3, 4, 6)
    for b in range(3):
        single = box_qp(Gs[b], None, lower[b])
        assert torch.allclose(V[b], single, atol=1e-12)
    with pytest.raises(ValueError, match="lower must be"):
        box_qp(Gs[0], None, torch.zeros(5))


def test_box_qp_ill_conditioned_and_rank_deficient():
    G = gram(12, 12, 4, spread=4.0)  # condition number ~1e16 before the ridge
    lower = torch.eye(12, dtype=torch.float64) / 12
    v = box_qp(G / G.trace() + 1e-4 * torch.eye(12, dtype=torch.float64), None, lower)
    for i in range(12):
        assert_box_kkt(G / G.trace() + 1e-4 * torch.eye(12, dtype=torch.float64), None, lower[i], v[i], tol=1e-8)
    Gs = gram(10, 3, 5)  # rank 3: the face systems are singular, solved by the pseudo-inverse fallback
    v = box_qp(Gs, None, lower[:10, :10])
    assert float((Gs @ v.T).min()) >= -1e-9 * float(Gs.diagonal().max())  # projections are in the dual cone


@pytest.mark.parametrize(
    "n,r,spread,ridge", [(40, 40, 1.0, 1e-4), (48, 48, 4.0, 1e-4), (40, 10, 2.0, 1e-4), (32, 8, 2.0, 0.0)]
)
def test_box_qp_admm_start_gives_the_exact_answer(n, r, spread, ridge):
    """Many problems per matrix start the pivoting from an ADMM guess of the free sets: same KKT point as the
    cold start, on full-rank, ill-conditioned, rank-deficient and singular (no ridge) matrices."""
    G = gram(n, r, n + r, spread)
    G = G / G.trace() + ridge * torch.eye(n, dtype=torch.float64)
    lower = torch.eye(n, dtype=torch.float64) / n
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        warm = box_qp(G, None, lower)
        cold = box_qp(G, None, lower, warm=0)
    for i in range(n):
        assert_box_kkt(G, None, lower[i], warm[i], tol=1e-8)
    if ridge > 0:  # unique solution
        assert torch.allclose(warm, cold, rtol=1e-9, atol=1e-12)


def test_box_qp_admm_start_batched_and_with_linear_term():
    Gs = torch.stack([gram(20, r, s) for s, r in enumerate((20, 20, 6))])
    Gs = Gs / Gs.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    g = torch.Generator().manual_seed(8)
    lower = torch.randn(3, 12, 20, generator=g, dtype=torch.float64)
    q = torch.randn(3, 12, 20, generator=g, dtype=torch.float64)
    V = box_qp(Gs, q, lower, ridge=1e-6)
    for b in range(3):
        Gr = Gs[b] + 1e-6 * Gs[b].diagonal().max() * torch.eye(20, dtype=torch.float64)
        assert torch.allclose(V[b], box_qp(Gr, q[b], lower[b], warm=0), rtol=1e-9, atol=1e-11)
        for i in range(12):
            assert_box_kkt(Gr, q[b, i], lower[b, i], V[b, i])


def drift(G, seed, size):
    """``G`` moved as a training step moves a Gramian: ``(I + size E) G (I + size E)^T``, ``E`` standard normal."""
    g = torch.Generator().manual_seed(seed)
    E = torch.eye(G.shape[0], dtype=torch.float64) + size * torch.randn(G.shape, generator=g, dtype=torch.float64)
    return E @ G @ E.T


@pytest.mark.parametrize(
    "n,r,spread,ridge", [(40, 40, 1.0, 1e-4), (48, 48, 4.0, 1e-4), (40, 10, 2.0, 1e-4), (32, 8, 2.0, 0.0)]
)
@pytest.mark.parametrize("warm", [None, 0])
def test_box_qp_started_from_a_previous_solution_gives_the_exact_answer(n, r, spread, ridge, warm):
    """A start from the solution of nearby problems (the previous training step's), with ADMM (``warm=None``) or
    straight into the pivoting (``warm=0``), on full-rank, ill-conditioned, rank-deficient and singular
    matrices: the same KKT point as the cold start, along a sequence of drifting matrices."""
    lower = torch.eye(n, dtype=torch.float64) / n
    G = gram(n, r, n + r, spread)
    prev = None
    for step in range(4):
        G = drift(G, step, 0.05)
        Gn = G / G.trace() + ridge * torch.eye(n, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("error", SolverWarning)
            cold = box_qp(Gn, None, lower, warm=0)
            started = box_qp(Gn, None, lower, warm=warm, start=prev)
        for i in range(n):
            assert_box_kkt(Gn, None, lower[i], started[i], tol=1e-8)
        if ridge > 0:  # unique solution
            assert torch.allclose(started, cold, rtol=1e-9, atol=1e-12)
        prev = started


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), r=st.integers(1, 12), seed=st.integers(0, 10_000), k=st.integers(1, 6))
def test_box_qp_from_any_start_meets_the_kkt_conditions(n, r, seed, k):
    """Random problems (those of the cold test above) started from random vectors (negative, large, zero
    entries), with and without ADMM."""
    G = gram(n, min(r, n), seed, spread=1.0) + 1e-6 * torch.eye(n, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 2)
    lower = torch.randn(k, n, generator=g, dtype=torch.float64)
    q = torch.randn(k, n, generator=g, dtype=torch.float64)
    start = torch.randn(k, n, generator=g, dtype=torch.float64) * 10.0 ** float(seed % 5 - 2)
    for warm in (None, 0, 30):
        with warnings.catch_warnings():
            warnings.simplefilter("error", SolverWarning)
            v = box_qp(G, q, lower, warm=warm, start=start)
        for i in range(k):
            assert_box_kkt(G, q[i], lower[i], v[i])


def test_box_qp_solves_again_from_the_cold_start_what_a_start_does_not_finish():
    """A condition number of 1e9 and a random start: one problem needs more than 100 pivoting steps from the
    start (Murty's one-variable steps); box_qp solves the batch again from the cold start, which converges."""
    n, k = 15, 3
    G = gram(n, 7, 1, spread=1.0) + 1e-6 * torch.eye(n, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    lower = torch.randn(k, n, generator=g, dtype=torch.float64)
    q = torch.randn(k, n, generator=g, dtype=torch.float64)
    start = torch.randn(k, n, generator=g, dtype=torch.float64) / 10
    from lossport.solvers import _lcp_bpp

    c = (lower @ G + q)[None]
    x0 = (start - lower).clamp_min(0)[None]
    assert not bool(_lcp_bpp(G[None], c, 1e-10, 100, x0 > 0)[2].all())  # from the start alone: not finished
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        v = box_qp(G, q, lower, warm=0, start=start)
    for i in range(k):
        assert_box_kkt(G, q[i], lower[i], v[i])


def test_box_qp_start_far_from_the_answer_and_wrong_shape():
    """A start from unrelated problems still ends at the exact answer; a start of the wrong shape is refused."""
    G = gram(24, 24, 3) / gram(24, 24, 3).trace() + 1e-4 * torch.eye(24, dtype=torch.float64)
    lower = torch.eye(24, dtype=torch.float64) / 24
    other = box_qp(gram(24, 5, 9) / gram(24, 5, 9).trace() + 1e-4 * torch.eye(24, dtype=torch.float64), None, lower)
    for start in (other, torch.full((24, 24), 5.0, dtype=torch.float64), -other):
        assert torch.allclose(
            box_qp(G, None, lower, start=start), box_qp(G, None, lower, warm=0), rtol=1e-9, atol=1e-12
        )
    with pytest.raises(ValueError, match="start must be shaped as lower"):
        box_qp(G, None, lower, start=other[:3])


def test_admm_from_the_solution_is_at_its_fixed_point():
    """Started from the exact solution, ADMM's first step stays at its fixed point: its support is the solution's
    free set (``w = x - y / rho`` is a fixed point of the Peaceman-Rachford step)."""
    from lossport.solvers import _admm_support, _lcp_bpp

    G = (gram(30, 30, 4, spread=1.0) / 30)[None]
    c = (torch.eye(30, dtype=torch.float64) / 30 @ G[0])[None]
    x, _, ok = _lcp_bpp(G, c, 1e-12, 50)
    assert bool(ok.all()) and bool((x > 0).any())
    assert torch.equal(_admm_support(G, c, 3, x0=x), x > 0)


def test_admm_start_falls_back_to_the_cold_start_when_the_matrix_is_not_psd():
    from lossport.solvers import _admm_support

    G = -torch.eye(5, dtype=torch.float64)[None]
    c = torch.tensor([[[1.0, -1.0, 2.0, -3.0, 0.0]]], dtype=torch.float64)
    assert torch.equal(_admm_support(G, c, 50), c < 0)


def test_box_qp_warns_with_the_residual_when_not_converged():
    G = gram(30, 30, 6)
    lower = torch.eye(30, dtype=torch.float64)
    Gn = G / G.trace() + 1e-4 * torch.eye(30, dtype=torch.float64)
    with pytest.warns(SolverWarning, match="KKT residual"):
        box_qp(Gn, None, lower, max_iter=1, warm=0)  # cold start: one pivoting step is not enough
    # from the ADMM start, too few pivoting steps on a hard problem (rank 3 of 40, condition 1e8) also warn
    G3 = gram(40, 3, 7, spread=4.0)
    with pytest.warns(SolverWarning, match="KKT residual"):
        eye = torch.eye(40, dtype=torch.float64)
        box_qp(G3 / G3.trace() + 1e-8 * eye, None, eye, max_iter=1)


def test_kkt_residual_detects_violations():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([[0.0, 2.0], [0.0, -2.0], [0.0, 2.0]], dtype=torch.float64)
    r = kkt_residual(x, y)
    assert r[0] == 0 and r[1] == pytest.approx(1.0) and r[2] == pytest.approx(0.5)


def test_min_norm_simplex_closed_form_two_tasks_and_batch():
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([-0.5, 2.0], dtype=torch.float64)
    J = torch.stack([g1, g2])
    G = J @ J.T
    a = float((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)))
    assert torch.allclose(min_norm_simplex(G), torch.tensor([a, 1 - a], dtype=torch.float64))
    # one gradient inside the other's half-line: clipped to a vertex
    G2 = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    assert torch.allclose(min_norm_simplex(G2), torch.tensor([1.0, 0.0], dtype=torch.float64))
    Gs = torch.stack([gram(5, 5, s) for s in range(4)])
    W = min_norm_simplex(Gs)
    for b in range(4):
        assert torch.allclose(W[b], min_norm_simplex(Gs[b]), atol=1e-12)


@pytest.mark.parametrize("T,r", [(3, 3), (6, 6), (8, 3), (12, 12)])
def test_min_norm_simplex_optimal_against_slsqp(T, r):
    G = gram(T, r, T + r)
    w = min_norm_simplex(G)
    assert abs(float(w.sum()) - 1) < 1e-12 and float(w.min()) >= 0
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
    value = float(w @ G @ w)
    assert value <= res.fun * (1 + 1e-7) + 1e-10 * float(G.trace())
    # KKT of the simplex problem: (G w)_i >= w^T G w, with equality on the support
    Gw = G @ w
    scale = float(G.diagonal().max())
    assert float((value - Gw).max()) <= 1e-8 * scale
    assert float((Gw - value)[w > 1e-9].abs().max()) <= 1e-7 * scale


def test_newton_positive_solves_and_is_batched_and_warm_started():
    G = gram(6, 6, 7)
    for p in (0.5, 1.0, 2.0):
        x = newton_positive(G, p)
        assert float(x.min()) > 0
        assert torch.allclose(G @ x, x ** (-p), rtol=1e-8)
    Gs = torch.stack([gram(5, 5, s) for s in range(3)])
    X = newton_positive(Gs, 1.0)
    for b in range(3):
        assert torch.allclose(X[b], newton_positive(Gs[b], 1.0), rtol=1e-9)
        assert torch.allclose(X[b], newton_positive(Gs[b], 1.0, x0=X[b] * 1.01), rtol=1e-9)
    with pytest.raises(ValueError, match="power"):
        newton_positive(G, 0.0)


def test_newton_positive_warns_when_stopped_early():
    with pytest.warns(SolverWarning, match="residual"):
        newton_positive(gram(8, 8, 9), 1.0, max_iter=1)


def test_project_simplex_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(1)
    V = 3 * torch.randn(20, 6, generator=g, dtype=torch.float64)
    P = project_simplex(V)
    assert torch.allclose(P.sum(-1), torch.ones(20, dtype=torch.float64)) and float(P.min()) >= 0
    # variational inequality: <v - p, z - p> <= 0 for every vertex z of the simplex
    for i in range(20):
        d = V[i] - P[i]
        assert float((d.unsqueeze(0) @ (torch.eye(6, dtype=torch.float64) - P[i]).T).max()) <= 1e-12


def test_simplex_minimize_quadratic_and_warning():
    G = gram(5, 5, 2)
    w = simplex_minimize(lambda w: w @ G @ w, lambda w: 2 * G @ w, 5)
    assert torch.allclose(w, min_norm_simplex(G), atol=1e-6)
    with pytest.warns(SolverWarning, match="last step"):
        simplex_minimize(lambda w: w @ G @ w, lambda w: 2 * G @ w, 5, iters=2)


# -- bounded and scale-aware (issue 17) ----------------------------------------------------------------------
def test_simplex_minimize_raises_on_overflow_and_stops_on_a_hopeless_backtracking():
    G = gram(3, 3, 2) * 1e300
    with pytest.raises(FloatingPointError, match="simplex_minimize"):
        simplex_minimize(lambda w: w @ G @ w * 1e300, lambda w: 2 * G @ w * 1e300, 3)
    # an objective that no step decreases (a discontinuous one): warns after max_backtrack halvings
    with pytest.warns(SolverWarning, match="no decrease"):
        w = simplex_minimize(
            lambda w: torch.tensor(float(w[0] != 1 / 3)),
            lambda w: torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
            3,
            max_backtrack=20,  # (beyond ~50 halvings the step rounds to 0 and "decreases")
        )
    assert torch.allclose(w, torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("c", [1e-280, 1e-100, 1e100, 1e280])
def test_newton_positive_is_scale_covariant(c):
    G = gram(5, 5, 3, spread=1.0)
    for p in (0.5, 1.0):
        x = newton_positive(G, p)
        xc = newton_positive(G * c, p)
        assert torch.allclose(xc, x * c ** (-1 / (1 + p)), rtol=1e-9)
        assert torch.allclose(newton_positive(G * c, p, x0=xc * 1.1), xc, rtol=1e-9)  # warm start, raw scale


def test_newton_positive_without_root_warns_quickly_and_non_finite_raises():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    J = torch.stack([g, -g, torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64)])
    with pytest.warns(SolverWarning, match="no positive root"):
        newton_positive(J @ J.T, 1.0)
    G = gram(3, 3, 1)
    G[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        newton_positive(G, 1.0)


# ------------------------------------------------------------------------------------------------ interior_qp
def forum_problem(T, P, seed, big=1.0):
    """FORUM's QP (lossport.balance.bilevel.FORUM): T unit rows and one row g_q of norm ~big."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(T + 1, P, generator=g, dtype=torch.float64)
    A[:T] /= A[:T].norm(dim=1, keepdim=True)
    A[T] *= big
    sq = float(A[T] @ A[T])
    pi = 0.1 - (A[:T] @ A[T]) / sq
    Q = 2 * A @ A.T
    q = torch.zeros(T + 1, dtype=torch.float64)
    q[T] = -0.1 * sq
    C = torch.cat([torch.eye(T + 1, dtype=torch.float64), torch.cat([-pi, torch.ones(1, dtype=torch.float64)])[None]])
    E = torch.cat([torch.ones(T, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])[None]
    return Q, q, C, torch.zeros(T + 2, dtype=torch.float64), E, torch.ones(1, dtype=torch.float64)


def scipy_qp(Q, q, C, d, E, e):
    Qn, qn, Cn, dn, En, en = (t.numpy() for t in (Q, q, C, d, E, e))
    res = minimize(
        lambda x: 0.5 * x @ Qn @ x + qn @ x,
        np.linalg.lstsq(En, en, rcond=None)[0].clip(0),
        jac=lambda x: Qn @ x + qn,
        constraints=[{"type": "ineq", "fun": lambda x: Cn @ x - dn}, {"type": "eq", "fun": lambda x: En @ x - en}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    return res.x, res.fun


@pytest.mark.parametrize(("T", "P", "big"), [(2, 10, 1.0), (3, 20, 1.0), (5, 4, 0.01), (8, 100, 1.0), (32, 50, 1e3)])
def test_interior_qp_solves_forums_problem_as_scipy(T, P, big):
    prob = forum_problem(T, P, seed=T, big=big)
    Q, q, C, d, E, e = prob
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        x = interior_qp(*prob)
    ref, fref = scipy_qp(*prob)
    f = float(0.5 * x @ Q @ x + q @ x)
    scale = 1 + float(x @ Q.abs() @ x.abs() + q.abs() @ x.abs())  # the size of the objective's terms
    assert f <= fref + 1e-9 * scale  # no worse than SLSQP's (whose point may violate a constraint by ~1e-8)
    assert float((C @ x - d).min()) >= -1e-12 * float(x.abs().max()) and float((E @ x - e).abs().max()) < 1e-12
    assert np.allclose(x.numpy(), ref, atol=1e-6 * float(np.abs(ref).max()))
    assert bool((x[:T].abs() < 1e-15).any()) or bool((x > 1e-9).all())  # polished: active bounds zero, not mu / z


def test_interior_qp_survives_a_numerically_singular_kkt_matrix():
    """FORUM's QP in w when its inner steps diverged (||g_q||^2 ~ 4e24, from a `lossport compare` run; FORUM now
    solves it in other variables): the matrix rounds to an indefinite one and the KKT systems become singular.
    The solver does not raise (least squares there), returns finite numbers and says that it did not converge."""
    G = torch.tensor(
        [[1.0, 0.0963, -0.2039, -7.18], [0.0963, 1.0, -0.00547, -0.425], [-0.2039, -0.00547, 1.0, 36.0],
         [-7.18, -0.425, 36.0, 3.76e24]], dtype=torch.float64,
    )  # fmt: skip
    q = torch.tensor([0.0, 0.0, 0.0, -0.1 * 3.76e24], dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    C = torch.cat([eye, torch.tensor([[-0.1, -0.1, -0.1, 1.0]], dtype=torch.float64)])
    E, e = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    with pytest.warns(SolverWarning, match="interior_qp: residual"):
        x = interior_qp(2 * G, q, C, torch.zeros(5, dtype=torch.float64), E, e)
    assert bool(torch.isfinite(x).all())


def test_interior_qp_is_batched_and_exact_on_a_face():
    probs = [forum_problem(4, 12, seed=s) for s in range(3)]
    stacked = [torch.stack(ts) for ts in zip(*probs)]
    X = interior_qp(*stacked)
    for x, prob in zip(X, probs):
        assert torch.allclose(x, interior_qp(*prob), atol=1e-12)
    # min ||x - c||^2 on the simplex: the projection, known exactly
    c = torch.tensor([0.9, 0.5, -0.3, 0.1], dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    x = interior_qp(2 * eye, -2 * c, eye, torch.zeros(4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64),
                    torch.ones(1, dtype=torch.float64))  # fmt: skip
    assert torch.allclose(x, project_simplex(c), atol=1e-14)


def test_interior_qp_warns_when_out_of_steps():
    prob = forum_problem(6, 30, seed=1)
    with pytest.warns(SolverWarning, match="interior_qp: residual"):
        interior_qp(*prob, max_iter=0)  # the starting point (no active constraint guessed) is not optimal
