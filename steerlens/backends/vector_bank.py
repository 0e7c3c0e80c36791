"""The host's record of the named vector sets a vLLM engine holds, and how a request names one.

An engine's steered model keeps a bank of vector sets (see `vllm_plugin`): slot 0 is no steering, slot 1
the engine's default set (what `SteeredLLM(model, vectors)` and `update(vectors)` write, and what a request
that names no set gets), slots 2.. the named sets, and one last slot for the engine's start-up probe (a random
set that proves steering is applied before anything is served; see `backends.vllm_checks.SteeringProbe`).
`VectorBank` is the bookkeeping beside it, in the process
that sends requests (a `SteeredLLM`, or the OpenAI server's middleware): which slot each name has, its scale,
its version, and how many requests are using it right now.

A request picks its set by two fields vLLM already carries: the slot and scale in `SamplingParams.extra_args`,
read by the worker before each forward pass, and a `cache_salt` that names the set, its version and the
scale, so vLLM's prefix cache never serves KV computed under another set, another scale, or this set's older
values, to it.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count

from steerlens.errors import SteerlensError

BASE = "base"  # the reserved name of slot 0: the model unsteered
BASE_SLOT = 0
DEFAULT_SLOT = 1  # the engine's default set, for requests that name none
FIRST_NAMED_SLOT = 2
SLOT_ARG = "steerlens_slot"  # the keys of a request's slot and scale in SamplingParams.extra_args
SCALE_ARG = "steerlens_scale"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")


def bank_slots(capacity: int) -> int:
    """The slots of an engine's bank holding `capacity` named sets: base, default, the named sets, the probe's."""
    return FIRST_NAMED_SLOT + capacity + 1


class VectorSetError(SteerlensError, ValueError):
    """A vector set was named that the engine does not hold, or cannot be added or removed."""


@dataclass(frozen=True)
class VectorSet:
    """One named set in an engine's bank: its slot, the scale its values are written with, its version."""

    name: str
    slot: int
    scale: float
    version: int

    def cache_salt(self, scale: float) -> str:
        """The prefix-cache salt of requests under this set as it is now (changes with every update), at `scale`."""
        return f"steerlens:{self.name}:v{self.version}:x{scale!r}"


class VectorBank:
    """Names, slots, scales, versions and in-use counts of the sets an engine holds (thread-safe).

    `capacity` named sets fit besides the base model and the default set.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise VectorSetError(f"max_vector_sets must be >= 0, got {capacity}")
        self.capacity = capacity
        self._sets: dict[str, VectorSet] = {}
        self._versions = count(1)  # one counter for every set: a removed and re-added name never reuses a salt
        self._in_use: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def slots(self) -> int:
        """The bank's size in the engine (`bank_slots`)."""
        return bank_slots(self.capacity)

    @property
    def probe_slot(self) -> int:
        """The slot the start-up probe writes its random set to (the last; never a named set's)."""
        return FIRST_NAMED_SLOT + self.capacity

    def names(self) -> list[str]:
        """The named sets, in the order they were added."""
        with self._lock:
            return list(self._sets)

    def get(self, name: str) -> VectorSet:
        """The set called `name`; an unknown name raises, listing the sets there are."""
        with self._lock:
            return self._get(name)

    def _get(self, name: str) -> VectorSet:
        if name not in self._sets:
            known = ", ".join([BASE, *self._sets]) or BASE
            raise VectorSetError(f"no vector set named {name!r} in this engine; available: {known}")
        return self._sets[name]

    def add(self, name: str, scale: float = 1.0) -> VectorSet:
        """Reserve a slot for a new set `name` (the caller writes its values)."""
        if not NAME.fullmatch(name) or name == BASE:
            raise VectorSetError(
                f"a vector set name must be 1-128 letters, digits or ._:+- (starting with a "
                f"letter or digit) and not {BASE!r}, got {name!r}"
            )
        with self._lock:
            if name in self._sets:
                raise VectorSetError(f"the engine already holds a vector set named {name!r}; update or remove it")
            used = {entry.slot for entry in self._sets.values()}
            free = next((slot for slot in range(FIRST_NAMED_SLOT, self.probe_slot) if slot not in used), None)
            if free is None:
                raise VectorSetError(
                    f"the engine holds its maximum of {self.capacity} vector sets "
                    f"({', '.join(self._sets)}); remove one, or start it with a larger max_vector_sets"
                )
            entry = VectorSet(name, free, float(scale), next(self._versions))
            self._sets[name] = entry
            return entry

    def bump(self, name: str) -> VectorSet:
        """Give set `name` a new version (its values are being replaced): later requests get a new cache salt."""
        with self._lock:
            old = self._get(name)
            self._sets[name] = VectorSet(name, old.slot, old.scale, next(self._versions))
            return self._sets[name]

    def remove(self, name: str) -> VectorSet:
        """Forget set `name`; refused while requests are using it."""
        with self._lock:
            entry = self._get(name)
            if self._in_use[name]:
                raise VectorSetError(
                    f"vector set {name!r} is in use by {self._in_use[name]} running request(s); "
                    "remove it after they finish"
                )
            del self._sets[name]
            return entry

    def request(self, name: str | None, scale: float | None = None) -> tuple[dict[str, int | float], str | None]:
        """The extra args (slot, scale) and cache salt of a request under `name` (None: the default set,
        unsalted, at scale 1), at `scale` (None: the set's own)."""
        if name is None:
            return {SLOT_ARG: DEFAULT_SLOT, SCALE_ARG: 1.0 if scale is None else float(scale)}, None
        if name == BASE:
            return {SLOT_ARG: BASE_SLOT, SCALE_ARG: 0.0}, f"steerlens:{BASE}"
        entry = self.get(name)
        scale = entry.scale if scale is None else float(scale)
        return {SLOT_ARG: entry.slot, SCALE_ARG: scale}, entry.cache_salt(scale)

    def in_use(self, name: str) -> int:
        """How many running requests use set `name`."""
        with self._lock:
            return self._in_use[name]

    def check_known(self, names: Iterable[str | None]) -> None:
        """Raise, listing the sets there are, if any of `names` is not held (None and "base" always are)."""
        with self._lock:
            for name in names:
                if name not in (None, BASE):
                    self._get(name)

    @contextmanager
    def using(self, names: Iterable[str | None]) -> Iterator[None]:
        """Count the named sets as in use (by one request per occurrence) inside the block."""
        counted = Counter(name for name in names if name not in (None, BASE))
        with self._lock:
            for name in counted:
                self._get(name)
            self._in_use.update(counted)
        try:
            yield
        finally:
            with self._lock:
                self._in_use.subtract(counted)


SetChoice = str | None | Sequence[str | None]  # one set for every prompt, or one per prompt


def per_prompt(choice: SetChoice, prompts: int) -> list[str | None]:
    """A set name for each of `prompts` prompts from one name (or None) or a list of them."""
    names = [choice] * prompts if choice is None or isinstance(choice, str) else list(choice)
    if len(names) != prompts:
        raise VectorSetError(f"{prompts} prompts but {len(names)} vector-set names (give one, or one per prompt)")
    return names
