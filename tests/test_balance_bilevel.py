"""LDC-MTL (lossport.balance.bilevel): the authors' penalised objective, stepped by hand over three steps."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lossport
from lossport.balance import FORUM, LDCMTL, MOML, AutoLambda, Context, resolve
from lossport.balance.bilevel import discrepancy_objective

NAMES = ["a", "b", "c"]
SPEC = dict.fromkeys(NAMES, "mse")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleDict({k: nn.Linear(8, 1) for k in NAMES})

    def forward(self, x):
        h = self.trunk(x)
        return {k: m(h) for k, m in self.heads.items()}


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return {"x": x, "a": x[:, :1], "b": 20 * x[:, 1:2] + 3, "c": 0.1 * torch.randn(n, 1, generator=g)}


def reference_run(normalization, lamb, steps=3, lr_net=0.05, lr_router=0.1):
    """The authors' loop (one backward of F, the net and the router stepped on it), with the net's gradient
    times T (lossport's factor) and the router's own Adam."""
    net = Net()
    r = torch.zeros(3, requires_grad=True)
    opt_net = torch.optim.SGD(net.parameters(), lr=lr_net)
    opt_r = torch.optim.Adam([r], lr=lr_router)
    init = None
    for s in range(steps):
        x = batch(s)
        out = net(x["x"])
        L = torch.stack([((out[k] - x[k]) ** 2).mean() for k in NAMES])
        if init is None:
            init = L.detach().clone()
        if normalization == "initial":
            lt = L / (init / init.min())
        elif normalization == "log":
            lt = torch.log(L / init)
        else:
            lt = L
        F = discrepancy_objective(torch.softmax(r, 0), lt, lamb)
        opt_net.zero_grad()
        opt_r.zero_grad()
        (3 * F).backward()  # the net's gradient times T ...
        r.grad /= 3  # ... the router's as the authors'
        opt_net.step()
        opt_r.step()
    return net, r.detach()


@pytest.mark.parametrize("normalization", ["initial", "log", "none"])
def test_three_steps_match_the_authors_update(normalization):
    ref_net, ref_r = reference_run(normalization, lamb=0.5)
    net = Net()
    bal = LDCMTL(lamb=0.5, normalization=normalization, lr=0.1)
    obj = lossport.Objective(SPEC, balance=bal)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for s in range(3):
        losses = obj(net, batch(s))
        assert losses.extra["ldc_mtl/router"].item() == 0.0
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        obj.step(net, batch(s))
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    got_r = torch.tensor([bal.values[k] for k in NAMES])
    assert torch.allclose(got_r, ref_r, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got_r, torch.zeros(3))  # the router moved


def test_weights_by_hand():
    """sigma uniform, Lt = L (normalization none): c_i = sigma_i (1 + lamb (s_i - s_{i-1})) with s_j the sign of
    the j-th consecutive difference; b = T c."""
    bal = LDCMTL(lamb=0.2, normalization="none")
    vals = {"a": 3.0, "b": 1.0, "c": 2.0}
    losses = lossport.Losses(
        parts={k: torch.tensor(v, requires_grad=True) for k, v in vals.items()}, weights=dict.fromkeys(vals, 1.0)
    )
    w = bal(losses).weights
    # wl = (1, 1/3, 2/3): s_1 = sign(1 - 1/3) = +1, s_2 = sign(1/3 - 2/3) = -1
    third = 1 / 3
    expected = {
        "a": 3 * third * (1 + 0.2 * (1 - 0)),
        "b": 3 * third * (1 + 0.2 * (-1 - 1)),
        "c": 3 * third * (1 + 0.2 * (0 + 1)),
    }
    assert w == pytest.approx(expected)
    assert bal.info["ldc_mtl/discrepancy"] == pytest.approx((3 - 1) / 3 + (2 - 1) / 3)


def test_state_round_trip_keeps_router_adam_and_initial_losses():
    net = Net()
    bal = resolve("ldc_mtl", lamb=0.3, lr=0.05)
    obj = lossport.Objective(SPEC, balance=bal)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for s in range(3):
        losses = obj(net, batch(s))
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        obj.step(net, batch(s))
    twin = resolve("ldc_mtl", lamb=0.3, lr=0.05)
    twin.load_state_dict(bal.state_dict())
    obj2 = lossport.Objective(SPEC, balance=twin)
    for s in range(3, 6):
        l1, l2 = obj(net, batch(s)), obj2(net, batch(s))
        assert l1.weights == l2.weights
        l1.total.backward()
        l2.total.backward()
        obj.step(net, batch(s))
        obj2.step(net, batch(s))
        net.zero_grad()
        assert bal.values == twin.values


def test_missing_part_and_errors():
    net = Net()
    b = batch()
    b["b"] = torch.full((16, 1), float("nan"))
    bal = LDCMTL()
    w = lossport.Objective(SPEC, balance=bal)(net, b).weights
    assert set(w) == {"a", "c"}
    assert sum(bal.info[f"ldc_mtl/sigma/{k}"] for k in ("a", "c")) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"needs finite losses > 0.*'a'"):
        LDCMTL()(lossport.Losses(parts={"a": torch.tensor(0.0), "b": torch.tensor(1.0)}, weights={"a": 1.0, "b": 1.0}))
    with pytest.raises(ValueError, match="lamb"):
        LDCMTL(lamb=-1.0)
    with pytest.raises(ValueError, match="normalization"):
        LDCMTL(normalization="ema")


def test_train_three_steps_with_finite_weights():
    data = {k: torch.cat([batch(s)[k] for s in range(3)]) for k in ("x", *NAMES)}
    net = Net()
    r = lossport.train(
        net, data, SPEC, balance="ldc_mtl", epochs=1, batch_size=16, shuffle=False, progress=False, seed=0
    )
    assert len(r.history.batch_values("loss")) == 3
    assert all(math.isfinite(r.history[f"weight/{k}"][-1]) for k in NAMES)
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------------------------------------------ Auto-Lambda
def authors_auto_lambda(steps, lr_meta, init=0.1, primary=NAMES):
    """The authors' procedure (auto_lambda.py, trainer_dense.py), written out: a copy of the net takes the virtual
    SGD step (momentum buffer and weight decay included), the meta loss's gradient there gives the finite
    differences on the net (moved by +eps d, -2 eps d, +eps d), the weights take an Adam step, then the net steps
    on sum_i lambda_i L_i. Float64, with meta batch m_s and training batch b_s at step s."""
    net = Net().double()
    copy_ = copy.deepcopy(net)
    lam = torch.tensor([init] * 3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    meta_opt = torch.optim.Adam([lam], lr=lr_meta)

    def parts(model, data):
        out = model(data["x"])
        return [((out[k] - data[k]) ** 2).mean() for k in NAMES]

    history = []
    for s in range(steps):
        b, m = dbl(batch(s)), dbl(batch(100 + s))
        alpha = opt.param_groups[0]["lr"]
        grads = torch.autograd.grad(sum(w * l for w, l in zip(lam, parts(net, b))), list(net.parameters()))
        with torch.no_grad():
            for p, p_, g in zip(net.parameters(), copy_.parameters(), grads):
                mom = opt.state[p].get("momentum_buffer", 0.0) * 0.9
                p_.copy_(p - alpha * (mom + g + 1e-4 * p))
        val = sum(l for k, l in zip(NAMES, parts(copy_, m)) if k in primary)
        d = torch.autograd.grad(val, list(copy_.parameters()), allow_unused=True)
        d = [torch.zeros_like(p) if x is None else x for x, p in zip(d, copy_.parameters())]  # heads not in val
        eps = 0.01 / torch.cat([x.reshape(-1) for x in d]).norm()
        with torch.no_grad():
            for p, x in zip(net.parameters(), d):
                p += eps * x
        gp = torch.autograd.grad(sum(w * l for w, l in zip(lam, parts(net, b))), lam)[0]
        with torch.no_grad():
            for p, x in zip(net.parameters(), d):
                p -= 2 * eps * x
        gn = torch.autograd.grad(sum(w * l for w, l in zip(lam, parts(net, b))), lam)[0]
        with torch.no_grad():
            for p, x in zip(net.parameters(), d):
                p += eps * x
        meta_opt.zero_grad()
        lam.grad = -alpha * (gp - gn) / (2 * eps)
        meta_opt.step()
        opt.zero_grad()
        sum(w * l for w, l in zip(lam.detach(), parts(net, b))).backward()
        opt.step()
        history.append(lam.detach().clone())
    return net, history


def dbl(data):
    return {k: v.double() for k, v in data.items()}


def lossport_auto_lambda(steps, lr_meta, **kw):
    net = Net().double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    bal = AutoLambda(lr=lr_meta, **kw)
    obj = lossport.Objective(SPEC)
    history = []
    for s in range(steps):
        b, m = dbl(batch(s)), dbl(batch(100 + s))
        ctx = Context(meta=lambda m=m: obj(net, m), train=lambda b=b: obj(net, b), optimizer=opt)
        out = bal(obj(net, b), ctx)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        bal.step()
        history.append(torch.tensor([bal.values[k] for k in NAMES], dtype=torch.float64))
    return net, history, bal


@pytest.mark.parametrize("primary", [None, ["b"]])
def test_auto_lambda_follows_the_authors_update_over_four_steps(primary):
    ref_net, ref = authors_auto_lambda(4, 1e-2, primary=primary or NAMES)
    net, mine, bal = lossport_auto_lambda(4, 1e-2, primary=primary)
    for s, (a, b) in enumerate(zip(mine, ref)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), (s, a, b)
    assert not torch.allclose(ref[-1], torch.full((3,), 0.1, dtype=torch.float64))  # the weights moved
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-9)
    assert bal.info["auto_lambda/meta_loss"] > 0


def test_auto_lambda_hypergradient_is_the_look_ahead_derivative():
    """The finite difference approximates d L_meta(theta - alpha grad sum_i lambda_i L_i) / d lambda_i, which
    autograd gives exactly through the look-ahead (plain SGD, one parameter group)."""
    net = Net().double()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    obj = lossport.Objective(SPEC)
    b, m = dbl(batch(1)), dbl(batch(2))
    bal = AutoLambda(init=0.7)
    bal._ensure(obj(net, b))
    got = bal.hypergradient(obj(net, b), Context(meta=lambda: obj(net, m), train=lambda: obj(net, b), optimizer=opt))
    lam = torch.full((3,), 0.7, dtype=torch.float64, requires_grad=True)
    params = dict(net.named_parameters())
    losses = obj(net, b)
    inner = sum(lam[i] * losses.parts[k] for i, k in enumerate(NAMES))
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    ahead = {n: p - 0.05 * g for (n, p), g in zip(params.items(), grads)}
    out = torch.func.functional_call(net, ahead, (m["x"],))
    meta = sum(((out[k] - m[k]) ** 2).mean() for k in NAMES)
    exact = torch.autograd.grad(meta, lam)[0]
    assert torch.allclose(torch.tensor([got[k] for k in NAMES], dtype=torch.float64), exact, rtol=1e-4)


def called_on_a_net(bal):
    """``bal`` called on ``Net()``'s losses: first without a Context (the refusal naming what it needs), then with
    a meta batch, the main batch and an SGD optimizer; the net's parameters must be as they were. Returns the net,
    the objective, the optimizer and the balanced losses (with the graph of the main batch)."""
    net = Net()
    obj = lossport.Objective(SPEC)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    name = type(bal).__name__
    with pytest.raises(ValueError, match=rf"{name} is bilevel: each call needs Context\(meta=.*\['meta', 'train'"):
        bal(obj(net, batch()))
    out = bal(
        obj(net, batch()), Context(meta=lambda: obj(net, batch(5)), train=lambda: obj(net, batch()), optimizer=opt)
    )
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    return net, obj, opt, out


def test_auto_lambda_leaves_the_net_as_it_was_and_needs_its_context():
    net, obj, opt, out = called_on_a_net(AutoLambda())
    out.total.backward()  # the main batch's graph is intact
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="primary parts \\['z'\\] are not parts"):
        AutoLambda(primary=["z"])(
            obj(net, batch()), Context(meta=lambda: obj(net, batch(5)), train=lambda: obj(net, batch()), optimizer=opt)
        )
    with pytest.raises(ValueError, match="eps must be > 0"):
        AutoLambda(eps=0.0)
    assert resolve("autol").__class__ is AutoLambda and lossport.balance.kind_of("auto_lambda") == "learned"


def trained(make, epochs, **kw):
    """A fresh ``Net`` trained by ``lossport.train`` on ``batch(7, n=48)`` with the balancer ``make()`` (3 batches a
    round, SGD lr 0.05); returns the net and the result."""
    torch.manual_seed(0)
    net = Net()
    r = lossport.train(
        net, batch(7, n=48), SPEC, balance=make(), epochs=epochs, batch_size=16, progress=False, seed=0,
        optimizer="sgd", lr=0.05, **kw,
    )  # fmt: skip
    return net, r


def resumed_run(make, tmp_path):
    """``(net, result)`` of 3 uninterrupted rounds and of 2 rounds checkpointed then resumed to 3."""
    full = trained(make, 3)
    trained(make, 2, checkpoint=tmp_path)
    return full, trained(make, 3, checkpoint=tmp_path, resume=True)


def test_auto_lambda_trains_resumes_bit_identically_and_takes_meta_data(tmp_path):
    data = batch(7, n=48)
    (full, r_full), (resumed, r_res) = resumed_run(lambda: AutoLambda(lr=1e-2), tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    assert r_full.history["weight/a"] == r_res.history["weight/a"]
    assert len(set(r_full.history["weight/b"])) == 3  # the weights move round by round
    _, r_meta = trained(lambda: AutoLambda(lr=1e-2), 1, meta_data=batch(9, n=32))
    assert r_meta.history["weight/a"] != r_full.history["weight/a"][:1]
    with pytest.raises(ValueError, match="meta_data= is given but the run's balancer \\(LDCMTL\\) uses no meta batch"):
        lossport.train(Net(), data, SPEC, balance="ldc_mtl", epochs=1, progress=False, meta_data=data)


# ------------------------------------------------------------------------------------------------ MOML
def min_norm_scipy(rows):
    """The min-norm point of the rows' convex hull, by scipy's SLSQP (independent of lossport's solver)."""
    from scipy.optimize import minimize

    G = (rows @ rows.T).numpy()
    T = G.shape[0]
    res = minimize(
        lambda w: w @ G @ w,
        np.full(T, 1.0 / T),
        jac=lambda w: 2 * G @ w,
        bounds=[(0, 1)] * T,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    return torch.tensor(res.x, dtype=torch.float64)


def libmtl_moml(steps, inner_lr=0.1, lr=1e-2):
    """LibMTL's bacth_forward_MOML written out (inner batch i_s, outer batch o_s, main batch b_s), with the net
    stepped on T softmax(alpha) (lossport's factor T) and an independent min-norm solver."""
    net = Net().double()
    alpha = torch.full((3,), 1 / 3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    a_opt = torch.optim.Adam([alpha], lr=lr)

    def jac(model, data):
        out = model(data["x"])
        rows = []
        for k in NAMES:
            ps = list(model.parameters())
            g = torch.autograd.grad(((out[k] - data[k]) ** 2).mean(), ps, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(q) if x is None else x).reshape(-1) for x, q in zip(g, ps)]))
        return torch.stack(rows)

    history = []
    for s in range(steps):
        b, i, o = dbl(batch(s)), dbl(batch(300 + s)), dbl(batch(100 + s))
        meta_model = copy.deepcopy(net)
        g_f = jac(meta_model, i)
        p = torch.softmax(alpha.detach(), -1)
        with torch.no_grad():
            beg = 0
            for q in meta_model.parameters():
                q -= inner_lr * (p @ g_f[:, beg : beg + q.numel()]).view(q.shape)
                beg += q.numel()
        g_s = torch.autograd.functional.jacobian(lambda x: torch.softmax(x, -1), alpha.detach())
        H = -inner_lr * jac(meta_model, o) @ g_f.T @ g_s
        H = H / H.norm(dim=1, keepdim=True)
        c = min_norm_scipy(H)
        a_opt.zero_grad()
        alpha.grad = c @ H
        a_opt.step()
        out = net(b["x"])
        w = 3 * torch.softmax(alpha.detach(), -1)
        opt.zero_grad()
        sum(w[j] * ((out[k] - b[k]) ** 2).mean() for j, k in enumerate(NAMES)).backward()
        opt.step()
        history.append(3 * torch.softmax(alpha.detach(), -1))
    return net, history


def test_moml_follows_libmtls_update_over_four_steps():
    ref_net, ref = libmtl_moml(4)
    net = Net().double()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    bal = MOML(lr=1e-2)
    obj = lossport.Objective(SPEC)
    for s in range(4):
        b, i, o = dbl(batch(s)), dbl(batch(300 + s)), dbl(batch(100 + s))
        ctx = Context(
            extra=(lambda i=i: obj(net, i),), meta=lambda o=o: obj(net, o), train=lambda b=b: obj(net, b), optimizer=opt
        )
        out = bal(obj(net, b), ctx)
        got = torch.tensor([float(out.weights[k]) for k in NAMES], dtype=torch.float64)
        assert torch.allclose(got, ref[s], rtol=1e-6, atol=1e-9), (s, got, ref[s])
        opt.zero_grad()
        out.total.backward()
        opt.step()
    assert not torch.allclose(ref[-1], torch.ones(3, dtype=torch.float64))  # the weights moved
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-9)


def test_moml_trains_resumes_bit_identically_and_refuses_bad_options(tmp_path):
    (full, r_full), (resumed, _) = resumed_run(lambda: MOML(lr=1e-2), tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    assert sum(r_full.history[f"weight/{k}"][-1] for k in NAMES) == pytest.approx(3.0)
    assert len(set(r_full.history["weight/a"])) == 3
    with pytest.raises(ValueError, match="inner_lr must be > 0"):
        MOML(inner_lr=0.0)
    with pytest.raises(ValueError, match="normalization must be 'l2' or 'none'"):
        MOML(normalization="loss")
    with pytest.raises(ValueError, match="MOML uses 2 independent training batches per step and got 0 extra"):
        MOML()(lossport.Objective(SPEC)(Net(), batch()))


# ----------------------------------------------------------------------------------------------- FORUM
def forum_qp_scipy(AAT, pi, wc):
    """LibMTL's FORUM QP (min w^T AAT w - wc w_T, sum w[:T] = 1, w_T >= pi^T w[:T], w >= 0) by scipy's SLSQP."""
    from scipy.optimize import minimize

    G, T = AAT.numpy(), len(pi)
    lin = np.r_[np.zeros(T), wc]
    res = minimize(
        lambda w: w @ G @ w - lin @ w,
        np.r_[np.full(T, 1.0 / T), 1.0],
        jac=lambda w: 2 * G @ w - lin,
        bounds=[(0, None)] * (T + 1),
        constraints=[
            {"type": "eq", "fun": lambda w: w[:T].sum() - 1},
            {"type": "ineq", "fun": lambda w: w[T] - np.asarray(pi) @ w[:T]},
        ],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    return res.x


def libmtl_forum(steps, epochs, phi=0.1, inner_step=5, inner_lr=0.1, lr=1e-2):
    """LibMTL's bacth_forward_FORUM written out (inner batch b_s, outer batch o_s; ``epochs[s]``: the epoch of
    step s), with scipy's SLSQP for cvxpy."""
    net = Net().double()
    tw = torch.full((3,), 1 / 3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    tw_opt = torch.optim.Adam([tw], lr=lr)
    lam_buf = np.zeros(3)

    def parts(model, data):
        out = model(data["x"])
        return torch.stack([((out[k] - data[k]) ** 2).mean() for k in NAMES])

    def flat_grad(y, xs, **kw):
        g = torch.autograd.grad(y, xs, allow_unused=True, **kw)
        return torch.cat([(torch.zeros_like(q) if x is None else x).reshape(-1) for x, q in zip(g, xs)])

    history = []
    for s in range(steps):
        b, o = dbl(batch(s)), dbl(batch(100 + s))
        g_f = flat_grad(torch.softmax(tw, -1) @ parts(net, b), [tw, *net.parameters()])
        inner = copy.deepcopy(net)
        inner_opt = torch.optim.SGD(inner.parameters(), lr=inner_lr)
        for _ in range(inner_step):
            loss = torch.softmax(tw.detach(), -1) @ parts(inner, b)
            if loss.item() > 1e5:
                break
            inner_opt.zero_grad()
            loss.backward()
            inner_opt.step()
        g_q = g_f.clone()
        g_q[:3] -= torch.autograd.grad(torch.softmax(tw, -1) @ parts(inner, b), tw)[0]
        Lo = parts(net, o)
        gF = torch.stack([flat_grad(Lo[t], list(net.parameters()), retain_graph=True) for t in range(3)])
        gF = torch.cat([torch.zeros(3, 3, dtype=torch.float64), gF / gF.norm(dim=1, keepdim=True)], 1)
        sq = g_q.norm() ** 2 + 1e-8
        pi = [phi - float(g_q @ gF[t] / sq) for t in range(3)]
        A = torch.cat([gF, g_q[None]])
        w = forum_qp_scipy(A @ A.T, pi, phi * float(sq))
        lam_buf = lam_buf + (1 / (epochs[s] + 1) ** 0.75) * (w[:3] - lam_buf)
        nu = max(float(lam_buf @ np.asarray(pi)), 0.0)
        g_final = torch.tensor(lam_buf) @ gF + nu * g_q
        tw.grad = g_final[:3].clone()
        beg = 3
        for q in net.parameters():
            q.grad = g_final[beg : beg + q.numel()].view_as(q).clone()
            beg += q.numel()
        tw_opt.step()
        opt.step()
        history.append((lam_buf.copy(), torch.softmax(tw.detach(), -1)))
    return net, history


def lossport_forum(steps, end_rounds=(), **kw):
    net = Net().double()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    bal = FORUM(lr=1e-2, **kw)
    obj = lossport.Objective(SPEC)
    history = []
    for s in range(steps):
        b, o = dbl(batch(s)), dbl(batch(100 + s))
        ctx = Context(meta=lambda o=o: obj(net, o), train=lambda b=b: obj(net, b), optimizer=opt)
        out = bal(obj(net, b), ctx)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        bal.step()
        if s in end_rounds:
            bal.end_round({})
        alpha = bal.parameters()[0].detach().clone()
        history.append((np.array([bal.info[f"forum/lambda/{k}"] for k in NAMES]), torch.softmax(alpha, -1)))
    return net, history, bal


@pytest.mark.parametrize("inner_lr", [0.1, 0.5])
def test_forum_follows_libmtls_update_over_four_steps(inner_lr):
    ref_net, ref = libmtl_forum(4, epochs=[0, 0, 1, 1], inner_lr=inner_lr)
    net, got, bal = lossport_forum(4, end_rounds=(1,), inner_lr=inner_lr)
    for (lam_r, p_r), (lam, p) in zip(ref, got):
        assert np.allclose(lam, lam_r, rtol=1e-6, atol=1e-8), (lam, lam_r)
        assert torch.allclose(p, p_r, rtol=1e-6, atol=1e-9), (p, p_r)
    assert not np.allclose(ref[1][0], ref[2][0])  # lambda moved, by the EMA after the first round
    assert not torch.allclose(ref[-1][1], torch.full((3,), 1 / 3, dtype=torch.float64))  # alpha moved
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-9)
    assert bal.state_dict()["round"] == 1


def test_forum_leaves_the_net_as_it_was_and_refuses_bad_options():
    bal = FORUM()
    net, obj, opt, out = called_on_a_net(bal)
    assert float(out.extra["forum/meta"].detach()) == 0.0
    out.total.backward()
    assert all(p.grad is not None for p in net.parameters())
    for bad, msg in [
        ({"phi": -1.0}, "phi must be finite and >= 0"),
        ({"inner_step": 0}, "inner_step must be an integer >= 1"),
        ({"inner_lr": 0.0}, "inner_lr must be > 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            FORUM(**bad)
    assert resolve("forum").__class__ is FORUM and lossport.balance.kind_of("forum") == "learned"
    state = bal.state_dict()
    bad = lossport.Objective(SPEC)(net, {**batch(), "b": torch.full((16, 1), float("inf"))})
    with pytest.raises(FloatingPointError, match=r"FORUM: the gradients of the parts .* are not finite"):
        bal(bad, Context(meta=lambda: obj(net, batch(5)), train=lambda: bad, optimizer=opt))
    after = bal.state_dict()
    assert after["lambda"] == state["lambda"] and torch.equal(after["theta"], state["theta"])


def test_forum_trains_resumes_bit_identically(tmp_path):
    (full, r_full), (resumed, r_res) = resumed_run(lambda: FORUM(lr=1e-2), tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    assert r_full.history["weight/a"] == r_res.history["weight/a"]
    assert all(math.isfinite(v) for k in NAMES for v in r_full.history[f"weight/{k}"])


@pytest.mark.parametrize("inner_lr", [0.1, 40.0])  # 40: f passes 1e5 and the inner steps stop early
def test_forum_inner_steps_are_libmtls_sgd_with_its_early_stop(inner_lr):
    net = Net().double()
    b = dbl(batch(3))
    obj = lossport.Objective(SPEC)
    bal = FORUM(inner_lr=inner_lr)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    ctx = Context(meta=lambda: obj(net, b), train=lambda: obj(net, b), optimizer=opt)
    losses = obj(net, b)
    bal._ensure(losses)
    p = [1 / 3] * 3
    f = sum(pk * losses.parts[k] for pk, k in zip(p, NAMES))
    params = list(net.parameters())
    g_f = torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, params, retain_graph=True)])
    before = [x.detach().clone() for x in params]
    got = bal._inner_values(losses, ctx, params, p, g_f, float(f.detach()))
    assert all(torch.equal(x, y) for x, y in zip(params, before))  # the net's parameters are put back
    inner = copy.deepcopy(net)  # LibMTL's loop on a copy
    inner_opt = torch.optim.SGD(inner.parameters(), lr=inner_lr)
    stopped = False
    for _ in range(5):
        out = inner(b["x"])
        loss = sum(pk * ((out[k] - b[k]) ** 2).mean() for pk, k in zip(p, NAMES))
        if loss.item() > 1e5:
            stopped = True
            break
        inner_opt.zero_grad()
        loss.backward()
        inner_opt.step()
    out = inner(b["x"])
    ref = torch.stack([((out[k] - b[k]) ** 2).mean() for k in NAMES]).detach()
    assert torch.allclose(got, ref, rtol=1e-9), (got, ref)
    assert stopped == (inner_lr > 1)


@pytest.mark.parametrize("scale", [1.0, 10.0, 30.0])  # SLSQP stalls at its start from ~100
def test_forum_qp_in_slack_variables_is_libmtls_qp(scale):
    """FORUM._solve (the QP in (u, t'), well scaled) against LibMTL's QP in w solved by SLSQP."""
    g = torch.Generator().manual_seed(int(scale))
    T = 4
    U = torch.randn(T, 12, generator=g, dtype=torch.float64)
    U = U / U.norm(dim=1, keepdim=True)
    gq = scale * torch.randn(12, generator=g, dtype=torch.float64)
    gq_alpha = torch.randn(T, generator=g, dtype=torch.float64)
    A = torch.cat([torch.zeros(T + 1, T, dtype=torch.float64), torch.cat([U, gq[None]])], 1)
    A[T, :T] = gq_alpha  # g_q = (gq_alpha, gq); the u rows have no alpha part
    sq = float(A[T] @ A[T]) + 1e-8
    pi = [0.1 - float(A[t] @ A[T]) / sq for t in range(T)]
    ref = forum_qp_scipy(A @ A.T, pi, 0.1 * sq)
    M = torch.cat([U, gq[None]]) @ torch.cat([U, gq[None]]).T
    w, got_pi = FORUM()._solve(M, gq_alpha)
    assert np.allclose(got_pi.numpy(), pi, atol=1e-12)
    assert np.allclose(w.numpy(), ref, atol=1e-6), (w, ref)


def test_forum_qp_when_the_inner_steps_diverged():
    """||g_q||^2 ~ 4e24 (a captured step): no solver warning, w feasible, the coupling constraint active."""
    M = torch.tensor(
        [[1.0, 0.0963, -0.2039, -7.18], [0.0963, 1.0, -0.00547, -0.425], [-0.2039, -0.00547, 1.0, 36.0],
         [-7.18, -0.425, 36.0, 3.76e24]], dtype=torch.float64,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w, pi = FORUM()._solve(M, torch.zeros(3, dtype=torch.float64))
    assert float(w[:3].min()) >= 0 and abs(float(w[:3].sum()) - 1) < 1e-12
    assert float(w[3]) >= float(pi @ w[:3]) - 1e-15 and float(w[3]) == pytest.approx(0.1)
    # w_4 = pi^T u: u minimises u^T A u + phi b^T u on the simplex (the other terms are ~1e-23 of these)
    from scipy.optimize import minimize

    A, bb = M[:3, :3].numpy(), M[:3, 3].numpy()
    res = minimize(
        lambda u: u @ A @ u + 0.1 * bb @ u, np.full(3, 1 / 3), jac=lambda u: 2 * A @ u + 0.1 * bb,
        bounds=[(0, None)] * 3, constraints=[{"type": "eq", "fun": lambda u: u.sum() - 1}], method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    )  # fmt: skip
    assert np.allclose(w[:3].numpy(), res.x, atol=1e-7), (w, res.x)
