"""Vectors in other tools' formats: every reader and writer round-trips, and the peer libraries steer
with exported vectors exactly as steerlens's HF hooks do (fp32 logits within 1e-5).

repeng 0.4.0 and steering-vectors 0.12.2 pin numpy<2 and transformers<5, so scripts/setup.sh installs
them without dependencies into ./.peers (appended to sys.path here, after the real packages). repeng
annotates with `np.float_`, which numpy 2 removed; the alias is restored before importing it.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from steerlens.backends import steer
from steerlens.formats import FORMATS, convert, read_vectors, write_vectors
from steerlens.formats.peers import from_repeng, from_steering_vector, to_repeng, to_steering_vector
from steerlens.models import load_model
from steerlens.vectors import PLACEMENTS, SteeringVectors, VectorsError

PEERS = Path(__file__).resolve().parents[1] / ".peers"
FILE_NAMES = {
    "steerlens": "v.safetensors",
    "llama.cpp": "v.gguf",
    "easysteer": "v.gguf",
    "vllm-lens": "v.vllm-lens.json",
}
RECORDS_MODEL = {"steerlens", "llama.cpp", "easysteer"}
PROMPT = "Vectors that travel between tools."
ATOL = 1e-5


def peer(name: str) -> ModuleType:
    """A peer library from ./.peers (installed by scripts/setup.sh), imported with ./.peers on sys.path
    only for the import: vllm-lens there declares a vLLM plugin that later engines must not load."""
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # type: ignore[attr-defined]  # repeng 0.4.0's annotations predate numpy 2
    sys.path.append(str(PEERS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(PEERS))


def random_vectors(num_layers: int, hidden: int, layers: tuple[int, ...], seed: int = 0) -> SteeringVectors:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVectors(
        values=2.0 * torch.randn(len(layers), hidden, generator=generator),
        layers=layers,
        num_layers=num_layers,
        model="tiny",
        architecture="Qwen2ForCausalLM",
    )


def same(a: SteeringVectors, b: SteeringVectors) -> bool:
    return a.layers == b.layers and a.num_layers == b.num_layers and torch.equal(a.values.float(), b.values.float())


@pytest.fixture(scope="module")
def tiny(tiny_qwen_dir: Path) -> tuple[torch.nn.Module, torch.Tensor, SteeringVectors]:
    model, tokenizer = load_model(tiny_qwen_dir)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    cfg = model.config
    return model, ids, random_vectors(cfg.num_hidden_layers, cfg.hidden_size, (1, 2, 3))


@torch.no_grad()
def steerlens_logits(model: torch.nn.Module, ids: torch.Tensor, vectors: SteeringVectors) -> torch.Tensor:
    with steer(model, vectors):
        return model(input_ids=ids).logits


# ---- files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_round_trips(fmt: str, tmp_path: Path) -> None:
    vectors = random_vectors(6, 16, (0, 3, 5) if fmt != "llama.cpp" else (1, 3, 5))
    path = write_vectors(vectors, tmp_path / FILE_NAMES[fmt], fmt)
    back = read_vectors(path, fmt, num_layers=6)
    assert same(back, vectors)
    assert back.model == ("tiny" if fmt in RECORDS_MODEL else "")
    again = convert(path, tmp_path / "again.safetensors", "steerlens", source_format=fmt, num_layers=6)
    assert same(SteeringVectors.load(again), vectors)


def test_llama_cpp_layout(tmp_path: Path) -> None:
    """llama.cpp's own keys: architecture controlvector, model_hint, layer_count, f32 direction.N (N >= 1)."""
    import gguf

    path = write_vectors(random_vectors(6, 16, (2, 5)), tmp_path / "v.gguf", "llama.cpp")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "qwen2"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    assert [(t.name, t.tensor_type) for t in reader.tensors] == [
        ("direction.2", gguf.GGMLQuantizationType.F32),
        ("direction.5", gguf.GGMLQuantizationType.F32),
    ]


def test_llama_cpp_refuses_layer_zero_unless_dropped(tmp_path: Path) -> None:
    vectors = random_vectors(4, 16, (0, 1, 2, 3))
    with pytest.raises(VectorsError, match="layer 0.*drop_layer0"):
        write_vectors(vectors, tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()
    written = read_vectors(write_vectors(vectors, tmp_path / "v.gguf", drop_layer0=True))
    assert same(written, vectors.select((1, 2, 3)))
    with pytest.raises(VectorsError, match="steerlens format takes no option drop_layer0"):
        write_vectors(vectors, tmp_path / "v.safetensors", drop_layer0=True)


def test_foreign_gguf_needs_the_layer_count(tmp_path: Path) -> None:
    """A control vector written by another tool does not know the model's layer count."""
    repeng = peer("repeng")
    vectors = random_vectors(6, 16, (1, 4))
    path = tmp_path / "repeng.gguf"
    to_repeng(vectors, "qwen2").export_gguf(str(path))
    with pytest.raises(VectorsError, match="num_layers"):
        read_vectors(path)
    assert same(read_vectors(path, num_layers=6), vectors)
    ours = write_vectors(vectors, tmp_path / "ours.gguf")
    imported = repeng.ControlVector.import_gguf(str(ours))
    assert sorted(imported.directions) == [1, 4]
    assert all(np.array_equal(imported.directions[k], vectors.values[i].numpy()) for i, k in enumerate((1, 4)))


def test_vllm_lens_json_is_its_steering_vector(tmp_path: Path) -> None:
    """vllm-lens's own pydantic model reads what steerlens writes, and steerlens reads what it dumps."""
    vllm_lens = peer("vllm_lens")
    vectors = random_vectors(6, 16, (1, 4))
    theirs = vllm_lens.SteeringVector.model_validate_json(
        write_vectors(vectors, tmp_path / "a.vllm-lens.json").read_text()
    )
    assert theirs.layer_indices == [1, 4] and theirs.scale == 1.0 and not theirs.norm_match
    assert torch.equal(theirs.activations, vectors.values)
    dumped = vllm_lens.SteeringVector(activations=vectors.values.to(torch.bfloat16), layer_indices=[1, 4], scale=0.5)
    (tmp_path / "b.vllm-lens.json").write_text(dumped.model_dump_json())
    back = read_vectors(tmp_path / "b.vllm-lens.json", num_layers=6)
    assert torch.equal(back.values, vectors.values.to(torch.bfloat16).float() * 0.5)
    norm_matched = vllm_lens.SteeringVector(activations=vectors.values, layer_indices=[1, 4], norm_match=True)
    (tmp_path / "c.vllm-lens.json").write_text(norm_matched.model_dump_json())
    with pytest.raises(VectorsError, match="norm_match"):
        read_vectors(tmp_path / "c.vllm-lens.json", num_layers=6)


def test_easysteer_keeps_layer_zero(tmp_path: Path) -> None:
    """EasySteer's loader takes direction.0, llama.cpp's does not: the same set, two files."""
    import gguf

    path = write_vectors(random_vectors(4, 16, (0, 2)), tmp_path / "v.gguf", "easysteer")
    assert [t.name for t in gguf.GGUFReader(str(path)).tensors] == ["direction.0", "direction.2"]


def test_unreadable_files_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(VectorsError, match="junk.gguf: not a readable GGUF"):
        read_vectors(tmp_path / "junk.gguf", num_layers=4)
    with pytest.raises(VectorsError, match="cannot tell the vectors format"):
        read_vectors(tmp_path / "v.pt")
    with pytest.raises(VectorsError, match="unknown vectors format 'onnx'"):
        read_vectors(tmp_path / "junk.gguf", "onnx")


# ---- peer libraries: same logits as steerlens ---------------------------------------------------------
def test_repeng_steers_like_steerlens(tiny: tuple) -> None:
    repeng = peer("repeng")
    model, ids, vectors = tiny
    expected = steerlens_logits(model, ids, vectors)
    controlled = repeng.ControlModel(model, list(vectors.layers))
    try:
        controlled.set_control(to_repeng(vectors), coeff=1.0)
        with torch.no_grad():
            got = controlled(input_ids=ids).logits
    finally:
        controlled.unwrap()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    assert (expected - base).abs().max() > 1.0  # the vectors do steer
    assert (got - expected).abs().max() <= ATOL
    assert same(from_repeng(to_repeng(vectors), vectors.num_layers), vectors)


def test_repeng_vectors_import(tiny: tuple) -> None:
    """A repeng ControlVector (negative layer ids allowed there) becomes the same steering in steerlens."""
    repeng = peer("repeng")
    model, ids, vectors = tiny
    directions = {-1: np.full(vectors.hidden_size, 0.5, dtype=np.float32), 1: vectors.values[0].numpy()}
    imported = from_repeng(repeng.ControlVector("qwen2", directions), vectors.num_layers)
    assert imported.layers == (1, vectors.num_layers - 1)
    controlled = repeng.ControlModel(model, [1, vectors.num_layers - 1])
    try:
        controlled.set_control(
            repeng.ControlVector("qwen2", {1: directions[1], vectors.num_layers - 1: directions[-1]})
        )
        with torch.no_grad():
            got = controlled(input_ids=ids).logits
    finally:
        controlled.unwrap()
    assert (got - steerlens_logits(model, ids, imported)).abs().max() <= ATOL


def test_steering_vectors_steers_like_steerlens(tiny: tuple) -> None:
    peer("steering_vectors")
    model, ids, vectors = tiny
    expected = steerlens_logits(model, ids, vectors)
    exported = to_steering_vector(vectors)
    with exported.apply(model), torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - expected).abs().max() <= ATOL
    assert same(from_steering_vector(exported, vectors.num_layers), vectors)
    half = exported.to(torch.float32)
    with half.apply(model, multiplier=0.5), torch.no_grad():
        scaled = model(input_ids=ids).logits
    assert (scaled - steerlens_logits(model, ids, vectors.scale(0.5))).abs().max() <= ATOL


@pytest.mark.parametrize("placement", sorted(set(PLACEMENTS) - {"layer_output"}))
def test_steering_vectors_steers_like_steerlens_inside_the_layer(tiny: tuple, placement: str) -> None:
    """steering-vectors' sub-module layer types add where steerlens's placements do (its own layer guessing)."""
    peer("steering_vectors")
    model, ids, vectors = tiny
    inside = replace(vectors, placement=placement)
    exported = to_steering_vector(inside)
    with exported.apply(model), torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - steerlens_logits(model, ids, inside)).abs().max() <= ATOL
    assert (got - steerlens_logits(model, ids, vectors)).abs().max() > 10 * ATOL or placement == "mlp_output"
    back = from_steering_vector(exported, vectors.num_layers)
    assert same(back, inside) and back.placement == placement


def test_steering_vectors_import_refuses_unknown_layer_types() -> None:
    steering_vectors = peer("steering_vectors")
    inside = steering_vectors.SteeringVector({1: torch.ones(16)}, layer_type="attention_heads")
    with pytest.raises(VectorsError, match="has no steerlens placement; layer types decoder_block, "):
        from_steering_vector(inside, 4)


@pytest.mark.parametrize("fmt", sorted(set(FORMATS) - {"steerlens"}))
def test_formats_refuse_vectors_added_inside_the_layer(fmt: str, tmp_path: Path) -> None:
    vectors = replace(random_vectors(4, 16, (1, 2)), placement="attn_output")
    with pytest.raises(
        VectorsError, match="takes only vectors added at layer outputs; these are added at 'attn_output'; keep them"
    ):
        write_vectors(vectors, tmp_path / "v", fmt)
    with pytest.raises(VectorsError, match="a repeng ControlVector takes only vectors added at layer outputs"):
        to_repeng(vectors)


# ---- the command line ---------------------------------------------------------------------------------
def test_convert_command(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    """steerlens convert: by suffix, through a format without a layer count (given by --model), and the
    llama.cpp refusal as one line with exit code 2."""
    from typer.testing import CliRunner

    from steerlens.cli import app

    vectors = random_vectors(4, 128, (0, 1, 3))
    source = vectors.save(tmp_path / "v.safetensors")
    runner = CliRunner()
    refused = runner.invoke(app, ["convert", str(source), str(tmp_path / "v.gguf")])
    assert refused.exit_code == 2 and "layer 0" in refused.output and "--drop-layer0" in refused.output
    assert "Traceback" not in refused.output
    done = runner.invoke(app, ["convert", str(source), str(tmp_path / "v.gguf"), "--drop-layer0"])
    assert done.exit_code == 0 and "llama.cpp; layer 0 left out" in done.output
    assert runner.invoke(app, ["convert", str(tmp_path / "v.gguf"), str(tmp_path / "v.vllm-lens.json")]).exit_code == 0
    missing = runner.invoke(app, ["convert", str(tmp_path / "v.vllm-lens.json"), str(tmp_path / "back.safetensors")])
    assert missing.exit_code == 2 and "--num-layers" in missing.output
    back = runner.invoke(
        app,
        [
            "convert",
            str(tmp_path / "v.vllm-lens.json"),
            str(tmp_path / "back.safetensors"),
            "--model",
            str(tiny_qwen_dir),
        ],
    )
    assert back.exit_code == 0, back.output
    assert same(SteeringVectors.load(tmp_path / "back.safetensors"), vectors.select((1, 3)))
    narrow = random_vectors(4, 64, (1,)).save(tmp_path / "narrow.safetensors")
    wrong = runner.invoke(app, ["convert", str(narrow), str(tmp_path / "x.gguf"), "--model", str(tiny_qwen_dir)])
    assert wrong.exit_code == 2 and "hidden size: vectors have 64" in wrong.output
