"""Table 3's steering row from a config alone: Qwen2.5-14B (its hub config values, written here) has
48 x 5,120 = 245,760 steering parameters; the paper's "240 KB" optimizer memory is AdamW's fp32 state
sharded over 8 GPUs, per GPU (1,966,080 B / 8 = 240 KiB), as its full-tuning 13.8 GB is (14.77 B x 8 B / 8)."""

from __future__ import annotations

import json

import pytest

from steerlens.analysis.resources import resource_cost
from steerlens.errors import SteerlensError
from steerlens.models import config_shape

QWEN25_14B = {  # huggingface.co/Qwen/Qwen2.5-14B config.json
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "sliding_window": 131072,
    "max_window_layers": 48,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}


@pytest.fixture(scope="module")
def qwen14b(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("qwen2.5-14b")
    (folder / "config.json").write_text(json.dumps(QWEN25_14B))
    return str(folder)


def test_the_papers_table3_from_the_config(qwen14b: str) -> None:
    shape = config_shape(qwen14b)
    assert (shape.num_layers, shape.hidden_size) == (48, 5120)
    steering = resource_cost(qwen14b, "steering", ranks=8)
    assert steering.parameters == shape.num_layers * shape.hidden_size == 245_760  # the paper: "245 K"
    assert steering.optimizer_bytes == 1_966_080
    assert steering.optimizer_bytes_per_rank == 240 * 1024  # the paper: "240 KB"
    full = resource_cost(qwen14b, "full", ranks=8)
    assert full.parameters == 14_770_033_664  # the paper: "14.7 B"
    assert round(full.optimizer_bytes_per_rank / 2**30, 1) == 13.8  # the paper: "13.8 GB"
    lora = resource_cost(qwen14b, "lora", lora_rank=1)
    assert lora.parameters == 48 * (13824 + 5120)


def test_config_counts_match_the_instantiated_toy_model() -> None:
    from steerlens.models import load_model
    from steerlens.rl.policy import make_policy

    for trainable in ("steering", "lora", "full"):
        model, _ = load_model("toy-arith")
        policy = make_policy(model, trainable, None, "toy-arith")
        assert resource_cost("toy-arith", trainable).parameters == sum(p.numel() for p in policy.parameters()), (
            trainable
        )
    with pytest.raises(SteerlensError, match="trainable must be one of"):
        resource_cost("toy-arith", "bias")
