"""Apply a llama.cpp control vector file to a running `llama_cpp.Llama` (llama-cpp-python), the way
llama.cpp's own `--control-vector` loader does, so steerlens's exported files can be checked in
llama.cpp itself. llama-cpp-python is optional: it is imported inside the functions that need it.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Any

import numpy as np

from steerlens.vectors import VectorsError

_DIRECTION = re.compile(r"^direction\.(\d+)$")


def llama_cpp_buffer(path: str | Path, n_embd: int, n_layer: int) -> list[float]:
    """The flat float buffer llama.cpp builds from a control-vector GGUF for a model with `n_layer`
    blocks of width `n_embd`: `n_embd * (n_layer - 1)` floats, `direction.N` at offset `(N-1)*n_embd`,
    zeros for layers the file does not steer.

    This follows llama.cpp's `common_control_vector_load_one` (common/common.cpp), which writes
    `direction.N` at `(N-1)*n_embd` because the buffer has no slot for layer 0; `llama_set_adapter_cvec`
    (src/llama-adapter.cpp, `llama_adapter_cvec::apply`) then reads layer `il`'s vector from
    `(il-1)*n_embd`, so the two offsets cancel and `direction.N` is added to the output of block N.
    Like that loader, a tensor not named `direction.N`, `direction.0`, and a non-F32 tensor are refused;
    so are N >= n_layer and a tensor of the wrong width, which llama.cpp would ignore or reject later.
    Repeated directions for one layer add up, as there.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    buffer = np.zeros(n_embd * (n_layer - 1), dtype=np.float32)
    for tensor in reader.tensors:
        match = _DIRECTION.match(tensor.name)
        if match is None:
            raise VectorsError(f"{path}: tensor {tensor.name!r} is not named direction.N (llama.cpp refuses it)")
        layer = int(match.group(1))
        if not 1 <= layer < n_layer:
            raise VectorsError(f"{path}: {tensor.name}: llama.cpp has slots for direction.1..{n_layer - 1} only")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise VectorsError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, llama.cpp needs F32")
        row = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        if row.size != n_embd:
            raise VectorsError(f"{path}: {tensor.name} has {row.size} values, the model's width is {n_embd}")
        buffer[(layer - 1) * n_embd : layer * n_embd] += row
    return buffer.tolist()


def apply_control_vector(llm: Any, path: str | Path | None, scale: float = 1.0) -> None:
    """Steer `llm` (a `llama_cpp.Llama`) with the control vector in `path`, scaled by `scale`, on every
    layer llama.cpp can steer (1..n_layer-1, both inclusive, as its CLI does); `path=None` removes it.

    The vector is read by the model's next decode; cached keys and values computed before are not
    redone, so reset the model (`llm.reset()`) before evaluating a prompt again.
    """
    import llama_cpp

    ctx = llm._ctx.ctx  # the raw llama_context pointer behind the high-level object
    if path is None:
        code = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, llm.n_embd(), 0, 0)
    else:
        n_embd = int(llm.n_embd())
        n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
        values = np.asarray(llama_cpp_buffer(path, n_embd, n_layer), dtype=np.float32) * np.float32(scale)
        data = (ctypes.c_float * values.size).from_buffer_copy(values.tobytes())
        code = llama_cpp.llama_set_adapter_cvec(ctx, data, values.size, n_embd, 1, n_layer - 1)
    if code != 0:
        raise VectorsError(f"llama.cpp refused the control vector {path} (llama_set_adapter_cvec returned {code})")


def greedy_generate(llm: Any, prompts: list[list[int]], max_new_tokens: int, stops: list[int]) -> list[list[int]]:
    """Greedy completions from `llm` (a `llama_cpp.Llama`) for prompts given as token ids, one prompt at a
    time from an empty cache: the argmax of the last logits after each decode, up to `max_new_tokens`,
    the stop token included when one of `stops` ends it (as steerlens's engines return completions)."""
    n_vocab = int(llm.n_vocab())
    outputs = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out: list[int] = []
        while len(out) < max_new_tokens:
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            token = int(np.argmax(logits))
            out.append(token)
            if token in stops:
                break
            llm.eval([token])
        outputs.append(out)
    return outputs
