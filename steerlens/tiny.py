"""Tiny causal LMs built offline: a byte-level tokenizer with a chat template, and a random model.

Tests, demos and the toy training task use these; nothing is downloaded. Every decoder family in
`FAMILIES` can be built, so architecture-specific code paths are exercised (the architecture matrix
test runs each on every backend). vLLM's CPU attention kernel needs head_dim 64, hence the defaults
(hidden 128, 2 heads).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from steerlens.errors import ModelError
from steerlens.io import atomic_dir

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges) plus ChatML special tokens."""
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


# Family -> (transformers model_type, what the family needs beyond the shared tiny sizes). The
# architecture is the model_type's causal-LM class; each config keeps its own defaults otherwise
# (Gemma ties its embeddings, the others do not).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": ("qwen2", {}),
    "llama": ("llama", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}),
    "mistral": ("mistral", {}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3_text", {}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "gpt_oss": ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def tiny_config(
    architecture: str = "qwen2",
    layers: int = 4,
    hidden: int = 128,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate: int = 256,
    vocab_size: int = 264,
    max_positions: int = 1024,
) -> PretrainedConfig:
    """An HF config for a tiny model of the family `architecture` (a key of `FAMILIES`) with the byte
    tokenizer's vocabulary; head_dim is `hidden // heads` in every family."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if architecture not in FAMILIES:
        raise ModelError(f"tiny_config: architecture must be one of {', '.join(FAMILIES)}, got {architecture!r}")
    model_type, extra = FAMILIES[architecture]
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        bos_token_id=None,
        eos_token_id=258,
        pad_token_id=256,
        architectures=[MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]],
        **extra,
    )


def build_tiny_model(out_dir: str | Path, architecture: str = "qwen2", seed: int = 0, **config_kwargs: Any) -> Path:
    """Save a randomly initialised tiny model and its tokenizer to `out_dir` (atomically)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, **config_kwargs), dtype=torch.float32)
    tokenizer = byte_tokenizer()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
