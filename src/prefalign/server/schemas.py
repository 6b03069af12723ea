"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types).

Strict mode: ``"0.5"`` is not a number and ``1.0`` is not an integer, as in OpenAI's
API; a wrong type is answered with 422 rather than silently coerced. Unknown fields
are rejected (400, "Unrecognized request argument") so that a misspelt ``preference``
is not silently ignored. OpenAI fields prefalign does not implement are accepted only
at their neutral value (see :data:`NEUTRAL_ONLY`).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PreferenceItem(BaseModel):
    """One weighted preference: ``{"text": "...", "weight": 1.0}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str
    weight: float = 1.0


class Alignment(BaseModel):
    """``{"method": "amulet", "template": "amulet", ...method parameters}``.

    Method parameters are the extra keys (e.g. ``alpha``, ``lambda``, ``ratio``,
    ``width``); they must be JSON scalars and are checked by the method itself.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    method: Optional[str] = None
    template: Optional[str] = None

    def method_params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _scalar_params(self) -> Alignment:
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, (bool, int, float, str)):
                raise ValueError(f"alignment parameter {key!r} must be a number, boolean or string")
        return self


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` has an effect."""

    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class ChatMessage(BaseModel):
    """One chat message. ``content`` may be a string or a list of text parts."""

    # Clients often send back a previous answer's message as is (with ``refusal``,
    # ``annotations``, ... set to null): ignore unknown keys here.
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[Any]] = None
    function_call: Optional[Any] = None


class _GenerationBody(BaseModel):
    """Fields shared by chat and plain completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    user: Optional[str] = None
    # prefalign extensions (top level, so the OpenAI SDK's ``extra_body`` works).
    preference: Union[str, list[Union[str, PreferenceItem]], None] = None
    alignment: Optional[Alignment] = None
    top_k: Optional[int] = None
    ignore_eos: Optional[bool] = False
    repetition_penalty: Optional[float] = None  # transformers' (as vLLM's extension field)
    no_repeat_ngram_size: Optional[int] = None
    # OpenAI's repetition penalties (decoding/repetition.py).
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    # Accepted and ignored: they do not change the answer.
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    # OpenAI features prefalign does not implement: accepted only when neutral.
    logit_bias: Optional[dict[str, Any]] = None


class ChatCompletionRequest(_GenerationBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(...)
    max_completion_tokens: Optional[int] = None
    #: The log-probabilities of the method's scores per token (``top_logprobs``: 0–20 alternatives).
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(_GenerationBody):
    """``POST /v1/completions`` (one plain prompt, answered as a user message)."""

    prompt: Union[str, list[str]] = Field(...)
    #: Legacy completions: the number of alternatives per token (0: the token's own log-prob only).
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


def _is_neutral_response_format(value: Any) -> bool:
    return value is None or value == {"type": "text"}


#: Field -> predicate of the values that mean "feature not used".
NEUTRAL_ONLY: dict[str, Any] = {
    "logit_bias": lambda v: not v,
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "response_format": _is_neutral_response_format,
    "echo": lambda v: not v,
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: not v,
}
