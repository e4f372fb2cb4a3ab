import io
import math

import pytest
import torch
from torch import nn
from torchjd import scalarization as S

import lossport
from lossport.balance import FAMO, IMTLL, GradNorm, Uncertainty, resolve


def losses_of(v: torch.Tensor, names: str = "ab") -> lossport.Losses:
    return lossport.Losses(parts={k: v[i] for i, k in enumerate(names)}, weights=dict.fromkeys(names, 1.0))


# -- Uncertainty ---------------------------------------------------------------------------------------
def test_uw_weights_and_log_variance_gradient():
    uw = Uncertainty(form={"b": "classification"}, init=0.0)
    v = torch.tensor([2.0, 3.0])
    out = uw(losses_of(v))
    with torch.no_grad():
        uw.parameters()[0][0] = math.log(4.0)
    out = uw(losses_of(v))
    assert float(out.weights["a"]) == pytest.approx(0.5 / 4)  # 1 / (2 sigma^2), sigma^2 = 4
    assert float(out.weights["b"]) == pytest.approx(1.0)  # classification: 1 / sigma^2, sigma^2 = 1
    out.total.backward()
    # d/ds (c e^-s L + s/2) = -c e^-s L + 1/2
    assert uw.parameters()[0].grad.tolist() == pytest.approx([-0.5 / 4 * 2.0 + 0.5, -1.0 * 3.0 + 0.5])
    assert float(out.total.detach()) == pytest.approx(0.5 / 4 * 2 + 3 + 0.5 * math.log(4.0))


def test_uw_and_imtll_match_torchjd():
    torch.manual_seed(0)
    for ours, ref, attr in ((Uncertainty(), S.UW(3), "log_var"), (IMTLL(), S.IMTLL(3), "log_scale")):
        v = (torch.rand(3) + 0.2).requires_grad_(True)
        ours(losses_of(v.detach(), "abc"))  # create the parameters
        s = torch.tensor([0.3, -0.2, 0.1])
        with torch.no_grad():
            ours.parameters()[0].copy_(s)
            getattr(ref, attr).copy_(s)
        out = ours(losses_of(v, "abc"))
        r = ref(v)
        assert float(out.total.detach()) == pytest.approx(float(r.detach()), rel=1e-6)
        g = torch.autograd.grad(out.total, [v, *ours.parameters()])
        gr = torch.autograd.grad(r, [v, getattr(ref, attr)])
        assert torch.allclose(g[0], gr[0], atol=1e-6)
        assert torch.allclose(g[1], gr[1], atol=1e-6)


def test_learned_step_uses_own_optimizer_and_clears_grad():
    uw = Uncertainty(lr=0.1)
    out = uw(losses_of(torch.tensor([4.0, 0.25])))
    out.total.backward()
    uw.step()
    # Adam's first step moves each parameter by lr against the sign of its gradient
    assert uw.values["a"] == pytest.approx(0.1, abs=1e-6)  # grad -0.5*4 + 0.5 < 0
    assert uw.values["b"] == pytest.approx(-0.1, abs=1e-6)  # grad -0.5*0.25 + 0.5 > 0
    assert all(p.grad is None for p in uw.parameters())


# -- FAMO ----------------------------------------------------------------------------------------------
def test_famo_weights_and_logit_update():
    f = FAMO(lr=0.1, gamma=0.0)
    v = torch.tensor([2.0, 0.5], dtype=torch.float64)
    b = {k: float(w) for k, w in f(losses_of(v)).weights.items()}
    # z = (1/2, 1/2), c = 1 / (0.25 + 1) = 0.8, b_i = 2 * c z_i / L_i
    assert b["a"] == pytest.approx(2 * 0.8 * 0.5 / 2.0, rel=1e-6)
    assert b["b"] == pytest.approx(2 * 0.8 * 0.5 / 0.5, rel=1e-6)
    assert sum(b.values()) == pytest.approx(2.0, rel=1e-6)
    # after the step: a fell from 2 to 1 (delta log 2), b from 0.5 to 0.4 (delta log 1.25)
    f.step(lambda: losses_of(torch.tensor([1.0, 0.4], dtype=torch.float64)))
    # gradient on xi: J_softmax^T delta = z * (delta - z.delta) = ((d1 - d2) / 4, -(d1 - d2) / 4) > 0 for a;
    # Adam's first step: xi -= lr * sign(grad)
    assert f.values["a"] == pytest.approx(-0.1, abs=1e-6)
    assert f.values["b"] == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError, match="recompute"):
        f.step(None)


def test_famo_matches_torchjd_over_steps():
    torch.manual_seed(0)
    ours, ref = FAMO(), S.FAMO(3)
    for _ in range(5):
        v = (torch.rand(3) + 0.1).requires_grad_(True)
        after = v.detach() * (0.5 + torch.rand(3))
        out = ours(losses_of(v, "abc"))
        (g,) = torch.autograd.grad(out.total, v)
        (gr,) = torch.autograd.grad(ref(v), v)
        assert torch.allclose(g, 3 * gr, rtol=1e-5, atol=1e-6)  # lossport's weights sum to T, FAMO's to 1
        ours.step(lambda a=after: losses_of(a, "abc"))
        ref.update(after)
    assert torch.allclose(torch.tensor(list(ours.values.values())), ref._w.detach(), atol=1e-6)


def test_famo_floor_error():
    with pytest.raises(ValueError, match="floor"):
        FAMO(floor=1.0)(losses_of(torch.tensor([0.5, 2.0])))


# -- GradNorm ------------------------------------------------------------------------------------------
def test_gradnorm_target_norms_hand_computed():
    W = nn.Parameter(torch.tensor([[2.0]]))
    gn = GradNorm(alpha=1.5, lr=0.01, layer=[W])

    def parts():
        return losses_of(torch.stack([3 * W[0, 0] ** 2, W[0, 0]]))  # grads on W: 6W and 1

    out = parts()
    res = gn(out)
    # step 0: L(0) = (12, 2), r = (1, 1), norms (12, 1), targets = mean = 6.5
    assert gn.info["gradnorm/norm/a"] == pytest.approx(12.0)
    assert gn.info["gradnorm/target/a"] == pytest.approx(6.5)
    assert gn.info["gradnorm/target/b"] == pytest.approx(6.5)
    assert gn.info["gradnorm/grad_loss"] == pytest.approx(11.0)
    assert float(res.total.detach()) == pytest.approx(14.0)  # the extra term has value 0
    res.total.backward()
    assert gn.parameters()[0].grad.tolist() == pytest.approx([12.0, -1.0])
    gn.step()
    assert gn.values == pytest.approx({"a": 0.99, "b": 1.01}, abs=1e-6)
    assert sum(gn.values.values()) == pytest.approx(2.0)
    W.grad = None
    with torch.no_grad():
        W.fill_(1.0)
    gn(parts())
    # L = (3, 1): L/L(0) = (0.25, 0.5), r = (2/3, 4/3); norms (0.99 * 6, 1.01 * 1)
    Ga, Gb = 0.99 * 6, 1.01
    m = (Ga + Gb) / 2
    assert gn.info["gradnorm/norm/a"] == pytest.approx(Ga, rel=1e-5)
    assert gn.info["gradnorm/target/a"] == pytest.approx(m * (2 / 3) ** 1.5, rel=1e-5)
    assert gn.info["gradnorm/target/b"] == pytest.approx(m * (4 / 3) ** 1.5, rel=1e-5)


class TwoHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 16), nn.Tanh())
        self.h1, self.h2 = nn.Linear(16, 1), nn.Linear(16, 1)

    def forward(self, x):
        z = self.trunk(x)
        return self.h1(z), self.h2(z)


def test_gradnorm_finds_the_last_shared_layer():
    torch.manual_seed(0)
    net = TwoHead()
    x = torch.randn(8, 4)
    o1, o2 = net(x)
    gn = GradNorm()
    parts = {"a": o1.pow(2).mean(), "b": o2.pow(2).mean()}  # separate graphs (a stack would join them)
    gn(lossport.Losses(parts=parts, weights={"a": 1.0, "b": 1.0}))
    assert gn._layer is not None and gn._layer[0] is net.trunk[2].weight


def test_gradnorm_without_shared_layer_errors():
    a = nn.Parameter(torch.tensor(1.0))
    b = nn.Parameter(torch.tensor(2.0))
    with pytest.raises(ValueError, match="layer="):
        GradNorm()(lossport.Losses(parts={"a": a * 2, "b": b * 3}, weights={"a": 1.0, "b": 1.0}))


# -- shared ----------------------------------------------------------------------------------------------
NAMES = ["uw", "imtl_l", "famo", "gradnorm"]


def _problem():
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    return x, x.sum(1, keepdim=True), 10 * x[:, :1]


def _train(bal, net, opt, steps, data, record):
    x, y1, y2 = data

    def evaluate():
        o1, o2 = net(x)
        parts = {"a": nn.functional.mse_loss(o1, y1), "b": nn.functional.mse_loss(o2, y2)}
        return lossport.Losses(parts=parts, weights={"a": 1.0, "b": 1.0})

    for _ in range(steps):
        raw = evaluate()
        out = bal(raw)
        expect = sum(
            float(out.weights[k].detach() if isinstance(out.weights[k], torch.Tensor) else out.weights[k])
            * float(raw.parts[k].detach())
            for k in raw.parts
        )
        expect += sum(float(e.detach()) for e in out.extra.values())
        assert float(out.total.detach()) == pytest.approx(expect, rel=1e-5)
        opt.zero_grad()
        out.total.backward()
        opt.step()

        def recompute():
            with torch.no_grad():
                return evaluate()

        bal.step(recompute)
        record.append(
            (
                float(raw.parts["a"].detach()),
                float(raw.parts["b"].detach()),
                tuple(float(w.detach() if isinstance(w, torch.Tensor) else w) for w in out.weights.values()),
            )
        )


@pytest.mark.parametrize("name", NAMES)
def test_end_to_end_reduces_the_loss(name):
    data = _problem()
    torch.manual_seed(1)
    net = TwoHead()
    bal = resolve(name)
    rec: list = []
    _train(bal, net, torch.optim.Adam(net.parameters(), lr=0.03), 40, data, rec)
    assert rec[-1][0] + rec[-1][1] < 0.5 * (rec[0][0] + rec[0][1])
    assert len({r[2] for r in rec}) > 1  # the weights adapt


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip(name):
    data = _problem()
    torch.manual_seed(1)
    net = TwoHead()
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    bal = resolve(name)
    _train(bal, net, opt, 5, data, [])
    buf = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "bal": bal.state_dict()}, buf)
    rec1: list = []
    _train(bal, net, opt, 5, data, rec1)

    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    net2 = TwoHead()
    net2.load_state_dict(ck["net"])
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.03)
    opt2.load_state_dict(ck["opt"])
    bal2 = resolve(name)  # GradNorm: the layer is not state; the new balancer finds net2's at its first call
    bal2.load_state_dict(ck["bal"])
    rec2: list = []
    _train(bal2, net2, opt2, 5, data, rec2)
    assert rec1 == rec2


@pytest.mark.parametrize("name", ["uw", "famo", "gradnorm"])
def test_missing_part_keeps_its_parameter(name):
    data = _problem()
    torch.manual_seed(1)
    net = TwoHead()
    bal = resolve(name)
    _train(bal, net, torch.optim.Adam(net.parameters(), lr=0.03), 3, data, [])
    before = bal.values["a"]
    x, _y1, y2 = data
    _o1, o2 = net(x)
    part = nn.functional.mse_loss(o2, y2)
    losses = lossport.Losses(parts={"b": part}, weights={"b": 1.0}, missing=("a",))
    out = bal(losses)
    out.total.backward()
    bal.step(lambda: lossport.Losses(parts={"b": part.detach() * 0.9}, weights={"b": 1.0}, missing=("a",)))
    assert bal.values["a"] == before


def test_unknown_part_after_first_call_errors():
    uw = Uncertainty()
    uw(losses_of(torch.tensor([1.0, 2.0])))
    with pytest.raises(ValueError, match="not in the objective"):
        uw(losses_of(torch.tensor([1.0, 2.0]), "ac"))


def test_objective_hand_loop_with_famo():
    torch.manual_seed(0)
    net = TwoHead()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = net

        def forward(self, x):
            o1, o2 = self.inner(x)
            return {"a": o1, "b": o2}

    model = Net()
    x, y1, y2 = _problem()
    batch = {"x": x, "a": y1, "b": y2}
    objective = lossport.Objective({"a": "mse", "b": "mse"}, balance="famo")
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    first = None
    for _ in range(40):
        losses = objective(model, batch)
        first = first if first is not None else sum(float(v.detach()) for v in losses.parts.values())
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        objective.step(model, batch)
    assert sum(float(v.detach()) for v in losses.parts.values()) < 0.5 * first
    assert objective.balancer is not None and objective.balancer.values["a"] != 0.0


def test_imtll_weights_and_scale_gradient_hand_computed():
    imtl = IMTLL()
    v = torch.tensor([2.0, 0.5])
    imtl(losses_of(v))
    with torch.no_grad():
        imtl.parameters()[0][0] = math.log(3.0)
    out = imtl(losses_of(v))
    assert float(out.weights["a"]) == pytest.approx(3.0)  # b = e^s
    assert float(out.weights["b"]) == pytest.approx(1.0)
    assert float(out.total.detach()) == pytest.approx(3 * 2.0 + 0.5 - math.log(3.0))
    out.total.backward()
    # d/ds (e^s L - s) = e^s L - 1
    assert imtl.parameters()[0].grad.tolist() == pytest.approx([3 * 2.0 - 1, 0.5 - 1])


@pytest.mark.parametrize("name", ["uw", "imtl_l", "gradnorm"])
def test_negative_loss_is_an_error_naming_the_part(name):
    W = nn.Parameter(torch.tensor([[1.0]]))
    bal = resolve(name) if name != "gradnorm" else GradNorm(layer=[W])
    with pytest.raises(ValueError, match=r"part 'b'.*>= 0|>= 0.*part 'b'"):
        bal(losses_of(torch.stack([W[0, 0] * 2, W[0, 0] * -1])))


def test_nonfinite_gradient_skips_the_balancer_step():
    uw = Uncertainty()
    out = uw(losses_of(torch.tensor([1.0, 2.0])))
    out.total.backward()
    uw.parameters()[0].grad[0] = float("inf")  # as after a mixed-precision overflow
    state = uw.state_dict()
    uw.step()
    assert torch.equal(uw.parameters()[0].detach(), state["theta"]) and uw.parameters()[0].grad is None
    assert all(torch.equal(v, state[k]) for k, v in uw.state_dict().items() if isinstance(v, torch.Tensor))
    assert uw.info["skipped_nonfinite_step"] == 1.0


def test_famo_skips_an_update_from_nonfinite_losses():
    f = FAMO()
    f(losses_of(torch.tensor([2.0, 0.5])))
    f.step(lambda: losses_of(torch.tensor([float("inf"), 0.4])))
    assert f.values == {"a": 0.0, "b": 0.0} and f.info["skipped_nonfinite_step"] == 1.0


def test_famo_nan_after_the_step_is_a_counted_skip_not_a_floor_error():
    """A NaN part in FAMO's second look used to raise its floor ValueError, escaping raise and skip alike."""
    f = FAMO()
    f(losses_of(torch.tensor([2.0, 0.5])))
    f.step(lambda: losses_of(torch.tensor([float("nan"), 0.4])))
    assert f.values == {"a": 0.0, "b": 0.0} and f.info["skipped_nonfinite_step"] == 1.0


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_vector_adam_is_torch_adam_over_one_parameter_per_part(weight_decay):
    """theta's element-wise Adam = torch.optim.Adam over one scalar parameter per part, parts missing from some
    batches included (their value, moments and step count untouched), float64."""
    torch.manual_seed(0)
    names = "abcd"
    bal = FAMO(lr=0.05, gamma=weight_decay).to(torch.float64)
    bal(
        lossport.Losses(
            parts={k: torch.tensor(1.0, dtype=torch.float64) for k in names}, weights=dict.fromkeys(names, 1.0)
        )
    )
    ref = [nn.Parameter(torch.zeros((), dtype=torch.float64)) for _ in names]
    opt = torch.optim.Adam(ref, lr=0.05, weight_decay=weight_decay)
    for step in range(14):
        # every part on the first steps (equal step counts), then each part missing on some steps
        present = list(names) if step < 4 else [k for i, k in enumerate(names) if step % (i + 2)]
        grad = torch.randn(len(present), dtype=torch.float64) * 10 ** (step % 4 - 2)
        bal._update(present, grad)
        for k, g in zip(present, grad, strict=True):
            ref[names.index(k)].grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.allclose(
            bal.parameters()[0].detach(), torch.stack([p.detach() for p in ref]), rtol=1e-12, atol=1e-14
        )
    steps = [int(opt.state[p]["step"]) for p in ref]
    assert bal.state_dict()["steps"].tolist() == steps and len(set(steps)) > 1


def test_a_backward_marks_only_the_parts_it_reaches():
    """A part missing from the batch gets no gradient and no Adam step (UW: its log-variance stays put)."""
    uw = Uncertainty(lr=0.1)
    full = losses_of(torch.tensor([2.0, 3.0]))
    uw(full).total.backward()
    uw.step()
    a, b = uw.values["a"], uw.values["b"]
    part = lossport.Losses(parts={"a": torch.tensor(2.0)}, weights={"a": 1.0}, missing=("b",))
    uw(part).total.backward()
    uw.step()
    assert uw.values["b"] == b and uw.values["a"] != a
    assert uw.state_dict()["steps"].tolist() == [2, 1]
