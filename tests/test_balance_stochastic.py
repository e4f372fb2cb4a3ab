"""CR-MOGM (lossport.balance.stochastic), checked against TorchJD 0.18's CRMOGMWeighting."""

import math

import pytest
import torch
from multihead import MultiHead, multihead_batch, unit_losses
from torchjd.aggregation import CRMOGMWeighting, IMTLGWeighting, MoDoWeighting, SDMGradWeighting, UPGradWeighting

import lossport
from lossport.balance import CRMOGM, Context, MoCo, MoDo, SDMGrad, UPGrad, resolve
from lossport.graph import shared_parameters

NAMES = ["a", "b", "c"]
SPEC = dict.fromkeys(NAMES, "mse")


def Net() -> MultiHead:
    return MultiHead(NAMES)


def batch(seed: int = 0, n: int = 32) -> dict[str, torch.Tensor]:
    return multihead_batch(NAMES, seed, n)


def jacobians(T, seed):
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(T, 30, generator=g, dtype=torch.float64)
    low = torch.randn(T, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 30, generator=g, dtype=torch.float64)
    U, _, V = torch.linalg.svd(torch.randn(T, 30, generator=g, dtype=torch.float64), full_matrices=False)
    ill = U @ torch.diag(torch.logspace(0, -6, T, dtype=torch.float64)) @ V
    return {"random": rand, "rank_deficient": low, "ill_conditioned": ill}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("base,tj", [("upgrad", UPGradWeighting), ("imtl_g", IMTLGWeighting)])
def test_equals_torchjd_times_T_over_three_steps(seed, base, tj):
    T = 3 + seed % 3
    names = list("abcde"[:T])
    for kind, J in jacobians(T, seed).items():
        mine, ref = CRMOGM(base=base, alpha=0.7), CRMOGMWeighting(tj(), alpha=0.7)
        g = torch.Generator().manual_seed(seed)
        for step in range(3):
            Js = J + 0.3 * step * torch.randn(J.shape, generator=g, dtype=torch.float64)
            G = Js @ Js.T
            assert torch.allclose(mine.weigh(G, unit_losses(names)), T * ref(G), rtol=1e-5, atol=1e-6), (kind, step)


def test_moving_average_by_hand_and_missing_part_keeps_its_average():
    bal = CRMOGM(base="imtl_g", alpha=0.5)
    base = resolve("imtl_g")
    Gs = [torch.diag(torch.tensor(d, dtype=torch.float64)) for d in ([1.0, 4.0, 9.0], [4.0, 1.0, 1.0])]
    hat = [base.weigh(G, unit_losses(NAMES)) for G in Gs]
    assert torch.allclose(bal.weigh(Gs[0], unit_losses(NAMES)), hat[0])  # lambda_0 = the first weights
    assert torch.allclose(bal.weigh(Gs[1], unit_losses(NAMES)), 0.5 * hat[0] + 0.5 * hat[1])
    G2 = torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64))
    h2 = base.weigh(G2, unit_losses(["a", "c"]))
    w = bal.weigh(G2, unit_losses(["a", "c"]))
    avg = 0.5 * hat[0] + 0.5 * hat[1]
    assert torch.allclose(w, 0.5 * avg[[0, 2]] + 0.5 * h2)
    assert bal.state_dict()["lambda"]["b"] == pytest.approx(float(avg[1]))  # b absent: its average is kept


def test_alpha_zero_is_the_base_and_alpha_one_freezes():
    net = Net()
    plain = lossport.Objective(SPEC, balance="upgrad")
    zero = lossport.Objective(SPEC, balance=CRMOGM(base="upgrad", alpha=0.0))
    frozen = lossport.Objective(SPEC, balance=CRMOGM(base=UPGrad(), alpha=1.0))
    first = frozen(net, batch(0)).weights
    for s in range(3):
        assert zero(net, batch(s)).weights == pytest.approx(plain(net, batch(s)).weights)
        assert frozen(net, batch(s)).weights == first


def test_state_round_trip_includes_the_base_state():
    net = Net()
    bal = resolve("cr_mogm", base="pcgrad", alpha=0.8, gramian="features", features="h")
    obj = lossport.Objective(SPEC, balance=bal)
    for s in range(3):
        obj(net, batch(s))
    twin = resolve("cr_mogm", base="pcgrad", alpha=0.8, gramian="features", features="h")
    twin.load_state_dict(bal.state_dict())
    obj2 = lossport.Objective(SPEC, balance=twin)
    for s in range(3, 7):  # PCGrad's random order continues where it was
        assert obj(net, batch(s)).weights == obj2(net, batch(s)).weights


def test_every_k_advances_the_average_on_computed_calls_only():
    net = Net()
    bal = CRMOGM(base="mgda", alpha=0.5, every=2)
    obj = lossport.Objective(SPEC, balance=bal)
    ws = [obj(net, batch(s)).weights for s in range(3)]
    assert ws[0] == ws[1] != ws[2]
    twin = CRMOGM(base="mgda", alpha=0.5)
    obj2 = lossport.Objective(SPEC, balance=twin)
    obj2(net, batch(0))
    assert obj2(net, batch(2)).weights == pytest.approx(ws[2])


def test_errors():
    with pytest.raises(TypeError, match="function of the Gramian"):
        CRMOGM(base="graddrop")
    with pytest.raises(TypeError, match="function of the Gramian"):
        CRMOGM(base="uw")
    with pytest.raises(TypeError, match="function of the Gramian"):
        CRMOGM(base="excess_mtl")
    with pytest.raises(ValueError, match="engine options"):
        CRMOGM(base=UPGrad(every=3))
    with pytest.raises(ValueError, match="alpha"):
        CRMOGM(alpha=1.5)
    bal = CRMOGM()
    with pytest.raises(ValueError, match="alpha"):
        bal.alpha = -0.1


def test_train_three_steps_with_finite_weights():
    net = Net()
    r = lossport.train(
        net, batch(7, n=48), SPEC, balance="cr_mogm", epochs=1, batch_size=16, shuffle=False, progress=False, seed=0
    )
    assert len(r.history.batch_values("loss")) == 3
    assert all(math.isfinite(r.history[f"weight/{k}"][-1]) for k in NAMES)
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------------------------------------------ SDMGrad, MoDo
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "mine,ref",
    [
        (lambda: SDMGrad(), lambda: SDMGradWeighting()),
        (lambda: SDMGrad(lambda_=0.0, lr=1.0, n_iter=5), lambda: SDMGradWeighting(lr=1.0, n_iter=5, lambda_=0.0)),
        (lambda: MoDo(), lambda: MoDoWeighting()),
        (lambda: MoDo(gamma=0.5, rho=0.0), lambda: MoDoWeighting(gamma=0.5, rho=0.0)),
    ],
)
def test_carried_simplex_methods_equal_torchjd_times_T_over_three_steps(seed, mine, ref):
    T = 3 + seed % 3
    names = list("abcde"[:T])
    for kind, J in jacobians(T, seed).items():
        J = J / J.norm() * 0.7  # gradients of norm ~1: MoDo's unnormalised steps stay inside the simplex
        a, b = mine(), ref()
        g = torch.Generator().manual_seed(seed)
        interior = False
        for step in range(3):
            Js = J + 0.1 * step * torch.randn(J.shape, generator=g, dtype=torch.float64)
            G = Js @ Js.T
            w, r = a.weigh(G, unit_losses(names)), T * b(G)
            assert torch.allclose(w, r, rtol=1e-6, atol=1e-9), (kind, step)
            assert w.sum().item() == pytest.approx(T)
            interior |= bool(((w > 1e-6) & (w < T - 1e-6)).sum() >= 2)
        assert interior, kind  # the weights are not just a vertex of the simplex


def ctx_of(obj, net, s):
    """A Context with two extra batches (other seeds) for the step on batch(s)."""
    return Context(extra=(lambda: obj.evaluate(net, batch(100 + s)), lambda: obj.evaluate(net, batch(200 + s))))


def test_sdmgrad_with_lambda_large_tends_to_the_mean_and_state_round_trip():
    net = Net()
    obj0 = lossport.Objective(SPEC, balance=SDMGrad(lambda_=1e6))
    w = obj0(net, batch(), context=ctx_of(obj0, net, 0)).weights
    assert w == pytest.approx(dict.fromkeys(NAMES, 1.0), rel=1e-4)
    for name in ("sdmgrad", "modo"):
        bal = resolve(name, every=2)
        obj = lossport.Objective(SPEC, balance=bal)
        ws = [obj(net, batch(s), context=ctx_of(obj, net, s)).weights for s in range(3)]
        assert ws[0] == ws[1]
        twin = resolve(name, every=2)
        twin.load_state_dict(bal.state_dict())
        obj2 = lossport.Objective(SPEC, balance=twin)
        for s in range(3, 7):
            assert (
                obj(net, batch(s), context=ctx_of(obj, net, s)).weights
                == obj2(net, batch(s), context=ctx_of(obj2, net, s)).weights
            )


def test_carried_weights_of_a_missing_part_are_kept():
    bal = MoDo(gamma=0.05)
    G = torch.tensor([[1.0, 0.2, 0.1], [0.2, 2.0, 0.3], [0.1, 0.3, 0.5]], dtype=torch.float64)
    bal.weigh(G, unit_losses(NAMES))
    before = dict(bal.state_dict()["w"])
    bal.weigh(G[[0, 2]][:, [0, 2]], unit_losses(["a", "c"]))
    after = bal.state_dict()["w"]
    assert after["b"] == before["b"]
    assert after["a"] + after["c"] == pytest.approx(before["a"] + before["c"])
    with pytest.raises(ValueError, match="lambda_"):
        SDMGrad(lambda_=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        MoDo(gamma=0.0)


@pytest.mark.parametrize("name", ["sdmgrad", "modo"])
def test_sdmgrad_and_modo_train_three_steps(name):
    net = Net()
    r = lossport.train(
        net, batch(7, n=48), SPEC, balance=name, epochs=1, batch_size=16, shuffle=False, progress=False, seed=0
    )
    assert len(r.history.batch_values("loss")) == 3
    assert all(math.isfinite(r.history[f"weight/{k}"][-1]) for k in NAMES)
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------------------------------------------ MoCo
def flat_grad(y, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(y, params, retain_graph=True)])


def test_moco_follows_libmtls_update_over_three_steps():
    net = Net()
    beta, beta_sigma, gamma, gamma_sigma, rho = 0.5, 0.5, 0.8, 0.5, 0.1
    bal = MoCo(beta=beta, beta_sigma=beta_sigma, gamma=gamma, gamma_sigma=gamma_sigma, rho=rho)
    obj = lossport.Objective(SPEC, weights={"a": 1.0, "b": 2.0, "c": 0.5}, balance=bal)
    s = torch.tensor([1.0, 2.0, 0.5])
    heads = list(net.heads.parameters())
    Y, lam = None, torch.full((3,), 1 / 3, dtype=torch.float64)
    for k in range(1, 4):
        losses = obj(net, batch(k))
        params = shared_parameters([losses.parts[n] for n in NAMES])
        J = torch.stack([flat_grad(losses.parts[n], params) for n in NAMES])
        vals = torch.tensor([losses.parts[n].item() for n in NAMES])
        target = J / (J.norm(dim=1, keepdim=True) + 1e-8) * (vals * s)[:, None]
        Y = torch.zeros_like(J) if Y is None else Y
        Y = Y - beta / k**beta_sigma * (Y - target)
        M = Y.double() @ Y.double().T + rho * torch.eye(3, dtype=torch.float64)
        lam = torch.softmax(lam - gamma / k**gamma_sigma * (M @ lam), dim=0)
        assert torch.allclose(flat_grad(losses.total, params), 3 * (lam.float() @ Y), rtol=1e-4, atol=1e-6)
        plain = flat_grad(sum(s[i] * losses.parts[n] for i, n in enumerate(NAMES)), heads)
        assert torch.allclose(flat_grad(losses.total, heads), plain, rtol=1e-5, atol=1e-7)
        assert [bal.state_dict()["lambda"][n] for n in NAMES] == pytest.approx(lam.tolist(), rel=1e-6)
    assert not torch.allclose(lam, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_moco_state_round_trip_every_k_and_errors():
    net = Net()
    bal = resolve("moco", every=2)
    obj = lossport.Objective(SPEC, balance=bal)
    first = obj(net, batch(0))
    assert "moco/shared" in first.extra
    assert "moco/shared" not in obj(net, batch(1)).extra  # the call between is the plain sum
    obj(net, batch(2))
    assert bal.state_dict()["k"] == 2 and len(bal.state_dict()["y"]["a"]) == sum(
        p.numel() for p in net.trunk.parameters()
    )
    twin = resolve("moco", every=2)
    twin.load_state_dict(bal.state_dict())
    obj2 = lossport.Objective(SPEC, balance=twin)
    for s in range(3, 7):
        l1, l2 = obj(net, batch(s)), obj2(net, batch(s))
        assert l1.weights == l2.weights
        if "moco/shared" in l1.extra:
            params = list(net.trunk.parameters())
            assert torch.allclose(flat_grad(l1.total, params), flat_grad(l2.total, params))
    with pytest.raises(ValueError, match="gramian='params'"):
        MoCo(gramian="features", features="h")
    with pytest.raises(ValueError, match="beta"):
        MoCo(beta=0.0)


def test_moco_trains_three_steps():
    net = Net()
    r = lossport.train(
        net, batch(7, n=48), SPEC, balance="moco", epochs=1, batch_size=16, shuffle=False, progress=False, seed=0
    )
    assert len(r.history.batch_values("loss")) == 3
    assert all(math.isfinite(r.history[f"weight/{k}"][-1]) for k in NAMES)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_crmogm_to_moves_the_base_and_a_state_with_another_base_is_refused_before_loading():
    net = Net()
    bal = resolve("cr_mogm", base="mgda")
    obj = lossport.Objective(SPEC, balance=bal)
    obj(net, batch(0))
    assert bal.to(torch.float64) is bal and bal.base._dtype == torch.float64
    bal.follow(lossport.Losses(parts={k: torch.zeros((), device="meta") for k in NAMES}, weights={}))
    assert bal.base._device == torch.device("meta")
    bal.to("cpu")
    other = resolve("cr_mogm", base="pcgrad")
    lossport.Objective(SPEC, balance=other)(net, batch(1))
    before = dict(bal.state_dict()["lambda"])
    with pytest.raises(ValueError, match="state is PCGrad's; the run uses MGDA"):
        bal.load_state_dict(other.state_dict())
    assert bal.state_dict()["lambda"] == before  # nothing was loaded


def test_moco_tracks_take_the_dtype_asked_by_to():
    net = Net()  # float32 parts
    bal = MoCo().to(torch.float64)
    lossport.Objective(SPEC, balance=bal)(net, batch(0))
    assert all(v.dtype == torch.float64 for v in bal.state_dict()["y"].values())
    plain = MoCo()
    lossport.Objective(SPEC, balance=plain)(net, batch(0))
    assert all(v.dtype == torch.float32 for v in plain.state_dict()["y"].values())
    plain.to(torch.float64)
    assert all(v.dtype == torch.float64 for v in plain._y.values())


# ------------------------------------------------------------------------------------------------ three batches
@pytest.mark.parametrize(("mine", "ref"), [(SDMGrad, SDMGradWeighting), (MoDo, MoDoWeighting)])
def test_three_batch_mode_weighs_the_cross_matrix_of_the_two_extra_batches(mine, ref):
    net = Net()
    obj = lossport.Objective(SPEC)
    params = shared_parameters([obj(net, batch(0)).parts[k] for k in NAMES])

    def jac(b):
        parts = obj(net, b).parts
        return torch.stack([flat_grad(parts[k], params) for k in NAMES]).double()

    cross = jac(batch(11)) @ jac(batch(12)).T
    assert not torch.allclose(cross, cross.T)  # not a Gramian: two batches
    a, r = mine(), ref()
    for main in (0, 1, 2):  # the main batch does not enter the weights, only the update
        ctx = Context(extra=(lambda: obj(net, batch(11)), lambda: obj(net, batch(12))))
        w = a(obj(net, batch(main)), ctx).weights
        expected = 3 * r(cross)
        assert torch.allclose(torch.tensor([w[k] for k in NAMES], dtype=torch.float64), expected, rtol=1e-5)
    one = mine(batches=1)(obj(net, batch(0))).weights  # one batch's Gramian: other weights
    assert one != a(obj(net, batch(0)), ctx).weights


def test_three_batch_mode_errors():
    with pytest.raises(ValueError, match=r"batches must be 3 .* or 1"):
        SDMGrad(batches=2)
    with pytest.raises(ValueError, match="MoDo: the cross matrix J_1 J_2\\^T of two batches exists on the shared"):
        MoDo(gramian="features", features="h")
    assert MoDo(gramian="features", features="h", batches=1).batches == 1
    with pytest.raises(ValueError, match="SDMGrad uses 3 independent training batches per step and got 1 extra"):
        SDMGrad()(unit_losses(NAMES), Context(extra=(lambda: unit_losses(NAMES),)))


def test_cross_matrix_layer_by_layer_equals_the_explicit_jacobians_with_parts_missing_from_a_batch():
    from dataclasses import replace

    from lossport.balance.stochastic import cross, cross_rows, jacobian_rows

    net = Net()
    obj = lossport.Objective(SPEC)
    params = shared_parameters([obj(net, batch(0)).parts[k] for k in NAMES])
    one, two = obj(net, batch(11)), obj(net, batch(12))
    one = replace(one, parts={k: v for k, v in one.parts.items() if k != "b"})  # b absent from the first batch
    two = replace(two, parts={k: v for k, v in two.parts.items() if k != "c"})  # c absent from the second
    M = cross_rows(one, two, NAMES, params)
    R = cross(jacobian_rows(one, NAMES, params), jacobian_rows(two, NAMES, params))
    assert M[1].abs().max() == 0 and M[:, 2].abs().max() == 0
    assert M.abs().min() == 0 and M[0, 0] != 0
    assert torch.allclose(M, R, rtol=1e-6, atol=1e-7 * float(R.abs().max()))
