"""Priority-Constrained Descent (lossport.balance.priority), checked against TorchJD 0.18's PCDWeighting."""

import math

import pytest
import torch
from multihead import MultiHead, multihead_batch, unit_losses
from torchjd.aggregation import PCDWeighting

import lossport
from lossport.balance import PCD, resolve
from lossport.balance.priority import pcd, pcd_direction
from lossport.gramian import gramian_reference
from lossport.graph import shared_parameters

NAMES = ["a", "b", "c", "d"]
SPEC = dict.fromkeys(NAMES, "mse")


def Net() -> MultiHead:
    return MultiHead(NAMES)


def batch(seed: int = 0, n: int = 32) -> dict[str, torch.Tensor]:
    return multihead_batch(NAMES, seed, n)


def jacobians(T, seed):
    """Seeded random, rank-deficient (rank 2), ill-conditioned (singular values 1 .. 1e-4) and infeasible (two
    anti-parallel secondaries) Jacobians."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(T, 20, generator=g, dtype=torch.float64)
    low = torch.randn(T, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 20, generator=g, dtype=torch.float64)
    U, _, V = torch.linalg.svd(torch.randn(T, 20, generator=g, dtype=torch.float64), full_matrices=False)
    ill = U @ torch.diag(torch.logspace(0, -4, T, dtype=torch.float64)) @ V
    bad = torch.randn(T, 20, generator=g, dtype=torch.float64)
    bad[2] = -0.5 * bad[1]
    return {"random": rand, "rank_deficient": low, "ill_conditioned": ill, "infeasible": bad}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", [0.02, 0.3, "vector"])
def test_weights_equal_torchjd_over_three_steps(seed, tau):
    T = 3 + seed % 3
    taus = {k: 0.1 * (i + 1) for i, k in enumerate("bcdef"[: T - 1])} if tau == "vector" else tau
    tj_tau = torch.tensor(list(taus.values()), dtype=torch.float64) if tau == "vector" else tau
    names = list("abcdef"[:T])
    for kind, J in jacobians(T, seed).items():
        mine, ref = PCD(tau=taus, beta=0.9), PCDWeighting(tau=tj_tau, beta=0.9)
        g = torch.Generator().manual_seed(100 + seed)
        for step in range(3):
            Js = J * (1 + 0.5 * step) + 0.1 * step * torch.randn(J.shape, generator=g, dtype=torch.float64)
            G = Js @ Js.T
            w, r = mine.weigh(G, unit_losses(names)), ref(G)
            assert torch.allclose(w, r, rtol=1e-5, atol=1e-9 * float(r.abs().max())), (kind, step)
            assert torch.allclose(w @ Js, r @ Js, rtol=1e-5, atol=1e-7 * float(Js.norm())), (kind, step)


def test_two_parts_by_hand():
    """T = 2, unit normalised gradients u1, u2 with cosine c: the constraint u2^T d >= tau holds for d = u1 when
    c >= tau; otherwise d = u1 + (tau - c) u2, rescaled to ||g_1||."""
    g1, g2 = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 2.0], dtype=torch.float64)
    J = torch.stack([g1, g2])
    s = 1 / J.norm(dim=1)
    c = float(g1 @ g2 * s[0] * s[1])
    tau = 0.5
    mu = tau - c
    dt = g1 * s[0] + mu * g2 * s[1]
    expected = torch.tensor([s[0], mu * s[1]], dtype=torch.float64) * (g1.norm() / dt.norm())
    assert torch.allclose(pcd(J @ J.T, torch.tensor([tau], dtype=torch.float64), s), expected, rtol=1e-12)
    assert math.isclose(float(dt @ g2 * s[1]), tau, rel_tol=1e-12)  # the constraint is active
    assert math.isclose(float((expected @ J).norm()), 3.0, rel_tol=1e-12)  # rescaled to ||g_1||
    Jp = torch.stack([g1, torch.tensor([1.0, 2.0], dtype=torch.float64)])  # cosine 0.447 >= tau: d = g_1
    assert pcd_direction(Jp @ Jp.T, torch.tensor([0.2], dtype=torch.float64)).tolist() == [1.0, 0.0]
    assert pcd(torch.zeros(2, 2), torch.tensor([tau]), s).tolist() == [0.0, 0.0]  # g_1 = 0: no step


def test_balancer_uses_the_shared_gramian_with_the_primary_first():
    net = Net()
    bal = PCD(primary="c", tau=0.4, beta=0.5)
    obj = lossport.Objective(SPEC, balance=bal)
    ref = PCDWeighting(tau=0.4, beta=0.5)
    order = ["c", "a", "b", "d"]
    for s in range(3):
        x = batch(s)
        parts = lossport.Objective(SPEC)(net, x).parts
        G = gramian_reference([parts[k] for k in order], shared_parameters([parts[k] for k in order])).double()
        r = ref(G)
        w = obj(net, x).weights
        assert torch.allclose(torch.tensor([w[k] for k in order], dtype=torch.float64), r, rtol=1e-4, atol=1e-7)


def test_missing_primary_and_bad_arguments_are_errors():
    net = Net()
    b = batch()
    b["a"] = torch.full((32, 1), float("nan"))
    with pytest.raises(ValueError, match=r"primary part 'a' is not present.*missing: \['a'\]"):
        lossport.Objective(SPEC, balance=PCD(primary="a"))(net, b)
    w = lossport.Objective(SPEC, balance=PCD())(net, b).weights  # default primary: the first part present
    assert set(w) == {"b", "c", "d"} and w["b"] > 0
    with pytest.raises(ValueError, match=r"tau names \['zz'\]"):
        lossport.Objective(SPEC, balance=PCD(tau={"zz": 0.1}))(net, batch())
    with pytest.raises(ValueError, match="tau must be in"):
        PCD(tau=1.5)
    with pytest.raises(ValueError, match="beta"):
        PCD(beta=1.0)


def test_state_round_trip_every_k_and_failed_call():
    net = Net()
    bal = resolve("pcd", primary="a", beta=0.9, tau=0.3, every=2)
    obj = lossport.Objective(SPEC, balance=bal)
    ws = [obj(net, batch(s)).weights for s in range(3)]
    assert ws[0] == ws[1] != ws[2]
    assert bal.state_dict()["steps"] == dict.fromkeys(NAMES, 2)  # advanced on calls 0 and 2 only
    twin = resolve("pcd", primary="a", beta=0.9, tau=0.3, every=2)
    twin.load_state_dict(bal.state_dict())
    obj2 = lossport.Objective(SPEC, balance=twin)
    for s in range(3, 7):
        assert obj(net, batch(s)).weights == obj2(net, batch(s)).weights
    before = bal.state_dict()
    b = batch(9)
    b["a"] = torch.full((32, 1), float("nan"))
    with pytest.raises(ValueError, match="primary"):
        obj(net, b)
    assert bal.state_dict() == before


def test_train_three_steps_with_finite_weights():
    net = Net()
    r = lossport.train(
        net, batch(7, n=48), SPEC, balance="pcd", epochs=1, batch_size=16, shuffle=False, progress=False, seed=0
    )
    assert len(r.history.batch_values("loss")) == 3
    assert all(math.isfinite(r.history[f"weight/{k}"][-1]) for k in NAMES)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def _many_jacobians(T, seed):
    """T x 300 Jacobians: random, rank 3, ill-conditioned (singular values 1 .. 1e-4), a primary opposed to the
    sum of the secondaries, and infeasible (two anti-parallel secondaries)."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(T, 300, generator=g, dtype=torch.float64)
    low = torch.randn(T, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 300, generator=g, dtype=torch.float64)
    U, _, V = torch.linalg.svd(torch.randn(T, 300, generator=g, dtype=torch.float64), full_matrices=False)
    ill = U @ torch.diag(torch.logspace(0, -4, T, dtype=torch.float64)) @ V
    conflict = torch.randn(T, 300, generator=g, dtype=torch.float64)
    conflict[0] = -conflict[1:].sum(0)
    bad = torch.randn(T, 300, generator=g, dtype=torch.float64)
    bad[2] = -0.5 * bad[1]
    return {"random": rand, "rank_deficient": low, "ill_conditioned": ill, "conflict": conflict, "infeasible": bad}


@pytest.mark.parametrize("T", [32, 64])
@pytest.mark.parametrize("force_active_set", [False, True])
def test_many_parts_equal_torchjd(T, force_active_set, monkeypatch):
    """T = 32 and 64 (beyond the enumeration's 16 parts): the weights equal TorchJD's; with the dual solver made
    to fail (it returns mu = 0, which violates the constraints), every solve goes through the active-set method."""
    import lossport.balance.priority as priority

    calls = []
    if force_active_set:
        monkeypatch.setattr(priority, "box_qp", lambda Gs, q, x0: torch.zeros_like(q))
        real = priority._active_set
        monkeypatch.setattr(priority, "_active_set", lambda *a: calls.append(1) or real(*a))
    names = [f"p{i}" for i in range(T)]
    for seed in range(2):
        for tau in (0.02, 0.3):
            for kind, J in _many_jacobians(T, seed).items():
                mine, ref = PCD(tau=tau, beta=0.9), PCDWeighting(tau=tau, beta=0.9)
                for step in range(2):
                    Js = J * (1 + 0.5 * step)
                    G = Js @ Js.T
                    w, r = mine.weigh(G, unit_losses(names)), ref(G)
                    assert torch.allclose(w, r, rtol=1e-5, atol=1e-9 * float(r.abs().max())), (kind, tau, step)
    if force_active_set:
        assert len(calls) >= 30  # every case with a violated constraint took the active-set path


@pytest.mark.parametrize("seed", range(8))
def test_active_set_equals_enumeration(seed):
    """The active-set method and the exact enumeration give the same multipliers (T = 4..10), and the same
    verdict on infeasible constraints."""
    from lossport.balance.priority import _active_set, _enumerate_active_sets

    T = 4 + seed % 7
    for kind, J in _many_jacobians(T, seed).items():
        G = J @ J.T
        Gs = G[1:, 1:]
        q = G[1:, 0] - 0.3 * Gs.diagonal()
        atol = 1e-9 * float(G.diagonal().max())
        if float(q.min()) >= -atol:
            continue  # g_1 satisfies every constraint: pcd_direction returns before any solver
        mu, done = _active_set(Gs, q, atol, 1e-9)
        e = _enumerate_active_sets(Gs, q, atol, 1e-9)
        assert done and (mu is None) == (e is None), kind
        if e is not None:
            assert mu is not None and torch.allclose(mu, e, rtol=1e-6, atol=1e-9 * float(e.abs().max())), kind
