"""down_proj-bias checkpoints: export loads in stock transformers with the same logits; import reads them back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from steerlens.anatomy import model_shape
from steerlens.backends import hf
from steerlens.bias_checkpoint import export_checkpoint, import_vectors
from steerlens.models import load_model
from steerlens.vectors import SteeringVectors, VectorsError


def test_export_matches_hooks_and_imports_back(tiny_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(tiny_dir)
    vectors = SteeringVectors.zeros(model_shape(model), layers=[0, 3])
    vectors.values = torch.randn(vectors.values.shape, generator=torch.Generator().manual_seed(3))
    ids = tokenizer("1+2=3, so the answer is 3.", return_tensors="pt").input_ids
    with hf.attach(model, vectors):
        steered = model(ids).logits
    out = export_checkpoint(tiny_dir, vectors, tmp_path / "exported")
    stock = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no steerlens code involved
    assert torch.allclose(stock(ids).logits, steered, atol=1e-5)
    assert not torch.allclose(model(ids).logits, steered, atol=1e-3)
    back = import_vectors(out)
    assert back.layers == (0, 1, 2, 3)
    assert torch.equal(back.dense(), vectors.dense())
    assert back.provenance["format"] == "down_proj_bias"


def test_import_without_biases_is_clear(tiny_qwen_dir: Path) -> None:
    with pytest.raises(VectorsError, match=r"no tensor named '...layers.N.mlp.down_proj.bias'"):
        import_vectors(tiny_qwen_dir)
