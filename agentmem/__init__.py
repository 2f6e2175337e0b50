"""agentmem: run a language model for as long as an agent needs inside a fixed KV-cache budget."""

from ._version import __version__
from .agent import AgentSession
from .batch import generate_batch
from .cartridge import Cartridge
from .errors import (
    AgentMemError,
    BudgetError,
    CompactionError,
    ModelMismatchError,
    ModelNotFoundError,
    PinRefused,
    SessionFileError,
    UnknownPolicyError,
)
from .events import CompactionEvent, GenerationResult, ScoreResult, SessionStats, StreamEvent
from .kv.positions import PositionConfig
from .recall import RECALL_TOOL, RecallResult
from .session import Session
from .tools import ToolReceipt

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
    "PinRefused",
    "PositionConfig",
    "RECALL_TOOL",
    "RecallResult",
    "ScoreResult",
    "Session",
    "SessionFileError",
    "SessionStats",
    "StreamEvent",
    "ToolReceipt",
    "UnknownPolicyError",
    "__version__",
    "generate_batch",
]
