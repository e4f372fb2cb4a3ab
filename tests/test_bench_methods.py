"""The per-method benchmark (``benchmarks/methods.py``): every registered method's step trains the net, the
reference steps do what they claim, and the report and the docs table come out of a tiny run."""

import importlib.util
from pathlib import Path

import pytest
import torch

from lossport.balance import available, kind_of

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "methods.py"
_spec = importlib.util.spec_from_file_location("bench_methods", _PATH)
assert _spec is not None and _spec.loader is not None
bm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bm)


def _trunk_weight(m):
    return m.trunk[0].weight.detach().clone()


@pytest.mark.parametrize("name", available())
def test_every_registered_method_steps_the_net_with_finite_weights(name):
    m = bm.Model(4, batch=16)
    before = _trunk_weight(m)
    step = bm.lossport_step(m, name)
    step()
    step()  # the second call too (state after one step: Adam moments, warm starts, FAMO's re-evaluation)
    after = _trunk_weight(m)
    assert bool(torch.isfinite(after).all())
    if name != "pcd":  # PCD may leave the trunk unchanged when the primary part has a zero gradient: not here
        assert not torch.equal(before, after), f"{name}: the trunk did not move"


def test_sum_step_is_one_sgd_step_on_the_sum_of_the_losses():
    m, twin = bm.Model(3, batch=8), bm.Model(3, batch=8)
    bm.sum_step(m)()
    _, ls = twin.forward()
    torch.stack(ls).sum().backward()
    with torch.no_grad():
        expected = twin.trunk[0].weight - bm.LR * twin.trunk[0].weight.grad
    torch.testing.assert_close(m.trunk[0].weight, expected)


def test_torchjd_upgrad_reference_takes_lossport_upgrads_step_up_to_the_factor_T():
    """The same method on both sides: lossport's UPGrad weights sum to T where TorchJD's are its paper's (factor T,
    docs/balancing.md), so with SGD lossport's update of every parameter is T times TorchJD's."""
    refs = bm.torchjd_references()
    assert "upgrad" in refs and "famo" in refs and "config" in refs
    T = 3
    m, twin, start = bm.Model(T, batch=8), bm.Model(T, batch=8), bm.Model(T, batch=8)
    bm.lossport_step(m, "upgrad")()
    refs["upgrad"](twin)()
    for mine, theirs, w0 in ((m.trunk[0], twin.trunk[0], start.trunk[0]), (m.heads[1], twin.heads[1], start.heads[1])):
        d_mine, d_theirs = (mine.weight - w0.weight).detach(), (theirs.weight - w0.weight).detach()
        assert float(d_theirs.norm()) > 0
        assert float((d_mine - T * d_theirs).norm()) < 1e-3 * float(d_mine.norm())


def test_libmtl_loader_stands_in_empty_packages(tmp_path, monkeypatch):
    """A LibMTL checkout's weighting module imports from there without running ``LibMTL/__init__.py``."""
    pkg = tmp_path / "LibMTL"
    (pkg / "weighting").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the trainer needs things this benchmark does not')\n")
    (pkg / "weighting" / "__init__.py").write_text("raise ImportError('imports every weighting')\n")
    (pkg / "weighting" / "abstract_weighting.py").write_text(
        "import torch.nn as nn\nclass AbsWeighting(nn.Module):\n    def init_param(self):\n        pass\n"
    )
    (pkg / "weighting" / "EW.py").write_text(
        "import torch\nfrom LibMTL.weighting.abstract_weighting import AbsWeighting\n"
        "class EW(AbsWeighting):\n"
        "    def backward(self, losses, **kwargs):\n"
        "        losses.sum().backward()\n"
    )
    for k in ("LibMTL", "LibMTL.weighting", "LibMTL.weighting.EW", "LibMTL.weighting.abstract_weighting"):
        monkeypatch.delitem(__import__("sys").modules, k, raising=False)
    refs = bm.libmtl_references(str(tmp_path))
    assert set(refs) == {"ew"}  # the other classes of the mapping are absent from this checkout: reported, left out
    m, twin = bm.Model(3, batch=8), bm.Model(3, batch=8)
    refs["ew"](m)()
    bm.sum_step(twin)()
    torch.testing.assert_close(m.trunk[0].weight, twin.trunk[0].weight)


def test_every_method_has_a_needs_line():
    for name in available():
        need, state = bm.needs(name)
        assert need and state, name
    assert bm.needs("moco")[1] == "T x P tracked gradients"
    assert kind_of("moco") == "surgery"


def test_slower_lists_only_methods_slower_than_their_reference():
    res = {8: {"sum": bm.Timed(1.0), "a": bm.Timed(3.0), "a @torchjd": bm.Timed(2.0), "b": bm.Timed(1.0)}}
    res[8]["b @torchjd"] = bm.Timed(2.0)
    assert bm.slower(res, ["a", "b"], ["torchjd"]) == ["a vs torchjd at T = 8: 1.50 x (3.0 vs 2.0 ms)"]


def test_tiny_run_prints_the_table_and_writes_the_markdown(tmp_path, capsys):
    out = tmp_path / "table.md"
    bm.main(["--tasks", "3", "--reps", "1", "--methods", "ew,upgrad,famo", "--markdown", str(out)])
    text = capsys.readouterr().out
    assert "T = 3: median ms per step" in text and "upgrad" in text and "Slower than the reference" in text
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| method | kind |") and "lossport / torchjd" in lines[0]
    assert len(lines) == 2 + 1 + 3  # header, rule, plain sum, three methods
    row = next(line for line in lines if line.startswith("| `upgrad`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "gramian" and "x)" in cells[4] and float(cells[-1]) > 0


def test_evaluate_on_the_models_own_batch_gives_its_losses():
    m = bm.Model(3, batch=8)
    mine, theirs = bm.evaluate(m, m.x, m.y), m.losses()
    for k in theirs.parts:
        torch.testing.assert_close(mine.parts[k], theirs.parts[k])


def test_a_method_that_needs_nothing_more_gets_no_context():
    m = bm.Model(3, batch=8)
    bal = bm.B.resolve("upgrad")
    assert bm.context(bal, m, torch.optim.SGD(m.params, lr=0.1)) is None


def test_a_method_that_declares_extra_and_meta_batches_gets_them_on_other_inputs():
    base = pytest.importorskip("lossport.balance.base")
    if not hasattr(base, "Context"):
        pytest.skip("this lossport has no balancer Context yet (issue 15, item 1)")

    class Needy:
        batches, meta = 3, True

    m = bm.Model(3, batch=8)
    opt = torch.optim.SGD(m.params, lr=0.1)
    ctx = bm.context(Needy(), m, opt)
    assert len(ctx.extra) == 2 and ctx.optimizer is opt and ctx.train is not None and ctx.meta is not None
    own = float(m.losses().parts["task0"].detach())
    values = [float(f().parts["task0"].detach()) for f in (*ctx.extra, ctx.meta)]
    assert all(v == v and v != own for v in values) and len(set(values)) == 3


def test_torchjd_three_batch_reference_is_the_cross_matrix_recipe():
    """``_cross``: weights of ``A = J_1 J_2^T`` from two other batches, applied to the main batch's losses."""
    from torchjd.aggregation import MoDoWeighting

    m, twin = bm.Model(3, batch=8), bm.Model(3, batch=8)
    bm._cross(lambda: MoDoWeighting(gamma=0.1, rho=0.1))(m)()
    shared = list(twin.trunk.parameters())

    def J(x, y):
        parts = list(bm.evaluate(twin, x, y).parts.values())
        return torch.stack(
            [torch.cat([g.flatten() for g in torch.autograd.grad(p, shared, retain_graph=True)]) for p in parts]
        )

    (x1, y1), (x2, y2) = bm.other_batches(twin, 2)
    w = MoDoWeighting(gamma=0.1, rho=0.1)(J(x1, y1) @ J(x2, y2).T)
    torch.stack(twin.forward()[1]).backward(w)
    with torch.no_grad():
        expected = twin.trunk[0].weight - bm.LR * twin.trunk[0].weight.grad
    torch.testing.assert_close(m.trunk[0].weight, expected, rtol=1e-5, atol=1e-7)
    assert float((m.trunk[0].weight - bm.Model(3, batch=8).trunk[0].weight).abs().max()) > 0
