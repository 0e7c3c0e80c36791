"""The ASGI middleware that lets vLLM's OpenAI server serve steered models: each vector set is a model name.

`steerlens serve --vectors name=FILE` starts vLLM's own server on the steered architecture with this
middleware (`--middleware`), the set names as extra served model names (so `/v1/models` lists them beside
the base model, like `--lora-modules`), and its settings in the environment (`SERVE_SETTINGS`). At start-up
(the ASGI lifespan, before the server accepts a connection) it makes the engine's workers fill their per-token
slot buffers, proves that steering is applied (`backends.vllm_checks.SteeringProbe`) and loads every set into the bank
(see `backends.vector_bank`); if any of that fails, the server does not start: it prints one line
(`STARTUP_FAILED` and the reason) and exits.

A completion or chat request then runs under a set when its `model` is the set's name, or when its body
says so: `{"steerlens": {"vectors": NAME, "scale": S}}` (scale optional: the set's own). The middleware
rewrites the body into what vLLM already understands, `vllm_xargs` (the set's bank slot and scale, read by
the workers) and `cache_salt` (set, version and scale: the prefix cache never mixes sets), and counts the
request as using its set until its response ends. An unknown set is a 404 that lists the available ones.

`POST /steerlens/vectors {"name": N, "path": FILE, "scale": S}` loads (or replaces, in place) a set at run
time; it exists only when the server was started with it (`--allow-vector-loading`), and it needs the API
key when there is one. `GET /steerlens/vectors` lists the sets.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from steerlens.backends.vector_bank import BASE, SCALE_ARG, SLOT_ARG, VectorBank, VectorSetError
from steerlens.backends.vllm import check_installed
from steerlens.backends.vllm_checks import SteeringProbe
from steerlens.backends.vllm_plugin import to_wire
from steerlens.errors import SteerlensError
from steerlens.vectors import LAYER_OUTPUT, ModelShape, SteeringVectors

SERVE_SETTINGS = "STEERLENS_SERVE_SETTINGS"  # the environment variable the launcher writes them to
STARTUP_FAILED = "steerlens: the server cannot start: "  # begins the one line a failed start prints
VECTORS_PATH = "/steerlens/vectors"
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class ServeSettings:
    """What the launcher tells the server process: the base model's served name and shape, the sets to
    load (name -> file and scale), the bank's capacity, the API key, whether runtime loading is on, and
    where the engine adds the vectors."""

    base: str
    num_layers: int
    hidden_size: int
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    capacity: int = 8
    api_key: str | None = None
    allow_loading: bool = False
    placement: str = LAYER_OUTPUT  # where the engine adds every set

    def to_env(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_env(cls) -> ServeSettings:
        raw = os.environ.get(SERVE_SETTINGS)
        if not raw:
            raise SteerlensError(
                f"the steerlens serving middleware needs {SERVE_SETTINGS}; start the server with "
                "`steerlens serve` (or steerlens.serving.LocalServer)"
            )
        return cls(**json.loads(raw))


class RequestError(Exception):
    """A request the middleware answers itself: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SteeringMiddleware:
    """Maps model names and `steerlens` request fields to the engine's vector sets (see the module doc)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.settings = ServeSettings.from_env()
        self.shape = ModelShape(self.settings.num_layers, self.settings.hidden_size, name=self.settings.base)
        self.bank = VectorBank(self.settings.capacity)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._starting(scope, send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if scope["path"] == VECTORS_PATH:
                await self._vectors_endpoint(scope, receive, send)
            elif scope["method"] == "POST" and scope["path"] in GENERATION_PATHS and self._authorized(scope):
                await self._steer(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        except RequestError as err:
            await respond(send, err.status, {"error": {"message": str(err), "type": "steerlens", "code": err.status}})

    def _authorized(self, scope: Scope) -> bool:
        if not self.settings.api_key:
            return True
        headers = dict(scope.get("headers") or [])
        return headers.get(b"authorization", b"").decode() == f"Bearer {self.settings.api_key}"

    def _starting(self, scope: Scope, send: Send) -> Send:
        """The lifespan's `send`: before the server reports itself started, `_start`; if that fails, report the
        start failed instead (uvicorn then exits), after printing the reason in one line."""

        async def send_after_start(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                try:
                    await self._start(scope)
                except Exception as err:  # noqa: BLE001 - every failure stops the start (see `failure_line`)
                    line = STARTUP_FAILED + failure_line(err)
                    print(line, file=sys.stderr, flush=True)
                    message = {"type": "lifespan.startup.failed", "message": line}
            await send(message)

        return send_after_start

    async def _start(self, scope: Scope) -> None:
        """Make every worker fill its slot buffers, prove steering applied, load the sets the server started with."""
        engine = scope["app"].state.engine_client
        check_installed(await engine.collective_rpc("steerlens_install"))
        await self._prove_steering(engine)
        for name, entry in self.settings.sets.items():
            await self._load(scope, name, entry["path"], float(entry.get("scale", 1.0)))

    async def _prove_steering(self, engine: Any) -> float:
        """The start-up probe (`SteeringProbe`) through the server's engine client; raises `SteeringNotApplied`."""
        probe = SteeringProbe.of(engine.vllm_config, self.bank.probe_slot)
        await engine.collective_rpc("steerlens_write", args=(probe.slot, *to_wire(probe.vectors(self.shape).dense())))
        try:
            outputs = []
            for call, (prompts, params) in enumerate(probe.calls()):
                requests = (
                    engine.generate(prompt, sampling, f"steerlens-probe-{call}-{i}")
                    for i, (prompt, sampling) in enumerate(zip(prompts, params))
                )
                outputs.append(await asyncio.gather(*map(final_output, requests)))
        finally:
            zeros = SteeringVectors.zeros(self.shape).dense()
            await engine.collective_rpc("steerlens_write", args=(probe.slot, *to_wire(zeros)))
        return probe.judge(outputs)

    async def _load(self, scope: Scope, name: str, path: str, scale: float) -> dict[str, Any]:
        """Load the vectors in `path` as set `name` (a new set, or new values for an existing one)."""
        try:
            vectors = SteeringVectors.load(path)
            vectors.check_fits(self.shape, what=f"served model {self.settings.base!r} (vector set {name!r})")
            vectors.require_placement(
                self.settings.placement,
                f"this server (vector set {name!r})",
                f"serve it from a server started with --placement {vectors.placement}",
            )
        except SteerlensError as err:
            raise RequestError(400, str(err)) from None
        engine = scope["app"].state.engine_client
        if self.bank.in_use(name):
            raise RequestError(
                409,
                f"vector set {name!r} is in use by {self.bank.in_use(name)} running request(s); "
                "load its new values after they finish",
            )
        try:
            entry = self.bank.bump(name) if name in self.bank.names() else self.bank.add(name, scale)
        except VectorSetError as err:
            raise RequestError(409, str(err)) from None
        await engine.collective_rpc("steerlens_write", args=(entry.slot, *to_wire(vectors.dense())))
        models = getattr(scope["app"].state, "openai_serving_models", None)
        if models is not None and not models.is_base_model(name):  # listed in /v1/models, like a started set
            from vllm.entrypoints.openai.models.protocol import BaseModelPath

            models.base_model_paths.append(BaseModelPath(name=name, model_path=models.base_model_paths[0].model_path))
        return {"name": entry.name, "scale": entry.scale, "version": entry.version}

    async def _vectors_endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.settings.allow_loading:
            raise RequestError(
                404,
                f"{VECTORS_PATH} is off: start the server with --allow-vector-loading to load vector files at run time",
            )
        if not self._authorized(scope):
            raise RequestError(401, "missing or wrong API key (Authorization: Bearer KEY)")
        if scope["method"] == "GET":
            listed = [
                {"name": e.name, "scale": e.scale, "version": e.version} for e in map(self.bank.get, self.bank.names())
            ]
            await respond(send, 200, {"vector_sets": listed})
            return
        if scope["method"] != "POST":
            raise RequestError(405, f"{VECTORS_PATH} takes GET (list) or POST (load)")
        body = json_body(await read_body(receive))
        name, path, scale = body.get("name"), body.get("path"), body.get("scale", 1.0)
        if not isinstance(name, str) or not isinstance(path, str) or not finite_number(scale):
            raise RequestError(400, 'load a vector file with {"name": NAME, "path": FILE, "scale": NUMBER (optional)}')
        await respond(send, 200, await self._load(scope, name, path, float(scale)))

    async def _steer(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = json_body(await read_body(receive))
        name, scale = self._chosen_set(body)
        extra = body.get("vllm_xargs") or {}
        if not isinstance(extra, dict) or SLOT_ARG in extra or SCALE_ARG in extra:
            raise RequestError(
                400,
                f"vllm_xargs must be an object without {SLOT_ARG}/{SCALE_ARG}: choose a vector "
                'set by model name or {"steerlens": {"vectors": NAME, "scale": S}}',
            )
        with self.bank.using([name]):
            args, salt = self.bank.request(name, scale)
            body["model"] = self.settings.base
            body["vllm_xargs"] = {**extra, **args}
            if salt is not None:
                body["cache_salt"] = f"{salt}:{body['cache_salt']}" if body.get("cache_salt") else salt
            raw = json.dumps(body).encode()
            await self.app(with_body(scope, raw), replay(raw, receive), send)

    def _chosen_set(self, body: dict[str, Any]) -> tuple[str, float | None]:
        """The set (and scale override) a request asks for: its `steerlens` field, else its model name."""
        choice = body.pop("steerlens", None)
        available = ", ".join([self.settings.base, *self.bank.names()])
        if choice is not None:
            if (
                not isinstance(choice, dict)
                or not isinstance(choice.get("vectors"), str)
                or not finite_number(choice.get("scale", 1.0))
            ):
                raise RequestError(400, 'the steerlens field is {"vectors": NAME, "scale": NUMBER (optional)}')
            name, scale = choice["vectors"], choice.get("scale")
        else:
            name, scale = body.get("model"), None
        if name in (None, self.settings.base, BASE):
            return BASE, None
        if name not in self.bank.names():
            raise RequestError(404, f"no vector set or model named {name!r}; available: {available}")
        return name, None if scale is None else float(scale)


def failure_line(err: Exception) -> str:
    """Why the start failed, in one line: a steerlens error's message, else the error's type and first line.
    Every error is caught and reported so: one escaping the lifespan would read to uvicorn's default ("auto")
    as an app without a lifespan, and the server would start without steering."""
    if isinstance(err, (SteerlensError, RequestError)):
        return str(err)
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


async def final_output(outputs: Any) -> Any:
    """The last of the outputs an engine client's `generate` yields for one request."""
    last = None
    async for output in outputs:
        last = output
    return last


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except json.JSONDecodeError as err:
        raise RequestError(400, f"the request body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


def with_body(scope: Scope, body: bytes) -> Scope:
    """`scope` with its content-length set to `body`'s."""
    headers = [(key, value) for key, value in scope.get("headers", []) if key != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the rewritten `body` once, then the client's own messages (its disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def respond(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
