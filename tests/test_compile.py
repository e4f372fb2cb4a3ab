"""Gradient-level balancers, monitor= and inspect on torch.compile'd nets give the eager results
(lossport.graph, lossport.gramian, lossport.inspection). Compilation is slow on few cores: one tiny net, compiled
once per backend and reused (its parameters are reset between runs)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lossport
from lossport.balance import resolve
from lossport.graph import has_compiled_node

pytestmark = pytest.mark.compile


@pytest.fixture(autouse=True)
def fresh_compilation():
    """No compile cache and no deterministic mode left by other tests: a cached inductor artifact compiled under
    other settings (seen with torch.use_deterministic_algorithms(True), which Lightning's deterministic=True sets
    for the whole process) was served and overwrote saved activations (docs/integrations.md)."""
    import torch._inductor.config as inductor_config

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    with inductor_config.patch(force_disable_caches=True):
        yield
    torch.use_deterministic_algorithms(deterministic)


W = 64  # wide enough for inductor to donate buffers (16-32-32 does not)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, W), nn.GELU(), nn.LayerNorm(W), nn.Linear(W, W), nn.Tanh())
        self.a = nn.Linear(W, 1)
        self.b = nn.Linear(W, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h)}


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        x = torch.randn(32, 16, generator=g)
        out.append({"x": x, "a": x[:, :1] + 0.1 * torch.randn(32, 1, generator=g), "b": 3 * x[:, 1:2].sin()})
    return out


torch.manual_seed(0)
BASE = Net()
STATE = copy.deepcopy(BASE.state_dict())


def train(balance: str, mode: str, backend: str | None) -> tuple[torch.Tensor, dict[str, float]]:
    """3 SGD steps from the same start, eager (``backend=None``) or compiled; the parameters after them and the
    last applied weights. The net is compiled after the balancer is built: torch._dynamo does not see forward
    hooks added to a net it has already compiled (a features= module's hook)."""
    net = Net()
    net.load_state_dict(STATE)
    kw: dict = {"gramian": "features", "features": net.trunk} if mode == "features" else {}
    if balance == "graddrop" and mode == "params":
        # GradDrop's random draws follow the order of the shared parameters, which a compiled graph lists in
        # another order than the eager graph: the same parameters given explicitly give the same draws
        kw["params"] = list(net.trunk.parameters())
    objective = lossport.Objective({"a": "mse", "b": "mse"}, balance=resolve(balance, **kw))
    model: nn.Module = net
    if backend is not None:
        torch._dynamo.reset()
        model = torch.compile(net, backend=backend)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for batch in batches():
        losses = objective(model, batch)
        assert has_compiled_node(list(losses.parts.values())) == (backend is not None)
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        objective.step(model, batch)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return flat, {k: float(w) for k, w in losses.weights.items()}


GRADIENT_LEVEL = ["upgrad", "mgda", "pcgrad", "nash_mtl", "cagrad", "graddrop", "db_mtl"]


@pytest.mark.parametrize("mode", ["params", "features"])
def test_gradient_balancers_match_eager(mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "batched backward failed" fallback warning either
        for balance in GRADIENT_LEVEL:
            eager, w_eager = train(balance, mode, None)
            comp, w_comp = train(balance, mode, "aot_eager")
            torch.testing.assert_close(comp, eager, rtol=0, atol=1e-5, msg=f"{balance} ({mode})")
            assert w_comp == pytest.approx(w_eager, abs=1e-5), balance


def test_inductor_with_donated_buffers() -> None:
    """The default backend donates saved buffers to the backward at this width; the graph compiled inside the
    objective's forward does not, so the retained passes run and give the eager result."""
    for balance, mode in [("upgrad", "params")]:  # features mode with inductor: the docs recipe test
        eager, _ = train(balance, mode, None)
        comp, _ = train(balance, mode, "inductor")
        torch.testing.assert_close(comp, eager, rtol=0, atol=1e-5, msg=balance)


class LossNet(Net):
    """Returns its two losses (scalars): compiled, its backward donates the saved activations."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"a": self.a(h).pow(2).mean(), "b": self.b(h).sin().mean()}


def test_graph_compiled_outside_the_objective_with_donated_buffers_is_a_clear_error() -> None:
    torch._dynamo.reset()
    net = LossNet()
    model = torch.compile(net)
    x = batches()[0]["x"]
    out = model(x)  # compiled here, outside the objective: with donated buffers
    (out["a"] + out["b"]).backward()
    objective = lossport.Objective(["a", "b"], balance="upgrad")
    with pytest.raises(RuntimeError, match=r"compiled with donated buffers.*objective"):
        objective(model, {"x": x})  # the same graph is reused: one backward pass only


def test_graph_compiled_inside_the_objective_allows_the_retained_passes() -> None:
    torch._dynamo.reset()
    net, eager = LossNet(), LossNet()
    eager.load_state_dict(net.state_dict())
    model = torch.compile(net)
    x = batches()[0]["x"]
    weights = []
    for m in (eager, model):
        objective = lossport.Objective(["a", "b"], balance="mgda")
        weights.append({k: float(w) for k, w in objective(m, {"x": x}).weights.items()})
    assert weights[1] == pytest.approx(weights[0], abs=1e-6)


class FeatureNet(Net):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h), "h": h}


def test_representation_output_of_a_whole_compiled_net_is_an_error() -> None:
    """Returned as an output, the representation is a sibling of the heads' outputs in the compiled node: no part
    reads it, its Gramian would be zero. An error says so and names the ways out."""
    torch._dynamo.reset()
    net = FeatureNet()
    balancer = resolve("mgda", gramian="features", features="h")
    objective = lossport.Objective({"a": "mse", "b": "mse"}, balance=balancer)
    with pytest.raises(ValueError, match=r"no loss part is computed from the representation.*module"):
        objective(torch.compile(net, backend="aot_eager"), batches()[0])
    weights = []
    for split in (False, True):
        model = copy.deepcopy(net)
        if split:  # a graph per part of the net: the heads read the trunk's output
            model.trunk = torch.compile(model.trunk, backend="aot_eager")
        balancer = resolve("mgda", gramian="features", features="h")
        losses = lossport.Objective({"a": "mse", "b": "mse"}, balance=balancer)(model, batches()[0])
        weights.append({k: float(w) for k, w in losses.weights.items()})
    assert weights[1] == pytest.approx(weights[0], abs=1e-6)


def test_monitor_and_inspect_match_eager() -> None:
    torch._dynamo.reset()
    model = torch.compile(copy.deepcopy(BASE), backend="aot_eager")
    data = {k: torch.cat([b[k] for b in batches()]) for k in ("x", "a", "b")}
    eager = lossport.inspect(BASE, data, {"a": "mse", "b": "mse"}, batches=2, batch_size=32)
    comp = lossport.inspect(model, data, {"a": "mse", "b": "mse"}, batches=2, batch_size=32)
    assert comp.reach == eager.reach
    assert comp.reach["a"] == ["trunk.0", "trunk.2", "trunk.3", "a"]
    torch.testing.assert_close(torch.tensor(comp.trunk_cos), torch.tensor(eager.trunk_cos), rtol=0, atol=1e-6)

    mon_e, mon_c = lossport.inspection.Monitor(every=1), lossport.inspection.Monitor(every=1)
    objective = lossport.Objective({"a": "mse", "b": "mse"})
    for batch in batches()[:2]:
        fe = mon_e.observe(objective(BASE, batch))
        fc = mon_c.observe(objective(model, batch))
        assert fc == pytest.approx(fe, rel=1e-5)
    assert len(mon_c.params) == len(mon_e.params) == 6  # the trunk's parameters, not the heads'


def run_recipe(section: str) -> dict:
    from doc_blocks import python_block

    scope: dict = {"__name__": "recipe"}
    exec(compile(python_block("integrations.md", section), "integrations.md", "exec"), scope)
    return scope


def test_docs_plain_loop_recipe_runs() -> None:
    scope = run_recipe("A plain loop")
    assert set(scope["checkpoint"]) == {"net", "optimizer", "balancer"}
    assert set(scope["losses"].parts) == {"a", "b"}


def test_docs_compile_recipe_runs() -> None:
    torch._dynamo.reset()
    scope = run_recipe("torch.compile")
    assert has_compiled_node(list(scope["losses"].parts.values()))
    assert scope["report"].reach == {"a": ["trunk.0", "trunk.2", "a"], "b": ["trunk.0", "trunk.2", "b"]}
