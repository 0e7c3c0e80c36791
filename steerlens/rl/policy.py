"""What the RL loop trains: steering vectors (default), LoRA on MLP down_proj, or every weight.

A `Policy` gives the loop one surface for all three: the trainable parameters, their state for
checkpoints, a context in which the base policy is restored (for the KL reference), and the final
artefact written at the end of a run (steering: `vectors.safetensors` and the folder `vectors/` with its
model card).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlens.anatomy import model_shape
from steerlens.backends.hf import HFSteering, attach, freeze
from steerlens.errors import SteerlensError
from steerlens.io import atomic_dir
from steerlens.vectors import SteeringVectors


class Policy:
    """The model being trained and its trainable parameters."""

    final_dir = "model"  # where save_final writes the trained weights in the run directory
    card_dir = "vectors"  # steering: where save_final writes the vectors folder (save_pretrained)

    def __init__(self, model: nn.Module) -> None:
        self.model: Any = model  # an HF causal LM, or its peft wrapper
        self._reference: nn.Module | None = None

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors by name, for checkpoints."""
        return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        named = dict(self.model.named_parameters())
        for name, value in state.items():
            named[name].copy_(value)

    def vectors(self) -> SteeringVectors | None:
        """Current steering vectors (None unless steering is trained)."""
        return None

    @contextlib.contextmanager
    def base_policy(self) -> Iterator[nn.Module]:
        """A module computing the untrained policy (the KL reference)."""
        if self._reference is None:
            self._reference = copy.deepcopy(self.model).eval()
            freeze(self._reference)
        yield self._reference

    def save_final(
        self,
        out_dir: Path,
        tokenizer: Any,
        training: dict[str, Any] | None = None,
        results: dict[str, Any] | None = None,
    ) -> Path:
        """Write the trained weights with the tokenizer, so the folder loads on its own (`steerlens eval --model`).

        `training` (the run's settings) and `results` (held-out accuracy) go into a steering run's card."""
        target = out_dir / self.final_dir
        with atomic_dir(target) as tmp:
            self.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return target


class SteeringPolicy(Policy):
    """Steering vectors on a frozen model, via the HF backend's hooks."""

    def __init__(self, model: nn.Module, layers: list[int] | None, model_name: str) -> None:
        super().__init__(model)
        freeze(model)
        shape = model_shape(model, name=model_name)
        self.handle: HFSteering = attach(model, SteeringVectors.zeros(shape, layers), trainable=True)

    def parameters(self) -> list[nn.Parameter]:
        return [self.handle.parameter]

    def named_state(self) -> dict[str, torch.Tensor]:
        return {"steering": self.handle.parameter.detach()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.handle.update(state["steering"])

    def vectors(self) -> SteeringVectors:
        return self.handle.vectors()

    @contextlib.contextmanager
    def base_policy(self) -> Iterator[nn.Module]:
        attached = self.handle.attached
        self.handle.remove()
        try:
            yield self.model
        finally:
            if attached:
                self.handle.attach()

    def save_final(
        self,
        out_dir: Path,
        tokenizer: Any,
        training: dict[str, Any] | None = None,
        results: dict[str, Any] | None = None,
    ) -> Path:
        """`vectors.safetensors` (the artefact every reader knows) and the same vectors as a self-describing
        folder `vectors/` (`vectors.safetensors` + `README.md`), both recording `training` and `results`."""
        told = {"training": training, "results": results}
        vectors = self.handle.vectors(**{key: value for key, value in told.items() if value})
        vectors.save_pretrained(out_dir / self.card_dir)
        return vectors.save(out_dir / "vectors.safetensors")


class LoraPolicy(Policy):
    """Rank-r LoRA on every MLP down_proj (the paper's LoRA baseline), via peft."""

    final_dir = "lora"

    def __init__(self, model: nn.Module, rank: int, alpha: float) -> None:
        from peft import LoraConfig, get_peft_model

        freeze(model)
        peft_model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["down_proj"], lora_dropout=0.0, bias="none")
        )
        super().__init__(peft_model)

    @contextlib.contextmanager
    def base_policy(self) -> Iterator[nn.Module]:
        with self.model.disable_adapter():
            yield self.model


def make_policy(
    model: nn.Module,
    trainable: str,
    layers: list[int] | None,
    model_name: str,
    lora_rank: int = 1,
    lora_alpha: float = 2.0,
) -> Policy:
    """Prepare `model` for training `trainable` ("steering", "lora" or "full")."""
    if trainable == "steering":
        return SteeringPolicy(model, layers, model_name)
    if trainable == "lora":
        return LoraPolicy(model, lora_rank, lora_alpha)
    if trainable == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return Policy(model)
    raise SteerlensError(f"trainable must be steering, lora or full, got {trainable!r}")
