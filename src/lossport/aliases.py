"""Type aliases of the public boundary: what a loss spec, a balancer spec and training data may be."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from torch.utils.data import DataLoader, Dataset

    from .balance import Balancer

LossSpec = Any
"""A loss spec (:class:`~lossport.Objective`): ``"auto"``, a name (``"ce"``, ``"mse"``...), a loss layer, a
``torch.nn`` loss, a callable, ``Scaled(spec, r)``, ``L1``/``L2``, or a dict/list of these per output."""

BalanceSpec = Union[str, "Balancer", None]
"""A balancer by name (``"uw"``, ``"upgrad"``, ... :func:`lossport.balance.available`), an instance, or ``None``
(static weights)."""

DataLike = Union[
    Mapping[str, Any],
    tuple[Any, Any],
    Sequence[Any],
    "Dataset[Any]",
    "DataLoader[Any]",
]
"""Data (:mod:`lossport.training.data`): a dict of tensors/arrays, a pair ``(x, y)``, a list of examples, a
``Dataset`` or a ``DataLoader``."""

__all__ = ["BalanceSpec", "DataLike", "LossSpec"]
