"""What each way of training costs, from a model's config alone: trainable parameters and optimizer state
(the papers' Table 3), for steering vectors, rank-r LoRA on `down_proj`, and full fine-tuning.

The full model's parameter count comes from instantiating it on PyTorch's meta device (shapes, no
memory), so it is exact for any architecture transformers knows. Optimizer state is AdamW's two fp32
moments per trainable parameter (8 bytes each); with ZeRO-style sharding over `ranks` GPUs each holds
1/ranks of it, which is how per-GPU figures such as the paper's are reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerlens.errors import SteerlensError
from steerlens.models import resolve_model

ADAMW_BYTES_PER_PARAMETER = 8  # exp_avg and exp_avg_sq, fp32


@dataclass(frozen=True)
class ResourceCost:
    """Trainable parameters and optimizer-state bytes of one way of training one model."""

    model: str
    trainable: str
    parameters: int
    ranks: int = 1

    @property
    def optimizer_bytes(self) -> int:
        """AdamW state over all ranks."""
        return self.parameters * ADAMW_BYTES_PER_PARAMETER

    @property
    def optimizer_bytes_per_rank(self) -> float:
        """AdamW state per GPU when it is sharded over `ranks` GPUs."""
        return self.optimizer_bytes / self.ranks


def model_parameters(model: str) -> int:
    """Every parameter of `model` (short name, directory or hub id), counted from its config on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model(model))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in skeleton.parameters())


def resource_cost(
    model: str, trainable: str, lora_rank: int = 1, layers: int | None = None, ranks: int = 1
) -> ResourceCost:
    """The cost of training `trainable` ("steering": one d-vector per layer, or per each of `layers` layers;
    "lora": rank `lora_rank` on every MLP down_proj; "full": every weight) on `model`, from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(model)).get_text_config()
    hidden, num_layers = int(config.hidden_size), int(config.num_hidden_layers)
    counts = {
        "steering": lambda: (layers or num_layers) * hidden,
        "lora": lambda: num_layers * lora_rank * (int(config.intermediate_size) + hidden),  # A: r x d_ff, B: d x r
        "full": lambda: model_parameters(model),
    }
    if trainable not in counts:
        raise SteerlensError(f"trainable must be one of {', '.join(counts)}, got {trainable!r}")
    return ResourceCost(model, trainable, counts[trainable](), ranks)
