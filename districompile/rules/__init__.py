"""Sharding rules by op family; importing this package registers them all."""

from . import attention, conv, norm, pointwise, reduction, resample, views  # noqa: F401
from .registry import Decision, Exchange, RuleContext, lookup, register

__all__ = ["Decision", "Exchange", "RuleContext", "lookup", "register"]
