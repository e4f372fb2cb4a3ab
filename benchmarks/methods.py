"""Every balancing method's training step, side by side with the reference implementation (issue 15, item 4 and
"Performance").

Model: TorchJD's benchmark trunk as this project uses it (``benchmarks/gramian.py``, ``benchmarks/many_tasks.py``:
Linear 256-512-512-512 with ReLU, 656,896 shared parameters), ``T`` heads ``Linear(512, 1)``, one MSE loss per
head, batch 64, targets of a shared rank-8 structure, one CPU thread. (TorchJD's own documentation example is a
toy trunk ``Linear(10, 5) -> Linear(5, 3)``, too small to show the cost of the per-task backward passes; the larger
trunk is the one of ``reference/anchors.md``'s TorchJD figures.)

One step = gradients set to None, forward, the method's weights (or edited gradients), backward, an SGD step of
the net (lr 1e-3), and the method's own update (``balancer.step(recompute)``: UW's and GradNorm's Adam step,
FAMO's re-evaluation of the batch without gradient). Every method of :func:`lossport.balance.available` runs with
its default options (``gramian="params"`` for the gradient-level ones), so methods registered later join
automatically. ``sum`` is the plain step (backward of the sum of the losses); ``x sum`` is a method's median over
``sum``'s.

References, where one runs here, each on a twin of the model (same initial weights) with the same optimizer:

* TorchJD 0.18 (installed): Gramian weightings through ``autogram`` (``Engine(trunk, batch_dim=None)
  .compute_gramian`` + the weighting + ``losses.backward(w)``, TorchJD's fast path for weightings), aggregators that
  need the Jacobian through ``autojac`` (``mtl_backward`` + ``jac_to_grad``), loss-level methods through
  ``torchjd.scalarization`` (UW's and IMTL-L's parameters in the net's optimizer, FAMO's ``update`` after the
  step), each with lossport's default hyper-parameters. SDMGrad and MoDo, when lossport's take three batches per
  step, through TorchJD's documented three-batch recipe (``autojac.jac`` on two other batches, ``A = J_1 J_2^T``).
* LibMTL (``--libmtl DIR``: a source checkout of github.com/median-research-group/LibMTL outside this repository;
  its weighting classes are imported from there, never copied): each weighting class mixed into a minimal model
  (encoder = the trunk, decoders = the heads, ``rep_grad=False``), its ``backward(losses, **weight_args)`` then
  the optimizer step, FAMO's ``update_w`` after it, as LibMTL's trainer does; lossport's hyper-parameters.

Methods and references are interleaved: per ``T``, one untimed warm-up call each, then ``reps`` rounds calling
every variant once in turn (a fast step as a burst of up to 20 calls, whose mean counts); medians are reported. A
variant whose warm-up exceeds ``--max-step`` seconds is timed once (its warm-up) and marked ``*``; one that fails is
reported and left out (``fails`` in the docs table). ``lossport / ref`` above 1 means lossport's step is the slower
one; such methods are listed at the end.

Loss-history methods run in their first period here (nothing calls ``end_round``: DWA gives ``b = 1``, STCH is in
its SI warm-up), which costs the same ``O(T)`` arithmetic as later periods; LibMTL's are run past their warm-up
epochs. Methods that need more than the batch per step (extra batches, a meta batch: the protocol of issue 15,
item 1) get them in a ``Context`` (:func:`context`); one that fails is listed as failing.

Peak extra memory (lossport methods, ``--memory``): growth of the peak resident set during one step over the
resident set before it, on each method's second step, in a fresh child process with malloc's thresholds pinned
(``benchmarks/many_tasks.py``'s method; Linux only).

    .venv/bin/python benchmarks/methods.py --quick                              # ~1.5 min on the 2-core machine
    .venv/bin/python benchmarks/methods.py --memory --libmtl /path/to/LibMTL \\
        --markdown /tmp/methods.md                                              # ~5 min; the docs table
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from lossport import Losses
from lossport import balance as B

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/many_tasks.py, also when loaded by path
from many_tasks import Model, _pin_malloc, json_from_child, peak_extra_mb

TASKS = (8, 32)
LR = 1e-3
Step = Callable[[], None]


# ------------------------------------------------------------------------------------------------------------
# lossport's steps
# ------------------------------------------------------------------------------------------------------------
def _net(m: Model) -> nn.Module:
    return nn.ModuleDict({"trunk": m.trunk, "heads": m.heads})


def sum_step(m: Model) -> Step:
    """The plain step: backward of the sum of the losses, SGD step."""
    opt = torch.optim.SGD(m.params, lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _, ls = m.forward()
        torch.stack(ls).sum().backward()
        opt.step()

    return step


def lossport_step(m: Model, name: str) -> Step:
    """One step of the hand-written loop of ``docs/balancing.md`` with ``resolve(name)`` (default options), with the
    extra batches and the meta batch the method declares it needs (:func:`context`)."""
    bal = B.resolve(name)
    assert bal is not None
    bal.attach(_net(m))
    opt = torch.optim.SGD(m.params, lr=LR)
    recompute = m.losses if bal.needs_recompute else None
    ctx = context(bal, m, opt)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        losses = bal(m.losses()) if ctx is None else bal(m.losses(), ctx)  # type: ignore[call-arg]
        losses.total.backward()
        opt.step()
        bal.step(recompute)

    return step


def evaluate(m: Model, x: torch.Tensor, y: torch.Tensor) -> Losses:
    """The model's parts on another batch ``(x, y)`` (``m.losses()`` evaluates its own batch)."""
    h = m.trunk(x)
    parts = {f"task{t}": nn.functional.mse_loss(m.heads[t](h).squeeze(1), y[:, t]) for t in range(m.T)}
    return Losses(parts=parts, weights=dict.fromkeys(parts, 1.0), outputs={"h": h})


def other_batches(m: Model, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed batches of the main batch's shape: standard normal inputs, the batch's targets permuted."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(m.x.shape, generator=g), m.y[torch.randperm(len(m.y), generator=g)]) for _ in range(n)]


def context(bal: B.Balancer, m: Model, opt: torch.optim.Optimizer) -> Any:
    """The ``Context`` of a method that declares ``batches > 1`` or ``meta`` (issue 15's protocol), else ``None``.
    Its extra and meta batches are other inputs of the batch's shape (standard normal, the batch's targets
    permuted), fixed like the main batch: the cost of independent draws of the data, not their statistics."""
    n_extra, meta = max(0, int(getattr(bal, "batches", 1)) - 1), bool(getattr(bal, "meta", False))
    if not n_extra and not meta:
        return None
    from lossport.balance.base import Context  # type: ignore[attr-defined]

    others = other_batches(m, n_extra + meta)
    extra = tuple(lambda b=b: evaluate(m, *b) for b in others[:n_extra])
    if not meta:
        return Context(extra=extra)
    return Context(extra=extra, meta=lambda: evaluate(m, *others[-1]), train=m.losses, optimizer=opt)


# ------------------------------------------------------------------------------------------------------------
# TorchJD 0.18
# ------------------------------------------------------------------------------------------------------------
def _autogram(build: Callable[[], Any]) -> Callable[[Model], Step]:
    def make(m: Model) -> Step:
        from torchjd.autogram import Engine

        weighting, engine = build(), Engine(m.trunk, batch_dim=None)
        opt = torch.optim.SGD(m.params, lr=LR)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            _, ls = m.forward()
            losses = torch.stack(ls)
            losses.backward(weighting(engine.compute_gramian(losses)))
            opt.step()

        return step

    return make


def _autojac(build: Callable[[int], Any]) -> Callable[[Model], Step]:
    def make(m: Model) -> Step:
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator, shared = build(m.T), list(m.trunk.parameters())
        opt = torch.optim.SGD(m.params, lr=LR)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            h, ls = m.forward()
            mtl_backward(ls, features=h)
            jac_to_grad(shared, aggregator)
            opt.step()

        return step

    return make


def _cross(build: Callable[[], Any]) -> Callable[[Model], Step]:
    """TorchJD's documented three-batch step of SDMGrad / MoDo: ``A = J_1 J_2^T`` from the Jacobians of two other
    batches on the shared parameters (``autojac.jac``), the weights of ``A``, then the main batch's losses
    backpropagated with them (lossport's protocol: the main batch updates, the extra batches make ``A``)."""

    def make(m: Model) -> Step:
        from torchjd.autojac import jac

        weighting, shared, (b1, b2) = build(), list(m.trunk.parameters()), other_batches(m, 2)
        opt = torch.optim.SGD(m.params, lr=LR)

        def J(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.cat(
                [j.flatten(1) for j in jac(torch.stack(list(evaluate(m, x, y).parts.values())), shared)], 1
            )

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            weights = weighting(J(*b1) @ J(*b2).T)
            torch.stack(m.forward()[1]).backward(weights)
            opt.step()

        return step

    return make


def _scalarizer(build: Callable[[int], Any], update: bool = False, own_adam: bool = False) -> Callable[[Model], Step]:
    """TorchJD's scalarizer ``build(T)`` on the model. Its parameters (UW's, IMTL-L's) go into the net's optimizer
    as TorchJD's documentation shows, or with ``own_adam`` into an Adam of their own at lossport's learning rate
    (0.025), which is how lossport trains them: the same algorithm as lossport's step."""

    def make(m: Model) -> Step:
        s = build(m.T)
        own = list(s.parameters()) if own_adam else []
        opt = torch.optim.SGD([*m.params, *(p for p in s.parameters() if not own_adam)], lr=LR)
        adam = torch.optim.Adam(own, lr=0.025, fused=True) if own else None

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            if adam is not None:
                adam.zero_grad(set_to_none=True)
            s(torch.stack(m.forward()[1])).backward()
            opt.step()
            if adam is not None:
                adam.step()
            if update:
                with torch.no_grad():
                    s.update(torch.stack(m.forward()[1]))

        return step

    return make


def _importable(name: str, build: Callable[[], Any]) -> bool:
    try:
        build()
    except ImportError as e:
        print(f"  TorchJD reference of {name}: unavailable here ({str(e).splitlines()[0]})")
        return False
    return True


def torchjd_references() -> dict[str, Callable[[Model], Step]]:
    """lossport name -> factory of TorchJD's step (lossport's default hyper-parameters). A reference that cannot be
    built here (a missing optional dependency: CAGrad and Nash-MTL need cvxpy) is reported and left out."""
    try:
        import torchjd.aggregation as A
        import torchjd.scalarization as S
    except ImportError:  # pragma: no cover - torchjd is a test dependency
        return {}
    gramian: dict[str, Callable[[], Any]] = {
        "upgrad": A.UPGradWeighting,
        "mgda": A.MGDAWeighting,
        "cagrad": lambda: A.CAGradWeighting(c=0.4),
        "dualproj": A.DualProjWeighting,
        "imtl_g": A.IMTLGWeighting,
        "aligned_mtl": lambda: A.AlignedMTLWeighting(scale_mode="min"),
        "fairgrad": lambda: A.FairGradWeighting(alpha=2.0),
        "gradvac": lambda: A.GradVacWeighting(beta=0.5),
        "pcgrad": A.PCGradWeighting,
        "krum": lambda: A.KrumWeighting(n_byzantine=0, n_selected=1),
        "pcd": lambda: A.PCDWeighting(tau=0.02, beta=0.999),
        "cr_mogm": lambda: A.CRMOGMWeighting(A.MGDAWeighting(), alpha=0.9),
        "sdmgrad": A.SDMGradWeighting,
        "modo": lambda: A.MoDoWeighting(gamma=0.1, rho=0.1),
    }
    jacobian: dict[str, Callable[[int], Any]] = {
        "config": lambda T: A.ConFIG(),
        "graddrop": lambda T: A.GradDrop(),
        "trimmed_mean": lambda T: A.TrimmedMean(trim_number=1),
        "excess_mtl": lambda T: A.ExcessMTL(robust_step_size=1.0),
        "nash_mtl": lambda T: A.NashMTL(n_tasks=T, max_norm=0.0),
    }
    scalar: dict[str, tuple[Callable[[int], Any], bool]] = {
        "ew": (lambda T: S.Sum(), False),
        "rlw": (lambda T: S.Random(), False),
        "dwa": (lambda T: S.DWA(temperature=2.0), False),
        "gls": (lambda T: S.GeometricMean(), False),
        "stch": (lambda T: S.STCH(mu=1.0), False),
        "uw": (lambda T: S.UW(T), False),
        "imtl_l": (lambda T: S.IMTLL(T), False),
        "famo": (lambda T: S.FAMO(T, lr=0.025, weight_decay=1e-3), True),
    }
    out: dict[str, Callable[[Model], Step]] = {}
    for name, b in gramian.items():
        if _importable(name, b):
            three = (
                name in ("sdmgrad", "modo") and name in B.available() and getattr(B.resolve(name), "batches", 1) >= 3
            )
            out[name] = _cross(b) if three else _autogram(b)
    for name, bj in jacobian.items():
        if _importable(name, lambda bj=bj: bj(2)):
            out[name] = _autojac(bj)
    out.update({name: _scalarizer(b, update, own_adam=name in LEARNED) for name, (b, update) in scalar.items()})
    # UW and IMTL-L as TorchJD's documentation trains them (their parameters in the net's optimizer), for the record
    out.update({f"{name}@net_optimizer": _scalarizer(scalar[name][0]) for name in LEARNED})
    return out


LEARNED = ("uw", "imtl_l")
"""The scalarizers with parameters of their own: their TorchJD reference trains them with an Adam of their own, as
lossport does (``name@net_optimizer``: in the net's SGD, as TorchJD's documentation shows)."""


# ------------------------------------------------------------------------------------------------------------
# LibMTL (from a source checkout outside the repository)
# ------------------------------------------------------------------------------------------------------------
LIBMTL: dict[str, tuple[str, dict[str, Any]]] = {
    "ew": ("EW", {}),
    "gradnorm": ("GradNorm", {"alpha": 1.5}),
    "mgda": ("MGDA", {"mgda_gn": "none"}),
    "uw": ("UW", {}),
    "dwa": ("DWA", {"T": 2.0}),
    "gls": ("GLS", {}),
    "pcgrad": ("PCGrad", {}),
    "gradvac": ("GradVac", {"GradVac_beta": 0.5, "GradVac_group_type": 0}),
    "cagrad": ("CAGrad", {"calpha": 0.4, "rescale": 1}),
    "rlw": ("RLW", {}),
    "moco": (
        "MoCo",
        {"MoCo_beta": 0.5, "MoCo_beta_sigma": 0.5, "MoCo_gamma": 0.1, "MoCo_gamma_sigma": 0.5, "MoCo_rho": 0},
    ),
    "db_mtl": ("DB_MTL", {"DB_beta": 0.9, "DB_beta_sigma": 0.0}),
    "stch": ("STCH", {"STCH_mu": 1.0, "STCH_warmup_epoch": 4}),
    "excess_mtl": ("ExcessMTL", {"robust_step_size": 1.0}),
    "fairgrad": ("FairGrad", {"FairGrad_alpha": 2.0}),
    "famo": ("FAMO", {"FAMO_w_lr": 0.025, "FAMO_w_gamma": 1e-3}),
    "upgrad": ("UPGrad", {"UPGrad_norm_eps": 1e-4, "UPGrad_reg_eps": 1e-4}),
}
"""lossport name -> (LibMTL weighting class, its ``weight_args``). Not mapped: IMTL (LibMTL's is IMTL-L and IMTL-G
combined), Nash_MTL (needs cvxpy), MoDo and SDMGrad (LibMTL's trainer feeds them three batches per step), GradDrop
(LibMTL runs it only with ``rep_grad=True``, on the representation), Aligned_MTL (calls ``torch.symeig``, removed
from torch 2)."""


def _load_libmtl(root: str) -> types.ModuleType:
    """``LibMTL.weighting`` of the checkout at ``root`` without running ``LibMTL/__init__.py`` (which imports the
    trainer, the architectures and their dependencies): empty package modules stand in for both packages."""
    for name, sub in (("LibMTL", "LibMTL"), ("LibMTL.weighting", os.path.join("LibMTL", "weighting"))):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = pkg
    return sys.modules["LibMTL.weighting"]


def libmtl_references(root: str | None) -> dict[str, Callable[[Model], Step]]:
    """lossport name -> factory of LibMTL's step; empty without ``root``."""
    if not root:
        return {}
    _load_libmtl(root)
    out: dict[str, Callable[[Model], Step]] = {}
    for name, (cls_name, kwargs) in LIBMTL.items():
        try:
            cls = importlib.import_module(f"LibMTL.weighting.{cls_name}").__dict__[cls_name]
        except Exception as e:
            print(f"  LibMTL {cls_name}: not importable ({type(e).__name__}: {e})")
            continue
        out[name] = lambda m, cls=cls, kwargs=kwargs: _libmtl_step(m, cls, kwargs)
    return out


def libmtl_model(cls: type, encoder: nn.Module, decoders: dict[str, nn.Module], epoch: int, buffer: Any) -> Any:
    """An instance of LibMTL's weighting class ``cls`` with the attributes LibMTL's architectures give it
    (``abstract_arch.AbsArchitecture``): the shared ``encoder``, the task ``decoders``, ``rep_grad=False``, the
    current ``epoch`` and the ``train_loss_buffer`` (tasks x epochs); ``init_param`` called."""

    class Harness(cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.encoder = encoder
            self.decoders = nn.ModuleDict(decoders)
            self.task_name = list(self.decoders)
            self.task_num, self.device = len(decoders), torch.device("cpu")
            self.rep_grad, self.multi_input = False, False
            self.epoch, self.train_loss_buffer = epoch, buffer

        def get_share_params(self) -> Any:
            return self.encoder.parameters()

        def zero_grad_share_params(self) -> None:
            self.encoder.zero_grad(set_to_none=False)

    model = Harness()
    model.init_param()
    return model


def _libmtl_step(m: Model, cls: type, kwargs: dict[str, Any]) -> Step:
    import numpy as np

    # epoch 4 on the first (warm-up) call, 5 after: past the warm-up of STCH (4 epochs, whose last one records the
    # nadir), DWA (2) and GradNorm (1), so that every method runs its full rule
    heads = {f"task{t}": h for t, h in enumerate(m.heads)}
    model = libmtl_model(cls, m.trunk, heads, 4, np.ones((m.T, 6)))
    model.epochs = 6
    opt = torch.optim.SGD([*m.params, *(p for p in model.parameters() if p.requires_grad and p not in set(m.params))])
    for g in opt.param_groups:
        g["lr"] = LR
    famo = hasattr(model, "update_w")

    def step() -> None:
        opt.zero_grad(set_to_none=False)  # as LibMTL's trainer
        with contextlib.redirect_stdout(io.StringIO()):  # LibMTL's STCH prints its nadir vector
            model.backward(torch.stack(m.forward()[1]), **kwargs)
        model.epoch = 5
        opt.step()
        if famo:
            with torch.no_grad():
                model.update_w(torch.stack(m.forward()[1]))

    return step


# ------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------
class Timed(NamedTuple):
    ms: float  # median milliseconds per step
    once: bool = False  # True: only the warm-up was timed (over --max-step)


def interleaved(steps: dict[str, Step], reps: int, max_step: float, burst: float = 0.1) -> dict[str, Timed]:
    """Median ms per step of each step function: one warm-up call each, then ``reps`` rounds calling each in turn
    (interleaved, so drifts of the shared machine hit all alike). In each round a fast step runs a burst of
    consecutive calls (as many as fit in ``burst`` seconds, at most 20) and counts their mean, so that the
    scheduler's hiccups on a loaded machine do not decide a 10 ms figure."""
    warm: dict[str, float] = {}
    for k, f in steps.items():
        t0 = time.perf_counter()
        f()
        warm[k] = time.perf_counter() - t0
    live = [k for k in steps if warm[k] <= max_step]
    calls = {k: max(1, min(20, int(burst / max(warm[k], 1e-6)))) for k in live}
    times: dict[str, list[float]] = {k: [] for k in live}
    for _ in range(reps):
        for k in live:
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                steps[k]()
            times[k].append((time.perf_counter() - t0) / calls[k])
    out = {k: Timed(statistics.median(v) * 1e3) for k, v in times.items()}
    out.update({k: Timed(warm[k] * 1e3, once=True) for k in steps if k not in live})
    return out


FAILED: dict[tuple[int, str], str] = {}
"""(T, variant) -> the error of a variant that could not be built or failed its first step."""


def build(T: int, names: list[str], refs: dict[str, dict[str, Callable[[Model], Step]]]) -> dict[str, Step]:
    """Every variant at ``T``: ``sum``, ``<name>`` (lossport), ``<name> @<reference>``; each on its own twin model
    (same initial weights and data). A variant that fails to build is reported and left out."""
    steps: dict[str, Step] = {"sum": sum_step(Model(T))}
    for name in names:
        variants: list[tuple[str, Callable[[Model], Step]]] = [(name, lambda m, n=name: lossport_step(m, n))]
        variants += [(f"{name} @{lib}", made[name]) for lib, made in refs.items() if name in made]
        for key, make in variants:
            try:
                steps[key] = make(Model(T))
            except Exception as e:
                FAILED[(T, key)] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                print(f"  {key}: could not be built at T = {T}: {FAILED[(T, key)]}")
    return steps


def safe(T: int, steps: dict[str, Step]) -> dict[str, Step]:
    """The steps whose first call succeeds (a failing one is reported, recorded in :data:`FAILED` and dropped)."""
    ok = {}
    for k, f in steps.items():
        try:
            f()
            ok[k] = f
        except Exception as e:
            FAILED[(T, k)] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(f"  {k}: failed: {FAILED[(T, k)]}")
    return ok


# ------------------------------------------------------------------------------------------------------------
# memory (child process)
# ------------------------------------------------------------------------------------------------------------
def memory(T: int, names: list[str]) -> dict[str, float]:
    """Peak extra MB of the second step of ``sum`` and of each lossport method in ``names``."""
    out = {}
    for name in ["sum", *names]:
        step = sum_step(Model(T)) if name == "sum" else lossport_step(Model(T), name)
        step()
        out[name] = peak_extra_mb(step)
    return out


def memory_in_child(T: int, names: list[str]) -> dict[str, float]:
    """:func:`memory` in a fresh process; empty if unavailable."""
    return json_from_child(__file__, ["--memory-of", str(T), "--methods", ",".join(names)], f"memory at T = {T}")


# ------------------------------------------------------------------------------------------------------------
# what each method needs per step (for the docs table); methods not listed get their kind's line
# ------------------------------------------------------------------------------------------------------------
_GRAMIAN = "Gramian (~T passes)"
_JACOBIAN = "T x P Jacobian (~T passes), correction term"
NEEDS: dict[str, tuple[str, str]] = {
    "ew": ("nothing", "none"),
    "static": ("nothing", "none"),
    "normalize": ("O(T) arithmetic", "T scales"),
    "si": ("O(T) arithmetic", "none"),
    "gls": ("O(T) arithmetic", "none"),
    "dwa": ("O(T) arithmetic", "2 x T mean losses"),
    "rlw": ("T random draws", "a generator"),
    "stch": ("O(T) arithmetic", "T nadir values"),
    "cov": ("O(T) arithmetic", "T loss statistics"),
    "go4align": ("O(T) arithmetic, 1-D K-means", "T probabilities"),
    "uw": ("Adam step on T parameters", "T params + Adam"),
    "imtl_l": ("Adam step on T parameters", "T params + Adam"),
    "famo": ("1 extra forward without gradient, Adam on T logits", "T logits + Adam"),
    "gradnorm": ("T backward passes part -> last shared layer, Adam on T weights", "T weights + Adam"),
    "ldc_mtl": ("Adam step on T router logits", "T logits + Adam"),
    "upgrad": (_GRAMIAN + ", T x T dual QP", "none"),
    "dualproj": (_GRAMIAN + ", T x T dual QP", "none"),
    "mgda": (_GRAMIAN + ", min-norm QP", "none"),
    "cagrad": (_GRAMIAN + ", T-dim convex problem", "none"),
    "imtl_g": (_GRAMIAN + ", T x T solve", "none"),
    "aligned_mtl": (_GRAMIAN + ", T x T eigendecomposition", "none"),
    "nash_mtl": (_GRAMIAN + ", Newton on G a = 1/a", "T warm start"),
    "fairgrad": (_GRAMIAN + ", Newton on G w = w^(-1/alpha)", "T warm start"),
    "config": (_GRAMIAN + ", T x T solve", "none"),
    "pcgrad": (_GRAMIAN + ", O(T^2) projections", "a generator"),
    "gradvac": (_GRAMIAN + ", O(T^2) projections", "T x T cosine targets"),
    "krum": (_GRAMIAN + ", O(T^2) distances", "none"),
    "pcd": (_GRAMIAN + ", box QP", "T norm averages"),
    "cr_mogm": (_GRAMIAN + ", the base method's solve", "T averaged weights"),
    "sdmgrad": (_GRAMIAN + ", 20 projected steps", "T weights"),
    "modo": (_GRAMIAN + ", 1 projected step", "T weights"),
    "excess_mtl": ("T x P Jacobian (~T passes)", "T x P accumulators"),
    "graddrop": (_JACOBIAN, "a generator"),
    "trimmed_mean": (_JACOBIAN, "none"),
    "db_mtl": (_JACOBIAN, "T x P gradient averages"),
    "moco": (_JACOBIAN, "T x P tracked gradients"),
}
_BY_KIND = {
    "static": ("nothing", "see its docstring"),
    "loss": ("O(T) arithmetic", "see its docstring"),
    "learned": ("its own parameter update", "see its docstring"),
    "gramian": (_GRAMIAN, "see its docstring"),
    "surgery": (_JACOBIAN, "see its docstring"),
}


def needs(name: str) -> tuple[str, str]:
    """(what one step needs beyond one forward and one backward, the state it keeps) for ``name``."""
    return NEEDS.get(name) or _BY_KIND.get(B.kind_of(name), ("see its docstring", "see its docstring"))


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------
Results = dict[int, dict[str, Timed]]


def _ms(t: Timed | None, base: float, failed: str | None = None) -> str:
    if t is None:
        return f"fails ({failed.split(':')[0]})" if failed else "-"
    return f"{t.ms:.1f}{'*' if t.once else ''} ({t.ms / base:.1f}x)"


def print_table(T: int, res: dict[str, Timed], names: list[str], libs: list[str], mem: dict[str, float]) -> None:
    base = res["sum"].ms
    print(f"\nT = {T}: median ms per step (x sum); lossport / reference (> 1: lossport slower); peak extra MB")
    head = f"{'method':14s} {'kind':8s} {'lossport ms':>16s} {'MB':>7s}"
    print(head + "".join(f" {lib + ' ms':>17s} {'ratio':>6s}" for lib in libs))
    print(f"{'sum':14s} {'':8s} {_ms(res['sum'], base):>16s} {mem.get('sum', float('nan')):7.1f}")
    for name in names:
        line = f"{name:14s} {B.kind_of(name):8s} {_ms(res.get(name), base):>16s} {mem.get(name, float('nan')):7.1f}"
        for lib in libs:
            ref, mine = res.get(f"{name} @{lib}"), res.get(name)
            ratio = f"{mine.ms / ref.ms:6.2f}" if ref is not None and mine is not None else f"{'':6s}"
            line += f" {_ms(ref, base) if ref is not None else '':>17s} {ratio}"
        print(line)
    sys.stdout.flush()


def slower(results: Results, names: list[str], libs: list[str]) -> list[str]:
    """'name vs lib at T: ratio' for every method whose step is slower than its reference's."""
    out = []
    for T, res in results.items():
        for name in names:
            for lib in libs:
                ref, mine = res.get(f"{name} @{lib}"), res.get(name)
                if ref is not None and mine is not None and mine.ms > ref.ms:
                    out.append(
                        f"{name} vs {lib} at T = {T}: {mine.ms / ref.ms:.2f} x ({mine.ms:.1f} vs {ref.ms:.1f} ms)"
                    )
    return out


def markdown(results: Results, names: list[str], libs: list[str], mems: dict[int, dict[str, float]]) -> str:
    """The docs table: one row per method, its needs, its cost at each T and its ratio to each reference."""
    Ts = sorted(results)
    head = ["method", "kind", "per step, beyond one forward and one backward", "state kept"]
    head += [f"T = {T}: ms (x sum)" for T in Ts] + [f"peak MB T = {Ts[-1]}"]
    head += [f"lossport / {lib}, T = {', '.join(map(str, Ts))}" for lib in libs]
    rows = [head, ["---"] * len(head)]
    rows.append(["plain sum", "", "", ""] + [_ms(results[T].get("sum"), results[T]["sum"].ms) for T in Ts])
    rows[-1] += [_mb(mems.get(Ts[-1], {}).get("sum"))] + [""] * len(libs)
    for name in names:
        need, state = needs(name)
        row = [f"`{name}`", B.kind_of(name), need, state]
        row += [_ms(results[T].get(name), results[T]["sum"].ms, FAILED.get((T, name))) for T in Ts]
        row.append(_mb(mems.get(Ts[-1], {}).get(name)))
        for lib in libs:
            cells = []
            for T in Ts:
                ref, mine = results[T].get(f"{name} @{lib}"), results[T].get(name)
                cells.append(f"{mine.ms / ref.ms:.2f}" if ref is not None and mine is not None else "")
            row.append(", ".join(c or "-" for c in cells) if any(cells) else "")
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


# ------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round per T (a smoke run)")
    ap.add_argument("--tasks", type=int, nargs="*", default=list(TASKS), help="numbers of parts T (default 8 32)")
    ap.add_argument("--methods", default="", help="comma-separated names (default: every registered method)")
    ap.add_argument("--reps", type=int, default=None, help="rounds per T (default 5; 1 with --quick)")
    ap.add_argument("--max-step", type=float, default=5.0, help="time a variant once when its warm-up exceeds this (s)")
    ap.add_argument("--no-torchjd", action="store_true", help="leave TorchJD's steps out")
    ap.add_argument("--libmtl", default=None, help="a LibMTL source checkout (directory holding LibMTL/)")
    ap.add_argument("--memory", action="store_true", help="also the peak extra memory of lossport's steps")
    ap.add_argument("--markdown", default=None, help="write the docs table (markdown) to this file")
    ap.add_argument("--memory-of", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [n.strip() for n in args.methods.split(",") if n.strip()] or B.available()
    if args.memory_of is not None:  # child process: memory of one T, malloc pinned from the start
        ok = _pin_malloc() and os.path.exists("/proc/self/clear_refs")
        print(json.dumps(memory(args.memory_of, names) if ok else None))
        return
    refs = {} if args.no_torchjd else {"torchjd": torchjd_references()}
    if args.libmtl:
        refs["libmtl"] = libmtl_references(args.libmtl)
    refs = {k: v for k, v in refs.items() if v}
    libs = list(refs)
    reps = args.reps if args.reps is not None else (1 if args.quick else 5)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, 1 thread, batch 64, trunk 256-512-512-512 (656,896 shared params), SGD lr {LR}")
    print(f"{len(names)} methods; references: {', '.join(libs) or 'none'}; {reps} interleaved rounds per T")
    results: Results = {}
    mems: dict[int, dict[str, float]] = {}
    for T in args.tasks:
        print(f"\n... T = {T}", flush=True)
        steps = safe(T, build(T, names, refs))
        results[T] = interleaved(steps, reps, args.max_step)
        mems[T] = memory_in_child(T, [n for n in names if n in results[T]]) if args.memory else {}
        print_table(T, results[T], names, libs, mems[T])
    late = slower(results, names, libs)
    print("\nSlower than the reference:" + ("".join(f"\n  {s}" for s in late) if late else " none"))
    print("(* timed once: its first step exceeded --max-step)")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results, names, libs, mems))
        print(f"markdown table written to {args.markdown}")


if __name__ == "__main__":
    main()
