"""HOW to compact: plain tensor math (Attention Matching lands here) and the driver that applies a plan."""

from .driver import execute_plan
from .plan import Method

__all__ = ["Method", "execute_plan"]
