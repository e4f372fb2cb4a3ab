"""Naming a net's outputs.

What a net returns becomes a flat ``{name: tensor}`` map and a *structure* (``"single"``, ``"tuple"``,
``"dict"``), which the loss spec is read against (:mod:`lossport.spec`):

==============================================  ================================================================
the net returns                                 output names (structure)
==============================================  ================================================================
a tensor                                        ``out`` (single)
a dict, an ``OrderedDict`` subclass (a Hugging  its keys (dict); ``None`` values are left out (an HF output
Face ``ModelOutput``)                           without ``loss`` when no labels were given)
a namedtuple                                    its field names (tuple: lists of losses still match by position)
a dataclass instance                            its field names (dict); ``None`` fields are left out
a tuple or list of at most 8 values             ``out0``, ``out1``, ... (tuple)
==============================================  ================================================================

A value that is itself a dict (a detection model's loss dict, an FPN's feature dict) or a list/tuple is named one
level down: ``parent/child`` and ``parent/0``, ``parent/1``... Anything else is a :class:`LossSpecError` that
names the value and says how to fix it: a bare tuple or list of more than 8 values (name them: return a dict), a
value nested two levels deep, a value that is not a tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..errors import LossSpecError

MAX_POSITIONAL = 8
"""The most values a bare tuple/list output may have; more must be named (a dict)."""


def name_outputs(out: Any) -> tuple[dict[str, Tensor], str]:
    """The net's outputs by name, and their structure: ``"dict"``, ``"tuple"`` or ``"single"``."""
    if isinstance(out, Tensor):
        return {"out": out}, "single"
    if isinstance(out, Mapping):
        return _flatten(_keyed(out.items(), "dict"), "the net's dict"), "dict"
    fields = getattr(out, "_fields", None)
    if isinstance(out, tuple) and isinstance(fields, tuple):
        return _flatten(list(zip(fields, out)), f"the net's {type(out).__name__}"), "tuple"
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
        return _flatten(items, f"the net's {type(out).__name__}"), "dict"
    if isinstance(out, (tuple, list)):
        if len(out) > MAX_POSITIONAL:
            raise LossSpecError(
                f"the net returned a {type(out).__name__} of {len(out)} values; lossport names up to "
                f"{MAX_POSITIONAL} positional outputs (out0, out1, ...), more cannot be told apart in a loss spec. "
                "Name them: return a dict {name: tensor} (or a namedtuple) from forward"
            )
        return _flatten([(f"out{i}", v) for i, v in enumerate(out)], f"the net's {type(out).__name__}"), "tuple"
    raise LossSpecError(
        f"the net returned a {type(out).__name__}; lossport needs a tensor, a tuple, a namedtuple, a dataclass "
        "or a dict of tensors"
    )


def _keyed(items: Any, what: str) -> list[tuple[str, Any]]:
    out = []
    for k, v in items:
        if not isinstance(k, str):
            raise LossSpecError(f"the net returned a {what} with a non-string key {k!r}; use string keys")
        out.append((k, v))
    return out


def _flatten(items: list[tuple[str, Any]], where: str) -> dict[str, Tensor]:
    """Tensors by name; dicts and lists one level down as ``parent/child``; ``None`` left out."""
    named: dict[str, Tensor] = {}
    for name, v in items:
        if v is None:
            continue
        if isinstance(v, Tensor):
            named[name] = v
            continue
        if isinstance(v, Mapping):
            children = _keyed(v.items(), f"dict under {name!r}")
        elif isinstance(v, (tuple, list)):
            children = [(str(i), x) for i, x in enumerate(v)]
        else:
            raise LossSpecError(
                f"output {name!r} of {where} is a {type(v).__name__}, not a tensor; return tensors, or dicts/lists "
                "of tensors one level deep (named 'parent/child')"
            )
        for child, x in children:
            if x is None:
                continue
            full = f"{name}/{child}"
            if not isinstance(x, Tensor):
                raise LossSpecError(
                    f"output {full!r} of {where} is a {type(x).__name__}, not a tensor: lossport names outputs at "
                    "most one level deep ('parent/child'); return a flat dict {name: tensor} from forward"
                )
            if full in named:
                raise LossSpecError(f"{where} gives output {full!r} twice (a key and a nested key); rename one")
            named[full] = x
    return named
