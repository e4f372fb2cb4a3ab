"""lossport.train / lossport.evaluate: data forms, history keys, validation and best net, early stopping,
non-finite losses, balancers, precision, checkpoints and the SIGKILL/resume identity."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lossport import CustomLoss, NonFiniteLossError, Objective
from lossport.balance import Balancer
from lossport.callbacks import Callback, TrainState
from lossport.metrics import Callable, higher_is_better
from lossport.training import evaluate, load_checkpoint, train

torch.set_num_threads(1)


class TwoHead(nn.Module):
    """x (N, 4) -> {"a": regression (N, 1), "b": 3-class logits}."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.a = nn.Linear(8, 1)
        self.b = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h)}


LOSS = {"a": "mse", "b": "ce"}


def make_data(n: int = 40, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return {"x": x, "a": x[:, :1] * 2 + 1, "b": (x[:, 1] > 0).long() + (x[:, 2] > 1).long()}


def params(net: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------- data forms
class DictDataset(Dataset):
    def __init__(self, d: dict[str, Tensor]) -> None:
        self.d = d

    def __len__(self) -> int:
        return len(self.d["x"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.d.items()}


def test_data_forms_all_train_and_report_every_part() -> None:
    d = make_data()
    forms = {
        "dict": d,
        "numpy": {k: v.numpy().astype(np.float64) if v.is_floating_point() else v.numpy() for k, v in d.items()},
        "dataset": DictDataset(d),
        "list of dicts": [{k: v[i] for k, v in d.items()} for i in range(len(d["x"]))],
        "loader": DataLoader(DictDataset(d), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)),
        "pair": (d["x"], {"a": d["a"], "b": d["b"]}),
    }
    for name, data in forms.items():
        res = train(TwoHead(), data, LOSS, epochs=2, batch_size=8, progress=False, seed=0)
        h = res.history
        assert len(h) == 2, name
        for k in ("loss", "a", "b", "weight/a", "weight/b", "lr", "seconds"):
            assert all(math.isfinite(v) for v in h[k]), (name, k)
        assert len(h.batches) == 10, name
        assert res.examples_per_second > 0


def test_pair_with_tuple_output_and_single_output() -> None:
    class Tup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(4, 1)
            self.c = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.l(x), self.c(x)

    d = make_data()
    res = train(Tup(), (d["x"], (d["a"], d["b"])), ["mse", "ce"], epochs=1, batch_size=10, progress=False)
    assert {"out0", "out1"} <= set(res.history.keys())
    res = train(nn.Linear(4, 1), (d["x"].numpy(), d["a"].numpy()), "mse", epochs=1, progress=False)
    assert "loss" in res.history and len(res.history) == 1


def test_same_seed_same_weights_for_tensor_and_numpy_dicts() -> None:
    d = make_data()
    nd = {k: v.numpy() for k, v in d.items()}
    n1, n2 = TwoHead(), TwoHead()
    train(n1, d, LOSS, epochs=2, batch_size=8, progress=False, seed=3)
    train(n2, nd, LOSS, epochs=2, batch_size=8, progress=False, seed=3)
    assert same(params(n1), params(n2))


def test_bad_data_and_arguments_raise_clear_errors() -> None:
    d = make_data()
    with pytest.raises(ValueError, match="same first dimension"):
        train(TwoHead(), {**d, "a": d["a"][:5]}, LOSS, progress=False)
    with pytest.raises(TypeError, match="dict of tensors"):
        train(TwoHead(), 3.0, LOSS, progress=False)
    with pytest.raises(ValueError, match="validation"):
        loader = DataLoader(DictDataset(d), batch_size=8)
        train(TwoHead(), loader, LOSS, validation=0.2, progress=False)
    with pytest.raises(ValueError, match="fraction"):
        train(TwoHead(), d, LOSS, validation=1.5, progress=False)
    with pytest.raises(ValueError, match="precision='fp8'"):
        train(TwoHead(), d, LOSS, precision="fp8", device="cpu", progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        train(TwoHead(), d, LOSS, resume=True, progress=False)
    with pytest.raises(ValueError, match="on_nonfinite"):
        train(TwoHead(), d, LOSS, on_nonfinite="ignore", progress=False)


# ------------------------------------------------------------------------------------------- history keys
def test_history_keys_validation_metrics_and_batches() -> None:
    d = make_data(60)
    res = train(
        TwoHead(),
        d,
        LOSS,
        epochs=2,
        batch_size=10,
        validation=0.25,
        progress=False,
        metrics={"b": ["accuracy", "f1"], "a": ["mae", "rmse"]},
    )
    keys = set(res.history.keys())
    expected = {
        "round",
        "loss",
        "a",
        "b",
        "weight/a",
        "weight/b",
        "b/accuracy",
        "b/f1",
        "a/mae",
        "a/rmse",
        "val_loss",
        "val_a",
        "val_b",
        "val_b/accuracy",
        "val_b/f1",
        "val_a/mae",
        "val_a/rmse",
        "lr",
        "seconds",
    }
    assert expected <= keys
    # validation = the last 25 % (15 examples) -> 45 training examples -> 5 batches of 10 per round
    assert len(res.history.batches) == 10
    assert set(res.history.batches[0]) == {"round", "batch", "loss", "a", "b"}
    # the validation values are those of evaluate() on the held-out examples with the final net
    val = {k: v[45:] for k, v in d.items()}
    ev = evaluate(res.final_net, val, LOSS, metrics={"b": ["accuracy", "f1"], "a": ["mae", "rmse"]})
    last = res.history.last
    for k, v in ev.items():
        assert last[f"val_{k}"] == pytest.approx(v, rel=1e-6), k
    assert last["val_loss"] == pytest.approx(last["val_a"] + last["val_b"], rel=1e-6)


def test_round_part_is_mean_over_labelled_examples_and_missing_part_is_absent() -> None:
    d = make_data(30)
    a = d["a"].clone()
    a[::3] = float("nan")  # a third unlabelled: batches hold different numbers of labelled examples
    data = {**d, "a": a}
    net = TwoHead()
    res = train(
        net,
        data,
        LOSS,
        epochs=1,
        batch_size=7,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        progress=False,
    )
    ev = evaluate(net, data, LOSS, batch_size=30)
    assert res.history.last["a"] == pytest.approx(ev["a"], rel=1e-6)
    assert res.history.last["b"] == pytest.approx(ev["b"], rel=1e-6)
    # a part with no label in a whole round is absent (NaN), never 0
    data2 = {**d, "a": torch.full_like(d["a"], float("nan"))}
    res2 = train(TwoHead(), data2, LOSS, epochs=1, batch_size=7, progress=False)
    assert "a" not in res2.history.rounds[0]
    assert math.isnan(res2.history.last.get("a", math.nan))
    assert "a" not in evaluate(TwoHead(), data2, LOSS)


def test_evaluate_per_example_and_hand_checked_values() -> None:
    net = nn.Linear(1, 1)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(0.0)
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [float("nan")], [2.0], [5.0]])  # errors 1, -, 0, 2 -> mse (1 + 0 + 4) / 3
    scores, ex = evaluate(net, (x, y), "mse", batch_size=3, per_example=True, metrics=["mae"])
    assert scores["loss"] == pytest.approx(5 / 3)
    assert scores["out"] == pytest.approx(5 / 3)
    assert scores["out/mae"] == pytest.approx(1.0)
    assert torch.allclose(ex["out"], torch.tensor([1.0, float("nan"), 0.0, 4.0]), equal_nan=True)
    assert net.training  # evaluate restores the mode


# --------------------------------------------------------------------------------- best net, early stop
class Scalar(nn.Module):
    """y = w: training pulls w from -1 towards the training target 1; the validation target is 0, so the
    validation loss w^2 falls, then rises."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(-1.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.w.expand(x.shape[0], 1)


def scalar_data(target: float, n: int = 4) -> tuple[Tensor, Tensor]:
    return torch.zeros(n, 1), torch.full((n, 1), target)


def sgd(lr: float):
    return lambda p: torch.optim.SGD(p, lr=lr)


class Recorder(Callback):
    def __init__(self) -> None:
        self.w: list[float] = []

    def on_round_end(self, state: TrainState) -> None:
        self.w.append(float(state.net.w.detach()))


def test_best_net_is_the_best_validation_round() -> None:
    rec = Recorder()
    res = train(
        Scalar(),
        scalar_data(1.0),
        "mse",
        epochs=8,
        batch_size=4,
        optimizer=sgd(0.15),
        validation=scalar_data(0.0),
        callbacks=[rec],
        progress=False,
    )
    val = res.history["val_loss"]
    best = int(np.argmin(val)) + 1
    assert 1 < best < 8  # falls, then rises
    assert res.best_round == best and res.best_key == "val_loss"
    assert float(res.net.w.detach()) == rec.w[best - 1]
    assert float(res.final_net.w.detach()) == rec.w[-1] and res.net is not res.final_net
    # without validation the result net is the final net
    res2 = train(Scalar(), scalar_data(1.0), "mse", epochs=2, optimizer=sgd(0.1), progress=False)
    assert res2.net is res2.final_net and res2.best_round is None


def closeness(out: Tensor, y: Tensor) -> float:
    return -float((out - y).abs().mean())


def test_early_stopping_minimises_losses_and_maximises_scores() -> None:
    common = {"epochs": 30, "batch_size": 4, "optimizer": sgd(0.15), "validation": scalar_data(0.0), "progress": False}
    res = train(Scalar(), scalar_data(1.0), "mse", stop_on="val_loss", patience=2, **common)
    val = res.history["val_loss"]
    best = int(np.argmin(val)) + 1
    assert res.stopped_because.startswith("early stopping: val_loss")
    assert len(val) == best + 2
    # a score that is higher when better, stopped the same way without being told the direction
    res2 = train(
        Scalar(),
        scalar_data(1.0),
        "mse",
        stop_on="val_out/closeness",
        patience=2,
        metrics=[Callable(closeness, higher_is_better=True)],
        **common,
    )
    assert len(res2.history) == best + 2 and res2.best_round == best
    # forcing the wrong direction changes the outcome: "min" on the score stops as soon as it improves
    res3 = train(
        Scalar(),
        scalar_data(1.0),
        "mse",
        stop_on="val_out/closeness",
        patience=2,
        mode="min",
        metrics=[Callable(closeness, higher_is_better=True)],
        **common,
    )
    assert len(res3.history) == 3
    assert higher_is_better("val_digit/accuracy", None) and higher_is_better("digit/f1", None)
    assert not higher_is_better("val_digit", None) and not higher_is_better("size/mae", None)
    assert not higher_is_better("val_loss", None)
    with pytest.raises(ValueError, match="not a history key"):
        train(Scalar(), scalar_data(1.0), "mse", stop_on="val_nope", patience=1, **common)


def test_callbacks_can_stop_and_function_callbacks() -> None:
    class StopAtBatch(Callback):
        def on_batch_end(self, state: TrainState) -> None:
            if state.round == 2 and state.batch == 1:
                state.stop("enough")

    d = make_data()
    res = train(TwoHead(), d, LOSS, epochs=5, batch_size=8, callbacks=[StopAtBatch()], progress=False)
    assert res.stopped_because == "enough" and len(res.history) == 2
    assert len(res.history.batches) == 5 + 2
    res = train(TwoHead(), d, LOSS, epochs=5, callbacks=[lambda s: "stop" if s.round == 3 else None], progress=False)
    assert len(res.history) == 3 and "stop" in res.stopped_because


# ---------------------------------------------------------------------------------------- non-finite
class Snap(Callback):
    def __init__(self) -> None:
        self.last: list[Tensor] = []

    def on_batch_end(self, state: TrainState) -> None:
        self.last = params(state.net)


def test_nonfinite_raises_naming_part_round_batch_and_keeps_weights(tmp_path: Path) -> None:
    d = make_data(40)
    x = d["x"].clone()
    poisoned = {**d, "x": x}
    snap = Snap()
    net = TwoHead()

    class Poison(Callback):
        def on_round_begin(self, state: TrainState) -> None:
            if state.round == 2:
                x[19, 0] = float("inf")  # example 19 = batch 2 (0-based) of round 2 with shuffle=False

    with pytest.raises(NonFiniteLossError, match=r"part '(a|b)' .* round 2, batch 2"):
        train(
            net,
            poisoned,
            LOSS,
            epochs=3,
            batch_size=8,
            shuffle=False,
            callbacks=[snap, Poison()],
            checkpoint=tmp_path,
            progress=False,
        )
    assert same(params(net), snap.last)  # the weights after the last good batch
    ck = load_checkpoint(tmp_path)
    assert ck["round"] == 1  # the last complete round's checkpoint is intact
    assert all(torch.isfinite(v).all() for v in ck["net"].values())


def test_nonfinite_skip_counts_batches() -> None:
    d = make_data(40)
    d["x"][3, 0] = float("nan")
    d["x"][35, 1] = float("inf")
    res = train(TwoHead(), d, LOSS, epochs=2, batch_size=8, on_nonfinite="skip", progress=False)
    assert res.history["skipped"] == [2.0, 2.0]
    assert all(math.isfinite(v) for v in res.history["loss"])
    assert len(res.history.batches) == 2 * 3


# ------------------------------------------------------------------------------------------ balancers
class Recording(Balancer):
    """A balancer with a learned parameter, recording the protocol calls it gets."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.zeros(()))
        self.steps = 0
        self.rounds: list[dict[str, float]] = []

    def balance(self, losses):  # type: ignore[no-untyped-def]
        self.info = {"calls": float(self.steps)}
        return {k: (2.0 if k == "a" else 0.5) for k in losses.parts}

    def parameters(self) -> list[nn.Parameter]:
        return [self.s]

    def step(self, recompute=None) -> None:  # type: ignore[no-untyped-def]
        self.steps += 1

    def end_round(self, round_means) -> None:  # type: ignore[no-untyped-def]
        self.rounds.append(dict(round_means))

    def state_dict(self):  # type: ignore[no-untyped-def]
        return {"steps": self.steps}

    def load_state_dict(self, state) -> None:  # type: ignore[no-untyped-def]
        self.steps = int(state["steps"])


def test_balancer_protocol_weights_and_info_in_history() -> None:
    bal = Recording()
    d = make_data(40)
    res = train(
        TwoHead(),
        d,
        LOSS,
        weights={"a": 3.0, "b": 1.0},
        balance=bal,
        epochs=2,
        batch_size=8,
        accumulate=2,
        progress=False,
    )
    assert bal.steps == 2 * 3  # 5 batches, 2 per step -> 3 optimizer steps per round (the last has one batch)
    assert [set(r) for r in bal.rounds] == [{"a", "b"}, {"a", "b"}]
    assert bal.rounds[0]["a"] == pytest.approx(res.history["a"][0])
    assert res.history.last["weight/a"] == pytest.approx(6.0) and res.history.last["weight/b"] == pytest.approx(0.5)
    assert "balancer/calls" in res.history.last
    b = res.history.batches[0]
    assert b["loss"] == pytest.approx(6.0 * b["a"] + 0.5 * b["b"], rel=1e-5)
    with pytest.raises(ValueError, match="balancer"):
        net = TwoHead()
        train(net, d, LOSS, balance=bal, optimizer=torch.optim.Adam([*net.parameters(), bal.s]), progress=False)


def test_named_balancer_trains() -> None:
    res = train(TwoHead(), make_data(), LOSS, balance="dwa", epochs=3, batch_size=8, progress=False)
    assert all(math.isfinite(v) for v in res.history["loss"])


# ------------------------------------------------------------------------- optimisation options
def test_accumulation_equals_larger_batch() -> None:
    d = make_data(32)
    n1, n2 = TwoHead(), TwoHead()
    train(n1, d, LOSS, epochs=2, batch_size=4, accumulate=2, shuffle=False, optimizer=sgd(0.1), progress=False)
    train(n2, d, LOSS, epochs=2, batch_size=8, shuffle=False, optimizer=sgd(0.1), progress=False)
    for p, q in zip(n1.parameters(), n2.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_grad_clip_scheduler_and_bf16() -> None:
    d = make_data(32)
    net = TwoHead()
    before = torch.cat([p.detach().flatten() for p in net.parameters()])
    train(net, d, LOSS, epochs=1, batch_size=32, optimizer=sgd(1.0), grad_clip=1e-3, progress=False)
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert float((after - before).norm()) <= 1e-3 + 1e-7  # one step of lr 1 with a clipped gradient
    res = train(
        TwoHead(),
        d,
        LOSS,
        epochs=3,
        optimizer=sgd(0.1),
        progress=False,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
    )
    assert res.history["lr"] == pytest.approx([0.1, 0.05, 0.025])
    res = train(TwoHead(), d, LOSS, epochs=2, batch_size=8, precision="bf16", device="cpu", progress=False)
    assert all(math.isfinite(v) for v in res.history["loss"])


def test_float16_mixed_precision_on_cpu_matches_float32() -> None:
    """'16-mixed' runs on CPU (float16 autocast and a GradScaler, whose first steps may be skipped while it
    calibrates); the balancer sees unscaled parts, so its weights match the float32 run's to float16 accuracy
    (a scaled loss would multiply UW's gradient on its log-variances by the scale, 65536)."""
    d = make_data(32)
    rows = []
    for prec in ("32", "16-mixed"):
        res = train(TwoHead(seed=3), d, LOSS, epochs=2, batch_size=8, balance="uw", optimizer=sgd(0.05),
                    precision=prec, device="cpu", progress=False, seed=0)  # fmt: skip
        rows.append(res.history.rounds[-1])
    for k in ("weight/a", "weight/b"):
        assert rows[1][k] == pytest.approx(rows[0][k], rel=2e-2)
    assert rows[1]["a"] == pytest.approx(rows[0]["a"], rel=0.05) and math.isfinite(rows[1]["loss"])


# --------------------------------------------------------------------------------- progress and logs
def test_progress_lines_and_silence(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = make_data()
    train(TwoHead(), d, LOSS, epochs=2, progress="lines")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith("round 1/2") and " a: " in out[0] and " b: " in out[0]
    train(TwoHead(), d, LOSS, epochs=2, progress=False, log=f"csv:{tmp_path / 'h.csv'}")
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert lines[0].startswith("round,loss,a,b") and len(lines) == 3


def test_tensorboard_needs_the_extra() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ImportError, match=r"lossport\[tensorboard\]"):
        train(TwoHead(), make_data(), LOSS, epochs=1, log="tensorboard:runs/x", progress=False)


# ----------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_resume_in_process_and_refusal_to_overwrite(tmp_path: Path) -> None:
    d = make_data()
    full = TwoHead()
    r_full = train(full, d, LOSS, epochs=4, batch_size=8, seed=1, progress=False)
    part = TwoHead()
    train(part, d, LOSS, epochs=2, batch_size=8, seed=1, checkpoint=tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "history.csv").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(FileExistsError, match="resume=True"):
        train(TwoHead(), d, LOSS, epochs=4, batch_size=8, checkpoint=tmp_path, progress=False)
    resumed = TwoHead(seed=5)  # different initial weights: all state comes from the checkpoint
    r = train(resumed, d, LOSS, epochs=4, batch_size=8, seed=1, checkpoint=tmp_path, resume=True, progress=False)
    assert same(params(full), params(resumed))
    assert r.history["loss"] == r_full.history["loss"]


@pytest.mark.parametrize(
    "name",
    [
        "uw",
        "famo",
        "gradnorm",
        "rlw",
        "pcgrad",
        "nash_mtl",
        "fairgrad",
        "graddrop",
        "db_mtl",
        "excess_mtl",
        "pcd",
        "cr_mogm",
        "sdmgrad",
        "modo",
        "moco",
        "go4align",
        "ldc_mtl",
        "ntkmtl",
        "ntkmtl_sr",
    ],
)
def test_resume_restores_balancer_state_and_randomness(tmp_path: Path, name: str) -> None:
    """Balancers with learned parameters and their own optimizer (uw, famo, gradnorm), random weights or
    random orders (rlw, pcgrad) and warm-started solvers (nash_mtl, fairgrad): 2 rounds + resume for 2 more gives the
    weights and history of 4 rounds in one go, bit for bit."""
    d = make_data(32)
    kw = {"balance": name, "batch_size": 8, "seed": 3, "progress": False}
    full = TwoHead()
    r_full = train(full, d, LOSS, epochs=4, **kw)
    train(TwoHead(), d, LOSS, epochs=2, checkpoint=tmp_path, **kw)
    resumed = TwoHead(seed=9)
    r = train(resumed, d, LOSS, epochs=4, checkpoint=tmp_path, resume=True, **kw)
    assert same(params(full), params(resumed))
    assert r.history["loss"] == r_full.history["loss"]
    assert [k for k in r.history if k.startswith("weight/")] == ["weight/a", "weight/b"]
    assert r.history["weight/a"] == r_full.history["weight/a"]


SCRIPT = """
import sys, time
from pathlib import Path
import torch
from torch import nn
from lossport.callbacks import Callback
from lossport.training import train

torch.set_num_threads(1)
ckpt, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
g = torch.Generator().manual_seed(0)
x = torch.randn(96, 6, generator=g)
data = {"x": x, "a": x[:, :2].sum(1, keepdim=True), "b": (x[:, 2] > 0).long()}
torch.manual_seed(0)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3))
        self.a = nn.Linear(16, 1)
        self.b = nn.Linear(16, 2)

    def forward(self, x):
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h)}

class Hang(Callback):
    def on_batch_end(self, state):
        if mode == "kill" and state.round == 3 and state.batch == 2:
            Path(out + ".hanging").write_text("1")
            time.sleep(300)

net = Net()
res = train(net, data, {"a": "mse", "b": "ce"}, balance="dwa", epochs=5, batch_size=16, seed=7,
            progress=False, checkpoint=ckpt, resume=(mode == "resume"), callbacks=[Hang()])
torch.save({"net": net.state_dict(), "loss": res.history["loss"]}, out)
"""


def test_sigkill_mid_round_then_resume_is_bit_identical(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    py = sys.executable
    full = subprocess.Popen([py, str(script), str(tmp_path / "ck_full"), str(tmp_path / "full.pt"), "full"], env=env)
    killed = subprocess.Popen([py, str(script), str(tmp_path / "ck"), str(tmp_path / "killed.pt"), "kill"], env=env)
    hanging = tmp_path / "killed.pt.hanging"
    deadline = time.monotonic() + 120
    while not hanging.exists():
        assert killed.poll() is None, "the run to be killed ended early"
        assert time.monotonic() < deadline, "the run never reached round 3"
        time.sleep(0.05)
    ckpt = tmp_path / "ck" / "checkpoint.pt"
    assert ckpt.exists() and load_checkpoint(ckpt)["round"] == 2  # mid-round 3: the round-2 checkpoint
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.pt").exists()
    resumed = subprocess.run(
        [py, str(script), str(tmp_path / "ck"), str(tmp_path / "resumed.pt"), "resume"], env=env, timeout=120
    )
    assert resumed.returncode == 0
    assert full.wait(timeout=120) == 0
    a = torch.load(tmp_path / "full.pt")
    b = torch.load(tmp_path / "resumed.pt")
    assert a["net"].keys() == b["net"].keys()
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]), k
    assert a["loss"] == b["loss"]


def test_objective_can_be_passed_and_reused_for_evaluate() -> None:
    obj = Objective(LOSS, weights={"a": 0.5, "b": 2.0})
    d = make_data()
    res = train(TwoHead(), d, obj, epochs=1, progress=False)
    ev = evaluate(res.net, d, obj)
    assert ev["loss"] == pytest.approx(0.5 * ev["a"] + 2.0 * ev["b"])
    with pytest.raises(ValueError, match="belong to the Objective"):
        train(TwoHead(), d, obj, weights={"a": 1.0, "b": 1.0}, progress=False)


def test_batch_without_any_label_is_passed_over_and_resume_without_checkpoint_starts_afresh(
    tmp_path: Path,
) -> None:
    d = make_data(24)
    d["a"][:8] = float("nan")
    d["b"][:8] = -100  # the first batch (shuffle=False) has no label at all
    res = train(TwoHead(), d, LOSS, epochs=1, batch_size=8, shuffle=False, progress=False)
    assert [b["batch"] for b in res.history.batches] == [1.0, 2.0]
    assert res.history.last["a"] == pytest.approx(np.mean([res.history.batches[i]["a"] for i in (0, 1)]))
    res = train(TwoHead(), d, LOSS, epochs=2, checkpoint=tmp_path / "new", resume=True, progress=False)
    assert len(res.history) == 2 and load_checkpoint(tmp_path / "new")["round"] == 2


def test_monitor_records_cosines_and_norms_per_round():
    import lossport

    torch.manual_seed(0)

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = torch.nn.Linear(4, 8)
            self.a, self.b = torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)

        def forward(self, x):
            h = torch.relu(self.trunk(x))
            return {"a": self.a(h), "b": self.b(h)}

    data = {"x": torch.randn(64, 4), "a": torch.randn(64, 1), "b": torch.randn(64, 1)}
    res = lossport.train(Two(), data, epochs=2, batch_size=16, progress=False, monitor=2, seed=0)
    row = res.history.rounds[-1]
    keys = [k for k in row if k.startswith("monitor/")]
    assert any("cos" in k for k in keys) and any("a" in k for k in keys), keys
    with pytest.raises(ValueError, match="monitor"):
        lossport.train(Two(), data, epochs=1, monitor=0, progress=False)


def _nan_gradient_loss(y, t):
    """A finite loss whose gradient is NaN on batches with a target above 50 (sqrt at 0)."""
    loss = ((y - t) ** 2).mean()
    return loss + torch.sqrt((y * 0).sum()) if bool(t.max() > 50) else loss


@pytest.mark.parametrize("balance", [None, "uw"])
def test_a_non_finite_gradient_with_finite_losses_is_caught_before_the_step(balance):
    d = make_data(32)
    d["a"] = d["a"].clone()
    d["a"][8:16] = 99.0  # second batch of 8
    spec = {"a": CustomLoss(_nan_gradient_loss, target=True), "b": "ce"}
    net = TwoHead()
    kw = {"batch_size": 8, "shuffle": False, "progress": False, "balance": balance}
    with pytest.raises(NonFiniteLossError, match=r"gradient of trunk\.0\.weight, .*a\.weight"):
        train(net, d, spec, epochs=1, **kw)
    assert all(torch.isfinite(p).all() for p in net.parameters())  # the first step only; no NaN step
    r = train(TwoHead(), d, spec, epochs=1, on_nonfinite="skip", **kw)
    assert r.history.rounds[-1]["skipped"] == 1


def test_gradient_check_is_exact_when_sums_overflow():
    from lossport.training.step import all_finite as _all_finite

    big = torch.full((4,), 3e38)  # finite entries whose sum overflows float32
    assert _all_finite([big, torch.ones(2)])
    assert not _all_finite([big, torch.tensor([1.0, float("nan")])])
    assert not _all_finite([torch.tensor([float("inf"), -float("inf")])])
