"""Token clustering: group each layer's top logit-lens tokens into named topics.

With a chat endpoint (any OpenAI-compatible server, reached through `llm_client.ChatClient`) the tokens go
to an LLM at temperature 0, which detects each token's language, translates non-English tokens and groups
them into English topics of >= 2 tokens, the rest under "Unclassified", answering in JSON. Good answers
are cached on disk by hash(model + prompt), so a rerun makes no request. Without an endpoint, an offline
clustering (average-linkage on the tokens' unembedding rows) produces the same table with `method="offline"`.

The output table has one row per (layer, topic): columns `layer, topic, tokens, translation, language,
method, model, status, error`; `tokens`, `translation` and `language` are aligned lists (translation ""
for English or unknown). A layer whose answer stays malformed after one reminder gets a single row with
`status="failed"` and the reason in `error` (redacted: `steerlens.redact`). When one layer's request fails
for good, the others in flight are stopped and the first failure is raised.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path  # noqa: F401  (pdoc resolves ClusteringConfig's inherited `cache_dir: Path | None` here)
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from steerlens.analysis.llm_client import ChatClient, ChatConfig, LLMError
from steerlens.config import option
from steerlens.errors import SteerlensError
from steerlens.redact import redact

UNCLASSIFIED = "Unclassified"
FAILED = "(clustering failed)"
COLUMNS = ["layer", "topic", "tokens", "translation", "language", "method", "model", "status", "error"]

SYSTEM_PROMPT = "You label vocabulary tokens of a language model. Reply with one JSON object and nothing else."
USER_PROMPT = """Here is a JSON list of {n} tokens from a language model's vocabulary. Leading or trailing \
spaces are part of a token; quote each token exactly as given.

1. For every token, name its language (or "code", "number", "symbol" or "fragment" if it is not a word of \
a natural language). If it is not English, translate it into English.
2. Group the tokens by meaning into topics with short English names. A topic must hold at least 2 tokens. \
Every token that fits no topic goes under "Unclassified". Each token appears in exactly one place.

Reply with exactly this JSON shape:
{{"tokens": [{{"token": "<as given>", "language": "<language>", "translation": "<English, or empty if English>"}}],
 "topics": [{{"topic": "<English name>", "tokens": ["<as given>", "..."]}}],
 "unclassified": ["<as given>", "..."]}}

Tokens: {tokens}"""
REMINDER = (
    "That reply could not be used: {reason}. Reply again with only the JSON object, in exactly the "
    "shape asked for, quoting tokens exactly as given."
)


class ClusteringError(SteerlensError, RuntimeError):
    """Clustering cannot run as asked (no unembedding for offline, an unusable chat endpoint, ...)."""


class AnswerError(ValueError):
    """An LLM answer that is not the JSON asked for; the message says what is wrong."""


@dataclass
class ClusteringConfig(ChatConfig):
    """Where and how to ask a chat model to cluster tokens (the endpoint's knobs, plus parallel requests)."""

    concurrency: int = option(4, "requests in flight at once (one layer each)")


def choose_method(config: ClusteringConfig | None) -> Literal["llm", "offline"]:
    """ "llm" when an endpoint or a model is configured (config or $OPENAI_BASE_URL), else "offline"."""
    config = config or ClusteringConfig()
    return "llm" if config.endpoint() or config.model else "offline"


def cluster_tokens(
    tokens: pd.DataFrame,
    config: ClusteringConfig | None = None,
    *,
    method: Literal["auto", "llm", "offline"] = "auto",
    unembed: torch.Tensor | None = None,
    n_clusters: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Cluster each layer's tokens from a (layer, token_id, token[, rank]) table, e.g. `logit_lens(...).top`.

    `method="auto"` uses the LLM when an endpoint is configured (see `choose_method`), else the offline
    clustering, which needs `unembed` (the `[vocab, d]` unembedding).
    """
    chosen = choose_method(config) if method == "auto" else method
    if chosen == "offline":
        if unembed is None:
            raise ClusteringError("offline clustering needs the unembedding (unembed=...) to compare tokens")
        return offline_clusters(tokens, unembed, n_clusters=n_clusters)
    if chosen != "llm":
        raise ClusteringError(f"method must be 'auto', 'llm' or 'offline', got {method!r}")
    ordered = tokens.sort_values(["layer", "rank"]) if "rank" in tokens else tokens
    by_layer = {int(layer): list(group["token"]) for layer, group in ordered.groupby("layer", sort=True)}
    return llm_clusters(by_layer, config or ClusteringConfig(), progress=progress)


# ---- LLM clustering -------------------------------------------------------------------------------
def build_prompt(tokens: Sequence[str]) -> str:
    """The user message asking to detect languages, translate and cluster `tokens`."""
    return USER_PROMPT.format(n=len(tokens), tokens=json.dumps(list(tokens), ensure_ascii=False))


def llm_clusters(
    tokens_by_layer: Mapping[int, Sequence[str]], config: ClusteringConfig, progress: bool = False
) -> pd.DataFrame:
    """Ask the chat endpoint to cluster each layer's tokens (cached answers make no request)."""
    try:
        return _llm_clusters(tokens_by_layer, config, progress)
    except LLMError as err:
        raise ClusteringError(str(err)) from None


def _llm_clusters(
    tokens_by_layer: Mapping[int, Sequence[str]], config: ClusteringConfig, progress: bool
) -> pd.DataFrame:
    unique = {layer: list(dict.fromkeys(tokens)) for layer, tokens in tokens_by_layer.items()}
    client = ChatClient(config)
    rows: dict[int, list[dict[str, Any]]] = {}
    todo = []
    for layer, tokens in unique.items():
        answer = _cached_answer(client, tokens)
        if answer is not None:
            rows[layer] = _answer_rows(layer, answer, client.model)
        else:
            todo.append(layer)
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, config.concurrency)) as pool:
            futures = {pool.submit(_ask, client, unique[layer]): layer for layer in todo}
            try:
                for future in tqdm(
                    as_completed(futures), total=len(futures), desc="clustering", unit="layer", disable=not progress
                ):
                    layer = futures[future]
                    answer, reason = future.result()
                    rows[layer] = (
                        _answer_rows(layer, answer, client.model)
                        if answer is not None
                        else [_failed_row(layer, unique[layer], client.model, reason)]
                    )
            except BaseException:
                for future in futures:
                    future.cancel()
                client.stop()  # the requests in flight end now, not at their deadlines
                raise
    return pd.DataFrame([row for layer in sorted(rows) for row in rows[layer]], columns=COLUMNS)


def _cache_key(client: ChatClient, tokens: Sequence[str]) -> str:
    """The answer's cache key: the model and both prompts (which contain the tokens)."""
    return client.cache_key(SYSTEM_PROMPT, build_prompt(tokens))


def _cached_answer(client: ChatClient, tokens: list[str]) -> dict[str, Any] | None:
    """A cached answer, or None if absent or no longer valid (it is then asked for again)."""
    entry = client.cached(_cache_key(client, tokens))
    if entry is None:
        return None
    try:
        return parse_answer(json.dumps(entry["answer"]), tokens)
    except (ValueError, KeyError, TypeError):
        return None


def _ask(client: ChatClient, tokens: list[str]) -> tuple[dict[str, Any] | None, str]:
    """One layer: ask, reparse once after a reminder, cache a good answer. Returns (answer, failure reason)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": build_prompt(tokens)}]
    reason = ""
    for _ in range(2):
        text = client.complete(messages, "clustering tokens")
        try:
            answer = parse_answer(text, tokens)
        except AnswerError as err:
            reason = str(err)
            messages = messages + [
                {"role": "assistant", "content": text},
                {"role": "user", "content": REMINDER.format(reason=reason)},
            ]
            continue
        client.store(_cache_key(client, tokens), {"model": client.model, "tokens": tokens, "answer": answer})
        return answer, ""
    return None, reason


def _extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in `text`, after any <think> block and code fences."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise AnswerError("it contains no JSON object")


def parse_answer(text: str, tokens: Sequence[str]) -> dict[str, Any]:
    """Validate an LLM answer against `tokens` and normalise it.

    Token strings are matched exactly, else after stripping whitespace; unknown ones are dropped, each
    token lands in one topic at most, topics of < 2 tokens and unmentioned tokens go to "Unclassified".
    Returns the same shape it reads, {"topics": [{"topic", "tokens"}], "tokens": [{"token", "language",
    "translation"}]}, so that a normalised answer parses to itself.
    """
    obj = _extract_json(text)
    topics, info = obj.get("topics"), obj.get("tokens", [])
    if not isinstance(topics, list) or not all(
        isinstance(t, dict) and isinstance(t.get("topic"), str) and isinstance(t.get("tokens"), list) for t in topics
    ):
        raise AnswerError('"topics" must be a list of {"topic": name, "tokens": [...]} objects')
    if not isinstance(info, list) or not all(isinstance(t, dict) for t in info):
        raise AnswerError('"tokens" must be a list of {"token", "language", "translation"} objects')
    exact = set(tokens)
    stripped: dict[str, str] = {}
    for token in tokens:
        stripped.setdefault(token.strip(), token)

    def match(value: Any) -> str | None:
        if not isinstance(value, str):
            return None
        return value if value in exact else stripped.get(value.strip())

    placed: set[str] = set()
    named = []
    for topic in topics:
        if topic["topic"].strip().lower() == UNCLASSIFIED.lower():
            continue
        members = [m for m in dict.fromkeys(match(v) for v in topic["tokens"]) if m is not None and m not in placed]
        if len(members) >= 2:
            placed.update(members)
            named.append({"topic": topic["topic"].strip(), "tokens": members})
    rest = [token for token in dict.fromkeys(tokens) if token not in placed]
    if rest:
        named.append({"topic": UNCLASSIFIED, "tokens": rest})
    details: dict[str, dict[str, str]] = {}
    for entry in info:
        token = match(entry.get("token"))
        if token is not None and token not in details:
            details[token] = {
                "token": token,
                "language": str(entry.get("language") or ""),
                "translation": _translation(token, entry),
            }
    return {"topics": named, "tokens": list(details.values())}


def _translation(token: str, entry: Mapping[str, Any]) -> str:
    """The English translation, or "" when the token is English or untranslated."""
    translation = str(entry.get("translation") or "").strip()
    if str(entry.get("language") or "").strip().lower() == "english" or translation == token.strip():
        return ""
    return translation


def _answer_rows(layer: int, answer: Mapping[str, Any], model: str) -> list[dict[str, Any]]:
    info = {entry["token"]: entry for entry in answer["tokens"]}
    return [
        {
            "layer": layer,
            "topic": topic["topic"],
            "tokens": topic["tokens"],
            "translation": [info.get(t, {}).get("translation", "") for t in topic["tokens"]],
            "language": [info.get(t, {}).get("language", "") for t in topic["tokens"]],
            "method": "llm",
            "model": model,
            "status": "ok",
            "error": "",
        }
        for topic in answer["topics"]
    ]


def _failed_row(layer: int, tokens: list[str], model: str, reason: str) -> dict[str, Any]:
    return {
        "layer": layer,
        "topic": FAILED,
        "tokens": tokens,
        "translation": [""] * len(tokens),
        "language": [""] * len(tokens),
        "method": "llm",
        "model": model,
        "status": "failed",
        "error": redact(f"malformed answer after one reminder: {reason}"),
    }


# ---- offline clustering ---------------------------------------------------------------------------
OFFLINE_MODEL = "average-linkage on unembedding cosine"


def offline_clusters(tokens: pd.DataFrame, unembed: torch.Tensor, n_clusters: int | None = None) -> pd.DataFrame:
    """Average-linkage clustering of each layer's tokens by the cosine of their unembedding rows.

    Each layer's tokens are merged into `n_clusters` groups (default: one per 5 tokens); groups of one
    go under "Unclassified". A topic is named after its most central token.
    """
    rows = []
    for layer, group in tokens.groupby("layer", sort=True):
        ids = [int(i) for i in group["token_id"]]
        strings = list(group["token"])
        x = unembed[ids].to(torch.float32)
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = (x @ x.T).cpu().double().numpy()
        wanted = n_clusters if n_clusters is not None else max(1, round(len(ids) / 5))
        groups = sorted(_average_linkage(sim, wanted), key=lambda g: (-len(g), g[0]))
        loose = [i for g in groups if len(g) < 2 for i in g]
        for number, members in enumerate((g for g in groups if len(g) >= 2), start=1):
            centre = members[int(np.argmax(sim[np.ix_(members, members)].mean(axis=1)))]
            name = f"cluster {number} (near {json.dumps(strings[centre], ensure_ascii=False)})"
            rows.append(_offline_row(int(layer), name, [strings[i] for i in members]))
        if loose:
            rows.append(_offline_row(int(layer), UNCLASSIFIED, [strings[i] for i in sorted(loose)]))
    return pd.DataFrame(rows, columns=COLUMNS)


def _offline_row(layer: int, topic: str, tokens: list[str]) -> dict[str, Any]:
    return {
        "layer": layer,
        "topic": topic,
        "tokens": tokens,
        "translation": [""] * len(tokens),
        "language": [""] * len(tokens),
        "method": "offline",
        "model": OFFLINE_MODEL,
        "status": "ok",
        "error": "",
    }


def _average_linkage(sim: np.ndarray, n_clusters: int) -> list[list[int]]:
    """Merge the two clusters with the highest mean pairwise similarity until `n_clusters` remain."""
    n = sim.shape[0]
    members = [[i] for i in range(n)]
    total = sim.astype(np.float64).copy()
    active = list(range(n))
    while len(active) > max(1, n_clusters):
        sizes = np.array([len(members[i]) for i in active], dtype=np.float64)
        mean = total[np.ix_(active, active)] / np.outer(sizes, sizes)
        np.fill_diagonal(mean, -np.inf)
        a, b = np.unravel_index(int(np.argmax(mean)), mean.shape)
        keep, gone = active[a], active[b]
        total[keep, :] += total[gone, :]
        total[:, keep] += total[:, gone]
        members[keep] += members[gone]
        active.remove(gone)
    return [sorted(members[i]) for i in active]
