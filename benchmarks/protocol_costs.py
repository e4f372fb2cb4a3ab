"""The cost of one step of the methods that need extra batches or a meta batch (issue 15, item 1).

Model: ``benchmarks/many_tasks.py``'s (TorchJD's benchmark trunk, 656,896 shared parameters, T one-output heads,
one MSE loss per head, batch 64, one thread). One step = gradients set to None, forward, the balancer's call
with its :class:`~lossport.balance.Context`, one backward of the weighted total, the balancer's ``step``; no
optimizer step on the net (as in ``many_tasks.py``). The extra and meta closures evaluate the same batch again:
the cost of a forward does not depend on which examples it sees.

Variants: ``sum`` (the plain sum), ``sdmgrad`` and ``modo`` with ``batches=1`` (one batch's Gramian) and
``batches=3`` (the papers' cross matrix ``J_1 J_2^T`` of two extra batches, layer by layer:
:func:`lossport.gramian.cross_gramian`), the same with ``explicit J`` (the cross matrix from the two explicit
``T x P`` Jacobians, as before that function and as under torchrun still), ``auto_lambda`` (look-ahead
on a meta batch, finite differences), ``moml`` (an inner and a meta batch, two explicit Jacobians over every
parameter) and ``forum`` (five inner SGD steps on the main batch, one explicit Jacobian of the meta batch over every
parameter, a QP). Interleaved rounds; the median of ``reps`` is printed with its ratio to ``sum``.

    .venv/bin/python benchmarks/protocol_costs.py            # T = 8 and 32, ~2 min on the 2-core machine
    .venv/bin/python benchmarks/protocol_costs.py --variants forum moml
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import torch

from lossport.balance import FORUM, MOML, AutoLambda, Balancer, Context, MoDo, SDMGrad
from lossport.balance.stochastic import cross, jacobian_rows
from lossport.result_types import Losses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gramian import interleaved_rounds
from many_tasks import Model


class _Explicit:
    """The cross matrix from two explicit Jacobians (the path torchrun takes), for the before/after figures."""

    def compute_gramian(self, losses: Losses) -> torch.Tensor:
        params = self.shared(losses)  # type: ignore[attr-defined]
        extra = self.context.extra[:2]  # type: ignore[attr-defined]
        J1, J2 = (jacobian_rows(evaluate(), losses.names, params) for evaluate in extra)
        return cross(J1, J2)


class SDMGradExplicit(_Explicit, SDMGrad):
    pass


class MoDoExplicit(_Explicit, MoDo):
    pass


VARIANTS: dict[str, Callable[[], Balancer] | None] = {
    "sum": None,
    "sdmgrad batches=1": lambda: SDMGrad(batches=1),
    "sdmgrad batches=3": lambda: SDMGrad(),
    "sdmgrad b=3 explicit J": lambda: SDMGradExplicit(),
    "modo batches=1": lambda: MoDo(batches=1),
    "modo batches=3": lambda: MoDo(),
    "modo b=3 explicit J": lambda: MoDoExplicit(),
    "auto_lambda": lambda: AutoLambda(),
    "moml": lambda: MOML(),
    "forum": lambda: FORUM(),
}


def make_step(m: Model, make: Callable[[], Balancer] | None) -> Callable[[], None]:
    """One step of a variant (module docstring)."""
    if make is None:

        def plain() -> None:
            m.zero()
            _, ls = m.forward()
            torch.stack(ls).sum().backward()

        return plain
    bal = make()
    opt = torch.optim.SGD(m.params, lr=1e-2)  # read by the bilevel methods' look-ahead, never stepped
    ctx = Context(extra=(m.losses,) * (bal.batches - 1), meta=m.losses, train=m.losses, optimizer=opt)

    def balanced() -> None:
        m.zero()
        bal(m.losses(), ctx).total.backward()
        bal.step(m.losses)

    return balanced


def check_cross(m: Model) -> None:
    """The two ways give the same cross matrix (float32 net: to float32 rounding)."""
    losses, ctx = m.losses(), Context(extra=(m.losses, m.losses))
    a, b = SDMGrad(), SDMGradExplicit()
    a.context = b.context = ctx
    A, B = a.compute_gramian(losses), b.compute_gramian(losses)
    err = float((A - B).abs().max() / B.abs().max())
    assert err < 1e-5, err
    print(f"cross matrix: layer by layer vs explicit Jacobians, max relative difference {err:.1e}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help="a subset of the variants (sum always)")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose among {list(VARIANTS)}")
    torch.set_num_threads(1)
    for T in args.tasks:
        m = Model(T)
        chosen = {"sum", *args.variants}
        steps = {name: make_step(m, make) for name, make in VARIANTS.items() if name in chosen}
        check_cross(m)
        times = interleaved_rounds(steps, args.reps)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"T = {T}: median of {args.reps} steps (ms), ratio to the plain sum")
        for k, v in med.items():
            print(f"  {k:24s} {1e3 * v:9.1f}  x{v / med['sum']:.1f}")


if __name__ == "__main__":
    main()
