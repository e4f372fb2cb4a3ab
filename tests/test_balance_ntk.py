"""NTKMTL and NTKMTL-SR (lossport.balance.ntk) against the authors' update rules, reimplemented here in plain torch
from the paper (Qin et al., NeurIPS 2025, Algorithms 1-2) and github.com/jianke0604/NTKMTL's weight_methods.py:
per-task backward passes for NTKMTL, per-chunk gradients on the representation for NTKMTL-SR."""

import math

import pytest
import torch
from multihead import MultiHead, multihead_batch, unit_losses

import lossport
from lossport.balance import CRMOGM, NTKMTL, NTKMTLSR, resolve
from lossport.balance.ntk import ntk_weights
from lossport.graph import shared_parameters

NAMES = ["a", "b", "c"]
SPEC = dict.fromkeys(NAMES, "mse")
T = len(NAMES)


def Net() -> MultiHead:
    return MultiHead(NAMES)


def batch(seed: int = 0, n: int = 32) -> dict[str, torch.Tensor]:
    return multihead_batch(NAMES, seed, n)


# ------------------------------------------------------------------------------------ the authors' rules
def authors_ntkmtl(net: MultiHead, data: dict, ntk_exp: float, max_norm: float) -> tuple[list, list]:
    """NTKMTL (n = 1) as the authors' code runs it: one backward per task, w_i = (tr(G) / G_ii)^ntk_exp, the shared
    gradient T * sum_i w_i g_i, clipped to max_norm (0: not clipped); heads keep their unweighted gradients.
    Returns (shared grads, head grads by task)."""
    shared = list(net.trunk.parameters())
    h = net.trunk(data["x"])
    losses = [((net.heads[k](h) - data[k]) ** 2).mean() for k in NAMES]
    grads = []
    for loss in losses:
        gs = torch.autograd.grad(loss, shared, retain_graph=True)
        grads.append(torch.cat([g.flatten() for g in gs]))
    Gm = torch.stack(grads, dim=1)  # P x T, as their `grads`
    GTG = Gm.T @ Gm
    w = (torch.trace(GTG) / GTG.diagonal()) ** ntk_exp
    g = T * (Gm @ w)
    if max_norm > 0 and g.norm() > max_norm:
        g = g * (max_norm / g.norm())
    heads = [
        [x.detach() for x in torch.autograd.grad(losses[i], list(net.heads[k].parameters()), retain_graph=True)]
        for i, k in enumerate(NAMES)
    ]
    return list(torch.split(g.detach(), [p.numel() for p in shared])), heads


def authors_sr_weights(net: MultiHead, data: dict, n: int, ntk_exp: float) -> torch.Tensor:
    """NTKMTL-SR's weights as the authors' code: per-example losses cut by torch.chunk into n chunks, each chunk's
    mean differentiated with respect to z, lambda_i = the largest eigenvalue of J_i J_i^T, w = (sum lambda /
    lambda)^ntk_exp."""
    z = net.trunk(data["x"])
    per = torch.stack([((net.heads[k](z) - data[k]) ** 2).mean(dim=1) for k in NAMES], dim=1)  # B x T
    chunks = torch.stack([c.mean(0) for c in torch.chunk(per, n, dim=0)])  # n x T
    lam = []
    for i in range(T):
        J = torch.stack(
            [torch.autograd.grad(chunks[j, i], z, retain_graph=True)[0].flatten() for j in range(len(chunks))]
        )
        lam.append(torch.linalg.eigvalsh((J @ J.T).double())[-1])
    lam_t = torch.stack(lam)
    return (lam_t.sum() / lam_t) ** ntk_exp


# ------------------------------------------------------------------------------------------ NTKMTL
@pytest.mark.parametrize("ntk_exp", [0.5, 0.75])
def test_shared_update_is_the_authors_times_t_to_the_one_plus_exp_on_a_sequence_of_batches(ntk_exp):
    net = Net().double()
    obj = lossport.Objective(SPEC, balance=NTKMTL(ntk_exp=ntk_exp))
    shared = list(net.trunk.parameters())
    for s in range(3):
        data = {k: v.double() for k, v in batch(s).items()}
        ref_shared, ref_heads = authors_ntkmtl(net, data, ntk_exp, max_norm=0.0)
        net.zero_grad()
        out = obj(net, data)
        out.total.backward()
        factor = T ** (1 + ntk_exp)
        for p, r in zip(shared, ref_shared):
            assert torch.allclose(factor * p.grad, r.reshape(p.shape), rtol=1e-9, atol=1e-12)
        for i, k in enumerate(NAMES):  # the heads: lossport weighs them by b_i, the authors do not
            b = float(out.weights[k])
            for p, r in zip(net.heads[k].parameters(), ref_heads[i]):
                assert torch.allclose(p.grad, b * r, rtol=1e-9, atol=1e-12)
        with torch.no_grad():  # move on, so the next batch sees other parameters
            for p in net.parameters():
                p -= 1e-3 * p.grad


def test_max_norm_gives_the_authors_clipped_shared_update():
    net = Net().double()
    data = {k: v.double() for k, v in batch(1).items()}
    ref_shared, _ = authors_ntkmtl(net, data, 0.5, max_norm=0.0)
    assert torch.cat([r.flatten() for r in ref_shared]).norm() > 1.0  # the authors' clipping acts
    clipped, _ = authors_ntkmtl(net, data, 0.5, max_norm=1.0)
    out = lossport.Objective(SPEC, balance=NTKMTL(max_norm=1.0))(net, data)
    out.total.backward()
    for p, r in zip(net.trunk.parameters(), clipped):
        assert torch.allclose(p.grad, r.reshape(p.shape), rtol=1e-8, atol=1e-12)  # no factor: both clipped


def test_closed_form_from_the_gramian_diagonal():
    G = torch.tensor([[4.0, 1.0, 0.0], [1.0, 1.0, 0.5], [0.0, 0.5, 0.25]], dtype=torch.float64)
    w = NTKMTL().weigh(G, unit_losses(NAMES))
    mean = (4.0 + 1.0 + 0.25) / 3
    assert w.tolist() == pytest.approx([math.sqrt(mean / 4.0), math.sqrt(mean / 1.0), math.sqrt(mean / 0.25)])
    assert NTKMTL().weigh(2.5 * torch.eye(3, dtype=torch.float64), unit_losses(NAMES)).tolist() == [1.0, 1.0, 1.0]
    # the equalised kernels: b_i^2 G_ii is the same for every part
    assert (w**2 * G.diagonal()).tolist() == pytest.approx([mean] * 3)
    # scale-free, and a zero gradient gets 1 and stays out of the mean
    assert torch.allclose(NTKMTL().weigh(1e-200 * G, unit_losses(NAMES)), w)
    Z = torch.diag(torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64))
    assert NTKMTL().weigh(Z, unit_losses(NAMES)).tolist() == pytest.approx([1.0, math.sqrt(2.5), math.sqrt(2.5 / 4)])
    assert ntk_weights(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]


def test_every_k_reuses_the_weights_and_state_round_trip():
    net = Net()
    bal = NTKMTL(every=2)
    obj = lossport.Objective(SPEC, balance=bal)
    ws = [obj(net, batch(s)).weights for s in range(3)]
    assert ws[0] == ws[1] != ws[2]
    assert ws[2] == pytest.approx(lossport.Objective(SPEC, balance=NTKMTL())(net, batch(2)).weights)
    twin = NTKMTL(every=2)
    twin.load_state_dict(bal.state_dict())
    obj2 = lossport.Objective(SPEC, balance=twin)
    for s in range(3, 7):  # the every=2 schedule continues where it was
        assert obj(net, batch(s)).weights == obj2(net, batch(s)).weights


def test_errors_and_crmogm_base():
    with pytest.raises(ValueError, match="ntk_exp"):
        NTKMTL(ntk_exp=-1.0)
    with pytest.raises(ValueError, match="max_norm"):
        NTKMTL(max_norm=-1.0)
    with pytest.raises(ValueError, match="n \\(the number of mini-batch chunks\\)"):
        NTKMTLSR(n=0)
    with pytest.raises(ValueError, match="not on parameters: drop params=, or use 'ntkmtl'"):
        NTKMTLSR(params=[torch.zeros(1)])
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        NTKMTL().weigh(torch.tensor([[float("nan")]]), unit_losses(["a"]))
    CRMOGM(base="ntkmtl")  # a function of the Gramian
    with pytest.raises(TypeError, match="function of the Gramian"):
        CRMOGM(base="ntkmtl_sr")  # needs the per-example gradients


# ------------------------------------------------------------------------------------------ NTKMTL-SR
@pytest.mark.parametrize("n,size", [(4, 32), (4, 30), (3, 32), (1, 16)])
@pytest.mark.parametrize("features", [None, "h"])
def test_sr_weights_are_the_authors_over_t_to_the_exp(n, size, features):
    net = Net().double()
    for s in range(2):
        data = {k: v.double() for k, v in batch(s, n=size).items()}
        ref = authors_sr_weights(net, data, n, 0.5)
        out = lossport.Objective(SPEC, balance=NTKMTLSR(n=n, features=features))(net, data)
        mine = torch.tensor([float(out.weights[k]) for k in NAMES], dtype=torch.float64)
        assert torch.allclose(T**0.5 * mine, ref, rtol=1e-8), (n, size, s)


def test_sr_with_one_chunk_is_ntkmtl_on_the_representation_and_with_a_module():
    net = Net()
    a = lossport.Objective(SPEC, balance=NTKMTLSR(n=1))(net, batch(3)).weights
    b = lossport.Objective(SPEC, balance=NTKMTL(gramian="features", features="h"))(net, batch(3)).weights
    c = lossport.Objective(SPEC, balance=NTKMTLSR(n=1, features=net.trunk))(net, batch(3)).weights
    assert a == pytest.approx(b, rel=1e-5) and a == pytest.approx(c, rel=1e-5)
    # 4 chunks differ from 1: the largest chunk kernel, not the batch's
    assert lossport.Objective(SPEC, balance=NTKMTLSR(n=4))(net, batch(3)).weights != pytest.approx(a, rel=1e-3)


def test_sr_cost_is_one_backward_through_the_heads_not_the_trunk():
    net = Net()
    calls = {"trunk": 0}
    net.trunk[2].register_full_backward_hook(lambda *a: calls.__setitem__("trunk", calls["trunk"] + 1))
    out = lossport.Objective(SPEC, balance=NTKMTLSR())(net, batch(0))
    assert calls["trunk"] == 0  # the weights came from the heads' backward only
    out.total.backward()
    assert calls["trunk"] == 1


def test_sr_needs_a_batch_dimension_shared_by_the_representation():
    class Scalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return {"a": self.w * x.sum(), "b": self.w * x.sum() ** 2}  # both parts straight off a shared scalar

    data = {"x": torch.randn(8), "a": torch.tensor(1.0), "b": torch.tensor(2.0)}
    with pytest.raises(ValueError, match=r"NTKMTL-SR: .*give features="):
        lossport.Objective({"a": "mse", "b": "mse"}, balance=NTKMTLSR())(Scalar(), data)


def test_sr_every_k_state_round_trip_and_train():
    net = Net()
    bal = NTKMTLSR(every=2)
    obj = lossport.Objective(SPEC, balance=bal)
    ws = [obj(net, batch(s)).weights for s in range(3)]
    assert ws[0] == ws[1] != ws[2]
    twin = resolve("ntkmtl_sr", every=2)
    twin.load_state_dict(bal.state_dict())
    obj2 = lossport.Objective(SPEC, balance=twin)
    for s in range(3, 6):
        assert obj(net, batch(s)).weights == obj2(net, batch(s)).weights


@pytest.mark.parametrize("name", ["ntkmtl", "ntkmtl_sr"])
def test_train_three_steps_with_finite_weights(name):
    net = Net()
    r = lossport.train(
        net, batch(7, n=48), SPEC, balance=name, epochs=1, batch_size=16, shuffle=False, progress=False, seed=0
    )
    assert len(r.history.batch_values("loss")) == 3
    assert all(math.isfinite(r.history[f"weight/{k}"][-1]) for k in NAMES)
    assert r.history["weight/a"][-1] != r.history["weight/c"][-1]
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_shared_parameters_of_the_fixture_are_the_trunk():
    net = Net()
    out = lossport.Objective(SPEC)(net, batch(0))
    assert {id(p) for p in shared_parameters([out.parts[k] for k in NAMES])} == {id(p) for p in net.trunk.parameters()}
