"""A chat client for any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, ...).

Endpoint and key come from `ChatConfig` or the environment (`OPENAI_BASE_URL`, `OPENAI_API_KEY`); a local
server needs no key. Requests run at temperature 0 and are retried on HTTP 429 / 5xx / connection errors
with bounded exponential backoff (the openai package's own retries are off, so ours are the only ones and
are logged). Answers can be cached on disk as JSON under a key derived from the model and the request, so
a rerun makes no request. The API key is never logged, cached or written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from steerlens.config import option
from steerlens.errors import SteerlensError
from steerlens.io import write_json

log = logging.getLogger(__name__)

T = TypeVar("T")
KEY_ENV = "OPENAI_API_KEY"
URL_ENV = "OPENAI_BASE_URL"


class LLMError(SteerlensError, RuntimeError):
    """The chat endpoint cannot be used (bad key, unknown model, unreachable after retries, ...)."""


@dataclass
class ChatConfig:
    """Where and how to ask a chat model."""

    model: str | None = option(None, "chat model name; None: the endpoint's only served model (e.g. a vLLM server)")
    base_url: str | None = option(None, f"OpenAI-compatible endpoint (http://host:port/v1); None: ${URL_ENV}, "
                                        "else OpenAI")
    api_key: str | None = option(None, f"API key; None: ${KEY_ENV} (local servers need none). Never written "
                                       "anywhere", repr=False)
    cache_dir: Path | None = option(None, "answer cache; None: $XDG_CACHE_HOME/steerlens/llm")
    max_retries: int = option(5, "retries on HTTP 429 / 5xx / connection errors, with exponential backoff")
    backoff_s: float = option(1.0, "first retry delay in seconds (doubled each retry, or the server's Retry-After)")
    max_backoff_s: float = option(60.0, "longest delay between retries")
    timeout_s: float = option(300.0, "timeout of one request in seconds")
    max_tokens: int = option(2048, "longest answer in tokens (a small local model may otherwise never stop)")

    def endpoint(self) -> str | None:
        """The configured endpoint URL (config, then $OPENAI_BASE_URL), or None for OpenAI's."""
        return self.base_url or os.environ.get(URL_ENV) or None

    def cache_path(self) -> Path:
        """The cache directory to use."""
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "steerlens" / "llm"


class ChatClient:
    """One endpoint and model: chat completions with bounded retries, and a JSON answer cache.

    Creating it lists the served models when `config.model` is None (one request); it is safe to share
    between threads.
    """

    def __init__(self, config: ChatConfig) -> None:
        self.config = config
        self.where = config.endpoint() or "the OpenAI API"
        self._openai = _openai_client(config)
        self.model = config.model or self._served_model()
        self.cache = config.cache_path()

    def complete(self, messages: list[dict[str, str]], what: str = "asking") -> str:
        """The reply's text to `messages` at temperature 0; `what` names the request in errors and logs."""
        def call() -> str:
            response = self._openai.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                            max_tokens=self.config.max_tokens)
            return response.choices[0].message.content or ""

        return self._with_retries(call, what)

    def cache_key(self, *parts: Any) -> str:
        """Hash of the model and `parts` (everything else that determines the answer, e.g. the prompts)."""
        blob = json.dumps([self.model, *parts], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def cached(self, key: str) -> Any | None:
        """The JSON stored under `key`, or None if absent or unreadable (it is then asked for again)."""
        try:
            return json.loads((self.cache / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def store(self, key: str, value: Any) -> None:
        """Write `value` as JSON under `key`, atomically."""
        write_json(self.cache / f"{key}.json", value)

    def _served_model(self) -> str:
        """The endpoint's only model, for servers that serve one (vLLM); otherwise ask for a name."""
        names = [m.id for m in self._with_retries(lambda: list(self._openai.models.list()), "listing models")]
        if len(names) == 1:
            return names[0]
        served = ", ".join(names[:20]) or "none listed"
        raise LLMError(f"choose the chat model with --llm-model / the config's model (served: {served})")

    def _with_retries(self, call: Callable[[], T], what: str) -> T:
        """Run `call`, retrying 429 / 5xx / connection errors with bounded exponential backoff."""
        import openai

        config, where = self.config, self.where
        for attempt in range(config.max_retries + 1):
            try:
                return call()
            except openai.AuthenticationError:
                raise LLMError(f"{where} refused the API key (HTTP 401) while {what}: set the environment "
                               f"variable {KEY_ENV} to a key this endpoint accepts") from None
            except openai.PermissionDeniedError:
                raise LLMError(f"{where} denied access (HTTP 403) while {what}: the key in {KEY_ENV} lacks "
                               f"access to this model or endpoint; set {KEY_ENV} to a key that has it") from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as err:
                status = getattr(err, "status_code", None)
                problem = f"HTTP {status}" if status else type(err).__name__
                if attempt == config.max_retries:
                    raise LLMError(f"{where} still failing ({problem}) while {what} after "
                                   f"{config.max_retries} retries; check the server and try again") from None
                delay = min(config.max_backoff_s, _retry_after(err) or config.backoff_s * 2 ** attempt)
                log.warning("%s: %s while %s; retry %d/%d in %.1f s", where, problem, what, attempt + 1,
                            config.max_retries, delay)
                time.sleep(delay)
            except openai.APIStatusError as err:
                raise LLMError(f"{where} answered HTTP {err.status_code} while {what}: {err.message}") from None
        raise AssertionError("unreachable")


def _openai_client(config: ChatConfig) -> Any:
    """An `openai.OpenAI` client with its own retries off (ours are bounded and logged)."""
    try:
        import openai
    except ImportError as err:
        raise LLMError("the LLM client needs the openai package: pip install 'steerlens[openai]'") from err
    url = config.endpoint()
    key = config.api_key or os.environ.get(KEY_ENV)
    if not key:
        if url is None:
            raise LLMError(f"no API key for OpenAI: set the environment variable {KEY_ENV}, or point "
                           f"{URL_ENV} (--endpoint) at a local OpenAI-compatible server")
        key = "EMPTY"  # local servers (vLLM, llama.cpp) accept any key
    return openai.OpenAI(api_key=key, base_url=url, max_retries=0, timeout=config.timeout_s)


def _retry_after(err: Exception) -> float | None:
    """The server's Retry-After delay in seconds, when it sent a numeric one."""
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
