"""Proofs that a vLLM engine steers as it should: the log-probs it gives a sequence (`engine_logprobs`), the
start-up probe (`SteeringProbe`: a random set moves log-probs, and each request of a batch gets its own set),
and a pushed set verified against the HF model with the same vectors attached (`verify_push`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from steerlens.backends.hf import attach
from steerlens.backends.vector_bank import BASE_SLOT, SCALE_ARG, SLOT_ARG, SetChoice, VectorBank
from steerlens.backends.vllm_requests import scored_logprobs, scoring_params, with_extra_args
from steerlens.errors import SteeringNotApplied, SteerlensError
from steerlens.vectors import ModelShape, SteeringVectors


class Engine(Protocol):
    """What the checks use of a `SteeredLLM` (declared here so that this module does not import the engine's)."""

    bank: VectorBank

    def generate(
        self, prompts: Sequence[Any], sampling: Any = None, vectors: SetChoice = None, **generate_kwargs: Any
    ) -> list[Any]: ...


VERIFY_PROMPT = "Question: what is 17 + 25?\nAnswer:"
VERIFY_COMPLETION = " 17 + 25 = 42, so the answer is \\boxed{42}."


class SyncError(SteerlensError, RuntimeError):
    """The engine's steering does not match the trainer's (a push was lost, partial or mis-scaled)."""


def engine_logprobs(
    steering: Engine, prompt_ids: list[int], completion_ids: list[int], vectors: str | None = None
) -> torch.Tensor:
    """Log-probabilities the vLLM engine gives each token of `completion_ids` after `prompt_ids` under set
    `vectors` (None: the default set; "base": unsteered) and its loaded adapter (fp32, CPU)."""
    (output,) = steering.generate(
        [{"prompt_token_ids": prompt_ids + completion_ids}], scoring_params(prompt_ids, completion_ids), vectors=vectors
    )
    return scored_logprobs(output, prompt_ids, completion_ids)


PROBE_TOKENS = 16  # length of the fixed token sequence the start-up probe scores
PROBE_SEED = 29
PROBE_STD = 4.0  # per-coordinate standard deviation of the probe's random vectors, at every layer
PROBE_MIN_SHIFT = 10  # times atol: the least the probe set must move some token's log-prob
PROBE_SALT = "steerlens:probe"  # its requests' prefix-cache salt: no other request reads their KV


def probe_atol(dtype: torch.dtype) -> float:
    """How far a request's log-probs may differ between a batch and running alone: fp32 is nearly batch-invariant,
    16-bit kernels can differ between batch shapes by hundredths of a nat."""
    return 1e-3 if dtype == torch.float32 else 0.1


@dataclass(frozen=True)
class SteeringProbe:
    """The start-up proof that an engine applies its vector sets, request by request, on whatever model runner.

    A random set is written to the bank's spare probe slot and a fixed token sequence is scored (prompt log-probs)
    in three calls: one batch of base (slot 0), the probe set, and the probe set at scale 0; then base alone;
    then the probe set alone. Steering is applied when the probe set moves some token's log-prob by at least
    `PROBE_MIN_SHIFT` times `atol` and every request of the batch gets what it gets alone (the probe at scale 0
    what base gets) to `atol`. A fill that never runs, layers that do not add, scales ignored, or slots given to
    the wrong rows all fail. No reference model is needed: slot 0 adds exact zeros, so base is the stock model
    (the trainer's `verify_push` compares with HF as well).

    An engine started with LoRA enabled skips the mixed batch (`batched=False`): vLLM cannot score the prompts of
    several requests in one step when LoRA wraps the LM head (Llama-family models; vllm-project/vllm#29955, the
    engine dies), so only "the probe set moves log-probs" is proven there. Slot selection is the same code with
    or without LoRA, and is proven by the batch on every other engine.
    """

    slot: int
    vocab_size: int
    atol: float
    batched: bool = True

    @classmethod
    def of(cls, vllm_config: Any, slot: int) -> SteeringProbe:
        """The probe of an engine with vLLM config `vllm_config`, writing to bank slot `slot` (without the mixed
        batch where LoRA is enabled)."""
        model_config = vllm_config.model_config
        batched = vllm_config.lora_config is None
        return cls(slot, model_config.get_vocab_size(), probe_atol(model_config.dtype), batched)

    def vectors(self, shape: ModelShape) -> SteeringVectors:
        """The random set written to the probe slot (seeded: the same on every start)."""
        generator = torch.Generator().manual_seed(PROBE_SEED)
        values = torch.randn(shape.num_layers, shape.hidden_size, generator=generator) * PROBE_STD
        return SteeringVectors(values, tuple(range(shape.num_layers)), shape.num_layers)

    def tokens(self) -> list[int]:
        """The fixed token sequence scored (spread over the vocabulary)."""
        return [(11 + 7919 * position) % self.vocab_size for position in range(PROBE_TOKENS)]

    def calls(self) -> list[tuple[list[dict[str, Any]], list[Any]]]:
        """The prompts and sampling parameters of each call: the mixed batch (when `batched`), base alone, the probe
        set alone."""
        tokens = self.tokens()
        base, steered, off = (BASE_SLOT, 0.0), (self.slot, 1.0), (self.slot, 0.0)
        prompt = {"prompt_token_ids": tokens, "cache_salt": PROBE_SALT}
        scoring = scoring_params(tokens[:1], tokens[1:])
        params = {
            choice: with_extra_args(scoring, {SLOT_ARG: choice[0], SCALE_ARG: choice[1]})
            for choice in (base, steered, off)
        }
        mixed = ([prompt] * 3, [params[base], params[steered], params[off]])
        alone = [([prompt], [params[base]]), ([prompt], [params[steered]])]
        return [mixed, *alone] if self.batched else alone

    def judge(self, outputs: Sequence[Sequence[Any]]) -> float:
        """Raise `SteeringNotApplied` unless the calls' outputs show steering applied; returns the shift (nats)."""
        tokens = self.tokens()
        *mixed, (base,), (steered,) = (
            [scored_logprobs(output, tokens[:1], tokens[1:]) for output in call] for call in outputs
        )
        shift = float((steered - base).abs().max())
        if not shift >= PROBE_MIN_SHIFT * self.atol:  # also catches NaN
            raise SteeringNotApplied(
                f"steering is not applied in this vLLM engine: a random vector set moved its log-probs by at most "
                f"{shift:.3g} nats (expected >= {PROBE_MIN_SHIFT * self.atol:g}), so the slot fill or the steered "
                "layers never ran; nothing was generated"
            )
        if not self.batched:
            return shift
        ((mixed_base, mixed_steered, mixed_off),) = mixed
        drift = max(
            float((got - alone).abs().max())
            for got, alone in ((mixed_base, base), (mixed_steered, steered), (mixed_off, base))
        )
        if not drift <= self.atol:
            raise SteeringNotApplied(
                f"steering is misapplied in this vLLM engine: in one batch, a request's log-probs differ from its "
                f"own run by {drift:.3g} nats (> {self.atol:g}), so requests got other requests' vector sets or "
                "scales; nothing was generated"
            )
        return shift


@torch.no_grad()
def hf_sequence_logprobs(
    model: nn.Module, vectors: SteeringVectors | None, prompt_ids: list[int], completion_ids: list[int]
) -> torch.Tensor:
    """The same log-probabilities from an HF model with `vectors` attached by hooks (None: the model as it
    is, e.g. a peft model with its adapter) (fp32, CPU)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    with attach(model, vectors) if vectors is not None else contextlib.nullcontext():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    targets = ids[0, len(prompt_ids) :]
    return logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0].cpu()


def verify_push(
    steering: Engine,
    hf_model: nn.Module,
    tokenizer: Any,
    vectors: SteeringVectors | None,
    prompt: str = VERIFY_PROMPT,
    completion: str = VERIFY_COMPLETION,
    atol: float = 2e-3,
    name: str | None = None,
) -> float:
    """Max |log-prob difference| between the engine's set `name` (None: its default set; with its LoRA
    adapter, if one is loaded) and `hf_model` steered by `vectors` on a fixed text.

    `hf_model` must be the unsteered base model (the vectors, times the set's scale, are attached here for
    the comparison); with `vectors=None` it is compared as it is (a LoRA push: the peft model with its
    adapter; a full-tuning push: the tuned model). Raises `SyncError` if the difference exceeds `atol`.
    """
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    engine = engine_logprobs(steering, prompt_ids, completion_ids, vectors=name)
    scale = steering.bank.request(name)[0][SCALE_ARG]  # the scale the set's requests run at
    expected = vectors.scale(scale) if vectors is not None and scale != 1.0 else vectors
    reference = hf_sequence_logprobs(hf_model, expected, prompt_ids, completion_ids)
    diff = float((engine - reference).abs().max())
    if not diff <= atol:  # also catches NaN
        what = "the default set" if name is None else f"vector set {name!r}"
        hf_side = "steered by the pushed vectors" if vectors is not None else "as it is (its adapter or pushed weights)"
        raise SyncError(
            f"vLLM ({what}) disagrees with the HF model {hf_side}: "
            f"max |Δ log-prob| = {diff:.3g} > atol {atol:g} over {len(completion_ids)} tokens. The engine is not "
            "running these weights (push missing or to the wrong model), or its dtype is coarser than atol allows."
        )
    return diff
