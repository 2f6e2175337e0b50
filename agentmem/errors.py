"""Exceptions raised by agentmem. Every message says what to change."""

from __future__ import annotations


class AgentMemError(Exception):
    """Base class of every error agentmem raises on purpose."""


class ModelNotFoundError(AgentMemError, FileNotFoundError):
    """The requested model is neither an embedded package nor a local directory / GGUF file."""


class BudgetError(AgentMemError, ValueError):
    """The KV budget cannot hold what the operation needs (even after compaction)."""


class PinRefused(BudgetError):
    """A pin or hold was refused before anything was read or recorded: the caller may go on without it."""


class UnknownPolicyError(AgentMemError, ValueError):
    """A policy name, preset file or config that agentmem does not know."""


class CompactionError(AgentMemError, RuntimeError):
    """A compaction could not be computed; the cache was left exactly as it was."""


class UnsupportedModelError(AgentMemError, NotImplementedError):
    """The model uses a feature the runtime cannot handle (the message names it)."""


class ProfileError(AgentMemError, ValueError):
    """A per-head budget profile that is missing, corrupt, inconsistent or for another model."""


class SessionFileError(AgentMemError, ValueError):
    """A saved session or cartridge file that is missing, truncated, corrupted or of another format version."""


class ModelMismatchError(AgentMemError, ValueError):
    """Saved memory (a session file or cartridge) belongs to another model than the one it is loaded into."""
