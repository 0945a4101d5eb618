"""The API's side of the chat model: an async client of the LLM server with a bounded queue.

The chat model runs in one server process (`appliance.inference.llm_server`, or any OpenAI-compatible
server named by `llm_url`), which generates one answer at a time. Each API process admits at most
`llm_concurrency` generations to it and lets at most `llm_queue_size` more wait, each for at most
`llm_queue_timeout_s`; past that a caller gets `503 llm_saturated` with `Retry-After` at once instead
of piling up. Waiting and generating are awaits on the event loop (HTTP to the server), never
blocking calls, so a long generation never stalls other requests of the same process.

A circuit breaker (appliance.resilience) guards the server: after repeated connection failures,
timeouts or 5xx, calls fail fast with `503 llm_unavailable` until a probe succeeds.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from appliance import metrics
from appliance.errors import ServiceUnavailable
from appliance.logs import get_logger
from appliance.resilience import CircuitBreaker, CircuitOpen, open_message
from appliance.settings import Settings

log = get_logger("appliance.inference.llm")


class LLMSaturated(ServiceUnavailable):
    code = "llm_saturated"
    title = "The language model is busy"


class LLMUnavailable(ServiceUnavailable):
    code = "llm_unavailable"
    title = "The language model is unavailable"


class LLMCircuitOpen(LLMUnavailable, CircuitOpen):
    def __init__(self, dependency: str, retry_in: float) -> None:
        super().__init__(
            open_message(dependency, retry_in), headers={"Retry-After": str(max(1, math.ceil(retry_in)))}
        )
        self.dependency, self.retry_in = dependency, retry_in


class _ServerError(Exception):
    """A 5xx from the LLM server: counts against the breaker."""


def _is_failure(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | _ServerError)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    model: str


@dataclass
class StreamState:
    """What a streamed generation produced, filled in as it goes."""

    text_parts: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class LLMClient:
    """One per API process (app.state.llm). Thread-unsafe by design: use it from the event loop."""

    def __init__(
        self, settings: Settings, *, model: str, n_ctx: int, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        self.model = model
        self.n_ctx = n_ctx
        self.base_url = settings.llm_base_url
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            transport=transport,
            timeout=httpx.Timeout(settings.llm_timeout_s, connect=5.0),
        )
        self._slots = asyncio.Semaphore(max(1, settings.llm_concurrency))
        self._waiting = 0
        self.breaker = CircuitBreaker(
            "LLM server", is_failure=_is_failure, open_error=LLMCircuitOpen, fail_max=3, reset_timeout_s=15.0
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> LLMClient:
        from appliance.inference.manifest import get_model

        spec = get_model(settings.models_dir, name=settings.chat_model, purpose="chat")
        return cls(settings, model=spec.name, n_ctx=int(spec.params.get("n_ctx", 4096)))

    async def aclose(self) -> None:
        await self._http.aclose()

    # Admission ---------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return self._waiting

    def _retry_after(self) -> str:
        return str(max(1, math.ceil(self.settings.llm_queue_timeout_s / 2)))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the process's generation slots; 503 at once when the queue is full, or after
        `llm_queue_timeout_s` of waiting."""
        if self._slots.locked() and self._waiting >= self.settings.llm_queue_size:
            metrics.LLM_REJECTED.labels("queue_full").inc()
            raise LLMSaturated(
                f"{self._waiting} requests are already waiting for the language model; try again shortly.",
                headers={"Retry-After": self._retry_after()},
            )
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.settings.llm_queue_timeout_s)
        except TimeoutError:
            metrics.LLM_REJECTED.labels("wait_timeout").inc()
            raise LLMSaturated(
                f"No language-model slot became free within {self.settings.llm_queue_timeout_s:g} s.",
                headers={"Retry-After": self._retry_after()},
            ) from None
        finally:
            self._waiting -= 1
        started = time.perf_counter()
        try:
            yield
        finally:
            self._slots.release()
            metrics.LLM_SECONDS.observe(time.perf_counter() - started)

    # Calls -------------------------------------------------------------------------------------
    def _unavailable(self, exc: BaseException) -> LLMUnavailable:
        if isinstance(exc, httpx.TimeoutException):
            detail = f"The language model did not answer within {self.settings.llm_timeout_s:g} s."
        else:
            # The server's address and its error stay in the log: API clients get no internal URLs.
            log.warning("language model server failed", url=self.base_url, error=str(exc)[:200])
            detail = f"The language model server failed ({type(exc).__name__}); try again shortly."
        return LLMUnavailable(detail, headers={"Retry-After": "5"})

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        probe = self.breaker.acquire()
        try:
            response = await self._http.post(path, json=body)
            if response.status_code >= 500:
                raise _ServerError(f"HTTP {response.status_code}: {response.text[:200]}")
        except BaseException as exc:
            self.breaker.record(exc, probe)
            if _is_failure(exc):
                metrics.LLM_REJECTED.labels("unavailable").inc()
                raise self._unavailable(exc) from exc
            raise
        self.breaker.record_success(probe)
        if response.status_code >= 400:
            raise LLMUnavailable(
                f"The language model refused the request: {response.text[:300]}",
                code="llm_bad_request",
                status=502,
            )
        data: dict[str, Any] = response.json()
        return data

    async def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the chat model's own tokenizer (the embedded server's /extras endpoint);
        an estimate (4 characters a token) for servers without it."""
        try:
            data = await self._post("/extras/tokenize/count", {"input": text, "model": self.model})
            return int(data["count"])
        except LLMUnavailable as exc:
            if exc.code == "llm_bad_request":
                return max(1, len(text) // 4)
            raise
        except (KeyError, ValueError):
            return max(1, len(text) // 4)

    def _body(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        stream: bool,
        **extra: Any,
    ) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": stream,
            **extra,
        }

    async def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float = 0.0, **extra: Any
    ) -> Completion:
        data = await self._post(
            "/v1/chat/completions",
            self._body(messages, max_tokens=max_tokens, temperature=temperature, stream=False, **extra),
        )
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return Completion(
            text=choice["message"].get("content") or "",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=choice.get("finish_reason"),
            model=self.model,
        )

    async def stream(
        self,
        messages: list[dict[str, str]],
        state: StreamState,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        **extra: Any,
    ) -> AsyncIterator[str]:
        """Yield content pieces as the model writes them; `state` collects the text and counts."""
        probe = self.breaker.acquire()
        body = self._body(messages, max_tokens=max_tokens, temperature=temperature, stream=True, **extra)
        try:
            async with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code >= 500:
                    raise _ServerError(f"HTTP {response.status_code}")
                if response.status_code >= 400:
                    text = (await response.aread()).decode(errors="replace")[:300]
                    raise LLMUnavailable(
                        f"The language model refused the request: {text}", code="llm_bad_request", status=502
                    )
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    if not chunk.get("choices"):
                        continue
                    choice = chunk["choices"][0]
                    if choice.get("finish_reason"):
                        state.finish_reason = choice["finish_reason"]
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        state.text_parts.append(piece)
                        state.completion_tokens += 1  # llama.cpp streams one token per chunk
                        yield piece
        except BaseException as exc:
            self.breaker.record(exc, probe)
            if _is_failure(exc):
                metrics.LLM_REJECTED.labels("unavailable").inc()
                raise self._unavailable(exc) from exc
            raise
        self.breaker.record_success(probe)

    async def ready(self) -> str | None:
        """None when the server answers /v1/models, else why not (for /readyz)."""
        try:
            response = await self._http.get("/v1/models", timeout=2.0)
        except httpx.HTTPError as exc:
            return f"{self.base_url}: {type(exc).__name__}"
        return None if response.status_code == 200 else f"{self.base_url}: HTTP {response.status_code}"


def record_usage(tenant_id: object, route: str, prompt_tokens: int, completion_tokens: int) -> None:
    metrics.LLM_TOKENS.labels(str(tenant_id), "prompt", route).inc(prompt_tokens)
    metrics.LLM_TOKENS.labels(str(tenant_id), "completion", route).inc(completion_tokens)
