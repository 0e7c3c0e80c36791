"""A vectors folder's model card, and the Hugging Face Hub at the edge (download, upload).

A folder saved by `SteeringVectors.save_pretrained` holds `vectors.safetensors` (values and metadata in
its header: the one source of truth) and `README.md`, a card rendered from that header: Hub-style YAML
front matter (`library_name: steerlens`, `base_model` when it is a hub id, and a `steerlens:` block
with every field) above a short text. Loading reads the header, never the card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from steerlens.errors import SteerlensError

VECTORS_FILE = "vectors.safetensors"
CARD_FILE = "README.md"
FILES = (VECTORS_FILE, CARD_FILE)
LIBRARY = "steerlens"


class HubError(SteerlensError, ValueError):
    """Vectors could not be fetched from or pushed to the Hugging Face Hub."""


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as err:
        raise HubError(
            "loading or pushing vectors by hub id needs huggingface_hub: pip install huggingface_hub"
        ) from err
    return huggingface_hub


def card_metadata(header: dict[str, str]) -> dict[str, Any]:
    """The card's YAML front matter, from a vectors file's header (its strings parsed back)."""
    provenance = json.loads(header.get("provenance") or "{}")
    fields: dict[str, Any] = {
        "format": header["format"],
        "model": header.get("model", ""),
        "architecture": header.get("architecture", ""),
        "base_model": header.get("base_model", ""),
        "base_revision": header.get("base_revision", ""),
        "base_config": header.get("base_config", ""),
        "placement": header["placement"],
        "scale": 1.0,
        "layers": json.loads(header["layers"]),
        "num_layers": int(header["num_layers"]),
        "hidden_size": int(header["hidden_size"]),
        "dtype": header.get("dtype", ""),
        "training": provenance.pop("training", None),
        "results": provenance.pop("results", None),
        "provenance": provenance or None,
    }
    meta: dict[str, Any] = {"library_name": LIBRARY, "tags": [LIBRARY, "steering-vectors"]}
    if fields["base_model"]:
        meta["base_model"] = fields["base_model"]
    meta[LIBRARY] = {key: value for key, value in fields.items() if value not in ("", None)}
    return meta


def _table(rows: dict[str, Any], what: str) -> list[str]:
    lines = [f"| {what} | value |", "| --- | --- |"]
    lines += [f"| {key} | {json.dumps(value, default=str)} |" for key, value in rows.items()]
    return lines


def render_card(header: dict[str, str], norms: dict[int, float]) -> str:
    """`README.md` for a vectors folder: YAML front matter, then what the vectors are and how to load them."""
    meta = card_metadata(header)
    info = meta[LIBRARY]
    base = info.get("base_model") or info.get("model") or "an unnamed model"
    revision = f" (revision `{info['base_revision']}`)" if info.get("base_revision") else ""
    layers = info["layers"]
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, default_flow_style=None, width=120).rstrip(),
        "---",
        f"# Steering vectors for {base}",
        "",
        f"{len(layers)} vectors of width {info['hidden_size']} for {info.get('architecture') or 'a model'} "
        f"`{base}`{revision} with {info['num_layers']} layers. Each is added at placement `{info['placement']}` "
        f"(the residual stream after decoder layer i), at every position, at scale {info['scale']}; the base "
        "weights are untouched.",
        "",
        "```python",
        "import steerlens as sl",
        "",
        f'model, tokenizer = sl.load_model("{info.get("model") or base}")',
        'vectors = sl.SteeringVectors.from_pretrained("<this folder or hub id>")',
        "with sl.steer(model, vectors):",
        "    ...  # generate as usual",
        "```",
        "",
        "Steering another base model is refused unless asked for: "
        "`SteeringVectors.from_pretrained(..., allow_other_base=True)`.",
    ]
    if info.get("training"):
        lines += ["", "## Training", "", *_table(info["training"], "setting")]
    if info.get("results"):
        lines += ["", "## Results", "", *_table(info["results"], "result")]
    lines += ["", "## Vector norms", "", "| layer | L2 norm |", "| --- | --- |"]
    lines += [f"| {layer} | {norm:.4g} |" for layer, norm in norms.items()]
    return "\n".join(lines) + "\n"


def looks_like_hub_id(name: str) -> bool:
    """`org/name` (one slash, no path prefix): what the Hub calls a repo id."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def download(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    token: str | None = None,
) -> Path:
    """The local folder of a vectors repo on the Hub, through huggingface_hub's cache (offline when
    `HF_HUB_OFFLINE=1` or `local_files_only`)."""
    hub = _hub()
    try:
        folder = hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            token=token,
            allow_patterns=[VECTORS_FILE, CARD_FILE],
            library_name=LIBRARY,
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubError(f"{repo_id}: vectors not found on the Hub or in its local cache ({first})") from err
    return Path(folder)


def upload(folder: Path, repo_id: str, token: str | None, private: bool | None, message: str) -> str:
    """Push a saved vectors folder to a model repo on the Hub (created if missing); returns the commit URL."""
    hub = _hub()
    if token is None and hub.get_token() is None:
        raise HubError(f"pushing to {repo_id} needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    api = hub.HfApi(token=token, library_name=LIBRARY)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    except (OSError, ValueError) as err:
        raise HubError(f"pushing vectors to {repo_id} failed: {err}") from err
    return str(getattr(info, "commit_url", info))
