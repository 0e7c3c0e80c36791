"""SteeringVectors: construction, layer operations, safetensors round trip and clear errors."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from steerlens.rl.config import TrainConfig
from steerlens.vectors import PLACEMENTS, ModelShape, Placement, SteeringVectors, VectorsError

SHAPE = ModelShape(num_layers=6, hidden_size=8, name="toy", architecture="Qwen2ForCausalLM")


def random_set(layers: tuple[int, ...] = (0, 2, 5), seed: int = 0) -> SteeringVectors:
    gen = torch.Generator().manual_seed(seed)
    return SteeringVectors(
        torch.randn(len(layers), 8, generator=gen), layers, 6, model="toy", provenance={"method": "test", "seed": seed}
    )


def test_round_trip_keeps_values_and_metadata(tmp_path: Path) -> None:
    vectors = random_set()
    loaded = SteeringVectors.load(vectors.save(tmp_path / "v.safetensors"))
    assert torch.equal(loaded.values, vectors.values)
    assert loaded.layers == (0, 2, 5) and loaded.num_layers == 6 and loaded.model == "toy"
    assert loaded.provenance == {"method": "test", "seed": 0}


def test_bfloat16_round_trip(tmp_path: Path) -> None:
    vectors = random_set()
    vectors.values = vectors.values.to(torch.bfloat16)
    loaded = SteeringVectors.load(vectors.save(tmp_path / "v.safetensors"))
    assert loaded.values.dtype == torch.bfloat16 and torch.equal(loaded.values, vectors.values)


def test_dense_select_merge_scale() -> None:
    a, b = random_set((0, 2), seed=1), random_set((5,), seed=2)
    merged = SteeringVectors.merge([b, a])
    assert merged.layers == (0, 2, 5)
    assert torch.equal(merged.select([5]).values, b.values)
    dense = merged.dense()
    assert dense.shape == (6, 8) and torch.equal(dense[1], torch.zeros(8)) and torch.equal(dense[2], a.values[1])
    assert torch.allclose(merged.scale(-2.0).values, -2 * merged.values)
    assert merged.cosine(merged) == pytest.approx({0: 1.0, 2: 1.0, 5: 1.0})


def test_merge_rejects_overlap_and_misfit() -> None:
    with pytest.raises(VectorsError, match="same layer twice"):
        SteeringVectors.merge([random_set((0, 2)), random_set((2,))])
    other = SteeringVectors(torch.zeros(1, 4), (0,), 6)
    with pytest.raises(VectorsError, match="hidden size: vectors have 8, merged set has 4"):
        SteeringVectors.merge([random_set(), other])


def test_zeros_and_bad_layers() -> None:
    zeros = SteeringVectors.zeros(SHAPE)
    assert zeros.layers == tuple(range(6)) and not zeros.values.any()
    with pytest.raises(VectorsError, match=r"outside the model's 0..5"):
        SteeringVectors(torch.zeros(1, 8), (6,), 6)
    with pytest.raises(VectorsError, match=r"layers \[1\] are not in this set"):
        random_set().select([1])


def test_wrong_model_is_named() -> None:
    with pytest.raises(VectorsError, match="layer count: vectors have 6, model has 4") as err:
        random_set().check_fits(ModelShape(4, 8))
    assert "'toy'" in str(err.value)


def test_corrupted_and_foreign_files(tmp_path: Path) -> None:
    good = random_set().save(tmp_path / "v.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(VectorsError, match="broken.safetensors: not a readable safetensors file"):
        SteeringVectors.load(broken)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(VectorsError, match="not a steerlens vectors file"):
        SteeringVectors.load(foreign)
    with pytest.raises(VectorsError, match="no such vectors file"):
        SteeringVectors.load(tmp_path / "missing.safetensors")


def test_damaged_header_is_named(tmp_path: Path) -> None:
    path = tmp_path / "v.safetensors"
    save_file(
        {"steering": torch.zeros(2, 8)},
        str(path),
        metadata={"format": "steerlens.vectors/1", "layers": json.dumps([0, 9]), "num_layers": "6"},
    )
    with pytest.raises(VectorsError, match=r"v.safetensors: layer indices \[9\] outside"):
        SteeringVectors.load(path)


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = random_set(seed=1).save(tmp_path / "v.safetensors")
    before = path.read_bytes()

    def explode(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("steerlens.vectors.save_file", explode)
    with pytest.raises(OSError):
        random_set(seed=2).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_every_placement_is_described_and_trainable() -> None:
    # One list of names (the `Placement` type): the descriptions and the training option follow it.
    assert tuple(PLACEMENTS) == typing.get_args(Placement)
    assert typing.get_type_hints(TrainConfig)["placement"] == Placement
