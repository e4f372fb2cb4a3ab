"""Gradient-level balancing: lossport's Gramian engine against TorchJD 0.18 and the plain sum-backward.

TorchJD's model (issue 5, item 7): trunk Linear 256-512-512-512 with ReLU (656,896 shared parameters), T heads
Linear(512, 1) with MSE, batch 64, one thread. For each T, every variant below runs one full step (forward,
weights, backward into ``.grad``; gradients set to None before each step) and the variants are interleaved in
one process, so drifts of the machine hit them all alike. Times are medians.

Variants: ``sum`` (plain backward of the sum of the losses); lossport ``UPGrad``/``MGDA``/``PCGrad`` (exact
Gramian on the trunk parameters, then one backward of ``sum_i w_i L_i``); lossport UPGrad with
``gramian="features"`` (Gramian of the gradients at the trunk output); lossport UPGrad ``every=10``; TorchJD
``autojac`` (``mtl_backward`` + ``jac_to_grad`` with ``UPGrad()`` / ``MGDA()``) and ``autogram``
(``Engine(trunk, batch_dim=None).compute_gramian`` + ``UPGradWeighting`` / ``MGDAWeighting``, then
``losses.backward(weights)``).

Peak extra memory: growth of the process's peak resident set during one step, over the resident set before it
(parameters and the previous step's ``.grad`` included there), after a warm-up step; the larger of two steps.
Measured in a child process per T: the peak is reset before the step by writing 5 to ``/proc/self/clear_refs``
(Linux) and read from ``VmHWM``; glibc's mmap and trim thresholds are pinned at 64 KiB (``mallopt``) from the
start, so that every tensor of 64 KiB or more is its own mapping, returned to the OS when freed.

Usage: ``python benchmarks/gramian.py`` (about 1-2 minutes) or ``--quick`` (a few seconds per T).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from lossport import Losses
from lossport.balance import MGDA, PCGrad, UPGrad
from lossport.balance import weighting as W

try:
    from torchjd.aggregation import MGDA as TJ_MGDA
    from torchjd.aggregation import MGDAWeighting, UPGradWeighting
    from torchjd.aggregation import UPGrad as TJ_UPGrad
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward

    HAVE_TORCHJD = True
except ImportError:  # pragma: no cover - torchjd is a test dependency
    HAVE_TORCHJD = False


# ------------------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------------------
def _pin_malloc() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 64 * 1024))  # MMAP / TRIM threshold
    except OSError:
        return False


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024
    return out


def peak_extra_mb(step: Callable[[], None]) -> float | None:
    """MB by which the peak resident set grows during ``step()`` (None where the peak cannot be reset)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status()["VmRSS"]
    except OSError:
        return None
    step()
    return _status()["VmHWM"] - before


# ------------------------------------------------------------------------------------------------------------
# the model and the variants
# ------------------------------------------------------------------------------------------------------------
class Model:
    def __init__(self, T: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.T = T
        self.trunk = nn.Sequential(
            nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU()
        )
        self.heads = nn.ModuleList([nn.Linear(512, 1) for _ in range(T)])
        self.x = torch.randn(64, 256, generator=g)
        self.y = torch.randn(64, T, generator=g)
        self.params = [*self.trunk.parameters(), *self.heads.parameters()]

    def zero(self) -> None:
        for p in self.params:
            p.grad = None

    def forward(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.trunk(self.x)
        return h, [nn.functional.mse_loss(self.heads[t](h).squeeze(1), self.y[:, t]) for t in range(self.T)]

    def losses(self) -> Losses:
        h, ls = self.forward()
        parts = {f"task{t}": v for t, v in enumerate(ls)}
        return Losses(parts=parts, weights=dict.fromkeys(parts, 1.0), outputs={"h": h})


def sum_step(m: Model) -> Callable[[], None]:
    """One plain step: backward of the sum of the losses."""

    def step() -> None:
        m.zero()
        _, ls = m.forward()
        torch.stack(ls).sum().backward()

    return step


def balanced_step(m: Model, bal: object) -> Callable[[], None]:
    """One step through a lossport balancer: weights (and extra terms), then one backward of the total."""

    def step() -> None:
        m.zero()
        bal(m.losses()).total.backward()  # type: ignore[operator]

    return step


def variants(m: Model) -> dict[str, Callable[[], None]]:
    def lossport(bal: object) -> Callable[[], None]:
        return balanced_step(m, bal)

    out: dict[str, Callable[[], None]] = {
        "sum": sum_step(m),
        "lossport UPGrad": lossport(UPGrad()),
        "lossport MGDA": lossport(MGDA()),
        "lossport PCGrad": lossport(PCGrad()),
        "lossport UPGrad features": lossport(UPGrad(gramian="features", features="h")),
        "lossport UPGrad every=10": lossport(UPGrad(every=10)),
        "lossport UPGrad feat every=10": lossport(UPGrad(gramian="features", features="h", every=10)),
    }
    if HAVE_TORCHJD:
        shared = list(m.trunk.parameters())

        def autojac(agg: object) -> Callable[[], None]:
            def step() -> None:
                m.zero()
                h, ls = m.forward()
                mtl_backward(ls, features=h)
                jac_to_grad(shared, agg)  # type: ignore[arg-type]

            return step

        def autogram(weighting: object) -> Callable[[], None]:
            # the engine hooks its modules: a twin model (same weights) of its own, untouched by other variants
            twin = Model(m.T)
            engine = Engine(twin.trunk, batch_dim=None)

            def step() -> None:
                twin.zero()
                _, ls = twin.forward()
                losses = torch.stack(ls)
                G = engine.compute_gramian(losses)
                losses.backward(weighting(G))  # type: ignore[operator]

            return step

        out["torchjd autojac UPGrad"] = autojac(TJ_UPGrad())
        out["torchjd autojac MGDA"] = autojac(TJ_MGDA())
        out["torchjd autogram UPGrad"] = autogram(UPGradWeighting())
        out["torchjd autogram MGDA"] = autogram(MGDAWeighting())
    return out


def timings(
    T: int, reps: int, make: Callable[[Model], dict[str, Callable[[], None]]] = variants
) -> dict[str, tuple[float, float]]:
    """(median, mean) ms of one step of every variant (``make(model)``), interleaved; ``reps`` a multiple of 10
    so that the mean of an ``every=10`` variant is its amortised cost."""
    times = interleaved_rounds(make(Model(T)), reps)
    return {k: (statistics.median(v) * 1e3, statistics.fmean(v) * 1e3) for k, v in times.items()}


def interleaved_rounds(
    steps: dict[str, Callable[[], None]], reps: int, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Seconds of each call of each step function (by ``clock``): ``warmup`` untimed calls each, then ``reps``
    rounds calling every step once in turn (interleaved, so that drifts of the shared machine hit all alike)."""
    for f in steps.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for k, f in steps.items():
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    return times


def memory(T: int) -> dict[str, float | None]:
    """Peak extra MB of one step of every variant (after a warm-up step); run with malloc pinned."""
    m = Model(T)
    vs = variants(m)
    out: dict[str, float | None] = {}
    for k, f in vs.items():
        f()  # warm-up with malloc pinned
        a, b = peak_extra_mb(f), peak_extra_mb(f)
        out[k] = None if a is None or b is None else max(a, b)
    return out


def _memory_in_child(T: int) -> dict[str, float | None]:
    """Memory is measured in a fresh process: malloc's thresholds must be pinned before the heap grows (a heap
    grown by earlier steps serves large tensors from its free space, where they do not show in the RSS)."""
    out = (
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--memory-of", str(T)],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    got = json.loads(out)
    return got if got is not None else {}


def weighting_alone(ms: list[int], reps: int) -> list[tuple[int, float, float | None]]:
    """UPGrad weighting alone on a random full-rank Gramian of size m (median ms)."""
    rows = []
    for m in ms:
        g = torch.Generator().manual_seed(m)
        J = torch.randn(m, 4 * m, generator=g, dtype=torch.float64)
        G = J @ J.T
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            W.upgrad(G)
            ts.append(time.perf_counter() - t0)
        tj = None
        if HAVE_TORCHJD and m <= 128:
            wt = UPGradWeighting()
            tts = []
            for _ in range(max(1, reps // 3)):
                t0 = time.perf_counter()
                wt(G.float())
                tts.append(time.perf_counter() - t0)
            tj = statistics.median(tts) * 1e3
        rows.append((m, statistics.median(ts) * 1e3, tj))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    ap.add_argument("--tasks", type=int, nargs="*", default=[2, 8, 32])
    ap.add_argument("--memory-of", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    reps = {2: 20, 8: 20, 32: 10} if not args.quick else {}
    print(f"torch {torch.__version__}, 1 thread, batch 64, trunk 256-512-512-512 (656,896 shared params)")
    if not HAVE_TORCHJD:
        print("torchjd not importable: TorchJD rows skipped")
    if args.memory_of is not None:  # child process: memory of one T, malloc pinned from the start
        if not _pin_malloc():
            print(json.dumps(None))
            return
        print(json.dumps(memory(args.memory_of)))
        return
    times = {T: timings(T, reps.get(T, 3 if args.quick else 10)) for T in args.tasks}
    mems = {T: _memory_in_child(T) for T in args.tasks}
    for T in args.tasks:
        res, mem = times[T], mems[T]
        if not mem:
            print("(peak memory unavailable: needs Linux /proc/self/clear_refs and glibc mallopt)")
        base = res["sum"][0]
        ref = {agg: res.get(f"torchjd autojac {agg}", (float("nan"),))[0] for agg in ("UPGrad", "MGDA")}
        mref = mem.get("torchjd autojac UPGrad")
        print(f"\nT = {T}")
        print(
            f"{'variant':30s} {'median ms':>9s} {'mean ms':>8s} {'x sum':>6s} {'x autojac':>9s} "
            f"{'peak extra MB':>13s} {'x autojac':>9s}"
        )
        for k, (ms, mean) in res.items():
            agg = "MGDA" if "MGDA" in k else "UPGrad"  # PCGrad (not in TorchJD's autojac rows) against UPGrad
            vs_aj = f"{ms / ref[agg]:9.2f}" if k.startswith("lossport") and ref[agg] == ref[agg] else f"{'':9s}"
            mb = mem.get(k)
            mtxt = f"{mb:13.1f}" if mb is not None else f"{'n/a':>13s}"
            mrat = f"{mb / mref:9.2f}" if mb is not None and mref and k.startswith("lossport") else ""
            print(f"{k:30s} {ms:9.1f} {mean:8.1f} {ms / base:6.2f} {vs_aj} {mtxt} {mrat}")
        print("(x sum and x autojac: ratios of medians; for every=10 compare the mean, its amortised cost)")
    print("\nUPGrad weighting alone (random full-rank G, float64; TorchJD on float32 as it runs)")
    print(f"{'m':>5s} {'lossport ms':>12s} {'torchjd ms':>11s}")
    for m, t, tj in weighting_alone([32, 64, 128], 3 if args.quick else 10):
        print(f"{m:5d} {t:12.2f} {(f'{tj:11.2f}' if tj is not None else f'{chr(45):>11s}')}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
