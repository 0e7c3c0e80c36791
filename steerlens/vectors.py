"""SteeringVectors: one d-dimensional vector per steered layer, plus what they belong to.

A set holds a `[k, d]` tensor for `k` of the model's `L` layers (all of them, one, or any subset),
saved as safetensors with the metadata in the header so a file says which model it fits, where each
vector is added and how it was made. Nothing is pickled. `save_pretrained` writes a folder (that file
and a model card, `steerlens.vector_card`); `from_pretrained` loads a folder, a file or a hub id.

Vectors remember their base model (`BaseModel`: hub id, revision, a hash of the config's identity
fields); steering a model whose base differs is refused unless the vectors were loaded with
`allow_other_base=True`, as a vector swap does on purpose.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from steerlens import vector_card
from steerlens.errors import SteerlensError
from steerlens.io import atomic_dir, atomic_path

TENSOR_KEY = "steering"
FORMAT = "steerlens.vectors/1"

# Where a vector is added (the name a file records): to the output of a decoder layer or of one of its
# sub-modules, at every position. Backends find the sub-modules with `steerlens.anatomy.placement_module`.
Placement = Literal["layer_output", "attn_input", "attn_output", "mlp_input", "mlp_output"]
PLACEMENTS: dict[Placement, str] = {
    "layer_output": "the residual stream after the decoder layer",
    "attn_input": "the attention's input, after its norm (only the attention sees it)",
    "attn_output": "the attention's output, before it joins the residual stream",
    "mlp_input": "the MLP's input, after its norm (only the MLP sees it)",
    "mlp_output": "the MLP's output, before it joins the residual stream (in a pre-norm layer without a "
    "post-MLP norm, such as Llama's or Qwen's, the same as layer_output)",
}
LAYER_OUTPUT = "layer_output"

# Config fields that tell base models of one shape apart (stable across transformers versions).
IDENTITY_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
)
_HF_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<rev>[0-9a-f]{40})")


class VectorsError(SteerlensError, ValueError):
    """A vectors file or set does not fit what it is used with."""


def _is_index(value: Any) -> bool:
    """A whole number that is not a bool (JSON and YAML give ints, floats, strings and bools alike)."""
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


@dataclass(frozen=True)
class BaseModel:
    """Which base model vectors were made for; an empty field is unknown.

    Two bases differ when both hub ids are known and differ, else when both config hashes are known and
    differ; otherwise they are taken as the same (a short name, a local folder and a hub id of one model
    all agree by config).
    """

    hub_id: str = ""  #: `org/name` on the Hub, when the model was loaded by hub id or from the HF cache
    revision: str = ""  #: the hub commit, when known
    config: str = ""  #: `sha256:<16 hex>` of the config's `IDENTITY_FIELDS`

    @classmethod
    def of_config(cls, config: Any) -> BaseModel:
        """The base of a loaded model, from its transformers config (`model.config` or `AutoConfig`)."""
        text = getattr(config, "get_text_config", lambda: config)()
        identity = {key: getattr(text, key, None) for key in IDENTITY_FIELDS}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        source = str(getattr(config, "_name_or_path", "") or "")
        hub_id = revision = ""
        cached = _HF_CACHE_SNAPSHOT.search(source)
        if cached:
            hub_id, revision = f"{cached['org']}/{cached['name']}", cached["rev"]
        elif vector_card.looks_like_hub_id(source) and not Path(source).exists():
            hub_id, revision = source, str(getattr(config, "_commit_hash", "") or "")
        return cls(hub_id=hub_id, revision=revision, config=f"sha256:{digest}")

    def differs(self, other: BaseModel) -> bool:
        if self.hub_id and other.hub_id:
            return self.hub_id.lower() != other.hub_id.lower()
        return bool(self.config and other.config and self.config != other.config)

    def describe(self, name: str = "") -> str:
        label = self.hub_id or name or "a model"
        return f"{label!r} (config {self.config})" if self.config else repr(label)


def check_placement(placement: str) -> None:
    """Raise in one line unless `placement` is one of `PLACEMENTS`."""
    if placement not in PLACEMENTS:
        raise VectorsError(f"placement {placement!r} is not one steerlens knows; use one of {', '.join(PLACEMENTS)}")


@dataclass(frozen=True)
class ModelShape:
    """What a set of vectors must agree with: the model's layer count and hidden size (and its base)."""

    num_layers: int
    hidden_size: int
    name: str = ""
    architecture: str = ""
    base: BaseModel = BaseModel()


@dataclass
class SteeringVectors:
    """Steering vectors for `layers` of a model with `num_layers` layers and width `hidden_size`.

    `values[i]` is added to the residual stream after layer `layers[i]`, at every position
    (`placement="layer_output"`), or to the output of one of that layer's sub-modules (`PLACEMENTS`).

    >>> import tempfile, torch, steerlens as sl
    >>> vectors = sl.SteeringVectors(torch.ones(2, 128), layers=(0, 1), num_layers=4, model="toy-arith")
    >>> folder = vectors.save_pretrained(tempfile.mkdtemp() + "/vectors")  # vectors.safetensors, README.md
    >>> sl.SteeringVectors.from_pretrained(folder).layers  # a folder, a .safetensors file or a hub id
    (0, 1)
    """

    values: torch.Tensor
    layers: tuple[int, ...]
    num_layers: int
    model: str = ""
    architecture: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    base: BaseModel = field(default_factory=BaseModel)
    placement: str = LAYER_OUTPUT
    #: steer a model whose base differs from `base` (a vector swap); never saved
    allow_other_base: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        check_placement(self.placement)
        if not isinstance(self.values, torch.Tensor) or not self.values.is_floating_point():
            kind = self.values.dtype if isinstance(self.values, torch.Tensor) else type(self.values).__name__
            raise VectorsError(f"values must be a floating-point tensor, got {kind}")
        if not isinstance(self.layers, (list, tuple)) or not all(_is_index(layer) for layer in self.layers):
            raise VectorsError(f"layers must be a list of layer indices, got {self.layers!r}")
        if not _is_index(self.num_layers):
            raise VectorsError(f"num_layers must be a whole number, got {self.num_layers!r}")
        self.layers = tuple(int(layer) for layer in self.layers)
        self.num_layers = int(self.num_layers)
        if self.values.ndim != 2:
            raise VectorsError(f"values must be [layers, hidden], got shape {tuple(self.values.shape)}")
        if len(self.layers) != self.values.shape[0]:
            raise VectorsError(f"{len(self.layers)} layer indices for {self.values.shape[0]} vectors; they must match")
        if len(set(self.layers)) != len(self.layers):
            raise VectorsError(f"layer indices repeat: {list(self.layers)}")
        bad = [layer for layer in self.layers if not 0 <= layer < self.num_layers]
        if bad:
            raise VectorsError(f"layer indices {bad} outside the model's 0..{self.num_layers - 1}")
        finite = torch.isfinite(self.values.detach()).all(dim=1)
        if not bool(finite.all()):
            broken = [layer for layer, ok in zip(self.layers, finite.tolist()) if not ok]
            raise VectorsError(
                f"values are not finite (NaN or Inf) at layers {broken}: vectors from a diverged run cannot steer"
            )

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def zeros(
        cls,
        shape: ModelShape,
        layers: Iterable[int] | None = None,
        dtype: torch.dtype = torch.float32,
        placement: str = LAYER_OUTPUT,
    ) -> SteeringVectors:
        """Zero vectors for `layers` (default: every layer) of a model of `shape`, added at `placement`."""
        chosen = tuple(range(shape.num_layers)) if layers is None else tuple(layers)
        return cls(
            values=torch.zeros(len(chosen), shape.hidden_size, dtype=dtype),
            layers=chosen,
            num_layers=shape.num_layers,
            model=shape.name,
            architecture=shape.architecture,
            base=shape.base,
            placement=placement,
        )

    @classmethod
    def from_dense(cls, dense: torch.Tensor, **meta: Any) -> SteeringVectors:
        """Wrap an `[L, d]` tensor that has one row for every layer."""
        return cls(values=dense, layers=tuple(range(dense.shape[0])), num_layers=dense.shape[0], **meta)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.values.shape[1])

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.num_layers, self.hidden_size, self.model, self.architecture, self.base)

    def dense(self) -> torch.Tensor:
        """An `[L, d]` tensor with a zero row for every layer that is not steered."""
        out = torch.zeros(self.num_layers, self.hidden_size, dtype=self.values.dtype)
        out[list(self.layers)] = self.values.detach().cpu()
        return out

    def require_placement(self, placement: str, where: str, instead: str) -> None:
        """Raise in one line unless these vectors are added at `placement`, the one place `where` (an engine, a
        server) adds them; `instead` says what to do otherwise."""
        if self.placement != placement:
            raise VectorsError(f"{where} adds at {placement!r}, these vectors at {self.placement!r}; {instead}")

    def require_layer_output(self, where: str, instead: str = "") -> None:
        """Raise in one line unless these vectors are added at layer outputs, the only place `where` (another
        tool's format, an analysis) knows; `instead` says what to do otherwise."""
        if self.placement != LAYER_OUTPUT:
            raise VectorsError(
                f"{where} takes only vectors added at layer outputs; these are added at {self.placement!r}"
                + (f"; {instead}" if instead else "")
            )

    def fingerprint(self) -> str:
        """`sha256:<hex>` of the layers, placement and fp32 values: names vectors that were never saved to a file
        (layer-output vectors keep the digest they had before placements were recorded)."""
        where = [] if self.placement == LAYER_OUTPUT else [self.placement]
        digest = hashlib.sha256(json.dumps([list(self.layers), self.num_layers, *where]).encode())
        digest.update(self.values.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
        return f"sha256:{digest.hexdigest()}"

    def norms(self) -> dict[int, float]:
        """L2 norm of each layer's vector."""
        return {layer: float(v.norm()) for layer, v in zip(self.layers, self.values.float())}

    # ---- operations ---------------------------------------------------------------------------
    def select(self, layers: Iterable[int]) -> SteeringVectors:
        """Keep only `layers` (each must be present)."""
        wanted = tuple(layers)
        missing = [layer for layer in wanted if layer not in self.layers]
        if missing:
            raise VectorsError(f"layers {missing} are not in this set (it has {list(self.layers)})")
        rows = [self.layers.index(layer) for layer in wanted]
        return replace(self, values=self.values[rows].clone(), layers=wanted)

    def scale(self, factor: float) -> SteeringVectors:
        """Every vector multiplied by `factor` (the magnitude sweep)."""
        return replace(self, values=self.values * factor, provenance={**self.provenance, "scaled_by": factor})

    @classmethod
    def merge(cls, parts: Sequence[SteeringVectors]) -> SteeringVectors:
        """Stack sets that steer disjoint layers of the same model (e.g. single-layer runs)."""
        if not parts:
            raise VectorsError("merge needs at least one set")
        first = parts[0]
        for other in parts[1:]:
            first.check_fits(other.shape, what="merged set", allow_other_base=other.allow_other_base)
            if other.placement != first.placement:
                raise VectorsError(
                    f"merged sets are added at different placements ({first.placement!r}, {other.placement!r})"
                )
        layers = [layer for part in parts for layer in part.layers]
        if len(set(layers)) != len(layers):
            raise VectorsError(f"merged sets steer the same layer twice: {sorted(layers)}")
        order = sorted(range(len(layers)), key=layers.__getitem__)
        values = torch.cat([p.values.to(first.values.dtype) for p in parts])[order]
        sources = [p.provenance for p in parts]
        return replace(first, values=values, layers=tuple(sorted(layers)), provenance={"merged": sources})

    def cosine(self, other: SteeringVectors) -> dict[int, float]:
        """Per-layer cosine similarity with `other` over the layers both steer."""
        self.check_fits(other.shape, what="compared set", allow_other_base=True)
        out = {}
        for layer in self.layers:
            if layer in other.layers:
                a = self.values[self.layers.index(layer)].float()
                b = other.values[other.layers.index(layer)].float()
                out[layer] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        return out

    def check_fits(self, shape: ModelShape, what: str = "model", allow_other_base: bool = False) -> None:
        """Raise a clear error if these vectors cannot steer a model of `shape`: another layer count or
        width, or another base model (unless `allow_other_base` here or on the vectors)."""
        if not (allow_other_base or self.allow_other_base) and self.base.differs(shape.base):
            raise VectorsError(
                f"steering vectors made for base model {self.base.describe(self.model)}, the {what} is "
                f"{shape.base.describe(shape.name)}: load them with allow_other_base=True to steer another base "
                "model on purpose (a vector swap)"
            )
        problems = []
        if shape.num_layers != self.num_layers:
            problems.append(f"layer count: vectors have {self.num_layers}, {what} has {shape.num_layers}")
        if shape.hidden_size != self.hidden_size:
            problems.append(f"hidden size: vectors have {self.hidden_size}, {what} has {shape.hidden_size}")
        if problems:
            origin = f" (vectors made for {self.model!r})" if self.model else ""
            raise VectorsError(f"steering vectors do not fit the {what}{origin}: " + "; ".join(problems))

    # ---- files --------------------------------------------------------------------------------
    def header(self) -> dict[str, str]:
        """The safetensors header `save` writes: every piece of metadata, as strings."""
        return {
            "format": FORMAT,
            "layers": json.dumps(list(self.layers)),
            "num_layers": str(self.num_layers),
            "hidden_size": str(self.hidden_size),
            "model": self.model,
            "architecture": self.architecture,
            "base_model": self.base.hub_id,
            "base_revision": self.base.revision,
            "base_config": self.base.config,
            "placement": self.placement,
            "dtype": str(self.values.dtype).removeprefix("torch."),
            "provenance": json.dumps(self.provenance, default=str),
        }

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file atomically; metadata goes in the header."""
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({TENSOR_KEY: self.values.detach().cpu().contiguous()}, str(tmp), metadata=self.header())
        return path

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a self-describing folder atomically: `vectors.safetensors` and a model card `README.md`
        (Hub-style YAML: base model, `library_name: steerlens`, layers, placement, scale, and the training
        settings and results found in `provenance["training"]` / `provenance["results"]`)."""
        directory = Path(directory)
        others = (
            sorted(p.name for p in directory.iterdir() if p.name not in vector_card.FILES) if directory.is_dir() else []
        )
        if others:
            raise VectorsError(
                f"{directory}: save_pretrained replaces the whole folder, which holds other files {others}"
            )
        with atomic_dir(directory) as tmp:
            self.save(tmp / vector_card.VECTORS_FILE)
            card = vector_card.render_card(self.header(), self.norms())
            (tmp / vector_card.CARD_FILE).write_text(card, encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        *,
        allow_other_base: bool = False,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        token: str | None = None,
    ) -> SteeringVectors:
        """Vectors from a folder `save_pretrained` wrote, a `.safetensors` file, or a hub id (`org/name`,
        fetched through `huggingface_hub` into its cache; offline with `HF_HUB_OFFLINE=1`).

        `allow_other_base=True` lets them steer a model other than the one they were made for.
        """
        path = Path(path_or_hub_id).expanduser()
        if not path.exists():
            name = str(path_or_hub_id)
            if not vector_card.looks_like_hub_id(name):
                raise VectorsError(f"{name}: no such vectors folder or file, and not a hub id (org/name)")
            path = vector_card.download(name, revision, cache_dir, local_files_only, token)
        return cls.load(path, allow_other_base=allow_other_base)

    def push_to_hub(
        self, repo_id: str, *, token: str | None = None, private: bool | None = None, commit_message: str = ""
    ) -> str:
        """Upload the `save_pretrained` folder to a Hub model repo (needs huggingface_hub and a token)."""
        with tempfile.TemporaryDirectory() as scratch:
            folder = self.save_pretrained(Path(scratch) / "vectors")
            message = commit_message or f"steerlens vectors for {self.base.hub_id or self.model or 'a model'}"
            return vector_card.upload(folder, repo_id, token, private, message)

    @classmethod
    def load(cls, path: str | Path, allow_other_base: bool = False) -> SteeringVectors:
        """Read a file written by `save` (or the folder `save_pretrained` wrote), with clear errors for
        anything else."""
        path = Path(path)
        if path.is_dir():
            if not (path / vector_card.VECTORS_FILE).is_file():
                raise VectorsError(
                    f"{path}: a vectors folder needs {vector_card.VECTORS_FILE} (save_pretrained writes it)"
                )
            path = path / vector_card.VECTORS_FILE
        if not path.is_file():
            raise VectorsError(f"{path}: no such vectors file")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise VectorsError(f"{path}: not a readable safetensors file ({err})") from err
        if meta.get("format") != FORMAT or TENSOR_KEY not in tensors:
            raise VectorsError(
                f"{path}: not a steerlens vectors file (header format={meta.get('format')!r}, "
                f"tensors={sorted(tensors)}); for a checkpoint with down_proj biases use "
                "steerlens.bias_checkpoint.import_vectors"
            )
        fields = {}
        for name in ("layers", "num_layers", "provenance"):
            raw = meta.get(name, "{}" if name == "provenance" else None)
            if raw is None:
                raise VectorsError(f"{path}: header field {name} is missing")
            try:
                fields[name] = json.loads(raw)
            except json.JSONDecodeError as err:
                raise VectorsError(f"{path}: header field {name} is not valid JSON ({raw[:40]!r})") from err
        layers, num_layers, provenance = fields["layers"], fields["num_layers"], fields["provenance"]
        if not isinstance(provenance, dict):
            raise VectorsError(f"{path}: header field provenance must be a JSON object, got {provenance!r}")
        try:
            return cls(
                values=tensors[TENSOR_KEY],
                layers=layers,
                num_layers=num_layers,
                model=meta.get("model", ""),
                architecture=meta.get("architecture", ""),
                provenance=provenance,
                base=BaseModel(meta.get("base_model", ""), meta.get("base_revision", ""), meta.get("base_config", "")),
                placement=meta.get("placement", LAYER_OUTPUT),  # files from before placements were recorded
                allow_other_base=allow_other_base,
            )
        except VectorsError as err:
            raise VectorsError(f"{path}: {err}") from err
