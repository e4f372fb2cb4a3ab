import io
import math

import pytest
import torch
from torch import nn
from torchjd import scalarization as S

import lossport
from lossport.balance import DWA, GLS, RLW, SI, STCH, Balancer, CoV, Normalize, available, resolve


def L(**parts: float) -> lossport.Losses:
    return lossport.Losses(
        parts={k: torch.tensor(v, dtype=torch.float64) for k, v in parts.items()}, weights=dict.fromkeys(parts, 1.0)
    )


def b_of(bal, losses: lossport.Losses) -> dict[str, float]:
    out = bal(losses)
    return {k: float(v) for k, v in out.weights.items()}


# -- Normalize / SI --------------------------------------------------------------------------------------
def test_normalize_initial_divides_by_first_value():
    n = Normalize("initial")
    assert b_of(n, L(a=2.0, b=10.0)) == pytest.approx({"a": 0.5, "b": 0.1})
    assert b_of(n, L(a=1.0, b=20.0)) == pytest.approx({"a": 0.5, "b": 0.1})


def test_normalize_ema_bias_corrected():
    n = Normalize("ema", beta=0.5)
    assert b_of(n, L(a=2.0)) == pytest.approx({"a": 0.5})  # m = 2
    # raw EMA: step 1 0.5 * 2 = 1; step 2 0.5 * 1 + 0.5 * 4 = 2.5; bias correction 1 - 0.5^2 = 0.75 -> m = 10/3
    assert b_of(n, L(a=4.0)) == pytest.approx({"a": 0.3})


@pytest.mark.parametrize("mode", ["initial", "ema", "log"])
def test_normalize_is_scale_invariant(mode):
    seq = [(2.0, 3.0), (1.5, 2.0), (1.0, 2.5), (0.7, 1.1)]
    n1, n2 = Normalize(mode), Normalize(mode)
    for a, b in seq:
        o1 = n1(L(a=a, b=b))
        o2 = n2(L(a=a, b=1000.0 * b))
        assert float(o1.total) == pytest.approx(float(o2.total), rel=1e-9)
        for k in ("a", "b"):
            assert float(o1.weights[k] * o1.parts[k]) == pytest.approx(float(o2.weights[k] * o2.parts[k]), rel=1e-9)


def test_si_gradient_is_that_of_sum_log():
    p = torch.tensor([0.3, 4.0], requires_grad=True)
    out = SI()(lossport.Losses(parts={"a": p[0] * 1, "b": p[1] * 1}, weights={"a": 1.0, "b": 1.0}))
    (g,) = torch.autograd.grad(out.total, p)
    assert torch.allclose(g, 1 / p.detach())
    assert isinstance(resolve("si"), SI)


def test_normalize_errors():
    with pytest.raises(ValueError, match="mode"):
        Normalize("zscore")
    with pytest.raises(ValueError, match="part 'a'"):
        Normalize()(L(a=-1.0))


# -- GLS --------------------------------------------------------------------------------------------------
def test_gls_matches_torchjd_geometric_mean():
    v = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64, requires_grad=True)
    out = GLS()(lossport.Losses(parts={"a": v[0] * 1, "b": v[1] * 1, "c": v[2] * 1}, weights=dict.fromkeys("abc", 1.0)))
    ref = S.GeometricMean()(v)
    assert float(out.total.detach()) == pytest.approx(float(ref.detach())) == pytest.approx(2.0)
    (g,) = torch.autograd.grad(out.total, v)
    (gr,) = torch.autograd.grad(ref, v)
    assert torch.allclose(g, gr)
    # hand: b_i = GM / (T L_i) = 2 / (3 L_i)
    assert float(out.weights["a"]) == pytest.approx(4 / 3)


# -- DWA ------------------------------------------------------------------------------------------------
def test_dwa_weights_from_round_history():
    d = DWA(temperature=2.0)
    assert b_of(d, L(a=1.0, b=1.0)) == {"a": 1.0, "b": 1.0}
    d.end_round({"a": 4.0, "b": 2.0})
    assert b_of(d, L(a=1.0, b=1.0)) == {"a": 1.0, "b": 1.0}
    d.end_round({"a": 2.0, "b": 2.0})  # r = (0.5, 1.0)
    got = b_of(d, L(a=1.0, b=1.0))
    ea, eb = math.exp(0.25), math.exp(0.5)
    assert got == pytest.approx({"a": 2 * ea / (ea + eb), "b": 2 * eb / (ea + eb)})
    assert sum(got.values()) == pytest.approx(2.0)


def test_dwa_uses_batch_means_without_given_means_and_windows():
    d = DWA(window=2)
    for v in (3.0, 5.0):  # window 1 mean a=4, b=v
        d(L(a=v, b=1.0))
    for v in (1.0, 3.0):  # window 2 mean a=2, b=1
        d(L(a=v, b=1.0))
    got = b_of(d, L(a=9.0, b=9.0))  # r = (0.5, 1.0)
    ea, eb = math.exp(0.25), math.exp(0.5)
    assert got["a"] == pytest.approx(2 * ea / (ea + eb))


def test_dwa_matches_torchjd_over_epochs():
    torch.manual_seed(0)
    ours, ref = DWA(), S.DWA()
    for _ in range(4):
        for _ in range(3):
            v = torch.rand(3, dtype=torch.float64) + 0.1
            out = ours(lossport.Losses(parts={k: v[i] for i, k in enumerate("abc")}, weights=dict.fromkeys("abc", 1.0)))
            assert float(out.total) == pytest.approx(float(ref(v)), rel=1e-12)
        ours.end_round({})
        ref.step()


# -- RLW --------------------------------------------------------------------------------------------------
def test_rlw_seeded_softmax_times_T():
    got = b_of(RLW(seed=3), L(a=1.0, b=1.0, c=1.0))
    eps = torch.randn(3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = 3 * torch.softmax(eps, 0)
    assert list(got.values()) == pytest.approx(want.tolist())
    assert sum(got.values()) == pytest.approx(3.0)
    with torch.no_grad():
        assert b_of(RLW(), L(a=1.0, b=2.0)) == {"a": 1.0, "b": 1.0}


# -- STCH -----------------------------------------------------------------------------------------------
def test_stch_mu1_closed_form_and_torchjd():
    nadir = {"a": 2.0, "b": 0.5}
    st = STCH(mu=1.0, nadir=nadir)
    v = torch.tensor([1.0, 0.25], dtype=torch.float64, requires_grad=True)
    out = st(lossport.Losses(parts={"a": v[0] * 1, "b": v[1] * 1}, weights={"a": 1.0, "b": 1.0}))
    s = 1.0 / 2.0 + 0.25 / 0.5
    assert float(out.weights["a"]) == pytest.approx(2 * (1 / 2.0) / s)
    assert float(out.weights["b"]) == pytest.approx(2 * (1 / 0.5) / s)
    (g,) = torch.autograd.grad(out.total, v)
    ref = S.STCH(mu=1.0, weights=torch.ones(2, dtype=torch.float64), reference=torch.tensor([2.0, 0.5]).log().double())
    vv = v.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(ref(vv.log()), vv)
    assert torch.allclose(g, 2 * gr)


def test_stch_warmup_schedule_and_nadir():
    st = STCH(mu=0.5, warmup=1)
    assert b_of(st, L(a=2.0, b=4.0)) == pytest.approx({"a": 0.5, "b": 0.25})  # SI
    st.end_round({})
    b_of(st, L(a=1.0, b=2.0))  # recording round
    b_of(st, L(a=3.0, b=6.0))
    assert st.nadir is None
    st.end_round({})
    assert st.nadir == pytest.approx({"a": 2.0, "b": 4.0})
    got = b_of(st, L(a=2.0, b=2.0))  # log(L/n) = (0, log .5); p = softmax(/0.5)
    p = torch.softmax(torch.tensor([0.0, math.log(0.5)]) / 0.5, 0)
    assert got == pytest.approx({"a": 2 * float(p[0]) / 2.0, "b": 2 * float(p[1]) / 2.0})


def test_stch_window_mode():
    st = STCH(warmup=1, window=2)
    for v in (1.0, 1.0, 2.0, 4.0):
        b_of(st, L(a=v))
    assert st.nadir == pytest.approx({"a": 3.0})


# -- CoV ----------------------------------------------------------------------------------------------------
def test_cov_hand_computed():
    cov = CoV()
    assert b_of(cov, L(a=2.0, b=1.0)) == {"a": 1.0, "b": 1.0}  # ratio 1, 1
    assert b_of(cov, L(a=1.0, b=2.0)) == {"a": 1.0, "b": 1.0}  # ratio a = 0.5, b = 2
    # stats after two steps: a: ratios (1, .5): mean .75, var .0625; b: ratios (1, 2): mean 1.5, var .25
    ca = math.sqrt(0.0625 + 1e-8) / 0.75
    cb = math.sqrt(0.25 + 1e-8) / 1.5
    got = b_of(cov, L(a=1.0, b=1.0))
    assert got == pytest.approx({"a": 2 * ca / (ca + cb), "b": 2 * cb / (ca + cb)})


# -- shared properties ------------------------------------------------------------------------------------
def _seq(n: int, seed: int = 0) -> list[dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"a": float(torch.rand(1, generator=g)) + 0.1, "b": 5 * float(torch.rand(1, generator=g)) + 0.1}
        for _ in range(n)
    ]


def _run(bal, seq, round_every: int = 3) -> list[dict[str, float]]:
    out = []
    for i, v in enumerate(seq):
        out.append(b_of(bal, L(**v)))
        bal.step()
        if (i + 1) % round_every == 0:
            bal.end_round({})
    return out


NAMES = ["normalize", "si", "gls", "dwa", "rlw", "stch", "cov"]
MAKERS = {
    "normalize": lambda: Normalize("ema"),
    "si": SI,
    "gls": GLS,
    "dwa": DWA,
    "rlw": lambda: RLW(seed=5),
    "stch": lambda: STCH(warmup=1),
    "cov": CoV,
}


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip(name):
    seq = _seq(24)
    a = MAKERS[name]()
    _run(a, seq[:11])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = MAKERS[name]()
    b.load_state_dict(torch.load(buf, weights_only=False))
    # both continue from step 11 (mid-round: round ends at the same global steps)
    wa = [b_of(a, L(**v)) for v in seq[11:12]]
    wb = [b_of(b, L(**v)) for v in seq[11:12]]
    for bal in (a, b):
        bal.end_round({})
    wa += _run(a, seq[12:])
    wb += _run(b, seq[12:])
    assert wa == wb
    assert len({tuple(w.values()) for w in wa}) > 1 or name in ("normalize",)


@pytest.mark.parametrize("name", NAMES)
def test_no_grad_calls_leave_state(name):
    seq = _seq(12)
    a, b = MAKERS[name](), MAKERS[name]()
    _run(a, seq[:7])
    _run(b, seq[:7])
    with torch.no_grad():
        for v in _seq(4, seed=9):
            b_of(b, L(**v))
    assert _run(a, seq[7:]) == _run(b, seq[7:])


@pytest.mark.parametrize("name", ["normalize", "dwa", "stch", "cov"])
def test_missing_part_keeps_its_state(name):
    seq = _seq(12)
    a, b = MAKERS[name](), MAKERS[name]()
    _run(a, seq[:6])
    _run(b, seq[:6])
    missing = lossport.Losses(parts={"b": torch.tensor(3.0)}, weights={"b": 1.0}, missing=("a",))
    out = b(missing)
    assert list(out.weights) == ["b"]
    # part a's state is untouched: its weight after the same history (and one b-only step) matches a's
    sa, sb = a.state_dict(), b.state_dict()
    for key, va in sa.items():
        if isinstance(va, dict) and "a" in va:
            assert sb[key]["a"] == va["a"], key


def test_all_constructible_by_name():
    for n in NAMES:
        b = resolve(n)
        assert isinstance(b, Balancer) and b.kind == "loss" and n in available(), n


# -- end to end ----------------------------------------------------------------------------------------
class TwoHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.h1, self.h2 = nn.Linear(16, 1), nn.Linear(16, 1)

    def forward(self, x):
        z = self.trunk(x)
        return self.h1(z), self.h2(z)


@pytest.mark.parametrize("name", NAMES)
def test_end_to_end(name):
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    y1, y2 = x.sum(1, keepdim=True), 10 * x[:, :1]
    net = TwoHead()
    bal = resolve(name)
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    sums = []
    for t in range(40):
        o1, o2 = net(x)
        parts = {"a": nn.functional.mse_loss(o1, y1), "b": nn.functional.mse_loss(o2, y2)}
        out = bal(lossport.Losses(parts=parts, weights={"a": 1.0, "b": 1.0}))
        expect = sum(float(out.weights[k]) * float(parts[k].detach()) for k in parts) + sum(
            float(e) for e in out.extra.values()
        )
        assert float(out.total.detach()) == pytest.approx(expect, rel=1e-6)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        bal.step()
        if (t + 1) % 5 == 0:
            bal.end_round({})
        sums.append(float(parts["a"].detach()) + float(parts["b"].detach()))
    assert sums[-1] < 0.5 * sums[0]


# -- through lossport.train (every method of this issue, by name) ------------------------------------------
ALL = ["ew", "static", "normalize", "si", "gls", "dwa", "rlw", "stch", "cov", "uw", "imtl_l", "famo", "gradnorm"]


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.h1, self.h2 = nn.Linear(16, 1), nn.Linear(16, 1)

    def forward(self, x):
        z = self.trunk(x)
        return {"a": self.h1(z), "b": self.h2(z)}


@pytest.mark.parametrize("name", ALL)
def test_train_with_each_method(name):
    from lossport.training import train

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = {"x": x, "a": x.sum(1, keepdim=True), "b": 10 * x[:, :1]}
    r = train(
        DictNet(),
        data,
        {"a": "mse", "b": "mse"},
        balance=name,
        epochs=6,
        batch_size=16,
        lr=0.03,
        progress=False,
        seed=0,
    )
    h = r.history
    assert h["a"][-1] + h["b"][-1] < 0.8 * (h["a"][0] + h["b"][0])
    assert "weight/a" in h


def test_per_batch_standardisation_would_not_train():
    """The reason given in Normalize's docstring: the batch mean of standardised per-example losses is 0 for
    every parameter value, so its gradient vanishes."""
    w = torch.tensor([1.5, -0.3], requires_grad=True)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    per_example = (x @ w - 1.0) ** 2
    standardised = ((per_example - per_example.mean()) / per_example.std()).mean()
    (g,) = torch.autograd.grad(standardised, w, retain_graph=True)
    assert float(standardised.detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(g.abs().max()) < 1e-5
    # Normalize's weight leaves a useful gradient: that of L / sg(L(0))
    n = Normalize("initial")
    out = n(lossport.Losses(parts={"a": per_example.mean()}, weights={"a": 1.0}))
    (g2,) = torch.autograd.grad(out.total, w)
    assert float(g2.abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["si", "gls", "dwa", "stch", "cov", "normalize"])
def test_negative_loss_is_an_error_naming_the_part(name):
    with pytest.raises(ValueError, match=r"part 'b' is -1.0"):
        resolve(name)(L(a=1.0, b=-1.0))


def test_rlw_matches_torchjd_random_times_T():
    """TorchJD's Random draws from the global generator and its weights sum to 1; with the same seed and dtype
    the draws coincide, and lossport's weights are T times TorchJD's."""
    v = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    parts = {k: v[i] * 1 for i, k in enumerate("abc")}
    out = RLW(seed=7)(lossport.Losses(parts=parts, weights=dict.fromkeys("abc", 1.0)))
    (g,) = torch.autograd.grad(out.total, v)
    state = torch.get_rng_state()
    try:
        torch.manual_seed(7)
        (gr,) = torch.autograd.grad(S.Random()(v), v)
    finally:
        torch.set_rng_state(state)
    assert torch.allclose(g, 3 * gr)
