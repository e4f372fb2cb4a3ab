"""lossport.inspect: reach from the autograd graph, pull and conflict against explicit per-part gradients,
renders, advice, and the training monitor."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossport import Objective
from lossport.inspection import Monitor, figures_from_gramian, inspect, monitor
from lossport.report import IMBALANCE
from lossport.training.data import first_batches


class SeedNet(nn.Module):
    """The seed question's net: shared A -> B, heads C (y1) and D (y2); E runs but feeds no loss when y3 has
    none; F is never called."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.A = nn.Linear(4, 8)
        self.B = nn.Linear(8, 8)
        self.C = nn.Linear(8, 1)
        self.D = nn.Linear(8, 3)
        self.E = nn.Linear(8, 2)
        self.F = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.B(torch.tanh(self.A(x))))
        return {"y1": self.C(h), "y2": self.D(h), "y3": self.E(h)}


def seed_data(n: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 4, generator=g),
        "y1": torch.randn(n, 1, generator=g),
        "y2": torch.randint(0, 3, (n,), generator=g),
    }


SPEC = {"y1": "mse", "y2": "ce"}


def explicit(net, data, spec, modules, batch_size=16, batches=4):
    """Per batch, per part, the flattened gradient on each module's own parameters (None when missing)."""
    obj = Objective(spec)
    out = []
    for batch in first_batches(data, batches, batch_size):
        losses = obj(net, batch)
        row = {}
        for k, v in losses.parts.items():
            row[k] = {}
            for m in modules:
                ps = list(getattr(net, m).parameters())
                gs = torch.autograd.grad(v, ps, retain_graph=True, allow_unused=True)
                row[k][m] = torch.cat(
                    [torch.zeros(p.numel()) if g is None else g.reshape(-1) for p, g in zip(ps, gs)]
                ).double()
        out.append(row)
    return out


# -- reach ------------------------------------------------------------------------------------------------
def test_seed_net_reach_is_the_keras_answer():
    net = SeedNet()
    r = inspect(net, seed_data(), SPEC, batch_size=16)
    assert r.parts == ["y1", "y2"]
    assert r.reach["y1"] == ["A", "B", "C"]
    assert r.reach["y2"] == ["A", "B", "D"]
    assert r.shared == ["A", "B"]
    assert {m.name: m.status for m in r.modules} == {
        "A": "reached",
        "B": "reached",
        "C": "reached",
        "D": "reached",
        "E": "no loss",
        "F": "not called",
    }
    assert r.reach_params["y1"] == ["A.bias", "A.weight", "B.bias", "B.weight", "C.bias", "C.weight"]
    # no gradient was left in .grad by the measurement
    assert all(p.grad is None for p in net.parameters())


def test_reach_is_read_from_the_graph_not_from_zero_gradients():
    class Zeroed(SeedNet):
        def forward(self, x):
            out = super().forward(x)
            out["y1"] = out["y1"] * 0.0  # C is on y1's graph, but every gradient is exactly 0
            return out

    r = inspect(Zeroed(), seed_data(), SPEC, batch_size=16)
    assert r.reach["y1"] == ["A", "B", "C"]
    assert r.pull["y1"]["C"] == 0.0 and r.pull["y1"]["A"] == 0.0
    assert "0" in r.table().split("Reach and pull")[1]


def test_frozen_layer_is_reported_and_gradient_still_passes_through_it():
    net = SeedNet()
    net.B.requires_grad_(False)
    r = inspect(net, seed_data(), SPEC, batch_size=16)
    assert r.module("B").status == "frozen" and r.module("B").trainable == 0
    assert r.reach["y1"] == ["A", "C"] and r.reach["y2"] == ["A", "D"]
    assert r.shared == ["A"]
    assert not any(n.startswith("B.") for n in r.reach_params["y1"])


def test_partially_frozen_module_counts_trainable_parameters():
    net = SeedNet()
    net.A.bias.requires_grad_(False)
    r = inspect(net, seed_data(), SPEC, batch_size=16)
    assert r.module("A").trainable == 32 and r.module("A").params == 40
    assert "A.bias" not in r.reach_params["y1"] and "A.weight" in r.reach_params["y1"]


def test_output_with_a_loss_only_on_some_heads():
    # y3 gets a loss too: E is then reached, F still never called
    data = seed_data()
    data["y3"] = torch.randn(64, 2)
    r = inspect(SeedNet(), data, {"y1": "mse", "y2": "ce", "y3": "mse"}, batch_size=16)
    assert r.reach["y3"] == ["A", "B", "E"]
    assert r.module("E").status == "reached" and r.module("F").status == "not called"
    assert any("'F'" in a and "never called" in a for a in r.advice)
    assert not any("'E'" in a for a in r.advice)


# -- pull and conflict against explicit gradients ----------------------------------------------------------
def test_pull_and_cosines_match_explicit_per_part_gradients():
    net, data = SeedNet(), seed_data()
    r = inspect(net, data, SPEC, batch_size=16, batches=4)
    ex = explicit(net, data, SPEC, ["A", "B", "C", "D"])
    for k, mods in (("y1", "ABC"), ("y2", "ABD")):
        for m in mods:
            want = sum(float(b[k][m].norm()) for b in ex) / len(ex)
            assert r.pull[k][m] == pytest.approx(want, rel=1e-6)
    for m in "AB":
        want = sum(float(F.cosine_similarity(b["y1"][m], b["y2"][m], dim=0)) for b in ex) / len(ex)
        assert r.cos[m][0][1] == pytest.approx(want, rel=1e-6, abs=1e-9)
        assert r.cos[m][1][0] == pytest.approx(want, rel=1e-6, abs=1e-9)
    trunk = [{k: torch.cat([b[k]["A"], b[k]["B"]]) for k in ("y1", "y2")} for b in ex]
    want_cos = sum(float(F.cosine_similarity(t["y1"], t["y2"], dim=0)) for t in trunk) / len(trunk)
    assert r.trunk_cos[0][1] == pytest.approx(want_cos, rel=1e-6, abs=1e-9)
    assert r.trunk_cos[0][0] == pytest.approx(1.0)
    for k in ("y1", "y2"):
        assert r.trunk_norm[k] == pytest.approx(sum(float(t[k].norm()) for t in trunk) / len(trunk), rel=1e-6)
    assert r.ratios()[0][1] == pytest.approx(r.trunk_norm["y1"] / r.trunk_norm["y2"])
    # values: mean over labelled examples of the 64 rows
    obj = Objective(SPEC)
    full = obj(net, data)
    assert r.values["y1"] == pytest.approx(float(full.parts["y1"].detach()), rel=1e-5)
    assert r.values["y2"] == pytest.approx(float(full.parts["y2"].detach()), rel=1e-5)


def test_missing_labels_leave_the_part_out_of_those_batches():
    net, data = SeedNet(), seed_data()
    data["y2"] = data["y2"].clone()
    data["y2"][:32] = -100  # batches 0 and 1 (of 16 rows) have no y2 label
    r = inspect(net, data, SPEC, batch_size=16, batches=4)
    assert r.missing == {"y1": 0, "y2": 2}
    assert r.counts == {"y1": 64, "y2": 32}
    ex = explicit(net, data, SPEC, ["A", "D"])
    present = [b for b in ex if "y2" in b]
    assert len(present) == 2
    assert r.pull["y2"]["D"] == pytest.approx(sum(float(b["y2"]["D"].norm()) for b in present) / 2, rel=1e-6)
    want = sum(float(F.cosine_similarity(b["y1"]["A"], b["y2"]["A"], dim=0)) for b in present) / 2
    assert r.cos["A"][0][1] == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert any("'y2' had no labelled example in 2 of 4 batches" in a for a in r.advice)
    assert "2/4 batches" in r.table()


def test_part_never_labelled_is_reported_not_measured():
    data = seed_data()
    data["y2"] = torch.full((64,), -100)
    r = inspect(SeedNet(), data, SPEC, batch_size=16, batches=2)
    assert r.parts == ["y1", "y2"]
    assert r.missing["y2"] == 2 and r.reach["y2"] == [] and "y2" not in r.trunk_norm
    assert r.measured == ["y1"] and r.shared == []
    assert any("'y2' had no labelled example in any of the 2" in a for a in r.advice)
    str(r)  # renders without a trunk
    json.dumps(r.as_dict())


# -- a dict-output net with three parts ----------------------------------------------------------------------
class ThreeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.trunk = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.digit = nn.Sequential(nn.Linear(16, 4), nn.Softmax(dim=1))
        self.size = nn.Linear(16, 1)
        self.side = nn.Linear(5, 1)  # reads the input directly: shares nothing

    def forward(self, x):
        h = self.trunk(x)
        return {
            "digit": self.digit(h),
            "size": self.size(h),
            "side": self.side(x),
            "both": self.size(h) + self.side(x),
        }


def three_data(n=48):
    g = torch.Generator().manual_seed(5)
    return {
        "x": torch.randn(n, 5, generator=g),
        "digit": torch.randint(0, 4, (n,), generator=g),
        "size": 100 * torch.randn(n, 1, generator=g),
        "side": torch.randn(n, 1, generator=g),
        "both": torch.randn(n, 1, generator=g),
    }


def test_dict_net_three_parts_auto_losses():
    data = three_data()
    spec = {"digit": "auto", "size": "mse", "both": "mse"}
    r = inspect(ThreeNet(), data, spec, batch_size=16, batches=3)
    assert r.parts == ["digit", "size", "both"]
    assert r.reach["digit"] == ["trunk.0", "trunk.2", "digit.0"]
    assert r.reach["size"] == ["trunk.0", "trunk.2", "size"]
    assert r.reach["both"] == ["trunk.0", "trunk.2", "size", "side"]
    assert r.shared == ["trunk.0", "trunk.2", "size"]
    # 'size' is shared by 'size' and 'both' only: digit's row/column of its cosine matrix is undefined
    assert math.isnan(r.cos["size"][0][1]) and not math.isnan(r.cos["size"][1][2])
    c = r.trunk_cos
    assert all(c[i][j] == pytest.approx(c[j][i]) for i in range(3) for j in range(3))
    assert all(-1.0 <= c[i][j] <= 1.0 for i in range(3) for j in range(3))
    d = json.loads(json.dumps(r.as_dict()))
    assert d["reach"]["both"] == ["trunk.0", "trunk.2", "size", "side"]
    assert d["cos"]["size"][0][1] is None


def test_tuple_batches():
    net = SeedNet()
    data = seed_data(32)

    class TupleSeed(SeedNet):
        def forward(self, x):
            o = super().forward(x)
            return o["y1"], o["y2"]

    tnet = TupleSeed()
    examples = [(x, (y1, y2)) for x, y1, y2 in zip(data["x"], data["y1"], data["y2"])]  # a list is a dataset
    r = inspect(tnet, examples, ["mse", "ce"], batches=3, batch_size=8)
    assert r.batches == 3 and r.reach["out0"] == ["A", "B", "C"] and r.reach["out1"] == ["A", "B", "D"]
    r2 = inspect(net, (data["x"], {"y1": data["y1"], "y2": data["y2"]}), SPEC, batch_size=8, batches=2)
    assert r2.batches == 2 and r2.counts["y1"] == 16


# -- advice --------------------------------------------------------------------------------------------------
class Scalars(nn.Module):
    """Two scalar outputs that are losses: a = <w, mean x>, b = -k <w, mean x> + c: gradients on w exactly
    opposite, and k times apart."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.w = nn.Linear(3, 1, bias=False)
        self.k = k

    def forward(self, x):
        s = self.w(x).mean()
        return {"a": s, "b": -self.k * s}


def test_advice_on_conflict_and_imbalance_cites_the_figures():
    x = {"x": torch.randn(32, 3, generator=torch.Generator().manual_seed(0))}
    r = inspect(Scalars(200.0), x, "auto", batch_size=16, batches=2)
    assert r.shared == ["w"]
    assert r.trunk_cos[0][1] == pytest.approx(-1.0)
    assert r.ratios()[1][0] == pytest.approx(200.0, rel=1e-6)
    conflict = [a for a in r.advice if "conflict" in a]
    assert len(conflict) == 1 and "-1.00" in conflict[0]
    pulls = [a for a in r.advice if "pulls" in a]
    assert len(pulls) == 1 and "'b' pulls 200x harder than 'a'" in pulls[0]
    # suggested static weights equalise the pulls and keep the sum of weights (2)
    assert "'a': 2, 'b': 0.01" in pulls[0]


def test_advice_holds_only_when_its_condition_does():
    x = {"x": torch.randn(32, 3, generator=torch.Generator().manual_seed(0))}
    r = inspect(Scalars(2.0), x, "auto", batch_size=16, batches=2)
    assert IMBALANCE > 2.0
    assert not any("pulls" in a for a in r.advice)
    # applied static weights count: a weight of 100 on 'a' makes it 50x the other
    r2 = inspect(Scalars(2.0), x, "auto", weights={"a": 100.0, "b": 1.0}, batch_size=16, batches=2)
    assert r2.weights == {"a": 100.0, "b": 1.0}
    assert any("'a' pulls 50x harder than 'b'" in a and "applied weights" in a for a in r2.advice)

    # agreeing parts: no conflict sentence, and the "no conflict" one instead
    class Agree(Scalars):
        def forward(self, x):
            s = self.w(x).mean()
            return {"a": s, "b": 3 * s}

    r3 = inspect(Agree(1.0), x, "auto", batch_size=16, batches=2)
    assert not any("conflict on" in a for a in r3.advice)
    assert any("no pair of parts conflicts" in a and "+1.00" not in a for a in r3.advice)


def test_separate_parts_share_nothing():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Linear(2, 1)
            self.q = nn.Linear(2, 1)

        def forward(self, x):
            return {"p": self.p(x), "q": self.q(x)}

    g = torch.Generator().manual_seed(1)
    data = {
        "x": torch.randn(16, 2, generator=g),
        "p": torch.randn(16, 1, generator=g),
        "q": torch.randn(16, 1, generator=g),
    }
    r = inspect(Two(), data, "auto", batch_size=8)
    assert r.shared == [] and r.trunk_norm == {}
    assert any("no module is reached by two parts" in a for a in r.advice)
    assert "Conflict" not in r.table()


def test_balance_reports_the_balancer_weights():
    x = {"x": torch.randn(32, 3, generator=torch.Generator().manual_seed(0))}
    r = inspect(Scalars(4.0), x, "auto", batch_size=16, batches=2, balance="mgda")
    assert r.balance == "mgda"
    # MGDA on two exactly opposite gradients puts its weights where the weighted gradients cancel: w_a |g_a| =
    # w_b |g_b|, so the applied weights are 4:1
    assert r.weights["a"] / r.weights["b"] == pytest.approx(4.0, rel=1e-4)
    assert not any("pulls" in a for a in r.advice)


# -- renders -------------------------------------------------------------------------------------------------
def test_table_fits_100_columns_with_many_parts_and_long_names():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a_rather_long_encoder_name = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
            self.heads = nn.ModuleDict({f"task_number_{i}": nn.Linear(4, 1) for i in range(9)})

        def forward(self, x):
            h = self.a_rather_long_encoder_name(x)
            return {k: m(h) for k, m in self.heads.items()}

    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(16, 3, generator=g)}
    data.update({f"task_number_{i}": torch.randn(16, 1, generator=g) * 10**i for i in range(9)})
    r = inspect(Wide(), data, "auto", batch_size=8, batches=2)
    text = r.table()
    assert max(len(line) for line in text.splitlines()) <= 100
    for i in range(9):
        assert f"task_number_{i}" in text
    assert str(r) == text


def test_plot_draws_the_reach():
    import matplotlib

    matplotlib.use("Agg")
    r = inspect(SeedNet(), seed_data(), SPEC, batch_size=16, batches=2)
    fig = r.plot()
    heat, cosax = fig.axes[0], fig.axes[1]
    hatched = [p for p in heat.patches if p.get_hatch()]
    # unreached cells: y1 on D, E, F and y2 on C, E, F
    assert len(hatched) == 6
    assert [t.get_text() for t in cosax.get_yticklabels()] == ["y1", "y2"]
    labels = [t.get_text() for t in heat.get_xticklabels()]
    assert labels[0] == "A*" and labels[4] == "E [no loss]"


# -- arguments ----------------------------------------------------------------------------------------------
def test_bad_arguments_raise():
    net, data = SeedNet(), seed_data()
    with pytest.raises(ValueError, match="batches"):
        inspect(net, data, SPEC, batches=0)
    with pytest.raises(ValueError, match="weights"):
        inspect(net, data, Objective(SPEC), weights=[1, 2])
    with pytest.raises(TypeError, match="data is a int"):
        inspect(net, 3, SPEC)
    with pytest.raises(ValueError, match="same first dimension"):
        first_batches({"x": torch.zeros(4, 1), "y": torch.zeros(3)}, 2, 2)
    with pytest.raises(ValueError, match="unknown balancer"):
        inspect(net, data, SPEC, balance="nope")


# -- monitor -------------------------------------------------------------------------------------------------
def test_monitor_matches_explicit_gradients():
    net, data = SeedNet(), seed_data(16)
    losses = Objective(SPEC)(net, data)
    figs = monitor(losses)
    shared = list(net.A.parameters()) + list(net.B.parameters())
    g1 = torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses.parts["y1"], shared, retain_graph=True)])
    g2 = torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses.parts["y2"], shared, retain_graph=True)])
    assert figs["gradnorm/y1"] == pytest.approx(float(g1.norm()), rel=1e-5)
    assert figs["gradnorm/y2"] == pytest.approx(float(g2.norm()), rel=1e-5)
    assert figs["cos/y1/y2"] == pytest.approx(float(F.cosine_similarity(g1, g2, dim=0)), rel=1e-5, abs=1e-7)
    assert figs["gradratio/y1/y2"] == pytest.approx(float(g1.norm() / g2.norm()), rel=1e-5)
    losses.total.backward()  # the graph is still there
    assert net.A.weight.grad is not None


def test_figures_from_gramian_hand_case():
    G = torch.tensor([[4.0, -2.0], [-2.0, 1.0]])
    f = figures_from_gramian(G, ["a", "b"])
    assert f == {"gradnorm/a": 2.0, "gradnorm/b": 1.0, "cos/a/b": -1.0, "gradratio/a/b": 2.0}


def test_monitor_samples_every_k_and_averages_per_round():
    net, data = SeedNet(), seed_data(64)
    obj = Objective(SPEC)
    mon = Monitor(every=3)
    got = []
    for b in first_batches(data, 4, 16):
        losses = obj(net, b)
        got.append(mon.observe(losses))
    assert [g is not None for g in got] == [True, False, False, True]
    means = mon.end_round()
    assert means["cos/y1/y2"] == pytest.approx((got[0]["cos/y1/y2"] + got[3]["cos/y1/y2"]) / 2)
    assert mon.end_round() == {}
    state = mon.state_dict()
    m2 = Monitor(every=3)
    m2.load_state_dict(state)
    assert m2.steps == 4


def test_monitor_reuses_a_gramian_balancers_figures():
    from lossport.balance import resolve

    net, data = SeedNet(), seed_data(64)
    obj = Objective(SPEC, balance=resolve("upgrad"))
    mon = Monitor(every=100)
    seen = []
    for b in first_batches(data, 3, 16):
        losses = obj(net, b)
        seen.append(mon.observe(losses, obj.balancer))
        direct = monitor(losses)
        assert seen[-1]["cos/y1/y2"] == pytest.approx(direct["cos/y1/y2"], rel=1e-6)
        assert seen[-1]["gradnorm/y2"] == pytest.approx(direct["gradnorm/y2"], rel=1e-6)
    assert all(s is not None for s in seen)  # every step, although every=100


def test_monitor_without_shared_parameters_raises():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Linear(2, 1)
            self.q = nn.Linear(2, 1)

        def forward(self, x):
            return {"p": self.p(x), "q": self.q(x)}

    data = {"x": torch.randn(4, 2), "p": torch.randn(4, 1), "q": torch.randn(4, 1)}
    with pytest.raises(ValueError, match="share no parameter"):
        Monitor(every=1).observe(Objective("auto")(Two(), data))


def test_monitor_moves_a_sample_past_steps_with_one_part():
    net, data = SeedNet(), seed_data(64)
    data["y2"] = data["y2"].clone()
    data["y2"][:16] = -100  # the first batch has only y1
    obj = Objective(SPEC)
    mon = Monitor(every=10)
    got = [mon.observe(obj(net, b)) for b in first_batches(data, 3, 16)]
    assert [g is not None for g in got] == [False, True, False]
    assert set(mon.end_round()) == {"gradnorm/y1", "gradnorm/y2", "cos/y1/y2", "gradratio/y1/y2"}


# -- group_by ---------------------------------------------------------------------------------------------------
class Nested(nn.Module):
    """Two blocks of two layers and a head: qualified names ``blocks.0.a``, ``blocks.0.b``, ... ``head``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.blocks = nn.ModuleList(nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}) for _ in range(2))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for blk in self.blocks:
            x = torch.tanh(blk["b"](torch.tanh(blk["a"](x))))
        out = self.head(x)
        return {"y1": out[:, :1], "y2": out[:, 1:]}


def test_group_modules_forms():
    from lossport.inspection import group_modules, parametrised_modules

    mods = parametrised_modules(Nested())
    assert [m[0] for m in mods] == ["blocks.0.a", "blocks.0.b", "blocks.1.a", "blocks.1.b", "head"]
    rows, note = group_modules(mods, None)
    assert [r.name for r in rows] == [m[0] for m in mods] and note == ""
    rows, note = group_modules(mods, "auto")  # 5 modules <= MAX_ROWS: one row each
    assert len(rows) == 5 and note == ""
    rows, note = group_modules(mods, 2)
    assert [(r.name, r.members, r.kind) for r in rows] == [
        ("blocks.0", ["blocks.0.a", "blocks.0.b"], "2x Linear"),
        ("blocks.1", ["blocks.1.a", "blocks.1.b"], "2x Linear"),
        ("head", ["head"], "Linear"),
    ]
    assert "5 modules grouped to depth 2 into 3 rows" in note
    rows, _ = group_modules(mods, ["blocks", "blocks.1"])  # the longest prefix wins
    assert [r.name for r in rows] == ["blocks", "blocks.1", "head"]
    assert rows[0].members == ["blocks.0.a", "blocks.0.b"]
    rows, _ = group_modules(mods, lambda n: n.split(".")[-1])
    assert [r.name for r in rows] == ["a", "b", "head"]
    for bad in ("depth", 0, True, 1.5):
        with pytest.raises(ValueError, match="group_by"):
            group_modules(mods, bad)


def test_auto_grouping_keeps_at_most_max_rows():
    from lossport.inspection import MAX_ROWS, group_modules, parametrised_modules

    net = nn.Sequential(*[nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)) for _ in range(30)])  # 60 modules
    rows, note = group_modules(parametrised_modules(net), "auto")
    assert len(rows) == 30 <= MAX_ROWS and all(r.members == [f"{r.name}.0", f"{r.name}.1"] for r in rows)
    assert "group_by='auto'" in note


def test_group_pull_is_the_norm_over_its_modules():
    net = Nested()
    data = {"x": torch.randn(8, 4), "y1": torch.randn(8, 1), "y2": torch.randn(8, 1)}
    spec = {"y1": "mse", "y2": "mse"}
    each = inspect(net, data, spec, batches=1, batch_size=8, group_by=None)
    grouped = inspect(net, data, spec, batches=1, batch_size=8, group_by=2)
    assert [m.name for m in grouped.modules] == ["blocks.0", "blocks.1", "head"]
    assert grouped.module("blocks.0").members == 2 and grouped.module("blocks.0").params == 40
    for p in ("y1", "y2"):
        expected = math.hypot(each.pull[p]["blocks.1.a"], each.pull[p]["blocks.1.b"])
        assert grouped.pull[p]["blocks.1"] == pytest.approx(expected, rel=1e-9)
    assert grouped.trunk_cos[0][1] == pytest.approx(each.trunk_cos[0][1], rel=1e-9)
    assert "grouped to depth 2" in str(grouped)


def test_advice_names_modules_reached_with_a_zero_gradient():
    class Gated(SeedNet):
        def forward(self, x):
            out = super().forward(x)
            out["y1"] = out["y1"] + 0.0 * self.F(torch.tanh(self.A(x)))[:, :1]  # F on y1's graph, gradient 0
            return out

    r = inspect(Gated(), seed_data(), SPEC, batch_size=16)
    assert "F" in r.reach["y1"] and r.pull["y1"]["F"] == 0.0
    assert any(a.startswith("'y1' reaches 'F' but the gradient there is exactly 0") for a in r.advice)
    assert not any("'y2' reach" in a for a in r.advice)


def test_a_deep_net_prints_compact_rows_and_detail_prints_each():
    """More than COMPACT rows: consecutive rows reached by the same parts print as one (pull = norm over all),
    per-module cosines move to detail=True; the report's figures are unchanged."""
    from lossport.report import COMPACT

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.trunk = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(COMPACT + 2)])
            self.y1, self.y2 = nn.Linear(6, 1), nn.Linear(6, 1)

        def forward(self, x):
            h = self.trunk(x)
            return {"y1": self.y1(h), "y2": self.y2(h)}

    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(32, 6, generator=g), "y1": torch.randn(32, 1, generator=g), "y2": torch.randn(32, 1)}
    r = inspect(Deep(), data, {"y1": "mse", "y2": "mse"}, batches=2, batch_size=16)
    assert len(r.modules) == COMPACT + 4
    short, full = r.table(), r.table(detail=True)
    assert "trunk.* (14)" in short and f"({COMPACT + 4} rows shown as 3" in short
    assert "Cosine per shared module: 14 rows" in short and "trunk.13.0" in full and "trunk.13.0" not in short
    merged = math.sqrt(sum(v * v for m, v in r.pull["y1"].items() if m.startswith("trunk.")))
    row = next(line for line in short.splitlines() if "trunk.* (14)" in line)
    assert f"{merged:.3g}" in row


def test_a_balancer_with_extra_batches_takes_the_next_inspected_batches():
    from lossport.balance import MoDo

    bal = MoDo()
    r = inspect(SeedNet(), seed_data(), SPEC, balance=bal, batch_size=16, batches=4)
    assert set(r.parts) == {"y1", "y2"}
    assert set(bal.state_dict()["w"]) == {"y1", "y2"}  # MoDo weighed on the cross matrix, four times
    with pytest.raises(ValueError, match="inspect: SDMGrad uses 3 batches per step; inspect at least batches=3"):
        inspect(SeedNet(), seed_data(), SPEC, balance="sdmgrad", batch_size=16, batches=2)
