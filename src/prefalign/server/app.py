"""The OpenAI-compatible HTTP API: ``create_app(aligner) -> FastAPI``.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /v1/models/{id}`` and ``GET /health``. prefalign's own request fields sit at the
top level of the body so that the official client's ``extra_body`` reaches them:

* ``preference``: a preset name, a sentence, or a list of ``{"text", "weight"}``;
* ``alignment``: ``{"method": "amulet", "template": ..., ...method parameters}``;
* ``top_k``, ``ignore_eos``, ``repetition_penalty`` and ``no_repeat_ngram_size`` (as in
  vLLM; the last two are transformers' repetition controls). OpenAI's
  ``frequency_penalty`` and ``presence_penalty`` are applied with OpenAI's formula.

Answers have OpenAI's shape plus ``alignment`` (the method, template and every
parameter used, defaults filled in, so it can be sent back as is) and ``preference``
(the resolved preference texts); ``usage`` adds ``context_tokens`` and
``forward_passes``.

Status codes: 400 invalid JSON or a value prefalign rejects, 401 missing/wrong API key,
404 unknown route or model, 408 body not received in time, 413 body too large, 415 a
body that is not ``application/json``, 422 a field of the wrong type or shape, 429
queue full (with ``Retry-After``), 500 this request failed while decoding (others go
on) or the shared pass failed (the server recovers), 503 shutting down. Every error body is ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..engine import Delta, GenerationRequest, GenerationResult, TokenLogprob
from ..errors import ContextLengthError, PrefalignError
from ..methods import METHODS, PARAM_ALIASES, make_method
from ..rules import DEFAULT_METHOD_WITH_PREFERENCE, choose_method
from ..spec import RequestSpec
from ..usage import Usage
from .errors import APIError
from .logprobs import TokenText, chat_logprobs, completion_logprobs
from .scheduler import EngineFailure, Job, QueueFullError, Scheduler, SchedulerStoppedError
from .schemas import NEUTRAL_ONLY, ChatCompletionRequest, ChatMessage, CompletionRequest, _GenerationBody

log = logging.getLogger("prefalign.server")

#: OpenAI's documented range.
MAX_TEMPERATURE = 2.0
#: Extra model names accepted in the ``model`` field besides the served id.
MODEL_ALIASES = ("prefalign",)


@dataclass(frozen=True)
class ServerConfig:
    """Limits and defaults of one server (see :func:`create_app`)."""

    model_id: str
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_tokens_cap: int = 1024
    max_body_bytes: int = 1_000_000
    default_method: str = DEFAULT_METHOD_WITH_PREFERENCE
    default_temperature: float = 1.0
    max_preferences: int = 8
    max_stop: int = 4
    max_prompt_tokens: int = 8192
    body_timeout: float = 30.0
    idle_stream_timeout: float | None = None

    @property
    def max_prompt_chars(self) -> int:
        """Text refused before tokenising: no tokenizer fits more than ~16 characters in a
        token on real text, so longer text cannot fit ``max_prompt_tokens``."""
        return 16 * self.max_prompt_tokens


@dataclass
class Prepared:
    """A validated request, ready for the scheduler, and what to echo back."""

    request: GenerationRequest
    alignment: dict[str, Any]
    preference: list[dict[str, Any]] | None
    stream: bool
    include_usage: bool


def default_model_id(aligner: Any) -> str:
    """A short id for ``/v1/models``: the model directory's name, without decorations."""
    name = str(getattr(getattr(aligner.model, "config", None), "name_or_path", "") or "")
    name = name.split(" (")[0].rstrip("/")  # "SmolLM2-135M-Instruct (embedded GGUF)" -> "SmolLM2-135M-Instruct"
    name = Path(name).name if name else ""
    return name.replace(" ", "-") or "prefalign"


# --- request translation ---------------------------------------------------------------


def _api_message(message: str) -> str:
    # The core speaks of max_new_tokens; API users wrote max_tokens.
    return message.replace("max_new_tokens", "max_tokens")


def _check_neutral(body: BaseModel) -> None:
    for name, is_neutral in NEUTRAL_ONLY.items():
        if name in type(body).model_fields and not is_neutral(getattr(body, name)):
            raise APIError(400, f"'{name}' is not supported by prefalign; leave it unset", param=name, code="unsupported_parameter")


def _chat_from_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    if not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} messages", param="messages", code="invalid_value")
    chat = []
    for i, message in enumerate(messages):
        if message.tool_calls or message.function_call:
            raise APIError(400, f"messages[{i}]: tool and function calls are not supported", param=f"messages.{i}", code="unsupported_parameter")
        content = message.content
        if content is None:
            raise APIError(400, f"messages[{i}] has no content", param=f"messages.{i}.content", code="invalid_value")
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(
                        400, f"messages[{i}]: only text content parts are supported", param=f"messages.{i}.content", code="invalid_value"
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        # OpenAI's newer "developer" role is what the model knows as "system".
        role = "system" if message.role == "developer" else message.role
        chat.append({"role": role, "content": content})
    return chat


def _text_length(value: Any) -> int:
    """Characters of text in a prompt, a chat or a preference value (before tokenising)."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_length(v) for v in value.values())
    if isinstance(value, BaseModel):
        return _text_length(getattr(value, "text", None) or getattr(value, "content", None))
    if isinstance(value, (list, tuple)):
        return sum(_text_length(v) for v in value)
    return 0


class _Translator:
    """Turns a validated body into an engine request, mapping core errors to 400s."""

    def __init__(self, aligner: Any, config: ServerConfig) -> None:
        self.aligner = aligner
        self.config = config

    def prepare(
        self,
        body: _GenerationBody,
        prompt: Any,
        *,
        prompt_param: str,
        max_tokens: int | None,
        max_tokens_param: str,
        default_max_tokens: int | None,
    ) -> Prepared:
        config = self.config
        _check_neutral(body)
        if body.model is not None and body.model not in (config.model_id, *MODEL_ALIASES):
            raise APIError(
                404,
                f"the model {body.model!r} does not exist on this server; it serves {config.model_id!r}",
                param="model",
                code="model_not_found",
            )
        if body.n is not None and body.n > config.max_batch:
            # The n answers decode side by side: each takes a batch slot.
            raise APIError(400, f"n is {body.n}; this server decodes at most {config.max_batch} answers at once", param="n", code="invalid_value")
        if max_tokens is not None and max_tokens > config.max_tokens_cap:
            raise APIError(
                400,
                f"'{max_tokens_param}' is {max_tokens}; this server allows at most {config.max_tokens_cap}",
                param=max_tokens_param,
                code="invalid_value",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > config.max_stop:
            raise APIError(400, f"at most {config.max_stop} stop sequences are allowed", param="stop", code="invalid_value")

        chars = _text_length(prompt) + _text_length(body.preference)
        if chars > config.max_prompt_chars:
            raise APIError(
                400,
                f"the request's text is {chars} characters; this server accepts at most {config.max_prompt_chars} "
                f"(its limit is {config.max_prompt_tokens} prompt tokens across all contexts)",
                param=prompt_param,
                code="context_length_exceeded",
            )

        alignment = body.alignment
        params = alignment.method_params() if alignment else {}
        preference_arg: Any = body.preference
        if isinstance(preference_arg, list):
            preference_arg = [p if isinstance(p, str) else {"text": p.text, "weight": p.weight} for p in preference_arg]
        # No method: the rule of every face (pref with a preference, else base), with
        # the server's --default-method in place of pref.
        method_name = str(choose_method((alignment.method or None) if alignment else None, preference_arg, config.default_method))

        method_cls = METHODS.get(method_name.lower()) if isinstance(method_name, str) else None
        method_fields = {f.name for f in dataclasses.fields(method_cls)} if method_cls else set()

        def param_name(field: str | None) -> str | None:
            # The spelling the client used: "lambda" when it sent lambda (the field is lam).
            aliases = method_cls.aliases if method_cls else PARAM_ALIASES
            sent = next((key for key in params if aliases.get(key, key) == field), None)
            if sent is not None:
                return f"alignment.{sent}"
            if field in ("method", "template") or field in method_fields or field in PARAM_ALIASES.values():
                return f"alignment.{field}"
            if field in ("max_new_tokens",):
                return max_tokens_param
            if field in ("prompt", "messages"):
                return prompt_param
            if field == "top_logprobs" and isinstance(body, CompletionRequest):
                return "logprobs"  # completions' logprobs is the number of alternatives
            if field and field.startswith("messages.") and prompt_param == "prompt":
                return "prompt"
            return field

        if isinstance(body, CompletionRequest):  # logprobs: how many alternatives (0: the token's own only)
            logprobs, top_logprobs = body.logprobs is not None, body.logprobs or 0
        else:
            logprobs, top_logprobs = bool(getattr(body, "logprobs", None)), getattr(body, "top_logprobs", None) or 0

        try:
            rule = make_method(method_name, **params)
            # The method names what multiplies its per-token cost, and the server's cap on it.
            for name, limit in type(rule).cost_limits.items():
                value = getattr(rule, name, None)
                if isinstance(value, int) and value > limit:
                    raise APIError(400, f"{name} is {value}; this server allows at most {limit}", param=f"alignment.{name}", code="invalid_value")
            temperature = body.temperature
            if temperature is None:
                # A method that cannot sample (beam search): OpenAI's default temperature would reject it.
                temperature = 0.0 if rule.deterministic else config.default_temperature
            if temperature > MAX_TEMPERATURE:
                raise APIError(400, f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}", param="temperature", code="invalid_value")
            spec = RequestSpec.build(
                rule,
                preference_arg,
                # Unset: the endpoint's default (OpenAI's chat: as much as the cap allows),
                # lowered by prepare() to the room the context window leaves.
                max_new_tokens=max_tokens if max_tokens is not None else min(config.max_tokens_cap, default_max_tokens or config.max_tokens_cap),
                template=alignment.template if alignment else None,
                temperature=temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k or 0,
                seed=body.seed,
                stop=stop,
                ignore_eos=bool(body.ignore_eos),
                frequency_penalty=body.frequency_penalty,
                presence_penalty=body.presence_penalty,
                repetition_penalty=body.repetition_penalty,
                no_repeat_ngram_size=body.no_repeat_ngram_size,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                n=1 if body.n is None else body.n,
            )
            if len(spec.preferences) > config.max_preferences:
                raise APIError(
                    400, f"at most {config.max_preferences} preferences per request", param="preference", code="invalid_value"
                )
            request = self.aligner.prepare(spec, prompt, fit_window=max_tokens is None)
            prompt_tokens = sum(len(ids) for _, ids in request.contexts)
            if prompt_tokens > config.max_prompt_tokens:
                raise ContextLengthError(
                    f"the prompt is {prompt_tokens} tokens across the {len(request.contexts)} contexts of method "
                    f"{rule.name!r}; this server allows at most {config.max_prompt_tokens} (serve --max-prompt-tokens)",
                    field="prompt",
                )
            # The engine's own check (its models, non-empty contexts) before queueing:
            # the client gets a 400 instead of a failed job.
            self.aligner.engine.validate(request.split_choices()[0])
        except APIError:
            raise
        except PrefalignError as exc:
            raise APIError(400, _api_message(str(exc)), param=param_name(exc.field), code=exc.code) from exc
        except (TypeError, ValueError) as exc:
            # Dataclass construction with a wrongly typed method parameter, e.g. plausibility="x".
            raise APIError(400, f"invalid alignment parameters: {exc}", param="alignment", code="invalid_value") from exc

        echo = {"method": rule.name, "template": request.template}
        echo.update(rule.params())
        preference_echo = (
            [{"text": p.text, "weight": p.weight, "name": p.name} for p in request.preferences] if rule.needs_preference else None
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(request, echo, preference_echo, bool(body.stream), include_usage)


# --- responses ----------------------------------------------------------------------


class _Shape:
    """OpenAI's response and chunk objects for one endpoint."""

    def __init__(self, *, chat: bool, model_id: str, prepared: Prepared, token_text: TokenText) -> None:
        self.chat = chat
        self.model_id = model_id
        self.prepared = prepared
        self.token_text = token_text
        self.offsets: dict[int, int] = {}  # completions' streamed text_offset, per choice
        self.id = ("chatcmpl-" if chat else "cmpl-") + prepared.request.request_id
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "system_fingerprint": f"prefalign-{__version__}"}

    def _extras(self) -> dict[str, Any]:
        return {"alignment": self.prepared.alignment, "preference": self.prepared.preference}

    def logprobs(self, entries: list[TokenLogprob] | None, index: int = 0) -> dict[str, Any] | None:
        """OpenAI's logprobs object for these tokens of answer ``index`` (None: not asked for)."""
        if entries is None:
            return None
        if self.chat:
            return chat_logprobs(entries, self.token_text)
        shaped = completion_logprobs(entries, self.token_text, self.offsets.get(index, 0))
        self.offsets[index] = self.offsets.get(index, 0) + sum(len(t) for t in shaped["tokens"])
        return shaped

    def full(self, results: list[GenerationResult]) -> dict[str, Any]:
        """The whole answer: one choice per result (``results[i]`` is answer i)."""
        choices = []
        for index, result in enumerate(results):
            self.offsets.pop(index, None)
            if self.chat:
                choices.append({
                    "index": index,
                    "message": {"role": "assistant", "content": result.text, "refusal": None},
                    "logprobs": self.logprobs(result.logprobs, index),
                    "finish_reason": result.finish_reason,
                })
            else:
                choices.append(
                    {"index": index, "text": result.text, "logprobs": self.logprobs(result.logprobs, index), "finish_reason": result.finish_reason}
                )
        out = self._head("chat.completion" if self.chat else "text_completion")
        out.update(choices=choices, usage=Usage.of_choices([r.usage for r in results]).as_dict(), **self._extras())
        return out

    def chunk(
        self, text: str | None = None, *, first: bool = False, finish_reason: str | None = None, index: int = 0,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": self.logprobs(logprobs, index), "finish_reason": finish_reason}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": index, "text": text or "", "logprobs": self.logprobs(logprobs, index), "finish_reason": finish_reason}
            out = self._head("text_completion")
        out["choices"] = [choice]
        if self.prepared.include_usage:
            out["usage"] = None
        if first or finish_reason is not None:
            out.update(self._extras())  # once at the start, once at the end: not on every token
        return out

    def usage_chunk(self, results: list[GenerationResult]) -> dict[str, Any]:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out.update(choices=[], usage=Usage.of_choices([r.usage for r in results]).as_dict())
        return out


def _sse(obj: Any) -> bytes:
    # allow_nan=False: strict JSON, as JSONResponse (a NaN or Infinity is a bug, never sent).
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode() + b"\n\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


class _ClientGone(Exception):
    """The client disconnected before its request body arrived: nobody to answer."""


class _Stalled(Exception):
    """A write of the stream waited longer than the idle-stream timeout."""


class _SSEResponse(StreamingResponse):
    """A server-sent-events response that runs ``on_close`` however the stream ends.

    Starlette cancels the body iterator when the client disconnects; wherever that
    cancellation lands, ``on_close`` still runs and cancels the generation.

    ``idle_timeout``: a client that stops reading makes the socket's buffers fill and
    then every write wait; one write that waits longer than this ends the stream
    (``on_stall`` is called once, then ``on_close``) instead of keeping its batch slot
    until the answer is complete. The connection is aborted through the
    ``prefalign.abort`` scope extension that :mod:`prefalign.server.transport` adds (any
    other ASGI server closes it itself and logs that the response was incomplete).
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], None],
        *,
        idle_timeout: float | None = None,
        on_stall: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close
        self._idle_timeout = idle_timeout
        self._on_stall = on_stall
        self._abort: Callable[[], None] | None = None

    async def stream_response(self, send: Send) -> None:
        timeout = self._idle_timeout
        if timeout is None:
            return await super().stream_response(send)

        async def guarded(message: Any) -> None:
            try:
                await asyncio.wait_for(send(message), timeout)
            except asyncio.TimeoutError:
                raise _Stalled() from None

        try:
            await super().stream_response(guarded)
        except _Stalled:
            self._on_close()  # free the batch slot first, then report
            if self._on_stall is not None:
                self._on_stall(timeout)
            if self._abort is not None:
                self._abort()  # the buffered bytes would never be read: drop them

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._abort = scope.get("extensions", {}).get("prefalign.abort")
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _failed_request(result: GenerationResult) -> APIError:
    """The error a client gets when its own request failed while decoding (no one else's did)."""
    return APIError(500, f"request {result.request_id} failed: {result.error}", code="request_failed")


def _job_error(event: BaseException) -> APIError:
    if isinstance(event, APIError):
        return event
    if isinstance(event, PrefalignError):
        return APIError(400, _api_message(str(event)), param=event.field, code=event.code)
    if isinstance(event, SchedulerStoppedError):
        return APIError(503, str(event), code="server_shutting_down")
    if isinstance(event, EngineFailure):
        return APIError(500, str(event), code="engine_failure")
    return APIError(500, f"internal error: {type(event).__name__}: {event}", code="internal_error")


async def _wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --- the app ------------------------------------------------------------------------


def create_app(
    aligner: Any,
    *,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    max_tokens_cap: int = 1024,
    max_body_bytes: int = 1_000_000,
    model_id: str | None = None,
    default_method: str = DEFAULT_METHOD_WITH_PREFERENCE,
    default_temperature: float = 1.0,
    max_preferences: int = 8,
    max_prompt_tokens: int = 8192,
    prefill_chunk: int | None = None,
    body_timeout: float = 30.0,
    idle_stream_timeout: float | None = None,
    scheduler: Any = None,
) -> FastAPI:
    """Build the OpenAI-compatible app around ``aligner`` (an :class:`~prefalign.Aligner`).

    The app owns a :class:`~prefalign.server.scheduler.Scheduler` (started and stopped
    with the app's lifespan) that batches concurrent requests into ``aligner.engine``;
    nothing else may use that engine while the app runs.

    ``api_key``: require ``Authorization: Bearer <api_key>`` on ``/v1/*`` (``/health``
    stays open). ``max_batch``: requests decoded together; ``max_queue``: requests
    waiting beyond that before 429. ``max_tokens_cap``: the largest ``max_tokens``
    accepted (and the default for chat). ``max_body_bytes``: larger bodies get 413.
    ``default_method``: used when a request gives a preference but no method (default
    ``pref``, as on every face; no preference and no method: ``base``). ``default_temperature``: OpenAI's default, 1.
    ``body_timeout``: seconds for a request body to arrive (408). ``idle_stream_timeout``:
    a stream whose writes have waited this long for the client to read is cancelled,
    freeing its batch slot (``None``: never).

    ``scheduler``: where requests run, in place of a :class:`Scheduler` on
    ``aligner.engine``: anything with its ``start``/``stop``/``submit``/``cancel``/``load``
    and ``stats``, whose jobs have ``ready``/``next_event``, plus an async ``health()``.
    :mod:`prefalign.server.ray_serve` passes one that sends each validated request to a
    Ray Serve replica; ``aligner`` then only needs to render and check requests.
    """
    make_method(default_method)  # fail at startup, not on the first request
    if prefill_chunk is not None:
        aligner.engine.prefill_chunk = prefill_chunk
    config = ServerConfig(
        model_id=model_id or default_model_id(aligner),
        api_key=api_key or None,
        max_batch=max_batch,
        max_queue=max_queue,
        max_tokens_cap=max_tokens_cap,
        max_body_bytes=max_body_bytes,
        default_method=default_method,
        default_temperature=default_temperature,
        max_preferences=max_preferences,
        max_prompt_tokens=max_prompt_tokens,
        body_timeout=body_timeout,
        idle_stream_timeout=idle_stream_timeout,
    )
    if scheduler is None:
        scheduler = Scheduler(aligner, max_batch=max_batch, max_queue=max_queue)
    # Rendering and tokenising (and a first PAD request's PRM load) run here, off the
    # event loop; one worker, because a tokenizer is not safe to share between threads.
    preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefalign-prepare")
    translator = _Translator(aligner, config)
    token_text = TokenText(aligner.tokenizer)  # token texts and bytes of logprobs, cached
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)
            preparer.shutdown(wait=False, cancel_futures=True)

    # No /docs or /openapi.json: they would be unauthenticated, and clients use OpenAI's docs.
    # redirect_slashes=False: Starlette's 307 for ".../completions/" builds its Location from
    # the client's Host header (an open redirect, before authentication); a 404 names the route.
    app = FastAPI(
        title="prefalign", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
        redirect_slashes=False,
    )
    app.state.scheduler = scheduler
    app.state.config = config
    app.state.aligner = aligner

    # -- errors: everything in OpenAI's shape ---------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        hint = f" (did you mean {path.rstrip('/')}?)" if path.endswith("/") and len(path) > 1 else ""
        message = {404: f"no route {request.method} {path}{hint}", 405: f"method {request.method} not allowed on {request.url.path}"}
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code=code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only path/query parameters reach FastAPI's own validation (bodies are parsed by read_body).
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return APIError(422, f"invalid value for '{param}': {first.get('msg', 'invalid request')}", param=param, code="invalid_type").response()

    @app.exception_handler(_ClientGone)
    async def _client_gone(request: Request, exc: _ClientGone) -> Response:
        log.debug("client left before sending its whole body (%s %s)", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error ({type(exc).__name__}); the server keeps running", code="internal_error").response()

    # -- auth, body ----------------------------------------------------------------------

    async def require_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(
                401,
                "invalid or missing API key; send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def read_body(request: Request, schema: type[BaseModel]) -> Any:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            # Also what keeps a web page from posting here without a CORS preflight.
            raise APIError(
                415,
                f"the body must be JSON sent with 'Content-Type: application/json' (got {media_type or 'no content type'!r})",
                code="unsupported_media_type",
            )
        limit = config.max_body_bytes
        too_large = APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large

        async def receive_all() -> bytes:
            raw = bytearray()
            async for chunk in request.stream():  # counted as it arrives: chunked bodies too
                raw += chunk
                if len(raw) > limit:
                    raise too_large
            return bytes(raw)

        try:
            raw = await asyncio.wait_for(receive_all(), timeout=config.body_timeout)
        except ClientDisconnect:
            raise _ClientGone() from None
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {config.body_timeout:g} s", code="request_timeout") from None
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise APIError(400, f"could not parse the JSON body: {exc}", code="invalid_json") from exc
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            raise _schema_error(exc) from exc

    async def prepare(*args: Any, **kwargs: Any) -> Prepared:
        """``translator.prepare`` on the preparing thread, so the event loop never tokenises."""
        return await asyncio.get_running_loop().run_in_executor(preparer, functools.partial(translator.prepare, *args, **kwargs))

    # -- generation ----------------------------------------------------------------------

    def submit(prepared: Prepared) -> list[Job]:
        """Queue the request's answers (``n``: one job each, sharing the prompt's prefill)."""
        try:
            return scheduler.submit_all(prepared.request.split_choices(), asyncio.get_running_loop(), stream=prepared.stream)
        except QueueFullError as exc:
            raise APIError(429, str(exc), code="rate_limit_exceeded", headers={"Retry-After": str(exc.retry_after)}) from exc
        except SchedulerStoppedError as exc:
            raise APIError(503, str(exc), code="server_shutting_down") from exc
        except PrefalignError as exc:  # what this scheduler cannot serve (n > 1 on Ray replicas)
            raise APIError(400, _api_message(str(exc)), param=param_name(exc.field), code=exc.code) from exc

    def cancel_all(jobs: list[Job]) -> None:
        for job in jobs:
            scheduler.cancel(job)  # no-op once finished

    async def answer(request: Request, prepared: Prepared, *, chat: bool) -> Response:
        shape = _Shape(chat=chat, model_id=config.model_id, prepared=prepared, token_text=token_text)
        jobs = submit(prepared)
        for job in jobs:
            await job.ready()  # a remote replica may still refuse it: an error before any byte is sent
        if prepared.stream:
            client = request.client.host if request.client else "?"

            def stalled(timeout: float) -> None:
                log.warning("stream %s from %s: not read for %g s; cancelled, its batch slot freed", jobs[0].id, client, timeout)

            return _SSEResponse(
                _stream(jobs, shape), on_close=lambda: cancel_all(jobs), idle_timeout=config.idle_stream_timeout, on_stall=stalled
            )
        index = {job.id: i for i, job in enumerate(jobs)}
        results: dict[int, GenerationResult] = {}
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while len(results) < len(jobs):
                getter = asyncio.ensure_future(jobs[0].next_event())  # the jobs share one queue
                done, _ = await asyncio.wait({getter, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:  # the client left: free its slots
                    getter.cancel()
                    cancel_all(jobs)
                    return Response(status_code=499)
                event = getter.result()
                if isinstance(event, GenerationResult):
                    if event.error is not None:
                        raise _failed_request(event)
                    results[index[event.request_id]] = event
                elif isinstance(event, BaseException):
                    raise _job_error(event)
            return JSONResponse(shape.full([results[i] for i in range(len(jobs))]))
        finally:
            disconnect.cancel()
            cancel_all(jobs)  # frees the slots on any other exit

    async def _stream(jobs: list[Job], shape: _Shape) -> AsyncIterator[bytes]:
        index = {job.id: i for i, job in enumerate(jobs)}
        for i in range(len(jobs)):
            yield _sse(shape.chunk("" if shape.chat else None, first=True, index=i))
        results: dict[int, GenerationResult] = {}
        while len(results) < len(jobs):
            event = await jobs[0].next_event()  # the jobs share one queue
            if isinstance(event, Delta):
                if event.text or event.logprobs:
                    yield _sse(shape.chunk(event.text, index=index[event.request_id], logprobs=event.logprobs))
            elif isinstance(event, GenerationResult):
                if event.error is not None:
                    yield _sse(_failed_request(event).body())
                    break
                results[index[event.request_id]] = event
                yield _sse(shape.chunk(None, finish_reason=event.finish_reason, index=index[event.request_id]))
            else:  # the status line is sent already: report the error in the stream
                yield _sse(_job_error(event).body())
                break
        else:
            if shape.prepared.include_usage:
                yield _sse(shape.usage_chunk([results[i] for i in range(len(jobs))]))
        yield b"data: [DONE]\n\n"

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions with per-request ``preference`` and ``alignment``."""
        body: ChatCompletionRequest = await read_body(request, ChatCompletionRequest)
        use_completion = body.max_completion_tokens is not None
        prepared = await prepare(
            body,
            _chat_from_messages(body.messages),
            prompt_param="messages",
            max_tokens=body.max_completion_tokens if use_completion else body.max_tokens,
            max_tokens_param="max_completion_tokens" if use_completion else "max_tokens",
            default_max_tokens=None,
        )
        return await answer(request, prepared, chat=True)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        """OpenAI (legacy) completions: the prompt is answered as one user message."""
        body: CompletionRequest = await read_body(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "exactly one prompt per request is supported", param="prompt", code="invalid_value")
            prompt = prompt[0]
        prepared = await prepare(
            body, prompt, prompt_param="prompt", max_tokens=body.max_tokens, max_tokens_param="max_tokens", default_max_tokens=16
        )
        return await answer(request, prepared, chat=False)

    def model_card() -> dict[str, Any]:
        return {
            "id": config.model_id,
            "object": "model",
            "created": started,
            "owned_by": "prefalign",
            "methods": sorted(METHODS),
            "default_method": config.default_method,
            "max_tokens_cap": config.max_tokens_cap,
            "context_window": aligner.context_window,
        }

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        if model not in (config.model_id, *MODEL_ALIASES):
            raise APIError(404, f"the model {model!r} does not exist on this server", param="model", code="model_not_found")
        return model_card()

    app.include_router(v1)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and load; unauthenticated so that probes need no key."""
        if not isinstance(scheduler, Scheduler):  # replicas elsewhere report themselves
            return {"model": config.model_id, **await scheduler.health()}
        return {
            "status": "ok",
            "model": config.model_id,
            **scheduler.load(),
            "max_batch": config.max_batch,
            "max_queue": config.max_queue,
            "engine_active": scheduler.engine_active,  # not engine.num_active: only the scheduler thread touches the engine
            "stats": asdict(scheduler.stats),
        }

    return app


def _schema_error(exc: ValidationError) -> APIError:
    """Map pydantic's first error to OpenAI's shape (400 unknown field, 422 wrong type)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    # Union branches add type tags to the location ("stop.list[str]"): cut them.
    parts: list[str] = []
    for part in first["loc"]:
        if isinstance(part, str) and ("[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "list", "dict")):
            break
        parts.append(str(part))
    param = ".".join(parts) or None
    if first["type"] == "string_unicode":
        # A dict key that is not valid Unicode (string values are checked where they are used):
        # name it, escaped, since the raw text cannot be encoded into the JSON answer.
        key = str(first.get("input", "")).encode("utf-8", "backslashreplace").decode("utf-8")
        where = f"in '{param}'" if param else "at the top level of the body"
        return APIError(
            400, f"the key '{key}' {where} is not valid Unicode (a lone surrogate?); send field names as valid UTF-8",
            param=param or key, code="invalid_value",
        )
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(422, f"invalid value for '{param}': {first['msg']}{more}", param=param, code="invalid_type")
