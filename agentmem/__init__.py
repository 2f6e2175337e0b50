"""agentmem: run a language model for as long as an agent needs inside a fixed KV-cache budget."""

from .cartridge import Cartridge
from .errors import (
    AgentMemError,
    BudgetError,
    CompactionError,
    ModelMismatchError,
    ModelNotFoundError,
    SessionFileError,
    UnknownPolicyError,
)
from .events import CompactionEvent, GenerationResult, SessionStats, StreamEvent
from .kv.positions import PositionConfig
from .recall import RECALL_TOOL, RecallResult
from .session import AgentSession, ScoreResult, generate_batch
from .toolcalls import ToolReceipt

__all__ = [
    "AgentMemError",
    "AgentSession",
    "BudgetError",
    "Cartridge",
    "CompactionError",
    "CompactionEvent",
    "GenerationResult",
    "ModelMismatchError",
    "ModelNotFoundError",
    "PositionConfig",
    "RECALL_TOOL",
    "RecallResult",
    "ScoreResult",
    "SessionFileError",
    "SessionStats",
    "StreamEvent",
    "ToolReceipt",
    "UnknownPolicyError",
    "generate_batch",
]

__version__ = "0.1.0"
