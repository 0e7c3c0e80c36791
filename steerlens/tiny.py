"""Tiny causal LMs built offline: a byte-level tokenizer with a chat template, and a random model.

Tests, demos and the toy training task use these; nothing is downloaded. Qwen2 and Llama layouts
are both available so architecture-specific code paths are exercised. vLLM's CPU attention kernel
needs head_dim 64, hence the defaults (hidden 128, 2 heads).
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


def tiny_config(architecture: str = "qwen2", layers: int = 4, hidden: int = 128, heads: int = 2,
                kv_heads: int = 1, intermediate: int = 256, vocab_size: int = 264,
                max_positions: int = 1024) -> PretrainedConfig:
    """An HF config for a tiny Qwen2 or Llama model with the byte tokenizer's vocabulary."""
    from transformers import LlamaConfig, Qwen2Config

    tokenizer_ids = dict(bos_token_id=None, eos_token_id=258, pad_token_id=256)
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False, **tokenizer_ids,
    )
    if architecture == "qwen2":
        return Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    if architecture == "llama":
        return LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    raise ModelError(f"tiny_config: architecture must be 'qwen2' or 'llama', got {architecture!r}")


def build_tiny_model(out_dir: str | Path, architecture: str = "qwen2", seed: int = 0,
                     **config_kwargs: Any) -> Path:
    """Save a randomly initialised tiny model and its tokenizer to `out_dir` (atomically)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, **config_kwargs), dtype=torch.float32)
    tokenizer = byte_tokenizer()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
