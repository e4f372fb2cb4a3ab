"""The one script to run on a CUDA machine: a smoke test of every balancer on the device, then a timing table.

Runs unchanged on the CPU (``--device cpu``), where it checks the same things; on a GPU it is the check that
balancers keep their state on the device and survive mixed precision.

**1. Smoke test** (skipped with ``--skip-smoke``). For every registered balancer
(:func:`lossport.balance.available`), in every mode of its kind (``gramian="params"``, ``gramian="features"`` and
``every=2`` for the ``gramian`` and ``surgery`` kinds, the defaults for the others), and for each precision
``"32"``, ``"bf16"``, ``"16-mixed"``: three steps of :func:`lossport.train` (Adam, batch 16) on a small net
(trunk 8-32-32 ReLU, heads: regression ``a`` (MSE), 3-class ``b`` (cross-entropy), binary ``c`` (BCE); the trunk
output ``h`` is also an output, the representation of ``features`` mode) on the device. Checked after the run:
three steps were taken; the net's parameters, the round's loss and the applied weights ``weight/<part>`` are
finite; every tensor of ``balancer.state_dict()`` and every learned parameter of the balancer is on the device
(except the two kinds of tensor that stay on the host by design: random-generator states, ``uint8``, and the
``step`` counts of a ``torch.optim`` optimizer). A ``ValueError`` (``LossSpecError`` included) raised before
the first step completed whose message names the mode (``features``, ``params``, ``every``) counts as "not
supported" (MoCo and ExcessMTL refuse ``features`` mode); any other error, or a failed check, is a failure.
All failures are listed at the end and the script exits with status 1.

**2. Timing table** (TorchJD's model, ``benchmarks/gramian.py``'s ``Model``/``sum_step``/``balanced_step``,
moved to the device): trunk Linear 256-512-512-512 ReLU, ``T`` heads Linear(512, 1), MSE, batch 64, at T = 2,
8, 32. One full step per call (gradients set to None, forward, weights, backward into ``.grad``); variants
interleaved, ``torch.cuda.synchronize()`` before and after each timed step on CUDA; medians in ms and their
ratios to the plain sum-backward. Variants: ``sum``; lossport ``UPGrad()`` (exact Gramian on the trunk
parameters); lossport ``UPGrad(gramian="features")``; TorchJD 0.18 ``autojac.backward`` over all parameters then
``jac_to_grad(params, UPGrad())``; TorchJD ``mtl_backward`` + ``jac_to_grad`` on the trunk (the autojac variant
of the CPU table in BENCHMARKS.md); TorchJD ``autogram.Engine(trunk, batch_dim=None)`` +
``UPGradWeighting``. On CUDA also the peak extra device memory of one step (``torch.cuda.max_memory_allocated``
over the memory allocated before it). TorchJD columns are left out when ``torchjd`` is not importable.

Usage (from the repository root; where ``lossport`` is not installed, the checkout's ``src/`` is used)::

    python benchmarks/gpu.py                     # device: cuda if available, else cpu
    python benchmarks/gpu.py --device cpu --quick
    python benchmarks/gpu.py --skip-smoke --tasks 2 8
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if importlib.util.find_spec("lossport") is None:  # a bare machine with this checkout: use its src/
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "src"))

from gramian import HAVE_TORCHJD, Model, balanced_step, sum_step

import lossport
from lossport.balance import UPGrad, available, kind_of, resolve
from lossport.callbacks import Callback, TrainState

if HAVE_TORCHJD:
    from torchjd.aggregation import UPGrad as TJ_UPGrad
    from torchjd.aggregation import UPGradWeighting
    from torchjd.autogram import Engine
    from torchjd.autojac import backward as tj_backward
    from torchjd.autojac import jac_to_grad, mtl_backward

PRECISIONS = ("32", "bf16", "16-mixed")
STEPS = 3
BATCH = 16


# ------------------------------------------------------------------------------------------------------------
# 1. smoke test
# ------------------------------------------------------------------------------------------------------------
class SmokeNet(nn.Module):
    """Trunk 8-32-32 ReLU; outputs ``h`` (the trunk's output), ``a`` (1 value), ``b`` (3 logits), ``c`` (1 logit)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.heads = nn.ModuleDict({"a": nn.Linear(32, 1), "b": nn.Linear(32, 3), "c": nn.Linear(32, 1)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {"h": h, **{k: head(h) for k, head in self.heads.items()}}


LOSS = {"a": "mse", "b": "ce", "c": "bce"}


def smoke_data() -> tuple[Tensor, dict[str, Tensor]]:
    """``STEPS * BATCH`` examples (so one round is ``STEPS`` steps), on the host (``train`` moves each batch)."""
    g = torch.Generator().manual_seed(0)
    n = STEPS * BATCH
    x = torch.randn(n, 8, generator=g)
    y = {
        "a": 3.0 * torch.randn(n, 1, generator=g) + 1.0,
        "b": torch.randint(0, 3, (n,), generator=g),
        "c": torch.randint(0, 2, (n, 1), generator=g).float(),
    }
    return x, y


def modes(name: str) -> dict[str, dict[str, Any]]:
    """The modes to try for the method ``name``, by label: the Gramian engine's modes for its kinds."""
    if kind_of(name) in ("gramian", "surgery"):
        features = {"gramian": "features", "features": "h"}
        return {"params": {"gramian": "params"}, "features": features, "every=2": {"every": 2}}
    return {"default": {}}


class StepCounter(Callback):
    """Counts the completed steps of a run (so an error can be placed before or after the first step)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_batch_end(self, state: TrainState) -> None:
        self.steps += 1


def state_tensors(state: Any, key: str = "") -> Iterator[tuple[str, Tensor]]:
    """The tensors of a (nested) state dict with their paths."""
    if isinstance(state, Tensor):
        yield key, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from state_tensors(v, f"{key}/{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from state_tensors(v, f"{key}/{i}")


def host_by_design(path: str, t: Tensor) -> bool:
    """Random-generator states (uint8) and optimizer step counts stay on the host in torch's own design."""
    return t.dtype == torch.uint8 or (path.endswith("/step") and t.dim() == 0)


def check_run(net: nn.Module, bal: Any, result: lossport.Result, steps: int, device: torch.device) -> list[str]:
    """What is wrong after a smoke run (empty: nothing)."""
    bad = []
    if steps != STEPS:
        bad.append(f"{steps} steps taken, expected {STEPS}")
    for n, p in net.named_parameters():
        if not bool(torch.isfinite(p).all()):
            bad.append(f"net parameter {n} is not finite")
    last = result.history.last
    for k, v in last.items():
        if (k == "loss" or k.startswith("weight/")) and not math.isfinite(v):
            bad.append(f"history {k} = {v}")
    if not any(k.startswith("weight/") for k in last):
        bad.append("no weight/<part> in the history")
    for i, p in enumerate(bal.parameters()):
        if p.device != device:
            bad.append(f"learned parameter {i} on {p.device}")
        if not bool(torch.isfinite(p).all()):
            bad.append(f"learned parameter {i} is not finite")
    for path, t in state_tensors(bal.state_dict()):
        if t.device != device and not host_by_design(path, t):
            bad.append(f"state {path} ({t.dtype}) on {t.device}")
    return bad


@dataclass
class SmokeReport:
    ok: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def smoke_one(
    name: str, mode: str, make: Callable[[], Any], precision: str, device: torch.device, rep: SmokeReport
) -> None:
    """One smoke run of the balancer ``make()`` (method ``name`` in ``mode``) at ``precision``; its outcome goes
    into ``rep``. An error of ``make()`` is judged as one raised by the run before its first step."""
    label = f"{name} [{mode}] precision={precision}"
    counter = StepCounter()
    try:
        bal = make()
        torch.manual_seed(0)
        net = SmokeNet()
        result = lossport.train(
            net,
            smoke_data(),
            LOSS,
            balance=bal,
            epochs=1,
            batch_size=BATCH,
            precision=precision,
            device=device,
            progress=False,
            seed=0,
            callbacks=[counter],
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # asynchronous CUDA errors surface here, inside the try
    except ValueError as e:  # LossSpecError is a ValueError
        key = "every" if mode.startswith("every") else mode
        if counter.steps == 0 and key in str(e):
            rep.unsupported.append(f"{label}: {e}")
        else:
            rep.failures.append(f"{label}: after {counter.steps} steps, {type(e).__name__}: {e}")
        return
    except Exception as e:
        rep.failures.append(f"{label}: after {counter.steps} steps, {type(e).__name__}: {e}")
        return
    bad = check_run(net, bal, result, counter.steps, device)
    if bad:
        rep.failures.append(f"{label}: " + "; ".join(bad))
    else:
        rep.ok.append(label)


def smoke(device: torch.device, methods: list[str], precisions: list[str]) -> SmokeReport:
    rep = SmokeReport()
    t0 = time.perf_counter()
    for name in methods:
        for mode, kw in modes(name).items():
            for p in precisions:
                smoke_one(name, mode, functools.partial(resolve, name, **kw), p, device, rep)
        print(f"  {name:14s} done ({time.perf_counter() - t0:6.1f} s, {len(rep.failures)} failures so far)", flush=True)
    n = len(rep.ok) + len(rep.unsupported) + len(rep.failures)
    print(f"\nsmoke: {n} runs, {len(rep.ok)} passed, {len(rep.unsupported)} not supported, {len(rep.failures)} failed")
    for line in rep.unsupported:
        print(f"  not supported: {line}")
    for line in rep.failures:
        print(f"  FAIL: {line}")
    return rep


# ------------------------------------------------------------------------------------------------------------
# 2. timing table
# ------------------------------------------------------------------------------------------------------------
COLUMNS = {
    "sum": "sum-backward",
    "upgrad exact": "lossport UPGrad (exact)",
    "upgrad features": "lossport UPGrad `features`",
    "torchjd backward": "TorchJD autojac `backward` UPGrad",
    "torchjd mtl_backward": "TorchJD autojac `mtl_backward` UPGrad",
    "torchjd autogram": "TorchJD autogram UPGrad",
}


def on_device(m: Model, device: torch.device) -> Model:
    """``benchmarks/gramian.py``'s model, moved to ``device`` (parameters, inputs and targets)."""
    m.trunk.to(device)
    m.heads.to(device)
    m.x, m.y = m.x.to(device), m.y.to(device)
    m.params = [*m.trunk.parameters(), *m.heads.parameters()]
    return m


def torchjd_variants(m: Model, device: torch.device) -> dict[str, Callable[[], None]]:
    """TorchJD 0.18's three ways to an UPGrad step on the same model."""
    shared = list(m.trunk.parameters())

    def autojac_backward() -> None:
        m.zero()
        _, ls = m.forward()
        tj_backward(ls)  # Jacobian of the T losses w.r.t. every parameter, into .jac
        jac_to_grad(m.params, TJ_UPGrad())

    def autojac_mtl() -> None:
        m.zero()
        h, ls = m.forward()
        mtl_backward(ls, features=h)
        jac_to_grad(shared, TJ_UPGrad())

    twin = on_device(Model(m.T), device)  # the engine hooks its modules: a twin of its own, same weights
    engine = Engine(twin.trunk, batch_dim=None)
    weighting = UPGradWeighting()

    def autogram() -> None:
        twin.zero()
        _, ls = twin.forward()
        losses = torch.stack(ls)
        losses.backward(weighting(engine.compute_gramian(losses)))

    return {"torchjd backward": autojac_backward, "torchjd mtl_backward": autojac_mtl, "torchjd autogram": autogram}


def variants(m: Model, device: torch.device) -> dict[str, Callable[[], None]]:
    out = {
        "sum": sum_step(m),
        "upgrad exact": balanced_step(m, UPGrad(gramian="params")),
        "upgrad features": balanced_step(m, UPGrad(gramian="features", features="h")),
    }
    if HAVE_TORCHJD:
        out.update(torchjd_variants(m, device))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(f: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    f()
    sync(device)
    return time.perf_counter() - t0


def peak_extra_mb(f: Callable[[], None], device: torch.device) -> float:
    """Peak device memory during one step of ``f`` above the memory allocated before it (CUDA only)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    f()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def time_T(T: int, reps: int, device: torch.device, failures: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms and (on CUDA) peak extra MB of one step of every variant at ``T`` parts, interleaved. A variant
    that raises is dropped from this ``T`` and listed in ``failures``."""
    vs = variants(on_device(Model(T), device), device)
    live: dict[str, Callable[[], None]] = {}
    for k, f in vs.items():
        try:
            for _ in range(2):  # warm-up: CUDA contexts, cuBLAS handles, hooks, caches
                timed(f, device)
            live[k] = f
        except Exception as e:
            failures.append(f"timing T={T} {k}: {type(e).__name__}: {e}")
    times: dict[str, list[float]] = {k: [] for k in live}
    for _ in range(reps):
        for k, f in list(live.items()):
            try:
                times[k].append(timed(f, device))
            except Exception as e:
                failures.append(f"timing T={T} {k}: {type(e).__name__}: {e}")
                del live[k]
    med = {k: statistics.median(v) * 1e3 for k, v in times.items() if v and k in live}
    mem = {k: peak_extra_mb(f, device) for k, f in live.items()} if device.type == "cuda" else {}
    return med, mem


def markdown(rows: dict[int, dict[str, float]]) -> str:
    """The table: median ms per step, ratio to sum-backward beside every other column."""
    keys = [k for k in COLUMNS if any(k in r for r in rows.values())]
    lines = ["| T | " + " | ".join(COLUMNS[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for T, r in rows.items():
        base = r.get("sum")
        cells = []
        for k in keys:
            if k not in r:
                cells.append("error")
            elif k == "sum" or base is None:
                cells.append(f"{r[k]:.1f} ms")
            else:
                cells.append(f"{r[k]:.1f} ms ({r[k] / base:.2f} x sum)")
        lines.append(f"| {T} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_markdown(mems: dict[int, dict[str, float]]) -> str:
    keys = [k for k in COLUMNS if any(k in r for r in mems.values())]
    lines = ["| T | " + " | ".join(COLUMNS[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for T, r in mems.items():
        lines.append(f"| {T} | " + " | ".join(f"{r[k]:.1f} MB" if k in r else "error" for k in keys) + " |")
    return "\n".join(lines)


def timing(device: torch.device, tasks: list[int], quick: bool, failures: list[str]) -> None:
    reps = 3 if quick else (30 if device.type == "cuda" else 15)
    print(f"\ntiming: TorchJD's model (trunk 256-512-512-512, batch 64), {reps} interleaved repeats, medians")
    if not HAVE_TORCHJD:
        print("(torchjd not importable: TorchJD columns left out)")
    rows, mems = {}, {}
    for T in tasks:
        t0 = time.perf_counter()
        rows[T], mems[T] = time_T(T, reps, device, failures)
        print(f"  T = {T:2d} done ({time.perf_counter() - t0:.1f} s)", flush=True)
    print()
    print(markdown(rows))
    if device.type == "cuda":
        print("\nPeak extra device memory of one step (max_memory_allocated over the memory allocated before it):\n")
        print(memory_markdown(mems))


# ------------------------------------------------------------------------------------------------------------
def describe(device: torch.device) -> str:
    try:
        tj = metadata.version("torchjd")
    except metadata.PackageNotFoundError:
        tj = "not installed"
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{device.type}, {torch.get_num_threads()} CPU thread(s)"
    return f"device {device} ({where}), torch {torch.__version__}, torchjd {tj}, lossport {lossport.__file__}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="3 timing repeats instead of 15 (CPU) / 30 (CUDA)")
    ap.add_argument("--skip-smoke", action="store_true", help="only the timing table")
    ap.add_argument("--skip-timing", action="store_true", help="only the smoke test")
    ap.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32], help="values of T for the timing table")
    ap.add_argument("--methods", nargs="+", default=None, help="smoke-test only these balancers")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    args = ap.parse_args(argv)
    unknown = [m for m in args.methods or [] if m not in available()]
    if unknown:
        ap.error(f"unknown balancers {unknown}; available: {', '.join(available())}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"--device {args.device}: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
            return 2
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # as the CPU tables of BENCHMARKS.md
    print(describe(device), flush=True)
    t0 = time.perf_counter()
    failures: list[str] = []
    if not args.skip_smoke:
        print(f"\nsmoke test: {STEPS} steps of lossport.train per balancer, mode and precision", flush=True)
        failures += smoke(device, args.methods or available(), args.precisions).failures
    if not args.skip_timing:
        timing(device, args.tasks, args.quick, failures)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if failures:
        print(f"\n{len(failures)} FAILURES:")
        for line in failures:
            print(f"  {line}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
