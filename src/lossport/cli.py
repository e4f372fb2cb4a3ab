"""The ``lossport`` command.

One function per subcommand: ``add_<name>(subparsers)`` declares its arguments and sets ``func`` to
``cmd_<name>(args) -> int``. To add a subcommand, write the two functions and append ``add_<name>`` to
:data:`SUBCOMMANDS`.

* ``lossport demo``: train :class:`lossport.data.MultiDigitsNet` (three outputs: two digit classes and the
  ink regression) on the built-in :func:`lossport.data.multidigits`, print the per-part table and the path of
  the saved loss plot.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SubcommandAdder = Callable[[Any], None]


# ---------------------------------------------------------------------------------------------------- demo
def add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train a three-output net on the built-in digits and print the per-part table",
        description=(
            "Train MultiDigitsNet on lossport.data.multidigits (outputs: left digit, right digit, ink) and "
            "print "
            "the per-part table and the path of the loss plot."
        ),
    )
    p.add_argument("--epochs", type=int, default=5, help="training rounds (default 5)")
    p.add_argument("--size", type=int, default=2000, help="training examples (default 2000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--balance",
        default=None,
        help="a balancer name (see lossport.balance.available()); default: static weights, ink x 0.01",
    )
    p.add_argument("--out", type=Path, default=None, help="directory of the plot and history (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--progress", action="store_true", help="show the progress of each round")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .data import MultiDigitsNet, multidigits
    from .training import train

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    tr = multidigits("train", seed=args.seed, size=args.size)
    va = multidigits("val", seed=args.seed, size=max(200, args.size // 4))
    net = MultiDigitsNet(width=16)
    weights = None if args.balance else {"left": 1.0, "right": 1.0, "ink": 0.01}
    out = args.out or Path(tempfile.gettempdir()) / "lossport-demo"
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"MultiDigitsNet on multidigits: {len(tr['image'])} training, {len(va['image'])} validation "
        "examples; " + (f"balance={args.balance!r}" if args.balance else f"static weights {weights}")
    )
    res = train(
        net,
        tr,
        "auto",
        weights=weights,
        balance=args.balance,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=2e-3,
        validation=va,
        metrics={"left": ["accuracy"], "right": ["accuracy"], "ink": ["mae"]},
        seed=args.seed,
        progress="lines" if args.progress else False,
        device="cpu",
        log=f"csv:{out / 'history.csv'}",
    )
    print(res.table())
    print(f"{res.examples_per_second:.0f} examples/s")
    plot = out / "loss.png"
    res.plot(plot)
    print(f"loss plot: {plot}")
    print(f"history:   {out / 'history.csv'}")
    return 0


# ------------------------------------------------------------------------------------------------- inspect
def add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="which loss reaches which layer, how hard each pulls and whether they conflict (demo net)",
    )
    _inspect_arguments(p)
    p.set_defaults(func=_cli_inspect)


def _inspect_arguments(parser: Any) -> None:
    """The options of ``lossport inspect`` (on the demo net :class:`lossport.data.MultiDigitsNet`)."""
    parser.add_argument("--batches", type=int, default=4, help="batches measured (default 4)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    parser.add_argument("--balance", default=None, help="a balancer name whose weights to report")
    parser.add_argument("--seed", type=int, default=0, help="seed of the net's initialisation (default 0)")
    parser.add_argument(
        "--figure",
        default="lossport-inspect.png",
        help="where to save the figure ('' for none; default %(default)s)",
    )
    parser.add_argument("--json", default=None, help="also write report.as_dict() to this file")


def _cli_inspect(args: Any) -> int:
    """``lossport inspect``: the report of the demo net (multidigits, MultiDigitsNet, automatic losses) at
    initialisation: prints the table, saves the figure (and the JSON)."""
    import json

    import torch

    from .data import MultiDigitsNet, multidigits
    from .inspection import inspect

    torch.manual_seed(args.seed)
    net = MultiDigitsNet()
    data = multidigits("train", size=args.batches * args.batch_size)
    report = inspect(net, data, "auto", batches=args.batches, batch_size=args.batch_size, balance=args.balance)
    print(report.table())
    if args.figure:
        report.plot().savefig(args.figure, dpi=120, bbox_inches="tight")
        print(f"\nfigure saved to {args.figure}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_dict(), f, indent=1)
        print(f"report saved to {args.json}")
    return 0


# ------------------------------------------------------------------------------------------------- compare
def add_compare(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="rank balancing methods on the built-in data against single-task baselines (Delta-m%%)",
    )
    p.add_argument("--data", default="multidigits", choices=["multidigits"], help="built-in data set")
    p.add_argument("--methods", default=_default_methods(3, 5), help="comma-separated balancer names")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--size", type=int, default=2000, help="training examples (default 2000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("lossport-compare"), help="directory of the table and figure")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    import time

    import torch

    from .comparison import compare
    from .data import MultiDigitsNet, multidigits

    torch.set_num_threads(max(1, args.threads))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from .balance import aliases, available

    unknown = [m for m in methods if m.lower().replace("-", "_") not in aliases()]
    if unknown:
        print(f"unknown methods {unknown}; available: {', '.join(available())}", file=sys.stderr)
        return 2
    train_data = multidigits("train", size=args.size)
    test = multidigits("test")
    t0 = time.perf_counter()
    table = compare(
        lambda: MultiDigitsNet(width=16),
        train_data,
        {"left": "auto", "right": "auto", "ink": "auto"},
        methods=methods,
        metrics={"left": ["accuracy"], "right": ["accuracy"], "ink": ["mae"]},
        test=test,
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=2e-3,
        device="cpu",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    print(table.table())
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    table.to_csv(str(args.out / "compare.csv"))
    fig = table.plot(pareto=("left/accuracy", "ink/mae"))
    fig.savefig(args.out / "compare.png", dpi=120)
    print(f"table: {args.out / 'compare.csv'}\nfigure: {args.out / 'compare.png'}")
    failed = [r.method for r in table.rows if r.error is not None]
    if failed:  # the table is written, but a script running this must see that it is incomplete
        print(f"failed: {', '.join(failed)} (errors listed below the table and in compare.csv)", file=sys.stderr)
        return 1
    return 0


def _default_methods(n_loss: int, n_gradient: int) -> str:
    """The plain sum, then the first loss-level (learned or from the losses) and gradient-level methods of the
    balancers' own preference order (:func:`lossport.balance.suggest`)."""
    from .balance import suggest

    names = [*suggest(["static"])[:1], *suggest(["learned", "loss"])[:n_loss], *suggest(["gramian"])[:n_gradient]]
    return ",".join(names)


# ----------------------------------------------------------------------------------------------------- toy
def add_toy(sub: Any) -> None:
    p = sub.add_parser("toy", help="trajectories of balancers on the two-task toy problem (CAGrad/Nash-MTL/FAMO)")
    from .toy import PAPER_METHODS

    p.add_argument(
        "--methods",
        default=",".join(m for m in PAPER_METHODS if m != "fairgrad"),
        help="comma-separated balancer names (default: the methods whose papers show this problem, FairGrad aside: "
        "its solver is slow near the front)",
    )
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--out", type=Path, default=Path("lossport-toy.png"))
    p.set_defaults(func=cmd_toy)


def cmd_toy(args: argparse.Namespace) -> int:
    from . import toy

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    trajs: dict[str, list[toy.Trajectory]] = {}
    failed = 0
    for m in methods:
        try:
            trajs[m] = toy.run_all([m], steps=args.steps, lr=args.lr)[m]
        except Exception as e:  # a method that does not fit the problem (losses < 0 here): reported, the others run
            failed += 1
            print(f"{m:10s} not run: {type(e).__name__}: {e}")
            continue
        ends = ", ".join(f"({float(t.end[0]):.2f}, {float(t.end[1]):.2f})" for t in trajs[m])
        print(f"{m:10s} end points: {ends}")
    if trajs:
        toy.plot(trajs, path=str(args.out))
        print(f"figure: {args.out}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- the command
SUBCOMMANDS: list[SubcommandAdder] = [add_demo, add_inspect, add_compare, add_toy]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lossport", description="Several outputs, several losses.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
