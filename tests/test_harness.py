"""The `steerlens` model type in lm-evaluation-harness, offline: local task YAMLs over a local JSONL of
held-out word-arith problems, SmolLM2-135M base and steered by the shipped vectors, greedy.

Generation: lm-eval's exact-match scores equal `steerlens eval` on the same problems and settings, problem
by problem (one vLLM engine shared by both). Log-likelihood: the steered model's scores for multiple-choice
answers equal an HF forward pass with steerlens's hooks, on the vLLM backend and on the HF backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from steerlens import smollm
from steerlens.backends import steer
from steerlens.data.generated import generate
from steerlens.data.prompts import SYSTEM_PROMPT
from steerlens.models import load_model
from steerlens.vectors import SteeringVectors

pytestmark = [
    pytest.mark.smollm,
    pytest.mark.vllm,
    pytest.mark.skipif(not smollm.available(), reason=f"needs the SmolLM2 weights: {smollm.INSTALL}"),
]

NAME = "smollm2-135m"
PROBLEMS = 24
MAX_NEW_TOKENS = 48
ENGINE_ARGS = {"kv_cache_memory_bytes": 128 << 20, "max_model_len": 512}
VLLM_ATOL = 5e-4  # summed over a 1-3 token answer; measured 4.5e-5 (vLLM and HF fp32 kernels differ)
HF_ATOL = 1e-4

GENERATE_TASK = """
task: wordarith_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{problem}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: {max_new_tokens}
  do_sample: false
filter_list:
  - name: last_number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

CHOICE_TASK = """
task: wordarith_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{problem}}}} Answer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two task YAMLs and their data (absolute paths: lm-eval resolves data_files from the working directory)."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    problems = generate("word-arith", PROBLEMS, heldout=True)
    data = folder / "wordarith.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": p.id,
                    "problem": p.problem,
                    "answer": p.answer,
                    "choices": [p.answer, str(int(p.answer) + 1), str(int(p.answer) + 10)],
                }
            )
            + "\n"
            for p in problems
        )
    )
    (folder / "wordarith_gen.yaml").write_text(GENERATE_TASK.format(data=data, max_new_tokens=MAX_NEW_TOKENS))
    (folder / "wordarith_choice.yaml").write_text(CHOICE_TASK.format(data=data))
    return folder


@pytest.fixture(scope="module")
def engine() -> Any:
    from steerlens.backends.vllm import SteeredLLM

    with SteeredLLM(NAME, dtype="float32", seed=0, **ENGINE_ARGS) as llm:
        yield llm


def run_lm_eval(lm: Any, task: str, folder: Path, **kwargs: Any) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
        bootstrap_iters=0,
        **kwargs,
    )


def test_model_type_is_registered_by_name() -> None:
    from lm_eval.api.registry import get_model

    from steerlens.harness import SteerlensLM

    assert get_model("steerlens") is SteerlensLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours must not hide lm-eval's own types


def test_generation_scores_equal_steerlens_eval(engine: Any, tasks: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from steerlens.evaluation.config import EvalConfig
    from steerlens.evaluation.runner import evaluate
    from steerlens.harness import SteerlensLM
    from steerlens.rollout import VLLMRollout

    tokenizer = AutoTokenizer.from_pretrained(engine.llm.llm_engine.model_config.model)
    scores = {}
    for setup, vectors in (("base", None), ("steered", str(smollm.TRAINED_VECTORS))):
        lm = SteerlensLM(NAME, vectors=vectors, engine=engine, max_gen_toks=MAX_NEW_TOKENS)
        result = run_lm_eval(lm, "wordarith_gen", tasks, apply_chat_template=True, system_instruction=SYSTEM_PROMPT)
        theirs = {
            s["doc"]["id"]: (s["resps"][0][0], bool(s["exact_match"])) for s in result["samples"]["wordarith_gen"]
        }
        cfg = EvalConfig(
            model=NAME,
            vectors=vectors,
            benchmarks=[f"wordarith={tasks / 'wordarith.jsonl'}"],
            decoding="greedy",
            seeds=[0],
            max_new_tokens=MAX_NEW_TOKENS,
            answer_fallback="last_number",
            progress=False,
            out_dir=str(tmp_path / setup),
        )
        ours_score = float(evaluate(cfg, engine=VLLMRollout(engine, tokenizer))["scores"]["score"].iloc[0])
        (written,) = (tmp_path / setup / "samples").glob("*.seed0.jsonl")
        rows = [json.loads(line) for line in written.open()]
        ours = {row["id"]: (row["completion"], bool(row["correct"])) for row in rows}
        assert sorted(theirs) == sorted(ours)
        assert {i: text for i, (text, _) in theirs.items()} == {i: text for i, (text, _) in ours.items()}
        assert {i: ok for i, (_, ok) in theirs.items()} == {i: ok for i, (_, ok) in ours.items()}
        scores[setup] = result["results"]["wordarith_gen"]["exact_match,last_number"]
        assert scores[setup] == pytest.approx(ours_score)
    print("\nlm-eval exact match (= steerlens eval):", scores)
    assert scores["steered"] >= scores["base"] + 0.2  # the shipped vectors' effect, seen through lm-eval


@torch.no_grad()
def hooked_loglikelihoods(samples: list[dict[str, Any]], vectors: SteeringVectors) -> list[list[float]]:
    """Each request's continuation log-likelihood from the HF model with steerlens's hooks, tokenized as
    lm-eval's TemplateLM does (the whole text, then the context's tokens split off)."""
    from steerlens.rollout import encode_prompt

    model, tokenizer = load_model(NAME)
    out = []
    with steer(model, vectors):
        for sample in samples:
            row = []
            for context, continuation in sample["arguments"]:
                context_ids = encode_prompt(tokenizer, context)
                whole = encode_prompt(tokenizer, context + continuation)
                logits = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
                positions = range(len(context_ids), len(whole))
                row.append(sum(float(logits[p - 1, whole[p]]) for p in positions))
            out.append(row)
    return out


def test_loglikelihoods_equal_hf_with_hooks(engine: Any, tasks: Path) -> None:
    from steerlens.harness import SteerlensLM

    vectors = SteeringVectors.load(smollm.TRAINED_VECTORS)
    results = {
        "vllm": run_lm_eval(
            SteerlensLM(NAME, vectors=str(smollm.TRAINED_VECTORS), engine=engine), "wordarith_choice", tasks
        ),
        "hf": run_lm_eval(
            "steerlens",
            "wordarith_choice",
            tasks,
            model_args=f"pretrained={NAME},vectors={smollm.TRAINED_VECTORS},backend=hf",
            batch_size=4,
        ),
    }
    samples = sorted(results["vllm"]["samples"]["wordarith_choice"], key=lambda s: s["doc_id"])
    reference = hooked_loglikelihoods(samples, vectors)
    for backend, atol in (("vllm", VLLM_ATOL), ("hf", HF_ATOL)):
        got = [
            [float(r[0][0]) for r in s["resps"]]
            for s in sorted(results[backend]["samples"]["wordarith_choice"], key=lambda s: s["doc_id"])
        ]
        diff = max(abs(a - b) for row, ref in zip(got, reference, strict=True) for a, b in zip(row, ref, strict=True))
        print(f"\n{backend}: max |Δ loglikelihood| vs HF hooks = {diff:.2e}")
        assert diff <= atol, backend
    unsteered = run_lm_eval(SteerlensLM(NAME, engine=engine), "wordarith_choice", tasks)["samples"]["wordarith_choice"]
    moved = max(
        abs(float(a[0][0]) - float(b[0][0]))
        for s, u in zip(samples, sorted(unsteered, key=lambda s: s["doc_id"]))
        for a, b in zip(s["resps"], u["resps"])
    )
    assert moved > 0.5  # the vectors change the scores far beyond the tolerance


def test_lm_eval_command_line_finds_the_model_type(tasks: Path, tmp_path: Path) -> None:
    """`python -m steerlens.harness` is lm-eval's own command line with `--model steerlens` available."""
    import subprocess
    import sys

    out = tmp_path / "results"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "steerlens.harness",
            "run",
            "--model",
            "steerlens",
            "--model_args",
            f"pretrained={NAME},vectors={smollm.TRAINED_VECTORS},scale=0.5,backend=hf",
            "--tasks",
            "wordarith_choice",
            "--include_path",
            str(tasks),
            "--limit",
            "4",
            "--output_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (written,) = out.rglob("results_*.json")
    result = json.loads(written.read_text())
    assert 0.0 <= result["results"]["wordarith_choice"]["acc,none"] <= 1.0
    assert result["config"]["model_args"]["scale"] == 0.5
