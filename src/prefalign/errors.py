"""Errors raised by prefalign.

Every error a user can cause is a :class:`PrefalignError` (a ``ValueError``) whose
message names what is wrong and how to fix it. The server maps them to 4xx answers.
"""

from __future__ import annotations


class PrefalignError(ValueError):
    """A request prefalign cannot serve as given.

    ``field`` names the offending argument (``"method"``, ``"max_new_tokens"``, ...)
    so that the CLI and the server can point at it.
    """

    #: The OpenAI-style error code the server answers with (400 for every PrefalignError).
    code = "invalid_value"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownNameError(PrefalignError):
    """An unknown method, preset, template or judge name."""


class ModelLoadError(PrefalignError):
    """A model or tokenizer that cannot be loaded (missing path, offline hub, bad GGUF)."""


class TemplateError(PrefalignError):
    """A chat that cannot be formatted (no chat template, empty prompt, bad roles)."""


class TokenizerMismatchError(PrefalignError):
    """Two models (e.g. a PRM and its policy) whose tokenizers differ."""


class ContextLengthError(PrefalignError):
    """A prompt (plus the tokens to generate) longer than the model or the server allows."""

    code = "context_length_exceeded"
