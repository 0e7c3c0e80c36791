"""A chat client for any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, ...).

Endpoint and key come from `ChatConfig` or the environment (`OPENAI_BASE_URL`, `OPENAI_API_KEY`); a local
server needs no key. Requests run at temperature 0 and are retried on HTTP 429 / 5xx / connection errors
and timeouts with bounded exponential backoff (the openai package's own retries are off, so ours are the
only ones and are logged), all within one deadline per call, enforced on the whole response
(`analysis.deadline`): a server that never answers, or answers a byte at a time, costs at most `deadline_s`
(120 s by default, so that a hung endpoint fails within about two minutes; a slow server needs more:
`--llm-timeout`). An answer that is not the JSON the API defines is a one-line `LLMError`. Answers can be
cached on disk as JSON under a key derived from the model and the request, so a rerun makes no request.
The API key is never logged, cached or written anywhere: errors and answers pass through `redact`, which
also removes any `Bearer` token a server echoes back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from steerlens.config import ConfigError, option
from steerlens.errors import SteerlensError
from steerlens.io import write_json
from steerlens.redact import redact, remember

if TYPE_CHECKING:
    from steerlens.analysis.deadline import Deadline

log = logging.getLogger(__name__)

T = TypeVar("T")
KEY_ENV = "OPENAI_API_KEY"
URL_ENV = "OPENAI_BASE_URL"


class LLMError(SteerlensError, RuntimeError):
    """The chat endpoint cannot be used (bad key, unknown model, unreachable after retries, ...); the message
    is redacted (`steerlens.redact`): no key of the request's is in it."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


@dataclass
class ChatConfig:
    """Where and how to ask a chat model."""

    model: str | None = option(None, "chat model name; None: the endpoint's only served model (e.g. a vLLM server)")
    base_url: str | None = option(
        None, f"OpenAI-compatible endpoint (http://host:port/v1); None: ${URL_ENV}, else OpenAI"
    )
    api_key: str | None = option(
        None, f"API key; None: ${KEY_ENV} (local servers need none). Never written anywhere", repr=False
    )
    cache_dir: Path | None = option(None, "answer cache; None: $XDG_CACHE_HOME/steerlens/llm")
    max_retries: int = option(5, "retries on HTTP 429 / 5xx / connection errors / timeouts, with exponential backoff")
    backoff_s: float = option(1.0, "first retry delay in seconds (doubled each retry, or the server's Retry-After)")
    max_backoff_s: float = option(60.0, "longest delay between retries")
    deadline_s: float = option(
        120.0, "most seconds one request may take, all tries and the whole answer included (--llm-timeout)"
    )
    timeout_s: float | None = option(None, "most seconds of one try; None: all that is left of deadline_s")
    max_tokens: int = option(2048, "longest answer in tokens (a small local model may otherwise never stop)")

    def __post_init__(self) -> None:
        """Refuse times and retry counts that would leave a call unbounded or make it fail at once."""
        checks = [
            (
                math.isfinite(self.deadline_s) and self.deadline_s > 0,
                f"deadline_s (--llm-timeout) must be a number of seconds > 0, got {self.deadline_s}",
            ),
            (
                self.timeout_s is None or (math.isfinite(self.timeout_s) and self.timeout_s > 0),
                f"timeout_s must be a number of seconds > 0 (or None), got {self.timeout_s}",
            ),
            (self.max_retries >= 0, "max_retries must be >= 0"),
            (
                math.isfinite(self.backoff_s + self.max_backoff_s) and min(self.backoff_s, self.max_backoff_s) >= 0,
                "backoff_s and max_backoff_s must be seconds >= 0",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ConfigError(f"{type(self).__name__}: " + "; ".join(problems))

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
    between threads. `stop()` ends the calls in flight (within `deadline.POLL_S`) and refuses later ones.
    """

    def __init__(self, config: ChatConfig) -> None:
        self.config = config
        self.where = redact(config.endpoint() or "the OpenAI API")
        self._stopped = threading.Event()
        self._openai = _openai_client(config)
        self.model = config.model or self._served_model()
        self.cache = config.cache_path()

    def complete(self, messages: list[dict[str, str]], what: str = "asking") -> str:
        """The reply's text to `messages` at temperature 0; `what` names the request in errors and logs."""
        body = self._request(
            lambda timeout: self._openai.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, temperature=0, max_tokens=self.config.max_tokens, timeout=timeout
            ),
            what,
        )
        try:
            content = body["choices"][0]["message"]["content"]
            if content is None or isinstance(content, str):
                return redact(content or "")  # a server that echoes the request puts no key in tables or cache
        except (KeyError, IndexError, TypeError):
            pass
        raise self._unexpected(what, "choices[0].message.content text")

    def stop(self) -> None:
        """End every call in flight as out of time, within `deadline.POLL_S` seconds, and refuse new ones."""
        self._stopped.set()

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
        what = "listing models"
        body = self._request(lambda timeout: self._openai.models.with_raw_response.list(timeout=timeout), what)
        try:
            names = [str(model["id"]) for model in body["data"]]
        except (KeyError, TypeError):
            raise self._unexpected(what, 'a "data" list of models with ids') from None
        if len(names) == 1:
            return names[0]
        served = ", ".join(names[:20]) or "none listed"
        raise LLMError(f"choose the chat model with --llm-model / the config's model (served: {served})")

    def _request(self, call: Callable[[float], Any], what: str) -> Any:
        """The JSON body of the raw response that `call(timeout)` returns, with retries; any other body is an
        LLMError."""
        response = self._with_retries(call, what).http_response
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type") or "no content type"
            raise LLMError(
                f"{self.where} answered HTTP {response.status_code} with a body that is not JSON "
                f"({kind}: {redact(response.text)[:60]!r}) while {what}; is it an OpenAI-compatible endpoint "
                "(the URL usually ends in /v1)?"
            ) from None

    def _unexpected(self, what: str, expected: str) -> LLMError:
        return LLMError(
            f"{self.where} answered JSON without {expected} while {what}; is it an OpenAI-compatible endpoint?"
        )

    def _with_retries(self, call: Callable[[float], T], what: str) -> T:
        """Run `call(timeout)`, retrying 429 / 5xx / connection errors and timeouts with bounded exponential
        backoff, all within `deadline_s`, which bounds every byte of every try (`analysis.deadline`): each try
        gets what is left of it (at most `timeout_s`)."""
        from steerlens.analysis.deadline import Deadline

        with Deadline(self.config.deadline_s, self._stopped) as deadline:
            return self._tries(call, what, deadline)

    def _tries(self, call: Callable[[float], T], what: str, deadline: Deadline) -> T:
        import openai

        config, where = self.config, self.where
        start = time.monotonic()
        tries, problem = 0, "no time left"
        while tries <= config.max_retries and deadline.left() > 0:
            tries += 1
            try:
                return call(min(config.timeout_s or math.inf, deadline.left()))
            except openai.AuthenticationError:
                raise LLMError(
                    f"{where} refused the API key (HTTP 401) while {what}: set the environment "
                    f"variable {KEY_ENV} to a key this endpoint accepts"
                ) from None
            except openai.PermissionDeniedError:
                raise LLMError(
                    f"{where} denied access (HTTP 403) while {what}: the key in {KEY_ENV} lacks "
                    f"access to this model or endpoint; set {KEY_ENV} to a key that has it"
                ) from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as err:
                status = getattr(err, "status_code", None)
                problem = f"HTTP {status}" if status else type(err).__name__
                delay = min(config.max_backoff_s, _retry_after(err) or config.backoff_s * 2 ** (tries - 1))
                if tries > config.max_retries or delay >= deadline.left():
                    break
                log.warning(
                    "%s: %s while %s; retry %d/%d in %.1f s", where, problem, what, tries, config.max_retries, delay
                )
                if deadline.stopped.wait(delay):
                    break
            except openai.APIStatusError as err:
                message = " ".join(redact(str(err.message)).split())[:300]  # redacted whole: half a key stays hidden
                raise LLMError(f"{where} answered HTTP {err.status_code} while {what}: {message}") from None
            except openai.APIError as err:  # any other failure of the client's: one line, redacted
                message = " ".join(redact(str(err)).split())[:300]
                raise LLMError(f"{where}: {type(err).__name__} while {what}: {message}") from None
        retries = f"{tries - 1} retr{'y' if tries == 2 else 'ies'}"
        slow = "; for a slow server, set --llm-timeout (deadline_s) to more seconds"
        raise LLMError(
            f"{where} still failing ({problem}) while {what} after {retries}"
            f" in {time.monotonic() - start:.1f} s (at most {config.max_retries} retries within "
            f"{config.deadline_s:g} s: --llm-timeout){slow if 'Timeout' in problem else ''}; "
            "check the server and try again"
        )


def _openai_client(config: ChatConfig) -> Any:
    """An `openai.OpenAI` client with its own retries off (ours are bounded and logged)."""
    try:
        import openai
    except ImportError as err:
        raise LLMError("the LLM client needs the openai package: pip install 'steerlens[openai]'") from err
    from steerlens.analysis import deadline

    url = config.endpoint()
    key = config.api_key or os.environ.get(KEY_ENV)
    remember(key)
    if not key:
        if url is None:
            raise LLMError(
                f"no API key for OpenAI: set the environment variable {KEY_ENV}, or point "
                f"{URL_ENV} (--endpoint) at a local OpenAI-compatible server"
            )
        key = "EMPTY"  # local servers (vLLM, llama.cpp) accept any key
    return openai.OpenAI(
        api_key=key,
        base_url=url,
        max_retries=0,
        timeout=config.timeout_s or config.deadline_s,
        http_client=deadline.client(limits=openai.DEFAULT_CONNECTION_LIMITS, follow_redirects=True),
    )


def _retry_after(err: Exception) -> float | None:
    """The server's Retry-After delay in seconds, when it sent a finite, non-negative number."""
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        delay = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return delay if math.isfinite(delay) and delay >= 0 else None
