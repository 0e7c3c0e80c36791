"""steerlens: train and study steering vectors (one vector per layer, added after it; base weights frozen).

    import steerlens as sl

    vectors = sl.SteeringVectors.load("vectors.safetensors")
    with sl.steer(model, vectors) as handle:        # HF, TransformerLens or nnsight model
        ...
    engine = sl.vllm.SteeredLLM("path/to/model", vectors)   # vLLM, same verbs
    sl.write_vectors(vectors, "vectors.gguf", drop_layer0=True)  # llama.cpp, EasySteer, vllm-lens files

    task = sl.Task(problems, reward=my_reward)      # reward(completions, problems) -> floats
    sl.Trainer(model, tokenizer, task, sl.TrainConfig(steps=20)).train()

Everything a user needs is here (`__all__`); the submodules hold the rest (`steerlens.analysis` for
the analyses). The names load on first use, so `import steerlens.reward` in a worker process (the
reward pool, vLLM's workers) does not import the trainer, pandas or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steerlens.anatomy import decoder_layers, final_norm, model_shape, register_architecture, unembedding
    from steerlens.backends import BackendError, SteeringHandle, steer
    from steerlens.backends import vllm as vllm
    from steerlens.data import Problem, load_problems
    from steerlens.errors import ModelError, SteerlensError
    from steerlens.evaluation import EvalConfig, evaluate
    from steerlens.formats import read_vectors, write_vectors
    from steerlens.models import load_model, register_source, resolve_model
    from steerlens.rl.config import TrainConfig
    from steerlens.rl.job import train
    from steerlens.rl.trainer import Trainer
    from steerlens.rollout import Completion, Sampling, make_rollout
    from steerlens.task import MathReward, Reward, Task
    from steerlens.vectors import ModelShape, SteeringVectors, VectorsError

_HOMES = {
    "steerlens.anatomy": ("decoder_layers", "final_norm", "model_shape", "register_architecture", "unembedding"),
    "steerlens.backends": ("BackendError", "SteeringHandle", "steer"),
    "steerlens.data": ("Problem", "load_problems"),
    "steerlens.errors": ("ModelError", "SteerlensError"),
    "steerlens.evaluation": ("EvalConfig", "evaluate"),
    "steerlens.formats": ("read_vectors", "write_vectors"),
    "steerlens.models": ("load_model", "register_source", "resolve_model"),
    "steerlens.rl.config": ("TrainConfig",),
    "steerlens.rl.job": ("train",),
    "steerlens.rl.trainer": ("Trainer",),
    "steerlens.rollout": ("Completion", "Sampling", "make_rollout"),
    "steerlens.task": ("MathReward", "Reward", "Task"),
    "steerlens.vectors": ("ModelShape", "SteeringVectors", "VectorsError"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
_SUBMODULES = {"vllm": "steerlens.backends.vllm"}

__version__ = "0.1.0"  # the one place the version is written; pyproject.toml reads it (a dynamic version)

__all__ = sorted([*_HOME_OF, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    if name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
    elif name in _HOME_OF:
        value = getattr(importlib.import_module(_HOME_OF[name]), name)
    else:
        raise AttributeError(f"module 'steerlens' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
