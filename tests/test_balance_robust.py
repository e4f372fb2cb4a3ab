"""Krum and the trimmed mean (lossport.balance.robust), checked against TorchJD 0.18."""

import math

import pytest
import torch
from multihead import MultiHead, multihead_batch
from torchjd.aggregation import ExcessMTLWeighting, KrumWeighting
from torchjd.aggregation import TrimmedMean as TJTrimmedMean

import lossport
from lossport.balance import ExcessMTL, Krum, TrimmedMean, resolve, robust
from lossport.balance.robust import krum, trimmed_mean
from lossport.gramian import gramian_reference
from lossport.graph import shared_parameters

NAMES = ["a", "b", "c", "d", "e"]
SPEC = dict.fromkeys(NAMES, "mse")


def Net() -> MultiHead:
    return MultiHead(NAMES)


def batch(seed: int = 0, n: int = 32) -> dict[str, torch.Tensor]:
    return multihead_batch(NAMES, seed, n, spread=3.0)


def jacobian_and_parts(net, x, spec=SPEC):
    parts = lossport.Objective(spec)(net, x).parts
    params = shared_parameters([parts[k] for k in NAMES])
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(parts[k], params, retain_graph=True)]) for k in NAMES]
    return torch.stack(rows), params, parts


def grad_on(losses, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses.total, params, retain_graph=True)])


def matrices(T, P=40, seed=0):
    """Seeded random, rank-deficient (rank 2) and ill-conditioned (singular values 1 .. 1e-6) Jacobians."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(T, P, generator=g, dtype=torch.float64)
    low = torch.randn(T, 2, generator=g, dtype=torch.float64) @ torch.randn(2, P, generator=g, dtype=torch.float64)
    U, _, V = torch.linalg.svd(torch.randn(T, P, generator=g, dtype=torch.float64), full_matrices=False)
    ill = U @ torch.diag(torch.logspace(0, -6, T, dtype=torch.float64)) @ V
    return {"random": rand, "rank_deficient": low, "ill_conditioned": ill}


# ------------------------------------------------------------------------------------------------ Krum
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("T,f,m", [(4, 0, 1), (5, 1, 1), (6, 1, 2), (8, 2, 3), (7, 0, 7)])
def test_krum_euclidean_equals_torchjd(seed, T, f, m):
    for kind, J in matrices(T, seed=seed).items():
        G = J @ J.T
        expected = KrumWeighting(n_byzantine=f, n_selected=m)(G)
        assert torch.allclose(krum(G, f, m, "euclidean"), expected, atol=1e-5), kind


def test_krum_squared_score_is_the_papers_and_can_differ_from_torchjd():
    """The paper's score sums squared distances to the T - f - 2 nearest neighbours; computed here directly
    from the gradients. Over random draws the two scores pick different parts at least once."""
    differ = 0
    for seed in range(40):
        J = torch.randn(7, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        D2 = torch.cdist(J, J) ** 2
        scores = [sorted(D2[i, j].item() for j in range(7) if j != i)[: 7 - 1 - 2] for i in range(7)]
        best = min(range(7), key=lambda i: sum(scores[i]))
        w = krum(J @ J.T, 1)
        assert w.tolist() == [1.0 if i == best else 0.0 for i in range(7)]
        differ += not torch.equal(w, krum(J @ J.T, 1, distance="euclidean"))
    assert differ > 0


def test_krum_outlier_is_never_selected_and_ties_go_to_the_lower_index():
    J = torch.tensor([[1.0, 0.0], [1.1, 0.1], [0.9, -0.1], [50.0, -40.0]], dtype=torch.float64)
    w = krum(J @ J.T, f=1, m=3)
    assert w[3] == 0 and torch.allclose(w[:3], torch.full((3,), 1 / 3, dtype=torch.float64))
    same = torch.ones(4, 3, dtype=torch.float64)
    assert krum(same @ same.T, 0).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_krum_tie_of_the_two_nearest_goes_to_the_lower_index_despite_rounding_in_the_gramian():
    """With T = f + 3 each score is the distance to the nearest other gradient, so the two mutually nearest
    gradients tie exactly; a Gramian computed in pieces is symmetric only up to rounding (G_01 != G_10 in the
    last bits), which must not decide the tie (multidigits, issue 15: lossport's Gramian picked `left` or
    `right` by rounding)."""
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [30.0, 20.0]], dtype=torch.float64)
    G = J @ J.T
    G[1, 0] += 1e-9  # part 1's distance to part 0 now rounds smaller: unsymmetrised, part 1 would win
    assert krum(G, f=0).tolist() == [1.0, 0.0, 0.0]


def test_krum_balancer_weights_are_T_times_the_selection_on_the_shared_gramian():
    net = Net()
    x = batch(1)
    J, params, _ = jacobian_and_parts(net, x)
    G = gramian_reference([lossport.Objective(SPEC)(net, x).parts[k] for k in NAMES], params).to(torch.float64)
    for f, m in [(0, 1), (1, 2), (2, 1)]:
        losses = lossport.Objective(SPEC, balance=Krum(f=f, m=m))(net, x)
        got = torch.tensor([losses.weights[k] for k in NAMES], dtype=torch.float64)
        assert torch.equal(got, 5 * krum(G, f, m))
        # the shared parameters receive T/m times the sum of the selected gradients
        assert torch.allclose(grad_on(losses, params), got.to(J.dtype) @ J, rtol=1e-5, atol=1e-6)


def test_krum_errors_name_the_parts_and_the_fix():
    net = Net()
    with pytest.raises(ValueError, match=r"needs at least 7 parts present.*lower f"):
        lossport.Objective(SPEC, balance=Krum(f=4))(net, batch())
    with pytest.raises(ValueError, match="f must be an integer"):
        Krum(f=-1)
    with pytest.raises(ValueError, match="m must be an integer"):
        Krum(m=0)
    with pytest.raises(ValueError, match="distance"):
        Krum(distance="manhattan")
    b = batch()
    b["e"] = torch.full((32, 1), float("nan"))  # e missing: 4 parts left, f=2 needs 5
    with pytest.raises(ValueError, match=r"missing: \['e'\]"):
        lossport.Objective(SPEC, balance=Krum(f=2))(net, b)


def test_krum_every_k_features_mode_and_state_round_trip():
    net = Net()
    bal = resolve("krum", f=1, m=2, gramian="features", features="h", every=2)
    obj = lossport.Objective(SPEC, balance=bal)
    ws = [obj(net, batch(s)).weights for s in range(3)]
    assert ws[0] == ws[1] and sorted(ws[2].values()) == [0.0, 0.0, 0.0, 2.5, 2.5]
    losses = lossport.Objective(SPEC)(net, batch(2))
    z = losses.outputs["h"]
    Jz = torch.stack([torch.autograd.grad(losses.parts[k], z, retain_graph=True)[0].reshape(-1) for k in NAMES])
    expected = 5 * krum((Jz @ Jz.T).double(), 1, 2)
    assert torch.equal(torch.tensor([ws[2][k] for k in NAMES], dtype=torch.float64), expected)
    twin = resolve("krum", f=1, m=2, gramian="features", features="h", every=2)
    twin.load_state_dict(bal.state_dict())
    obj2 = lossport.Objective(SPEC, balance=twin)
    for s in range(3, 6):
        assert obj(net, batch(s)).weights == obj2(net, batch(s)).weights


# ------------------------------------------------------------------------------------------------ TrimmedMean
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("T,k", [(3, 1), (5, 1), (5, 2), (6, 0), (8, 3)])
def test_trimmed_mean_equals_torchjd(seed, T, k):
    for kind, J in matrices(T, seed=seed).items():
        assert torch.allclose(trimmed_mean(J, k), TJTrimmedMean(k)(J), atol=1e-5, rtol=1e-5), kind


@pytest.mark.parametrize(
    "T,k", [(3, 1), (4, 1), (7, 3), (8, 1), (9, 2), (32, 1), (32, 15), (33, 16), (64, 31), (128, 63)]
)
def test_trimmed_mean_averages_the_values_a_sort_keeps(T, k):
    """The selection network keeps, in every column, exactly the values between the k smallest and the k largest
    (ties, repeated rows and infinities included); the sort path (T = 64, k = 31) too; both agree with TorchJD."""
    g = torch.Generator().manual_seed(T + k)
    J = torch.randn(T, 300, generator=g).round(decimals=1)  # many ties
    J[1] = J[0]
    J[2, :5], J[-1, 5:10] = float("inf"), float("-inf")
    kept = J
    if robust._network_pays(T, k):
        for _ in range(k):
            kept = robust._drop_extremes(kept)
        assert torch.equal(torch.sort(kept, dim=0).values, torch.sort(J, dim=0).values[k : T - k])
    else:
        assert T == 128
    finite = J[:, 10:]
    assert torch.allclose(trimmed_mean(finite, k), TJTrimmedMean(k)(finite), atol=1e-6, rtol=1e-6)


def test_trimmed_mean_orders_nan_as_the_sort_does():
    nan = float("nan")
    J = torch.tensor([[1.0, 2.0], [nan, 3.0], [4.0, nan], [0.0, nan], [2.0, 1.0]])
    expected = torch.tensor([7 / 3, nan])  # NaN sorts last: trimmed in column 0, one of two kept in column 1
    assert torch.allclose(trimmed_mean(J, 1), expected, equal_nan=True)
    assert torch.allclose(TJTrimmedMean(1)(J), expected, equal_nan=True)


def test_trimmed_mean_gives_the_trunk_T_times_torchjds_aggregation_and_heads_their_plain_gradient():
    net = Net()
    for s, trim in [(0, 1), (1, 2), (2, 0)]:
        x = batch(s)
        J, params, parts = jacobian_and_parts(net, x)
        losses = lossport.Objective(SPEC, balance=TrimmedMean(trim_number=trim))(net, x)
        assert losses.weights == dict.fromkeys(NAMES, 1.0)
        assert losses.extra["trimmed_mean/shared"].item() == 0.0
        expected = 5 * TJTrimmedMean(trim)(J)
        assert torch.allclose(grad_on(losses, params), expected, rtol=1e-5, atol=1e-6)
        heads = list(net.heads.parameters())
        plain = torch.cat([g.reshape(-1) for g in torch.autograd.grad(sum(parts.values()), heads)])
        assert torch.allclose(grad_on(losses, heads), plain, rtol=1e-5, atol=1e-7)


def test_trimmed_mean_trims_the_static_weighted_gradients():
    net = Net()
    x = batch(3)
    weights = {"a": 2.0, "b": 0.5, "c": 1.0, "d": 3.0, "e": 0.1}
    spec = lossport.Objective(SPEC, weights=weights)
    J, params, _ = jacobian_and_parts(net, x)
    s = torch.tensor([weights[k] for k in NAMES])
    losses = lossport.Objective(SPEC, weights=weights, balance="trimmed_mean")(net, x)
    assert torch.allclose(grad_on(losses, params), 5 * TJTrimmedMean(1)(J * s[:, None]), rtol=1e-5, atol=1e-6)
    assert spec(net, x).weights == losses.weights


def test_trimmed_mean_features_mode_every_k_and_errors():
    net = Net()
    x = batch(4)
    bal = TrimmedMean(trim_number=2, gramian="features", features="h", every=2)
    obj = lossport.Objective(SPEC, balance=bal)
    losses = obj(net, x)
    z = losses.outputs["h"]
    Jz = torch.stack([torch.autograd.grad(losses.parts[k], z, retain_graph=True)[0].reshape(-1) for k in NAMES])
    gz = torch.autograd.grad(losses.total, z, retain_graph=True)[0].reshape(-1)
    assert torch.allclose(gz, 5 * TJTrimmedMean(2)(Jz), rtol=1e-5, atol=1e-6)
    between = obj(net, x)
    assert "trimmed_mean/shared" not in between.extra  # the call between two trimmed ones is the plain sum
    with pytest.raises(ValueError, match=r"needs at least 7 parts present.*lower trim_number"):
        lossport.Objective(SPEC, balance=TrimmedMean(trim_number=3))(net, x)
    with pytest.raises(ValueError, match="trim_number must be an integer"):
        TrimmedMean(trim_number=1.5)


@pytest.mark.parametrize("name,kw", [("krum", {"f": 1}), ("trimmed_mean", {"trim_number": 1})])
def test_train_three_steps_with_finite_weights(name, kw):
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    r = lossport.train(
        net,
        batch(7, n=48),
        SPEC,
        balance=resolve(name, **kw),
        epochs=1,
        batch_size=16,
        shuffle=False,
        progress=False,
        seed=0,
    )
    h = r.history
    assert len(h.batch_values("loss")) == 3 and all(math.isfinite(v) for v in h.batch_values("loss"))
    w = [h[f"weight/{k}"][-1] for k in NAMES]
    assert all(math.isfinite(v) and v >= 0 for v in w)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), before))


# ------------------------------------------------------------------------------------------------ ExcessMTL
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("warmup,eta", [(0, 1.0), (2, 1.0), (0, 0.3)])
def test_excess_mtl_equals_torchjd_over_four_steps(seed, warmup, eta):
    T = 3 + seed
    names = NAMES[:T] if T <= 5 else NAMES
    T = len(names)
    for kind, J in matrices(T, seed=seed).items():
        mine, ref = ExcessMTL(robust_step_size=eta, n_warmup_steps=warmup), ExcessMTLWeighting(eta, warmup)
        g = torch.Generator().manual_seed(seed)
        for step in range(4):
            Js = J * (1 + 0.5 * step) + 0.2 * torch.randn(J.shape, generator=g, dtype=torch.float64)
            w, r = mine.weigh_jacobian(Js, names), ref(Js)
            assert torch.allclose(w, r, rtol=1e-6, atol=1e-9), (kind, step)
        assert not torch.allclose(w, torch.full_like(w, 1 / T))  # the weights moved


def test_excess_mtl_balancer_uses_the_shared_jacobian_and_keeps_its_state():
    net = Net()
    bal = ExcessMTL(robust_step_size=0.5)
    obj = lossport.Objective(SPEC, balance=bal)
    ref = ExcessMTLWeighting(0.5)
    for s in range(3):
        x = batch(s)
        J, _, _ = jacobian_and_parts(net, x)
        expected = 5 * ref(J.double())
        got = obj(net, x).weights
        assert torch.allclose(torch.tensor([got[k] for k in NAMES], dtype=torch.float64), expected, rtol=1e-4)
    twin = ExcessMTL(robust_step_size=0.5)
    twin.load_state_dict(bal.state_dict())
    obj2 = lossport.Objective(SPEC, balance=twin)
    for s in range(3, 5):
        assert obj(net, batch(s)).weights == obj2(net, batch(s)).weights
    b = batch(9)
    b["c"] = torch.full((32, 1), float("nan"))
    before = bal.state_dict()["logw"]["c"]
    w = obj(net, b).weights
    assert set(w) == set(NAMES) - {"c"} and bal.state_dict()["logw"]["c"] == before
    with pytest.raises(ValueError, match="gramian='params'"):
        ExcessMTL(gramian="features", features="h")
    with pytest.raises(ValueError, match="robust_step_size"):
        ExcessMTL(robust_step_size=0.0)


def test_excess_mtl_every_k_moves_its_state_on_computed_calls_only():
    net = Net()
    bal = ExcessMTL(every=2)
    obj = lossport.Objective(SPEC, balance=bal)
    ws = [obj(net, batch(s)).weights for s in range(3)]
    assert ws[0] == ws[1] != ws[2]
    assert bal.state_dict()["steps"] == dict.fromkeys(NAMES, 2) and bal._jac is None


def test_excess_mtl_trains_three_steps():
    net = Net()
    r = lossport.train(
        net, batch(7, n=48), SPEC, balance="excess_mtl", epochs=1, batch_size=16, shuffle=False, progress=False
    )
    assert len(r.history.batch_values("loss")) == 3
    assert all(math.isfinite(r.history[f"weight/{k}"][-1]) for k in NAMES)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_excess_mtl_accumulators_take_the_dtype_asked_by_to_and_move_with_it():
    net = Net()  # float32 parts
    bal = ExcessMTL().to(torch.float64)  # asked before the first call: the accumulators are created float64
    obj = lossport.Objective(SPEC, balance=bal)
    obj(net, batch(0))
    sq = bal.state_dict()["sq"]
    assert set(sq) == set(NAMES) and all(v.dtype == torch.float64 for v in sq.values())
    plain = ExcessMTL()
    lossport.Objective(SPEC, balance=plain)(net, batch(0))
    assert all(v.dtype == torch.float32 for v in plain.state_dict()["sq"].values())  # else the gradients' dtype
    plain.to(torch.float64)
    assert all(v.dtype == torch.float64 for v in plain._sq.values())  # declared state: to() casts it


def test_excess_mtl_failed_call_leaves_its_state_as_it_was(monkeypatch):
    """A call that fails after the state was updated (here: an error raised after weigh_jacobian) restores the
    accumulators, step counts and log-weights (the snapshot shares the accumulator tensors, which are replaced at
    each step, never changed in place); the next call then equals a twin's that never saw the failed one."""
    net = Net()
    bal, twin = ExcessMTL(), ExcessMTL()
    obj, obj2 = lossport.Objective(SPEC, balance=bal), lossport.Objective(SPEC, balance=twin)
    for s in range(2):
        assert obj(net, batch(s)).weights == obj2(net, batch(s)).weights
    before = bal.state_dict()
    real = ExcessMTL.weigh_jacobian

    def failing(self, J, names):
        real(self, J, names)
        raise RuntimeError("boom")

    monkeypatch.setattr(ExcessMTL, "weigh_jacobian", failing)
    with pytest.raises(RuntimeError, match="boom"):
        obj(net, batch(5))
    monkeypatch.setattr(ExcessMTL, "weigh_jacobian", real)
    after = bal.state_dict()
    assert after["steps"] == before["steps"] and after["logw"] == before["logw"]
    assert all(torch.equal(after["sq"][k], before["sq"][k]) for k in NAMES)
    assert obj(net, batch(6)).weights == obj2(net, batch(6)).weights


def test_excess_mtl_gramian_falls_back_to_float64_products_where_float32_ones_overflow(monkeypatch):
    """The Gramian (finite check, diagnostics) comes from float32 products; where they overflow (a gradient
    above 1.8e19 in norm) it is recomputed in float64, so finite gradients are never reported as non-finite."""
    bal = ExcessMTL()
    for J in (torch.tensor([[3e19, 0.0, 1.0], [1.0, 2.0, 3.0]]), torch.randn(2, 5000)):
        monkeypatch.setattr(bal, "compute_jacobian", lambda losses, J=J: (J, []))
        G = bal.compute_gramian(None)  # type: ignore[arg-type]
        assert G.dtype == torch.float64 and bool(torch.isfinite(G).all())
        assert torch.allclose(G, J.double() @ J.double().T, rtol=1e-5)
    bal._jac = None
