"""Balancers: turn the loss parts of a batch into weights (see :mod:`lossport.balance.base`)."""

from .base import Balancer, available, register, resolve

__all__ = ["Balancer", "available", "register", "resolve"]
