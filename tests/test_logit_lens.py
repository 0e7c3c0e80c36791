"""Logit lens: cosine projection pinned against a per-token computation, planted tokens, chunking, final norm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from steerlens.analysis.logit_lens import LogitLensError, coarsen_histogram, logit_lens, model_logit_lens
from steerlens.anatomy import final_norm, model_shape, unembedding
from steerlens.models import load_model
from steerlens.vectors import SteeringVectors


def random_case(vocab: int = 300, d: int = 16, layers: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(layers, d, generator=gen), torch.randn(vocab, d, generator=gen)


def test_cosine_projection_matches_per_token_computation() -> None:
    vectors, unembed = random_case()
    result = logit_lens(vectors, unembed, k=10, hist_bins=50)
    for layer, s in enumerate(vectors):
        per_token = [(float(F.cosine_similarity(s, u, dim=0)), float(s @ u), v) for v, u in enumerate(unembed)]
        ranked = sorted(per_token, reverse=True)
        for side, expected in (("top", ranked[:10]), ("bottom", ranked[::-1][:10])):
            frame = result.top if side == "top" else result.bottom
            got = frame[frame["layer"] == layer].sort_values("rank")
            assert got["token_id"].tolist() == [v for _, _, v in expected]
            assert got["cosine"].to_numpy() == pytest.approx([c for c, _, _ in expected], abs=1e-6)
            assert got["dot"].to_numpy() == pytest.approx([d for _, d, _ in expected], rel=1e-5)
        counts, _ = np.histogram([c for c, _, _ in per_token], bins=50, range=(-1, 1))
        hist = result.histogram[result.histogram["layer"] == layer]
        assert hist["count"].sum() == len(unembed)
        lo = int(np.flatnonzero(counts)[0])
        assert hist["count"].tolist() == counts[lo : lo + len(hist)].tolist()
    assert set(result.table()["projection"]) == {"raw"} and set(result.histogram["projection"]) == {"raw"}


def test_chunking_gives_the_same_result_as_one_chunk() -> None:
    vectors, unembed = random_case(vocab=1000, seed=1)
    whole = logit_lens(vectors, unembed, k=20, chunk_size=len(unembed))
    chunked = logit_lens(vectors, unembed, k=20, chunk_size=7)
    assert whole.table()["token_id"].tolist() == chunked.table()["token_id"].tolist()
    assert np.allclose(whole.table()["cosine"], chunked.table()["cosine"], atol=1e-6)
    assert whole.histogram["count"].tolist() == chunked.histogram["count"].tolist()


def test_planted_unembedding_row_comes_first_with_cosine_one(tiny_qwen_dir: Path) -> None:
    model, tokenizer = load_model(tiny_qwen_dir)
    target = tokenizer.convert_tokens_to_ids("A")
    vectors = SteeringVectors.zeros(model_shape(model), layers=[1, 3])
    vectors.values[1] = unembedding(model)[target] * 3.0
    result = model_logit_lens(model, tokenizer, vectors, k=5)
    first = result.top[(result.top["layer"] == 3) & (result.top["rank"] == 1)].iloc[0]
    assert first["token_id"] == target and first["token"] == "A"
    assert first["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert first["dot"] == pytest.approx(3.0 * float(unembedding(model)[target].norm() ** 2), rel=1e-5)
    assert len(result.top) == len(result.bottom) == 2 * 5


def test_final_norm_mode_differs_and_is_labelled(tiny_qwen_dir: Path) -> None:
    model, tokenizer = load_model(tiny_qwen_dir)
    norm = final_norm(model)
    with torch.no_grad():  # a trained norm is not all ones; make this one scale dimensions unevenly
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(0)) * 2)
    vectors, _ = random_case(d=model.config.hidden_size, layers=4, seed=2)
    raw = model_logit_lens(model, tokenizer, vectors, k=5)
    normed = model_logit_lens(model, tokenizer, vectors, k=5, final_norm=True)
    assert set(normed.table()["projection"]) == {"final_norm"} == set(normed.histogram["projection"])
    assert normed.projection == "final_norm" and raw.projection == "raw"
    assert not np.allclose(raw.top["cosine"], normed.top["cosine"])
    u = unembedding(model)
    with torch.no_grad():
        expected = F.cosine_similarity(norm(vectors[0])[None], u, dim=1).topk(5)
    assert normed.top[normed.top["layer"] == 0]["token_id"].tolist() == expected.indices.tolist()


def test_coarsen_keeps_counts_and_clear_errors() -> None:
    vectors, unembed = random_case()
    result = logit_lens(vectors, unembed)
    coarse = coarsen_histogram(result.histogram, max_bins=10)
    assert coarse.groupby("layer").size().max() <= 10
    assert coarse.groupby("layer")["count"].sum().tolist() == [len(unembed)] * 3
    with pytest.raises(LogitLensError, match="width 16, the unembedding 8"):
        logit_lens(vectors, unembed[:, :8])
