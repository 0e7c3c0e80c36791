"""One redaction for everything steerlens prints, logs or stores about a failure: keys never leave in a message.

`redact(text)` replaces, wherever they occur:
- every key steerlens was given (`remember(key)`: the chat client's `api_key`, `steerlens serve --api-key`) and
  the values of the key variables in `KEY_ENV` as they are when it runs (`OPENAI_API_KEY`, ...);
- the token of every `Bearer <token>` (an Authorization header echoed back by a server), and of every
  `Basic <token>` whose token is base64 of `user:password`;
- the password of a URL's `user:password@`.

Keys of 8 characters or more are replaced anywhere; shorter ones (4 to 7) only where they stand alone, so that
a short key does not mangle the words around it; keys under 4 characters are not secrets it can find. Redact
before shortening a message: half a key is not recognised.

It runs where messages leave steerlens: the command line's `error:` line (`cli_common.friendly`), its log
handler (`RedactingFilter`), the chat client's errors and answers and the clustering's failure rows.

>>> remember("sk-example-key-123")
>>> redact("HTTP 400: got Authorization: Bearer sk-example-key-123, key=sk-example-key-123")
'HTTP 400: got Authorization: Bearer ***, key=***'
>>> redact("Basic arithmetic; Authorization: Basic bWU6aHVudGVyMg==")
'Basic arithmetic; Authorization: Basic ***'
>>> redact("http://me:hunter2@host:8000/v1 refused")
'http://me:***@host:8000/v1 refused'
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import threading

MASK = "***"
KEY_ENV = ("OPENAI_API_KEY", "VLLM_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
"""Environment variables whose values are keys."""
SHORTEST = 4  # shorter values are not looked for
ANYWHERE = 8  # values this long are replaced even inside other text

_BEARER = re.compile(r"(\bBearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_BASIC = re.compile(r"(\bBasic\s+)([A-Za-z0-9+/]{4,}={0,2})(?![\w+/=])")
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^/\s@]+@")
_known: set[str] = set()
_lock = threading.Lock()


def remember(key: str | None) -> None:
    """Redact `key` from every later message of this process (None, "" and keys under 4 characters: nothing)."""
    if key and len(key) >= SHORTEST:
        with _lock:
            _known.add(key)


def redact(text: str) -> str:
    """`text` with every known key, `Bearer` token and URL password replaced by `***`."""
    with _lock:
        keys = set(_known)
    keys.update(value for name in KEY_ENV if len(value := os.environ.get(name, "")) >= SHORTEST)
    for key in sorted(keys, key=len, reverse=True):  # a key that contains another goes first
        if key not in text:
            continue
        if len(key) >= ANYWHERE:
            text = text.replace(key, MASK)
        else:
            text = re.sub(rf"(?<![\w.~+/=-]){re.escape(key)}(?![\w.~+/=-])", MASK, text)
    text = _BEARER.sub(rf"\g<1>{MASK}", text)
    text = _BASIC.sub(_basic, text)
    return _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)


def _basic(match: re.Match[str]) -> str:
    """A `Basic` token redacted when it is base64 of `user:password` (not when it is a word: "Basic arithmetic")."""
    try:
        decoded = base64.b64decode(match[2], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return match[0]
    return match[1] + MASK if ":" in decoded else match[0]


class RedactingFilter(logging.Filter):
    """A handler's filter that redacts each record's message, exception and stack text before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
