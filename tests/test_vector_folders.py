"""Vectors as self-describing folders: `save_pretrained` (vectors + a Hub model card), `from_pretrained` by
folder, file or hub id (the real huggingface_hub, offline, against a cache this test fills), `push_to_hub`,
and the one-line refusals: an unknown placement, another base model unless asked for."""

from __future__ import annotations

import doctest
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, scan_cache_dir
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import steerlens as sl
from steerlens.anatomy import model_shape
from steerlens.rl.policy import SteeringPolicy
from steerlens.smollm import TRAINED_VECTORS
from steerlens.tiny import build_tiny_model, tiny_config
from steerlens.vector_card import HubError
from steerlens.vectors import FORMAT, TENSOR_KEY, BaseModel, ModelShape, SteeringVectors, VectorsError

REVISION = "0123456789abcdef0123456789abcdef01234567"


def trained_like(base: BaseModel = BaseModel(), **provenance: object) -> SteeringVectors:
    return SteeringVectors(
        torch.randn(3, 16),
        layers=(0, 2, 5),
        num_layers=6,
        model="org/base",
        architecture="LlamaForCausalLM",
        base=base,
        provenance=dict(provenance),
    )


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_folder_has_vectors_and_a_card_the_hub_reads(tmp_path: Path) -> None:
    base = BaseModel("Org/Base-1.5B", REVISION, "sha256:00112233aabbccdd")
    vectors = trained_like(
        base, training={"lr": 0.02, "steps": 30, "seed": 0}, results={"heldout_accuracy_after": 0.63}, step=30
    )
    folder = vectors.save_pretrained(tmp_path / "vectors")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "vectors.safetensors"]

    card = ModelCard.load(folder / "README.md")  # huggingface_hub's own parser of Hub model cards
    data = card.data.to_dict()
    assert data["library_name"] == "steerlens" and data["base_model"] == "Org/Base-1.5B"
    info = data["steerlens"]
    assert info["placement"] == "layer_output" and info["scale"] == 1.0
    assert info["layers"] == [0, 2, 5] and info["num_layers"] == 6 and info["hidden_size"] == 16
    assert info["base_revision"] == REVISION and info["base_config"] == "sha256:00112233aabbccdd"
    assert info["training"] == {"lr": 0.02, "steps": 30, "seed": 0}
    assert info["results"] == {"heldout_accuracy_after": 0.63}
    assert info["provenance"] == {"step": 30}
    assert "| lr | 0.02 |" in card.text and "| heldout_accuracy_after | 0.63 |" in card.text

    for loaded in (SteeringVectors.from_pretrained(folder), SteeringVectors.load(folder)):
        assert torch.equal(loaded.values, vectors.values) and loaded.layers == vectors.layers
        assert loaded.base == base and loaded.placement == "layer_output"
        assert loaded.provenance == vectors.provenance
    plain = SteeringVectors.from_pretrained(folder / "vectors.safetensors")  # the file alone still loads
    assert plain.base == base and torch.equal(plain.values, vectors.values)


def test_card_without_a_hub_id_names_no_base_model(tmp_path: Path) -> None:
    vectors = SteeringVectors(torch.ones(2, 8), layers=(0, 1), num_layers=2, model="toy-arith")
    data = ModelCard.load(vectors.save_pretrained(tmp_path / "v") / "README.md").data.to_dict()
    assert "base_model" not in data  # the Hub wants a repo id there; a local name stays in the steerlens block
    assert data["steerlens"]["model"] == "toy-arith" and "training" not in data["steerlens"]


def test_save_pretrained_replaces_only_a_vectors_folder(tmp_path: Path) -> None:
    vectors = trained_like()
    vectors.save_pretrained(tmp_path / "v")
    vectors.scale(2.0).save_pretrained(tmp_path / "v")  # a vectors folder is replaced whole
    assert torch.equal(SteeringVectors.from_pretrained(tmp_path / "v").values, vectors.values * 2.0)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(VectorsError, match=r"holds other files \['metrics.jsonl'\]") as err:
        vectors.save_pretrained(tmp_path / "run")
    one_line(err)
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_files_from_before_folders_keep_loading(tmp_path: Path) -> None:
    """A header without placement or base fields: layer output, base unknown, so no base check."""
    old = {
        "format": FORMAT,
        "layers": "[0, 1]",
        "num_layers": "4",
        "hidden_size": "128",
        "model": "smollm2-135m",
        "architecture": "LlamaForCausalLM",
        "dtype": "float32",
        "provenance": "{}",
    }
    save_file({TENSOR_KEY: torch.ones(2, 128)}, str(tmp_path / "old.safetensors"), metadata=old)
    loaded = SteeringVectors.from_pretrained(tmp_path / "old.safetensors")
    assert loaded.placement == "layer_output" and loaded.base == BaseModel()
    loaded.check_fits(ModelShape(4, 128, "other", base=BaseModel.of_config(tiny_config("llama"))))
    shipped = SteeringVectors.load(TRAINED_VECTORS)
    assert shipped.num_layers == 30 and shipped.placement == "layer_output"


def test_placements_round_trip_and_an_unknown_one_is_refused_in_one_line(tmp_path: Path) -> None:
    vectors = replace(trained_like(), placement="attn_output")
    assert SteeringVectors.from_pretrained(vectors.save_pretrained(tmp_path / "attn")).placement == "attn_output"
    header = {**trained_like().header(), "placement": "pre_norm"}
    save_file({TENSOR_KEY: torch.ones(3, 16)}, str(tmp_path / "v.safetensors"), metadata=header)
    with pytest.raises(VectorsError, match="placement 'pre_norm' is not one steerlens knows") as err:
        SteeringVectors.from_pretrained(tmp_path / "v.safetensors")
    assert "layer_output, attn_input, attn_output, mlp_input, mlp_output" in one_line(err)


def test_base_model_identity_from_configs(tmp_path: Path) -> None:
    qwen, llama = tiny_config("qwen2"), tiny_config("llama")
    assert BaseModel.of_config(qwen) == BaseModel.of_config(tiny_config("qwen2"))  # same config: same base
    assert BaseModel.of_config(qwen).differs(BaseModel.of_config(llama))
    qwen._name_or_path = "Qwen/Qwen2.5-Math-1.5B"
    other = tiny_config("qwen2")
    other._name_or_path = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert BaseModel.of_config(qwen).hub_id == "Qwen/Qwen2.5-Math-1.5B"
    assert BaseModel.of_config(qwen).differs(BaseModel.of_config(other))  # one config, two hub ids
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-Math-1.5B" / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    other._name_or_path = str(snapshot)  # loaded from the HF cache: the hub id and revision are in the path
    cached = BaseModel.of_config(other)
    assert (cached.hub_id, cached.revision) == ("Qwen/Qwen2.5-Math-1.5B", REVISION)
    assert not cached.differs(BaseModel.of_config(qwen))
    local = tiny_config("qwen2")
    local._name_or_path = str(tmp_path)  # a local folder: known by its config only
    assert BaseModel.of_config(local).hub_id == "" and not BaseModel.of_config(local).differs(cached)


def test_base_check_in_check_fits_and_its_opt_in() -> None:
    made_for = BaseModel("Qwen/Qwen2.5-Math-1.5B", "", "sha256:aaaa")
    vectors = SteeringVectors.zeros(ModelShape(6, 16, "Qwen/Qwen2.5-Math-1.5B", base=made_for))
    other = ModelShape(6, 16, "distill", base=BaseModel("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "", "sha256:aaaa"))
    with pytest.raises(VectorsError) as err:
        vectors.check_fits(other, what="vLLM engine")
    assert one_line(err) == (
        "steering vectors made for base model 'Qwen/Qwen2.5-Math-1.5B' (config sha256:aaaa), the vLLM engine is "
        "'deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B' (config sha256:aaaa): load them with allow_other_base=True "
        "to steer another base model on purpose (a vector swap)"
    )
    vectors.check_fits(other, allow_other_base=True)
    from dataclasses import replace

    replace(vectors, allow_other_base=True).check_fits(other)
    vectors.check_fits(ModelShape(6, 16, "qwen-local", base=BaseModel(config="sha256:aaaa")))  # same config
    vectors.check_fits(ModelShape(6, 16))  # unknown base: shape only
    assert vectors.cosine(SteeringVectors.zeros(other)) == {layer: 0.0 for layer in range(6)}  # comparing is fine


@pytest.fixture(scope="module")
def toy_and_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    toy, _ = sl.load_model("toy-arith")
    llama_dir = build_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama", "llama", seed=1)
    return toy, AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def test_attaching_to_another_base_model_needs_the_opt_in(tmp_path: Path, toy_and_llama: tuple) -> None:
    toy, llama = toy_and_llama
    shape = model_shape(toy, name="toy-arith")
    vectors = SteeringVectors(
        torch.randn(4, 128), layers=(0, 1, 2, 3), num_layers=4, model="toy-arith", base=shape.base
    )
    folder = vectors.save_pretrained(tmp_path / "toy-vectors")
    ids = torch.tensor([[5, 6, 7, 8]])
    with sl.steer(toy, SteeringVectors.from_pretrained(folder)):  # its own base: steers
        pass
    with pytest.raises(VectorsError, match="steering vectors made for base model 'toy-arith'") as err:
        sl.steer(llama, SteeringVectors.from_pretrained(folder))
    assert "allow_other_base=True" in one_line(err)
    stock = llama(ids).logits
    with sl.steer(llama, SteeringVectors.from_pretrained(folder, allow_other_base=True)):  # a swap, on purpose
        swapped = llama(ids).logits
    assert (swapped - stock).abs().max() > 1e-3


def test_training_writes_the_folder_with_settings_and_results(tmp_path: Path, toy_and_llama: tuple) -> None:
    toy, _ = toy_and_llama
    policy = SteeringPolicy(toy, [1, 2], "toy-arith")
    tokenizer = sl.load_model("toy-arith")[1]
    try:
        artefact = policy.save_final(tmp_path, tokenizer, {"lr": 0.1, "steps": 3}, {"heldout_accuracy_after": 0.5})
    finally:
        policy.handle.remove()
    assert artefact == tmp_path / "vectors.safetensors"
    plain, folder = SteeringVectors.load(artefact), SteeringVectors.from_pretrained(tmp_path / "vectors")
    assert torch.equal(plain.values, folder.values) and folder.layers == (1, 2)
    assert folder.base == model_shape(toy).base and folder.base.config.startswith("sha256:")
    info = ModelCard.load(tmp_path / "vectors" / "README.md").data.to_dict()["steerlens"]
    assert info["training"] == {"lr": 0.1, "steps": 3} and info["results"] == {"heldout_accuracy_after": 0.5}
    assert info["model"] == "toy-arith" and info["architecture"] == "Qwen2ForCausalLM"


def fill_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = REVISION) -> None:
    """The layout huggingface_hub writes: blobs by hash, a snapshot of links to them, refs/main -> the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_from_pretrained_by_hub_id_offline(tmp_path: Path) -> None:
    vectors = trained_like(BaseModel("Org/Base-1.5B", "", "sha256:1"), training={"lr": 0.02})
    cache = tmp_path / "hub"
    fill_hub_cache(cache, "someone/base-1.5b-steering", vectors.save_pretrained(tmp_path / "v"))
    repos = {repo.repo_id: repo for repo in scan_cache_dir(cache).repos}  # the library sees a valid cached repo
    assert {rev.commit_hash for rev in repos["someone/base-1.5b-steering"].revisions} == {REVISION}

    for revision in (None, REVISION):
        loaded = SteeringVectors.from_pretrained(
            "someone/base-1.5b-steering", revision=revision, cache_dir=cache, local_files_only=True
        )
        assert torch.equal(loaded.values, vectors.values) and loaded.provenance == {"training": {"lr": 0.02}}
    with pytest.raises(HubError, match="someone/missing: vectors not found on the Hub or in its local cache") as err:
        SteeringVectors.from_pretrained("someone/missing", cache_dir=cache, local_files_only=True)
    one_line(err)
    with pytest.raises(VectorsError, match="no such vectors folder or file, and not a hub id"):
        SteeringVectors.from_pretrained(tmp_path / "nowhere" / "deep" / "v")

    # as a user runs it: the cache and offline mode from the environment, huggingface_hub's defaults
    script = (
        "import steerlens as sl; v = sl.SteeringVectors.from_pretrained('someone/base-1.5b-steering'); "
        "print(v.fingerprint(), v.base.hub_id)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [vectors.fingerprint(), "Org/Base-1.5B"]


def test_push_to_hub_needs_a_token_then_uploads_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = trained_like(BaseModel("Org/Base-1.5B", "", "sha256:1"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubError, match="needs a Hugging Face token: run `hf auth login` or set HF_TOKEN") as err:
        vectors.push_to_hub("someone/vecs")
    one_line(err)

    seen: dict[str, object] = {}

    def create_repo(self: object, repo_id: str, private: object = None, exist_ok: bool = False) -> None:
        seen["created"] = (repo_id, private, exist_ok)

    def upload_folder(self: object, repo_id: str, folder_path: str, commit_message: str) -> str:
        seen["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        seen["loaded"] = SteeringVectors.from_pretrained(folder_path)
        seen["message"] = commit_message
        return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = vectors.push_to_hub("someone/vecs", token="hf_test", private=True)
    assert url == "https://huggingface.co/someone/vecs/commit/abc"
    assert seen["created"] == ("someone/vecs", True, True)
    assert seen["files"] == ["README.md", "vectors.safetensors"]
    assert torch.equal(seen["loaded"].values, vectors.values)  # type: ignore[attr-defined]
    assert seen["message"] == "steerlens vectors for Org/Base-1.5B"


def test_docstring_example_runs() -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = doctest.DocTestFinder(recurse=False).find(SteeringVectors)
    assert tests and tests[0].examples
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_card_metadata_is_the_header(tmp_path: Path) -> None:
    """One source of truth: the card's steerlens block says what the safetensors header says."""
    from safetensors import safe_open

    vectors = trained_like(BaseModel("Org/Base-1.5B", REVISION, "sha256:1"), training={"seed": 3})
    folder = vectors.save_pretrained(tmp_path / "v")
    with safe_open(str(folder / "vectors.safetensors"), "pt") as handle:
        header = handle.metadata()
    info = ModelCard.load(folder / "README.md").data.to_dict()["steerlens"]
    for key in ("format", "model", "architecture", "base_model", "base_revision", "base_config", "placement"):
        assert info[key] == header[key]
    assert info["layers"] == json.loads(header["layers"]) and info["training"] == {"seed": 3}


@pytest.mark.slow
def test_a_training_run_writes_its_vectors_folder(trained_toy_vectors: Path) -> None:
    """`steerlens train` (the shared toy run): the run's vectors file and, beside it, the folder with its card."""
    folder = trained_toy_vectors.parent / "vectors"
    plain, loaded = SteeringVectors.load(trained_toy_vectors), SteeringVectors.from_pretrained(folder)
    assert torch.equal(plain.values, loaded.values) and loaded.base.config.startswith("sha256:")
    info = ModelCard.load(folder / "README.md").data.to_dict()["steerlens"]
    assert info["training"]["lr"] == 0.1 and info["training"]["model"] == "toy-arith"
    assert info["training"]["steps"] == 16 and info["placement"] == "layer_output"
    assert "results" not in info  # the fixture trains with --eval-data null: no held-out accuracy (NaN) to report
