"""Many tasks (issue 16, item 2): how the cost of one training step grows with the number of tasks T.

Model: TorchJD's benchmark trunk (Linear 256-512-512-512 with ReLU, 656,896 shared parameters), T heads
``Linear(512, 1)``, one MSE loss per head, batch 64, one thread. The targets share a low-rank structure
(``y = tanh(x A) B + noise``, rank 8), so that the tasks' gradients are correlated as in real multi-task data.

One step = gradients set to None, forward, the balancer's weights, one backward of the weighted total, and the
balancer's own ``step`` (UW's Adam step on its T log-variances; FAMO's logit update, which re-evaluates the
batch without gradient). No optimizer step on the net (the same for every variant).

Variants: ``sum`` (no balancer: backward of the plain sum), ``uw``, ``famo``, and ``upgrad``, ``mgda``,
``nash_mtl`` each with ``gramian="params"`` (exact Gramian on the trunk's parameters) and ``gramian="features"``
(Gramian of the gradients at the trunk's output ``h``). Also the weighting alone, ``weighting.upgrad(G)``,
``weighting.mgda(G)`` and ``weighting.nash_mtl(G / ||G||_F)`` (cold start), on that step's Gramian from each mode.
The approximations (:mod:`lossport.balance.approx`): UPGrad with ``subset=32`` in both modes; at T = 128 and 512
their error: UPGrad's update ``J^T w`` with ``subset=8, 32`` and with the Gramian sketched to ``d = 32, 128, 512``
directions, against the exact update, relative, measured with the exact Gramian (one update, and the mean of the
draws), the fraction of parts whose gradient conflicts with the update (0 for exact UPGrad), and the same for the
plain sum's update as a yardstick. (The balancers refuse ``sketch < T``; the error table shows why.)

Time: per T, one untimed warm-up call of each variant, then ``reps`` rounds in which every variant runs once in
turn (interleaved, so drifts of the shared machine hit all alike); the median is printed with its ratio to the
median of ``sum``. A variant (or weighting) whose step is predicted to exceed ``--max-step`` seconds at the next
T (its last time extrapolated with its measured growth exponent, clamped to [1, 3]) is skipped from there on
with the reason printed; ``--budget`` caps the whole run (rounds are cut short, later T skipped, with a message).

Peak memory: growth of the process's peak resident set (``VmHWM`` in ``/proc/self/status``, reset by writing 5
to ``/proc/self/clear_refs``) during one step over the resident set before it; measured in a fresh child process
per T, with glibc's mmap and trim thresholds pinned at 64 KiB (``mallopt``) from the start so that every tensor of
64 KiB or more is its own mapping, returned to the OS when freed. Each variant's second step is measured (its
first step, untimed, loads one-off modules and state). (tracemalloc does not see torch's tensor memory;
``ru_maxrss`` cannot be reset, hence ``VmHWM``.) Linux only; elsewhere memory is "n/a".

    .venv/bin/python benchmarks/many_tasks.py --plot docs/scaling.png     # ~10 min on the 2-core machine
    .venv/bin/python benchmarks/many_tasks.py --quick                     # T = 8, 32, 128; ~1 min
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from lossport.balance import FAMO, MGDA, NashMTL, Uncertainty, UPGrad
from lossport.balance import weighting as W
from lossport.balance.approx import sketch_jacobian, subset_indices
from lossport.balance.gramian_base import GramianBalancer
from lossport.gramian import gramian as exact_gramian

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/gramian.py, also when loaded by path
from gramian import Model as TorchJDModel

TASKS = (8, 32, 128, 512, 1024)
GRAMIAN_METHODS = {"upgrad": UPGrad, "mgda": MGDA, "nash_mtl": NashMTL}
APPROXIMATIONS = ("upgrad params subset=32", "upgrad features subset=32")
VARIANTS = (
    "sum",
    "uw",
    "famo",
    *(f"{m} {mode}" for mode in ("params", "features") for m in GRAMIAN_METHODS),
    *APPROXIMATIONS,
)


def _nash(G: torch.Tensor) -> torch.Tensor:
    n = float(torch.linalg.matrix_norm(G))
    return W.nash_mtl(G / n if n > 0 else G)


WEIGHTINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "upgrad": W.upgrad,
    "mgda": W.mgda,
    "nash_mtl": _nash,
}


# ------------------------------------------------------------------------------------------------------------
# the model and the steps
# ------------------------------------------------------------------------------------------------------------
class Model(TorchJDModel):
    """``benchmarks/gramian.py``'s model (shared trunk, ``T`` one-output linear heads, one MSE loss per head, a fixed
    batch, 64 by default) with targets of a shared low-rank structure, so that the tasks are related as in
    multi-label data."""

    def __init__(self, T: int, seed: int = 0, batch: int = 64) -> None:
        super().__init__(T, seed)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, 256, generator=g)  # batch = 64: the parent's inputs
        A = torch.randn(256, 8, generator=g) / 16
        B = torch.randn(8, T, generator=g)
        self.y = torch.tanh(self.x @ A) @ B + 0.1 * torch.randn(batch, T, generator=g)


def make_balancer(name: str) -> object:
    """The balancer of a variant name (``"uw"``, ``"famo"``, ``"<method> <mode>"`` optionally followed by
    approximation options such as ``subset=32`` or ``sketch=64``); ``None`` for ``"sum"``."""
    if name == "sum":
        return None
    if name == "uw":
        return Uncertainty()
    if name == "famo":
        return FAMO()
    method, mode, *opts = name.split()
    extra: dict[str, object] = {"features": "h"} if mode == "features" else {}
    for opt in opts:
        key, value = opt.split("=")
        extra[key] = int(value)
    return GRAMIAN_METHODS[method](gramian=mode, **extra)


def make_step(m: Model, name: str) -> Callable[[], None]:
    """One training step of variant ``name`` on ``m`` (see the module docstring)."""
    bal = make_balancer(name)

    if bal is None:

        def plain() -> None:
            m.zero()
            _, ls = m.forward()
            torch.stack(ls).sum().backward()

        return plain

    def balanced() -> None:
        m.zero()
        bal(m.losses()).total.backward()  # type: ignore[operator]
        bal.step(m.losses)  # type: ignore[attr-defined]  # UW: Adam on s; FAMO: re-evaluation (no grad), logits

    return balanced


def step_gramian(m: Model, mode: str) -> torch.Tensor:
    """The Gramian (float64, ``T x T``) a ``mode`` step computes, for timing the weightings alone."""
    bal = make_balancer(f"upgrad {mode}")
    assert isinstance(bal, GramianBalancer)
    with torch.enable_grad():
        return bal.compute_gramian(m.losses())


# ------------------------------------------------------------------------------------------------------------
# time, skipping, budget
# ------------------------------------------------------------------------------------------------------------
class Clock:
    """The run's budget (seconds) and the per-step cap with its extrapolation."""

    def __init__(self, budget: float, max_step: float) -> None:
        self.start = time.perf_counter()
        self.budget = budget
        self.max_step = max_step
        self.history: dict[str, list[tuple[int, float]]] = {}  # name -> [(T, seconds)]
        self.skipped: dict[str, str] = {}  # name -> reason

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def record(self, name: str, T: int, seconds: float) -> None:
        self.history.setdefault(name, []).append((T, seconds))

    def predict(self, name: str, T: int) -> tuple[float, float] | None:
        """(predicted seconds at ``T``, exponent used) from the last two measured sizes; ``None`` if unmeasured."""
        h = self.history.get(name, [])
        if not h:
            return None
        T1, t1 = h[-1]
        p = 2.0
        if len(h) >= 2:
            T0, t0 = h[-2]
            p = math.log(max(t1, 1e-9) / max(t0, 1e-9)) / math.log(T1 / T0)
        p = min(3.0, max(1.0, p))
        return t1 * (T / T1) ** p, p

    def allowed(self, name: str, T: int) -> bool:
        """False (and the reason recorded and printed once) when ``name`` is predicted over the per-step cap."""
        if name in self.skipped:
            return False
        guess = self.predict(name, T)
        if guess is not None and guess[0] > self.max_step:
            T1, t1 = self.history[name][-1]
            self.skipped[name] = (
                f"skipped from T = {T}: {t1:.2f} s at T = {T1}, growth T^{guess[1]:.2f} predicts {guess[0]:.0f} s "
                f"per step (> --max-step {self.max_step:g} s)"
            )
            print(f"  {name}: {self.skipped[name]}", flush=True)
            return False
        return True


def interleaved(fns: dict[str, Callable[[], object]], reps: int, clock: Clock, T: int) -> dict[str, float]:
    """Median seconds of each function: one warm-up call each (its time feeds the skip rule), then ``reps``
    rounds calling each in turn; rounds stop early (after at least one) when the budget is spent."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    warm: dict[str, float] = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        warm[k] = time.perf_counter() - t0
    for r in range(reps):
        if r > 0 and clock.left() < 0:
            print(f"  (budget spent: {r} of {reps} rounds at T = {T})", flush=True)
            break
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in times.items()}
    for k in fns:
        clock.record(k, T, out[k] if times[k] else warm[k])
    return out


def time_steps(T: int, reps: int, clock: Clock) -> dict[str, float]:
    """Median seconds per step of the variants not skipped at ``T``."""
    m = Model(T)
    names = [v for v in VARIANTS if clock.allowed(v, T)]
    return interleaved({v: make_step(m, v) for v in names}, reps, clock, T)


def time_weightings(T: int, reps: int, clock: Clock, modes: list[str]) -> dict[str, float]:
    """Median seconds of each weighting alone on the Gramian of a step in each of ``modes``
    (keys ``"w:<method> <mode>"``)."""
    m = Model(T)
    fns: dict[str, Callable[[], object]] = {}
    for mode in modes:
        G = step_gramian(m, mode)
        for method, fn in WEIGHTINGS.items():
            key = f"w:{method} {mode}"
            if clock.allowed(key, T):
                fns[key] = lambda fn=fn, G=G: fn(G)
    return interleaved(fns, reps, clock, T)


# ------------------------------------------------------------------------------------------------------------
# the approximations' error
# ------------------------------------------------------------------------------------------------------------
def update_error(G: torch.Tensor, w: torch.Tensor, exact: torch.Tensor) -> float:
    """``||J^T (w - exact)|| / ||J^T exact||`` from the exact Gramian ``G = J J^T`` alone."""
    e = w - exact
    return math.sqrt(max(float(e @ G @ e), 0.0) / float(exact @ G @ exact))


def approx_errors(T: int, draws: int = 8) -> dict[str, dict[str, float]]:
    """UPGrad's update with ``subset=k`` and ``sketch=d`` against the exact one, on a step's exact ``params``
    Gramian ``G``: ``step`` the median over ``draws`` (16 times as many for a subset) of the relative error of
    one update ``J^T w``, ``mean`` that of the mean update over the draws, ``conflicts`` the mean fraction of
    parts whose gradient has a negative inner product with the update (``(G w)_i < 0``; 0 for exact UPGrad),
    ``seconds`` the median time of one approximate weighting (Gramian and weighting; the exact figure is in
    ``exact``). ``plain sum``: the update of ``w = 1``, as a yardstick."""
    m = Model(T)
    losses = m.losses()
    parts = [losses.parts[k] for k in losses.names]
    params = list(m.trunk.parameters())
    t0 = time.perf_counter()
    G = exact_gramian(parts, params)
    exact = T * W.upgrad(G)
    out = {"exact": {"seconds": time.perf_counter() - t0, "step": 0.0, "mean": 0.0, "conflicts": 0.0}}
    ones = torch.ones(T, dtype=torch.float64)
    err = update_error(G, ones, exact)
    out["plain sum"] = {"seconds": 0.0, "step": err, "mean": err, "conflicts": float(((G @ ones) < 0).double().mean())}
    gen = torch.Generator().manual_seed(0)
    for name, k in [(f"subset={k}", k) for k in (8, 32) if k < T] + [(f"sketch={d}", -d) for d in (32, 128, 512)]:
        ws, secs = [], []
        for _ in range(draws if k < 0 else 16 * draws):  # subsets: cheap, more draws for the mean
            t0 = time.perf_counter()
            if k > 0:
                idx = torch.tensor(subset_indices(T, k, gen))
                wk = k * W.upgrad(G[idx][:, idx])  # the balancer's weights on the drawn parts
                w = torch.full((T,), float(wk.mean()), dtype=torch.float64)  # their mean for the others
                w[idx] = wk
            else:
                JS = sketch_jacobian(parts, params, -k, gen).to(torch.float64)
                w = T * W.upgrad(JS @ JS.T)
            secs.append(time.perf_counter() - t0)
            ws.append(w)
        out[name] = {
            "seconds": statistics.median(secs),
            "step": statistics.median(update_error(G, w, exact) for w in ws),
            "mean": update_error(G, torch.stack(ws).mean(0), exact),
            "conflicts": statistics.mean(float(((G @ w) < 0).double().mean()) for w in ws),
        }
    return out


def print_errors(T: int, errs: dict[str, dict[str, float]]) -> None:
    print(f"\nUPGrad approximations at T = {T} (params Gramian; errors of the update J^T w, relative)")
    print(f"{'':12s} {'ms':>9s} {'step error':>11s} {'mean error':>11s} {'conflicting':>12s}")
    for k, e in errs.items():
        ms = f"{e['seconds'] * 1e3:9.1f}" if e["seconds"] else f"{'-':>9s}"
        print(f"{k:12s} {ms} {e['step']:11.3f} {e['mean']:11.3f} {e['conflicts']:12.3f}")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------------------
# memory (child process)
# ------------------------------------------------------------------------------------------------------------
def _pin_malloc() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 64 * 1024))  # MMAP / TRIM threshold
    except OSError:
        return False


def _vm(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k == key:
                return int(v.split()[0]) / 1024
    raise KeyError(key)


def peak_extra_mb(step: Callable[[], None]) -> float:
    """MB by which the peak resident set grows during ``step()`` over the resident set before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _vm("VmRSS")
    step()
    return _vm("VmHWM") - before


def memory(T: int, names: list[str]) -> dict[str, float]:
    """Peak extra MB of one step of each variant in ``names``, measured on its second step (the first imports
    and builds one-off things: Adam's first step, for one, loads modules worth ~70 MB)."""
    m = Model(T)
    out = {}
    for v in names:
        step = make_step(m, v)
        step()
        out[v] = peak_extra_mb(step)
    return out


def json_from_child(script: str, args: list[str], what: str) -> dict[str, float]:
    """The JSON object that ``python script *args`` prints on its last line, run in a fresh process (peak memory
    needs malloc pinned before the heap grows); empty, with a line naming ``what``, if the run failed."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  ({what} failed: {proc.stderr.strip().splitlines()[-1:]})", flush=True)
        return {}
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return got if got is not None else {}


def memory_in_child(T: int, names: list[str]) -> dict[str, float]:
    """:func:`memory` in a fresh process; empty if unavailable."""
    return json_from_child(__file__, ["--memory-of", str(T), "--variants", ",".join(names)], f"memory at T = {T}")


# ------------------------------------------------------------------------------------------------------------
# report and plot
# ------------------------------------------------------------------------------------------------------------
def print_table(T: int, steps: dict[str, float], weights: dict[str, float], mem: dict[str, float]) -> None:
    base = steps.get("sum")
    print(f"\nT = {T}")
    print(f"{'variant':28s} {'median ms':>10s} {'x sum':>7s} {'peak extra MB':>14s}")
    for k, s in steps.items():
        ratio = f"{s / base:7.2f}" if base else f"{'':7s}"
        mb = f"{mem[k]:14.1f}" if k in mem else f"{'n/a':>14s}"
        print(f"{k:28s} {s * 1e3:10.1f} {ratio} {mb}")
    for k, s in weights.items():
        ratio = f"{s / base:7.2f}" if base else f"{'':7s}"
        print(f"{'weighting ' + k[2:]:28s} {s * 1e3:10.1f} {ratio}")
    sys.stdout.flush()


def print_summary(results: dict[int, dict[str, float]], clock: Clock) -> None:
    Ts = sorted(results)
    print("\nSummary: median ms per step (x sum) by T")
    print(f"{'variant':28s} " + " ".join(f"{'T = ' + str(T):>17s}" for T in Ts))
    names = list(dict.fromkeys(k for T in Ts for k in results[T]))
    for k in names:
        cells = []
        for T in Ts:
            s, base = results[T].get(k), results[T].get("sum")
            cells.append(f"{s * 1e3:9.1f} ({s / base:5.1f})" if s is not None and base else f"{'-':>17s}")
        label = "weighting " + k[2:] if k.startswith("w:") else k
        print(f"{label:28s} " + " ".join(f"{c:>17s}" for c in cells))
    for k, why in clock.skipped.items():
        print(f"{k}: {why}")


COLORS = {"sum": "black", "uw": "tab:olive", "famo": "tab:cyan", "upgrad": "tab:red", "mgda": "tab:blue"}
COLORS["nash_mtl"] = "tab:green"
APPROX_COLORS = ("tab:purple", "tab:pink", "tab:brown")


def plot(results: dict[int, dict[str, float]], path: str) -> None:
    """Log-log median time vs ``T``: colour by method, solid ``params``, dashed ``features``, dotted the
    weighting alone (on the ``features`` Gramian), thin grey lines of slope 1, 2 and 3 for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    Ts = sorted(results)
    names = list(dict.fromkeys(k for T in Ts for k in results[T]))
    for k in names:
        if k.startswith("w:") and not k.endswith("features"):
            continue
        pts = [(T, results[T][k] * 1e3) for T in Ts if k in results[T]]
        method = k.removeprefix("w:").split()[0]
        style = ":" if k.startswith("w:") else ("--" if " features" in k else "-")
        label = f"{method} weighting alone" if k.startswith("w:") else k
        color = COLORS[method]
        if "=" in k:  # an approximation: its own colour, the mode's line style, square markers
            color = APPROX_COLORS[APPROXIMATIONS.index(k)]
        marker = "s" if "=" in k else "o"
        lw = 2.5 if k == "sum" else 1.4
        ax.plot(*zip(*pts), style, marker=marker, ms=3, lw=lw, label=label, color=color)
    ax.autoscale_view()
    ylim = ax.get_ylim()
    if "sum" in results[Ts[0]] and len(Ts) > 1:
        y0 = results[Ts[0]]["sum"] * 1e3
        for p in (1, 2, 3):
            ax.plot([Ts[0], Ts[-1]], [y0, y0 * (Ts[-1] / Ts[0]) ** p], color="0.6", lw=0.7)
            end = min(Ts[-1], Ts[0] * (ylim[1] / y0) ** (1 / p))
            ax.annotate(f"T^{p}", (end, y0 * (end / Ts[0]) ** p), fontsize=7, color="0.4")
    ax.set_ylim(*ylim)
    ax.set_xlabel("number of tasks T (one linear head and one MSE loss each)")
    ax.set_ylabel("median ms per step (weighting: per call)")
    ax.set_title(
        "one step vs T: MLP trunk 657k params, batch 64, 1 CPU thread\n"
        "solid: gramian='params', dashed: gramian='features', dotted: weighting alone, squares: approximations",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot written to {path}")


def print_goals(results: dict[int, dict[str, float]], w64: dict[str, float]) -> None:
    """Issue 16's goals against this run's figures."""
    print("\nIssue 16 goals")
    for m, got in ((64, w64), (128, results.get(128, {}))):
        goal = 5.0 if m == 64 else 20.0
        for mode in ("params", "features"):
            t = got.get(f"w:upgrad {mode}")
            if t is not None:
                verdict = "met" if t * 1e3 <= goal else "NOT met"
                print(
                    f"  UPGrad weighting alone, m = {m}, {mode} Gramian: {t * 1e3:.1f} ms (goal <= {goal:g}): {verdict}"
                )
    r128 = results.get(128, {})
    for k in ("upgrad features", "mgda features", "nash_mtl features"):
        if k in r128 and "sum" in r128:
            q = r128[k] / r128["sum"]
            print(f"  {k} step at T = 128: {q:.2f} x sum (goal <= 2): {'met' if q <= 2 else 'NOT met'}")
    if 1024 in results:
        done = [k for k in results[1024] if not k.startswith("w:")]
        print(f"  T = 1024 finished: {', '.join(done)}")
        left = [k for k in VARIANTS if k not in results[1024]]
        if left:
            print(f"  T = 1024 not run: {', '.join(left)} (see the skip reasons above)")


# ------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 8, 32, 128 (unless --max-t), 2 rounds")
    ap.add_argument("--max-t", type=int, default=None, help="largest T to run")
    ap.add_argument("--max-step", type=float, default=20.0, help="skip a variant predicted above this (s/step)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    ap.add_argument("--no-memory", action="store_true", help="time only")
    ap.add_argument("--no-errors", action="store_true", help="skip the approximations' errors (T = 128, 512)")
    ap.add_argument("--plot", default=None, help="write a log-log plot of time vs T here (PNG)")
    ap.add_argument("--memory-of", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variants", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.memory_of is not None:  # child process: memory of one T, malloc pinned from the start
        ok = _pin_malloc() and os.path.exists("/proc/self/clear_refs")
        print(json.dumps(memory(args.memory_of, args.variants.split(",")) if ok else None))
        return
    max_t = args.max_t if args.max_t is not None else (128 if args.quick else max(TASKS))
    tasks = [T for T in TASKS if max_t >= T]
    reps = {8: 15, 32: 10, 128: 5, 512: 3, 1024: 3}
    clock = Clock(args.budget, args.max_step)
    print(f"torch {torch.__version__}, 1 thread, batch 64, trunk 256-512-512-512 (656,896 shared params)")
    results: dict[int, dict[str, float]] = {}
    w64: dict[str, float] = {}
    for T in tasks:
        if clock.left() < 0:
            print(f"budget of {args.budget:g} s spent: T >= {T} not run")
            break
        n = 2 if args.quick else reps[T]
        print(f"\n... T = {T}: {n} interleaved rounds", flush=True)
        steps = time_steps(T, n, clock)
        modes = [mode for mode in ("params", "features") if any(k.endswith(mode) for k in steps)]
        weights = time_weightings(T, n, clock, modes)
        mem = {} if args.no_memory else memory_in_child(T, list(steps))
        results[T] = {**steps, **weights}
        print_table(T, steps, weights, mem)
        if T in (128, 512) and not args.no_errors and clock.left() > 0:
            print_errors(T, approx_errors(T, draws=3 if T == 128 else 2))
        if T == 32 and max_t >= 64:  # the UPGrad weighting goal at m = 64 (issue 16)
            w64 = {
                k: v
                for k, v in time_weightings(64, 2 if args.quick else 10, Clock(60, 20), ["params", "features"]).items()
                if k.startswith("w:upgrad")
            }
            print(
                "\nUPGrad weighting alone at m = 64: " + ", ".join(f"{k[9:]} {v * 1e3:.1f} ms" for k, v in w64.items())
            )
    print_summary(results, clock)
    print_goals(results, w64)
    print(f"\nwall time {time.perf_counter() - clock.start:.0f} s")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
