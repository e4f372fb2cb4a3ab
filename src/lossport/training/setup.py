"""Set-up of a training run: device, precision, optimizer and scheduler from the user's arguments."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from ..balance import Balancer

PRECISIONS = {
    "32": "32",
    "32-true": "32",
    "fp32": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "16-mixed": "16-mixed",
    "16": "16-mixed",
    "fp16": "16-mixed",
}


def resolve_device(device: Any, net: nn.Module) -> torch.device:
    """``None``: the net's device; ``"auto"``: CUDA when available (one GPU per torchrun process, by
    ``LOCAL_RANK``), else the CPU; anything else as ``torch.device`` reads it."""
    if device is None:
        p = next(iter(net.parameters()), None)
        return p.device if p is not None else torch.device("cpu")
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def resolve_precision(precision: Any, device: torch.device) -> str:
    """``"32"``, ``"bf16"`` (bfloat16 autocast, no scaler) or ``"16-mixed"`` (float16 autocast with a
    ``GradScaler``), wherever torch supports autocast on the device (CPU included)."""
    key = str(precision).lower() if precision is not None else "32"
    if key not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of '32', 'bf16', '16-mixed'")
    p = PRECISIONS[key]
    if p != "32" and not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise ValueError(f"precision={precision!r}: torch has no autocast on {device.type}; use precision='32'")
    return p


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The forward's autocast context for ``precision``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for ``"16-mixed"``; ``None`` otherwise. The balancers never see scaled values: the
    parts (and any Gramian) are computed before the total is scaled for its backward."""
    return torch.amp.GradScaler(device.type) if precision == "16-mixed" else None


def make_optimizer(
    spec: Any, net: nn.Module, lr: float, weight_decay: float, balancer: Balancer | None
) -> torch.optim.Optimizer:
    """``"adam"``, ``"adamw"`` (weight decay 0.01 unless given), ``"sgd"`` (momentum 0.9), an Optimizer, or a
    function ``params -> Optimizer``; never over the balancer's own parameters."""
    params = [p for p in net.parameters() if p.requires_grad]
    if isinstance(spec, torch.optim.Optimizer):
        opt = spec
    elif isinstance(spec, str):
        key = spec.lower()
        if key == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        elif key == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay if weight_decay else 0.01)
        elif key == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        else:
            raise ValueError(
                f"optimizer={spec!r}: use 'adam', 'adamw', 'sgd', an Optimizer or a function params -> Optimizer"
            )
    elif callable(spec):
        opt = spec(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer function returned a {type(opt).__name__}, not a torch.optim.Optimizer")
    else:
        raise TypeError(f"optimizer must be a name, an Optimizer or a function, not {type(spec).__name__}")
    if balancer is not None:
        own = {id(p) for p in balancer.parameters()}
        if any(id(p) in own for g in opt.param_groups for p in g["params"]):
            raise ValueError(
                f"the optimizer holds parameters of the balancer {balancer!r}; the balancer trains them itself "
                "in balancer.step(): give the optimizer the net's parameters only"
            )
    return opt


def make_scheduler(spec: Any, opt: torch.optim.Optimizer) -> Any:
    """A function ``optimizer -> scheduler``, or a scheduler already bound to ``opt``; ``None``: none."""
    if spec is None:
        return None
    if isinstance(spec, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        if spec.optimizer is not opt:
            raise ValueError(
                "scheduler is bound to another optimizer; give a function optimizer -> scheduler "
                "(e.g. lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10)) or pass that optimizer as optimizer="
            )
        return spec
    if callable(spec):
        return spec(opt)
    raise TypeError(f"scheduler must be a function optimizer -> scheduler or a scheduler, not {type(spec).__name__}")


def has_batchnorm(net: nn.Module) -> bool:
    """Whether the net holds a batch-norm layer (which cannot train on a batch of one example)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


__all__ = [
    "PRECISIONS",
    "autocast",
    "grad_scaler",
    "has_batchnorm",
    "make_optimizer",
    "make_scheduler",
    "resolve_device",
    "resolve_precision",
]
