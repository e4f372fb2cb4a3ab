"""Reference implementations on the multidigits problem of ``lossport compare`` (issue 15): do Krum, SI, DB-MTL,
GradNorm, MoDo, MoCo and PBI end with the ink head untrained in their reference code too?

A hand loop with no lossport balancer in it: MultiDigitsNet(width=16) built after ``torch.manual_seed(seed)``,
the 2000 training examples in shuffled batches of 64, Adam lr 2e-3, ``--epochs`` rounds, scored on the 1000 test
examples (left / right accuracy, ink MAE). Per step the losses (cross-entropy from the heads' logits, MSE for
ink) go to one reference rule:

* ``sum``: the plain sum (sanity check against lossport's ``ew``).
* ``si``: ``sum_i log L_i`` backpropagated through the whole net (Nash-MTL's scale-invariant baseline, Navon et al.
  2022: the sum of the log losses).
* ``db_mtl``, ``gradnorm``, ``moco``, ``modo``: LibMTL's weighting classes from a source checkout (``--libmtl``),
  attached to the net as LibMTL's architectures attach them (encoder = trunk, decoders = heads) with lossport's
  default hyper-parameters. MoDo gets two extra batches per step from other shuffles (LibMTL's three batches).
  GradNorm: round 0 is the plain sum and records the round's mean losses (LibMTL's warm-up and
  ``train_loss_buffer``); its ``loss_scale`` is trained by the same Adam, as in LibMTL.
* ``krum``: TorchJD's ``mtl_backward`` with ``Krum(n_byzantine=0, n_selected=1)`` (``jac_to_grad``) on the
  trunk.
* ``pbi``: TorchJD's ``scalarization.PBI(theta=5)`` (uniform ray, origin as reference) of the loss vector.

In LibMTL's gradient methods and TorchJD's ``mtl_backward`` each head receives its own loss's *unweighted*
gradient; lossport gives every head ``w_i`` times it (``lossport.balance.gramian_base``). ``--heads weighted``
multiplies each head's gradient by the method's weight of that part (lossport's convention: weights summing to
``T``), so that the two conventions can be told apart (``krum``, ``gradnorm``, ``modo``; the others' heads are
already what lossport gives them).

    .venv/bin/python benchmarks/ink_reference.py --methods sum,si,db_mtl --seeds 0,1,2 --epochs 10 \
        --libmtl /tmp/costs/libmtl
    .venv/bin/python benchmarks/ink_reference.py --methods sum,si,db_mtl,moco --check 4 --libmtl /tmp/costs/libmtl

Methods named ``lossport:<name>`` run ``lossport.train`` with that balancer on the same net, data and schedule;
``--standardise`` replaces ink by ``(ink - mean) / std`` (training set's) in training and test, MAE in ink's units:

    .venv/bin/python benchmarks/ink_reference.py --standardise --methods lossport:gradnorm,lossport:si

``--check N``: instead of training, N calls of lossport's balancer and of the reference on the same net and
batches, and the largest relative difference between their gradients (``sum``, ``si``, ``db_mtl``, ``moco``).
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lossport.data import MultiDigitsNet, multidigits

LR, BATCH, SIZE = 2e-3, 64, 2000  # lossport compare: 2000 training examples
LIBMTL = {
    "db_mtl": ("DB_MTL", {"DB_beta": 0.9, "DB_beta_sigma": 0.0}),
    "gradnorm": ("GradNorm", {"alpha": 1.5}),
    "moco": (
        "MoCo",
        {"MoCo_beta": 0.5, "MoCo_beta_sigma": 0.5, "MoCo_gamma": 0.1, "MoCo_gamma_sigma": 0.5, "MoCo_rho": 0},
    ),
    "modo": ("MoDo", {"MoDo_gamma": 0.1, "MoDo_rho": 0.1}),  # lossport's (TorchJD's) defaults; LibMTL's gamma 1e-3
}
Step = Callable[[Tensor, list[Tensor], int], Tensor]  # (losses, extra batches' losses, round) -> weights (sum T)


def heads(net: MultiDigitsNet) -> list[nn.Module]:
    return [net.left, net.right, net.ink]


def weigh_heads(net: MultiDigitsNet, w: Tensor) -> None:
    """lossport's convention on top of a reference's plain-gradient heads: head ``i``'s gradient times ``w_i``."""
    for head, wi in zip(heads(net), w.tolist(), strict=True):
        for p in head.parameters():
            p.grad.mul_(wi)


def losses(net: MultiDigitsNet, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(L, z)``: the three losses (left and right cross-entropy from the logits, ink MSE) and the trunk's output."""
    z = net.trunk(batch["image"])
    left = F.cross_entropy(net.left[0](z), batch["left"])
    right = F.cross_entropy(net.right[0](z), batch["right"])
    ink = F.mse_loss(net.ink(z), batch["ink"])
    return torch.stack([left, right, ink]), z


@torch.no_grad()
def score(net: MultiDigitsNet, test: dict[str, Tensor]) -> tuple[float, float, float]:
    z = net.trunk(test["image"])
    acc = [float((h[0](z).argmax(1) == test[k]).float().mean()) for h, k in ((net.left, "left"), (net.right, "right"))]
    return acc[0], acc[1], float((net.ink(z) - test["ink"]).abs().mean())


def libmtl_step(net: MultiDigitsNet, root: str, name: str) -> tuple[Step, list[nn.Parameter]]:
    """LibMTL's weighting ``name`` attached to ``net``; returns the step and the weighting's own parameters."""
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from methods import _load_libmtl, libmtl_model  # benchmarks/methods.py: LibMTL without its trainer, its harness

    _load_libmtl(root)
    cls_name, kwargs = LIBMTL[name]
    cls = importlib.import_module(f"LibMTL.weighting.{cls_name}").__dict__[cls_name]
    import numpy as np

    decoders = {"left": net.left, "right": net.right, "ink": net.ink}
    model = libmtl_model(cls, net.trunk, decoders, 0, np.ones((3, 1)))
    own = [p for n, p in model.named_parameters() if not n.startswith(("encoder.", "decoders."))]
    first: list[Tensor] = []  # GradNorm: the losses of round 0, whose mean is LibMTL's train_loss_buffer[:, 0]

    def step(L: Tensor, extra: list[Tensor], epoch: int) -> Tensor:
        model.epoch = epoch
        if name == "gradnorm":
            if epoch == 0:
                first.append(L.detach())
            elif first:
                model.train_loss_buffer = torch.stack(first).mean(0)[:, None].numpy()
                first.clear()
        w = model.backward(torch.stack([*extra, L]) if name == "modo" else L, **kwargs)
        w = torch.as_tensor(w, dtype=torch.float32)
        return 3 * w if name == "modo" else w  # MoDo's lambda sums to 1; the others' weights already sum to T

    return step, own


def torchjd_step(net: MultiDigitsNet, name: str) -> Step:
    from torchjd.aggregation import Krum, KrumWeighting
    from torchjd.autojac import jac_to_grad, mtl_backward
    from torchjd.scalarization import PBI

    trunk = list(net.trunk.parameters())
    pbi = PBI(theta=5.0, weights=torch.ones(3))

    def step(L: Tensor, extra: list[Tensor], epoch: int) -> Tensor:
        if name == "pbi":
            S = pbi(L)
            (w,) = torch.autograd.grad(S, L, retain_graph=True)
            S.backward()
            return math.sqrt(3) * w.detach()  # lossport's factor: b = sqrt(T) dS/dL
        rows = [torch.cat([g.flatten() for g in torch.autograd.grad(L[i], trunk, retain_graph=True)]) for i in range(3)]
        J = torch.stack(rows)
        w = 3 * KrumWeighting(0, 1)(J @ J.T)
        # heads: their own loss's gradient; trunk: the Jacobian (in .jac), aggregated by Krum
        mtl_backward(list(L), features=net._z, retain_graph=True)
        jac_to_grad(trunk, Krum(0, 1))
        return w

    return step


def data(standardise: bool) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """``(train, test, ink's unit)``: with ``standardise``, ink minus the training mean over the training std in
    both (the unit is that std, to report the MAE in ink's units)."""
    train, test = multidigits("train", size=SIZE), multidigits("test")
    if not standardise:
        return train, test, 1.0
    mu, sd = train["ink"].mean(), train["ink"].std()
    return {**train, "ink": (train["ink"] - mu) / sd}, {**test, "ink": (test["ink"] - mu) / sd}, float(sd)


def run(
    method: str,
    seed: int,
    epochs: int,
    head_rule: str,
    root: str | None,
    own_lr: float | None = None,
    standardise: bool = False,
) -> tuple[float, float, float]:
    """Left and right test accuracy and ink test MAE (in ink's units) after ``epochs`` rounds of ``method``: a
    reference, or ``lossport:<name>`` for ``lossport.train`` with that balancer on the same run."""
    torch.manual_seed(seed)
    net = MultiDigitsNet(width=16)
    train, test, unit = data(standardise)
    own: list[nn.Parameter] = []
    if method.startswith("lossport:"):
        import lossport

        spec = {"left": "auto", "right": "auto", "ink": "auto"}
        kw = {"epochs": epochs, "batch_size": BATCH, "lr": LR, "device": "cpu", "seed": seed, "progress": False}
        lossport.train(net, train, spec, balance=method.split(":", 1)[1], **kw)
        left, right, mae = score(net, test)
        return left, right, mae * unit
    if method in LIBMTL:
        if not root:
            raise SystemExit(f"{method} needs --libmtl (a LibMTL source checkout)")
        step, own = libmtl_step(net, root, method)
    elif method in ("krum", "pbi"):
        step = torchjd_step(net, method)
    elif method in ("sum", "si"):

        def step(L: Tensor, extra: list[Tensor], epoch: int) -> Tensor:
            (L.log() if method == "si" else L).sum().backward()
            return 1 / L.detach() if method == "si" else torch.ones(3)

    else:
        raise SystemExit(f"unknown method {method!r}")
    groups: list[dict[str, Any]] = [{"params": list(net.parameters())}]
    if own:  # GradNorm's loss_scale: in the net's Adam (LibMTL), at the net's lr unless --own-lr
        groups.append({"params": own, "lr": own_lr or LR})
    opt = torch.optim.Adam(groups, lr=LR)
    gen = torch.Generator().manual_seed(seed)
    n = len(train["ink"])
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for a in range(0, n, BATCH):
            idx = order[a : a + BATCH]
            opt.zero_grad(set_to_none=False)
            L, net._z = losses(net, {k: v[idx] for k, v in train.items()})
            extra = []
            if method == "modo":  # two more batches from other draws (MoDo's double sampling)
                extra = [losses(net, {k: v[torch.randperm(n, generator=gen)[:BATCH]] for k, v in train.items()})[0]]
                extra.append(losses(net, {k: v[torch.randperm(n, generator=gen)[:BATCH]] for k, v in train.items()})[0])
            w = step(L, extra, epoch)
            if head_rule == "weighted" and method in ("krum", "gradnorm", "modo"):
                weigh_heads(net, w)
            opt.step()
    left, right, mae = score(net, test)
    return left, right, mae * unit


def check_gradients(method: str, calls: int, root: str | None) -> None:
    """Print, for ``calls`` successive calls on fresh batches, the largest relative difference between a parameter
    tensor's gradient from lossport's balancer and from the reference (same net, same batch); the trunk's
    reference gradient times lossport's documented factor (MoCo: ``T``). The net moves by the same small sign step
    after each call, so every call sees new gradients and the methods' states advance alike."""
    import lossport

    torch.manual_seed(0)
    net = MultiDigitsNet(width=16)
    train = multidigits("train", size=SIZE)
    objective = lossport.Objective({"left": "auto", "right": "auto", "ink": "auto"}, balance=method)
    if method in LIBMTL:
        step, _ = libmtl_step(net, str(root), method)
    else:
        step = {"sum": lambda L, e, k: L.sum().backward(), "si": lambda L, e, k: L.log().sum().backward()}[method]
    trunk = len(list(net.trunk.parameters()))
    factor = 3.0 if method == "moco" else 1.0
    gen = torch.Generator().manual_seed(0)
    for k in range(calls):
        idx = torch.randperm(SIZE, generator=gen)[:BATCH]
        batch = {key: v[idx] for key, v in train.items()}
        net.zero_grad()
        objective(net, batch).total.backward()
        ours = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        L, net._z = losses(net, batch)
        step(L, [], 1)
        theirs = [p.grad.clone() for p in net.parameters()]
        rel = max(
            float((a - (factor if i < trunk else 1.0) * b).norm() / b.norm().clamp_min(1e-30))
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
        )
        print(f"{method}: call {k}, largest relative difference of a parameter's gradient {rel:.1e}")
        with torch.no_grad():
            for p, g in zip(net.parameters(), theirs, strict=True):
                p -= 1e-3 * g.sign()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="sum,si,db_mtl,gradnorm,moco,modo,krum,pbi")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--heads", choices=("plain", "weighted"), default="plain")
    ap.add_argument("--own-lr", type=float, default=None, help="lr of GradNorm's loss_scale (default: the net's)")
    ap.add_argument("--libmtl", default=None, help="LibMTL source checkout (for db_mtl, gradnorm, moco, modo)")
    ap.add_argument("--standardise", action="store_true", help="ink minus its mean over its std (MAE in ink's units)")
    ap.add_argument("--check", type=int, default=0, help="compare N calls' gradients with lossport's instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.check:
        for m in args.methods.split(","):
            check_gradients(m, args.check, args.libmtl)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"heads: {args.heads}; GradNorm's lr {args.own_lr or LR}; {args.epochs} rounds, Adam {LR}, batch {BATCH}")
    print(f"mean ± std over seeds {seeds}")
    print(f"{'method':10} {'left acc':>14} {'right acc':>14} {'ink MAE':>14}   per seed ink MAE")
    for m in args.methods.split(","):
        res = [run(m, s, args.epochs, args.heads, args.libmtl, args.own_lr, args.standardise) for s in seeds]
        cols = list(zip(*res))

        def pm(v: tuple[float, ...]) -> str:
            return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"

        print(
            f"{m:10} {pm(cols[0]):>14} {pm(cols[1]):>14} {pm(cols[2]):>14}   {[round(v, 2) for v in cols[2]]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
