"""Head patching: identities of the mixed runs, per-head batching against hand-made patches, metrics, errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from steerlens.analysis.patches import Patch, PatchingError, make_patch
from steerlens.analysis.patching import LayerPatcher, head_patching, kl_divergence, patch_hooks, summarize_patching
from steerlens.anatomy import decoder_layers, final_norm, model_shape
from steerlens.backends import hf
from steerlens.models import load_model
from steerlens.tiny import build_tiny_model
from steerlens.vectors import SteeringVectors

LAYER = 2  # steer after layer 2, study layer 3 (the last of 4)
ATOL = 1e-4


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per architecture, built on first use: a tiny model with 4 query heads in 2 KV groups, a left-padded
    batch, and a vector at LAYER."""
    built: dict = {}

    def get(arch: str):
        if arch not in built:
            path = build_tiny_model(tmp_path_factory.mktemp("patching") / arch, arch, seed=3, heads=4, kv_heads=2)
            model, tokenizer = load_model(path)
            enc = tokenizer(
                ["Steer the last layer.", "Heads, groups"], return_tensors="pt", padding=True, padding_side="left"
            )
            vectors = SteeringVectors.zeros(model_shape(model), [LAYER])
            vectors.values = torch.randn(1, 128, generator=torch.Generator().manual_seed(0)) * 4
            built[arch] = (model, enc.input_ids, enc.attention_mask, vectors)
        return built[arch]

    return get


@pytest.fixture(params=["qwen2", "llama"])
def setup(request: pytest.FixtureRequest, cases):
    """Each architecture in turn (for the identities that depend on the layer's code)."""
    return cases(request.param)


@pytest.fixture()
def qwen(cases):
    return cases("qwen2")


def run(model, ids, mask, vectors=None) -> torch.Tensor:
    with torch.no_grad():
        if vectors is None:
            return model(input_ids=ids, attention_mask=mask).logits
        with hf.attach(model, vectors):
            return model(input_ids=ids, attention_mask=mask).logits


def patched(patcher: LayerPatcher, *patches: Patch) -> torch.Tensor:
    return torch.cat(list(patcher.logits(list(patches), batch_size=2)))


def close(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> bool:
    return torch.allclose(a[mask.bool()], b[mask.bool()], atol=ATOL)


def at_layer(vectors: SteeringVectors, layer: int) -> SteeringVectors:
    return SteeringVectors(vectors.values.clone(), (layer,), vectors.num_layers)


def test_uniform_patches_are_the_steered_and_unsteered_runs(setup) -> None:
    model, ids, mask, vectors = setup
    patcher = LayerPatcher(model, ids, vectors, LAYER, mask)
    heads, groups = patcher.parts.heads, patcher.parts.groups
    assert (heads, groups) == (4, 2)
    everything = Patch.uniform(True, heads, groups)
    assert everything.inverse() == Patch.uniform(False, heads, groups)
    steered, clean = patched(patcher, everything, everything.inverse())
    assert close(steered, run(model, ids, mask, vectors), mask)
    assert close(clean, run(model, ids, mask), mask)
    reference = patcher.reference_logits()
    assert close(reference[0], clean, mask) and close(reference[1], steered, mask)


def test_skip_layer_is_the_vector_moved_past_the_layer(setup) -> None:
    model, ids, mask, vectors = setup
    patcher = LayerPatcher(model, ids, vectors, LAYER, mask)
    skip_layer = make_patch("layer", None, "skip", 4, 2)
    assert skip_layer.residual and not skip_layer.mlp and not any(skip_layer.q + skip_layer.k + skip_layer.v)
    # Adding s after the study layer instead of before it: only the residual path carries it.
    assert close(patched(patcher, skip_layer)[0], run(model, ids, mask, at_layer(vectors, LAYER + 1)), mask)
    # Its inverse steers everything but the residual; both together are the steered run's parts.
    assert skip_layer.inverse() == make_patch("layer", None, "only", 4, 2)


def test_skip_attn_takes_attention_from_the_clean_run(setup) -> None:
    model, ids, mask, vectors = setup
    attn = decoder_layers(model)[LAYER + 1].self_attn
    clean_attn: list = []
    handle = attn.register_forward_hook(lambda m, a, out: clean_attn.append(out[0]))
    run(model, ids, mask)
    handle.remove()
    handle = attn.register_forward_hook(lambda m, a, out: (clean_attn[0], *out[1:]))
    try:
        expected = run(model, ids, mask, vectors)
    finally:
        handle.remove()
    patcher = LayerPatcher(model, ids, vectors, LAYER, mask)
    heads_clean = replace(Patch.uniform(True, 4, 2), head=(False,) * 4)
    skip_attn, heads_clean = patched(patcher, make_patch("attn", None, "skip", 4, 2), heads_clean)
    assert close(skip_attn, expected, mask)
    assert close(heads_clean, expected, mask)  # all heads overridden with clean outputs = clean attention


def test_one_head_patch_matches_a_hand_made_patch(setup) -> None:
    model, ids, mask, vectors = setup
    o_proj = decoder_layers(model)[LAYER + 1].self_attn.o_proj
    grab: list = []
    handle = o_proj.register_forward_pre_hook(lambda m, args: grab.append(args[0]))
    run(model, ids, mask, vectors)
    handle.remove()
    head_dim = o_proj.in_features // 4
    patcher = LayerPatcher(model, ids, vectors, LAYER, mask)
    batched = patched(patcher, *[make_patch("head", h, "only", 4, 2) for h in range(4)])
    for head in (0, 3):
        cols = slice(head * head_dim, (head + 1) * head_dim)

        def swap(m, args, cols=cols):
            x = args[0].clone()
            x[..., cols] = grab[0][..., cols]
            return (x,)

        handle = o_proj.register_forward_pre_hook(swap)
        try:
            expected = run(model, ids, mask)
        finally:
            handle.remove()
        assert close(batched[head], expected, mask)
        assert not close(batched[head], run(model, ids, mask), mask)


def test_head_routed_to_the_residual_only_leaves_the_mlp_clean(qwen) -> None:
    model, ids, mask, vectors = qwen
    study = decoder_layers(model)[LAYER + 1]
    o_proj = study.self_attn.o_proj
    heads_in, outs = [], []
    hooks = [
        o_proj.register_forward_pre_hook(lambda m, args: heads_in.append(args[0])),
        study.register_forward_hook(lambda m, a, out: outs.append(out)),
    ]
    run(model, ids, mask)
    run(model, ids, mask, vectors)
    for hook in hooks:
        hook.remove()
    delta = torch.zeros_like(heads_in[0])
    delta[..., 32:64] = heads_in[1][..., 32:64] - heads_in[0][..., 32:64]  # head 1 (head_dim 32)
    with torch.no_grad():
        final = outs[0] + o_proj(delta) - o_proj(torch.zeros_like(delta))
        expected = model.get_output_embeddings()(final_norm(model)(final))
    patcher = LayerPatcher(model, ids, vectors, LAYER, mask)
    residual, both = patched(
        patcher, make_patch("head", 1, "only", 4, 2, route="residual"), make_patch("head", 1, "only", 4, 2)
    )
    assert close(residual, expected, mask)
    assert not close(both, expected, mask)


def test_head_patching_table_is_batched_consistently(qwen) -> None:
    model, ids, mask, vectors = qwen
    kwargs = dict(variants=("head", "kv", "layer"), modes=("skip",), routes=("both", "mlp"), attention_mask=mask)
    table = head_patching(model, ids, vectors, LAYER, batch_size=64, **kwargs)
    one_by_one = head_patching(model, ids, vectors, LAYER, batch_size=3, **kwargs)
    assert len(table) == len(one_by_one) == (4 * 2 + 2 + 1) * int(mask.sum())
    for col in ("kl_steered", "kl_base", "prob"):
        assert torch.allclose(torch.tensor(table[col].to_numpy()), torch.tensor(one_by_one[col].to_numpy()), atol=1e-5)
    assert (table["kl_steered"] >= 0).all() and (table["kl_base"] >= 0).all()
    skip_layer = table[(table.variant == "layer") & (table["mode"] == "skip")]
    assert (skip_layer.kl_steered > 1e-6).any()
    summary = summarize_patching(table)
    assert set(summary.columns) >= {"variant", "index", "mode", "route", "kl_steered", "dprob", "recovered"}
    assert len(summary) == 4 * 2 + 2 + 1


def test_targets_and_scored_positions(qwen) -> None:
    model, ids, mask, vectors = qwen
    score = mask.bool().clone()
    score[:, :-3] = False
    table = head_patching(
        model,
        ids,
        vectors,
        LAYER,
        variants=("attn",),
        modes=("only",),
        attention_mask=mask,
        score_mask=score,
        targets="next",
    )
    assert sorted(set(table.position)) == list(range(ids.shape[1] - 3, ids.shape[1]))
    last = table[table.position == ids.shape[1] - 1]
    assert last["prob"].isna().all() and table[table.position < ids.shape[1] - 1]["prob"].notna().all()


def test_kl_divergence() -> None:
    logp = torch.randn(5, 11).log_softmax(-1)
    assert torch.equal(kl_divergence(logp, logp), torch.zeros(5))
    other = torch.randn(5, 11).log_softmax(-1)
    assert (kl_divergence(logp, other) > 0).all()


def test_patch_hooks_steer_generation(qwen) -> None:
    model, ids, mask, vectors = qwen
    gen = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with hf.attach(model, vectors):
            expected = model.generate(ids, **gen)
        with patch_hooks(model, vectors, LAYER, Patch.uniform(True, 4, 2)):
            assert torch.equal(model.generate(ids, **gen), expected)
        skip_attn = make_patch("attn", None, "skip", 4, 2)
        with patch_hooks(model, vectors, LAYER, skip_attn):
            logits = model(input_ids=ids, attention_mask=mask).logits
    assert close(logits, patched(LayerPatcher(model, ids, vectors, LAYER, mask), skip_attn)[0], mask)


def test_bad_requests_are_refused(qwen) -> None:
    model, ids, mask, vectors = qwen
    with pytest.raises(PatchingError, match=r"0\.\.2"):
        LayerPatcher(model, ids, vectors, 3, mask)
    with pytest.raises(PatchingError, match="do not steer layer 1"):
        LayerPatcher(model, ids, vectors, 1, mask)
    with pytest.raises(PatchingError, match=r"index in 0\.\.3"):
        make_patch("head", 4, "only", 4, 2)
    with pytest.raises(PatchingError, match="unknown unit"):
        make_patch("heads", 0, "only", 4, 2)
    with pytest.raises(PatchingError, match="head overrides"):
        with patch_hooks(model, vectors, LAYER, make_patch("head", 0, "only", 4, 2)):
            pass
