"""What the RL loop trains: steering vectors (default), a peft adapter (LoRA on MLP down_proj, or TinyLoRA), or
every weight.

A `Policy` gives the loop one surface for all of them: the trainable parameters, their state for
checkpoints, a context in which the base policy is restored (for the KL reference), and the final
artefact written at the end of a run (steering: `vectors.safetensors` and the folder `vectors/` with its
model card).

Steering may be trained through a parametrisation (`rl.parametrisations`: low rank, shared directions): the
hooks still add the handle's dense vectors, whose gradient `chain_gradients` pushes through the map onto the
parametrisation's parameters after the backward pass; `refresh` recomputes the dense vectors after each
optimizer step. Dense steering trains the handle's parameter itself, and both calls do nothing.
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
from steerlens.rl.parametrisations import Dense, Form, Parametrisation, lens_direction
from steerlens.vectors import LAYER_OUTPUT, SteeringVectors

FORM_PREFIX = "form."  # a parametrisation's tensors in `named_state`, beside the dense "steering"


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

    def chain_gradients(self) -> None:
        """After the backward pass: move the gradients onto the trained parameters (parametrised steering)."""

    def refresh(self) -> None:
        """After an optimizer step: recompute what the model runs from the trained parameters."""

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
    """Steering vectors on a frozen model, via the HF backend's hooks, trained directly (`form` dense, the
    default) or through a parametrisation (`form`; `tokenizer` resolves a lens direction's token), added at
    `placement`."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[int] | None,
        model_name: str,
        form: Form | None = None,
        tokenizer: Any = None,
        placement: str = LAYER_OUTPUT,
    ) -> None:
        super().__init__(model)
        freeze(model)
        shape = model_shape(model, name=model_name)
        zeros = SteeringVectors.zeros(shape, layers, placement=placement)
        self.handle: HFSteering = attach(model, zeros, trainable=True)
        rows, width = self.handle.parameter.shape
        self.form = (form or Form()).resolve(rows, width)
        if self.form.kind == "dense":
            self.map: Parametrisation = Dense(rows, width, self.handle.parameter)
        else:
            lens = (
                lens_direction(model, tokenizer, self.form.lens_token or "") if self.form.direction == "lens" else None
            )
            self.map = self.form.build(rows, width, lens).to(self.handle.parameter.device)
        self.refresh()

    @property
    def direct(self) -> bool:
        """Whether the handle's parameter is itself trained (dense steering)."""
        return isinstance(self.map, Dense) and self.map.values is self.handle.parameter

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.map.parameters() if p.requires_grad]

    def named_state(self) -> dict[str, torch.Tensor]:
        """The dense vectors ("steering") and, when parametrised, the parametrisation's tensors ("form.*")."""
        state = {"steering": self.handle.parameter.detach()}
        if not self.direct:
            state.update({FORM_PREFIX + name: value.detach() for name, value in self.map.state_dict().items()})
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.direct:
            self.handle.update(state["steering"])
            return
        own = {name.removeprefix(FORM_PREFIX): value for name, value in state.items() if name.startswith(FORM_PREFIX)}
        self.map.load_state_dict(own)
        self.refresh()

    def chain_gradients(self) -> None:
        """The dense vectors' gradient pushed through the map: the parametrisation's gradients are J^T G."""
        grad = self.handle.parameter.grad
        if self.direct or grad is None:
            return
        self.map().backward(grad)
        self.handle.parameter.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        if not self.direct:
            self.handle.update(self.map())

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


class AdapterPolicy(Policy):
    """A peft adapter on the frozen model (`lora_config`, `tinylora_config`); saved to `final_dir` as peft saves
    adapters, which `steerlens eval --adapter` merges."""

    def __init__(self, model: nn.Module, config: Any) -> None:
        from peft import get_peft_model

        freeze(model)
        super().__init__(get_peft_model(model, config))
        self.final_dir = str(config.peft_type.value).lower()  # lora/, tinylora/

    @contextlib.contextmanager
    def base_policy(self) -> Iterator[nn.Module]:
        with self.model.disable_adapter():
            yield self.model


def lora_config(rank: int = 1, alpha: float = 2.0) -> Any:
    """Rank-r LoRA on every MLP down_proj: the paper's LoRA baseline."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=["down_proj"], lora_dropout=0.0, bias="none")


def tinylora_config(u: int = 13, rank: int = 2, tying: float = 1.0, seed: int = 0) -> Any:
    """TinyLoRA ("Learning to Reason in 13 Parameters", arXiv 2602.04118) through peft's own `tinylora` tuner, on
    every linear layer: each weight moves along its top-`rank` singular directions by a fixed random projection of
    a trained `u`-vector, shared by a `tying` share of the layers (1.0: all share one: `u` parameters in all). It
    starts as a no-op (v = 0), like the steering vectors; `seed` draws the projections."""
    from peft import TinyLoraConfig

    return TinyLoraConfig(r=rank, u=u, weight_tying=tying, projection_seed=seed, target_modules="all-linear")


def make_policy(
    model: nn.Module,
    trainable: str,
    layers: list[int] | None,
    model_name: str,
    form: Form | None = None,
    tokenizer: Any = None,
    placement: str = LAYER_OUTPUT,
    adapter: Any = None,
) -> Policy:
    """Prepare `model` for training `trainable` ("steering", "lora", "tinylora" or "full"); steering through
    `form` (default: dense) at `placement`, `tokenizer` for a lens direction's token; an adapter as the peft
    config `adapter` says (default: `lora_config()` or `tinylora_config()`)."""
    if trainable == "steering":
        return SteeringPolicy(model, layers, model_name, form, tokenizer, placement)
    if trainable in ("lora", "tinylora"):
        return AdapterPolicy(model, adapter or (lora_config() if trainable == "lora" else tinylora_config()))
    if trainable == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return Policy(model)
    raise SteerlensError(f"trainable must be steering, lora, tinylora or full, got {trainable!r}")
