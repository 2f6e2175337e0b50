"""agentmem: run a language model for as long as an agent needs inside a fixed KV-cache budget."""

from .errors import AgentMemError, BudgetError, CompactionError, ModelNotFoundError, UnknownPolicyError
from .events import CompactionEvent, GenerationResult, SessionStats, StreamEvent
from .positions import PositionConfig
from .session import AgentSession, ScoreResult

__all__ = [
    "AgentMemError",
    "AgentSession",
    "BudgetError",
    "CompactionError",
    "CompactionEvent",
    "GenerationResult",
    "ModelNotFoundError",
    "PositionConfig",
    "ScoreResult",
    "SessionStats",
    "StreamEvent",
    "UnknownPolicyError",
]

__version__ = "0.1.0"
