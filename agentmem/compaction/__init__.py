"""HOW to compact: plain tensor math (Attention Matching lands here) and the driver that applies a plan."""

from .base import Method
from .driver import execute_plan

__all__ = ["Method", "execute_plan"]
