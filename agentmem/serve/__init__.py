"""The OpenAI-compatible server: ``openai`` (wire format), ``conversations`` (a session per
conversation), ``http`` (the HTTP layer)."""

from .conversations import Conversations, ServerConfig, message_key, new_messages
from .http import AgentMemServer, serve

__all__ = ["AgentMemServer", "Conversations", "ServerConfig", "message_key", "new_messages", "serve"]
