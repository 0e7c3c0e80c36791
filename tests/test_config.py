"""Config dataclasses: YAML and CLI overrides, type checks, unknown keys, and the shipped presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType

import pytest

from steerlens.config import ConfigError, build_config, describe, parse_overrides, read_config, to_yaml
from steerlens.evaluation.config import EvalConfig
from steerlens.rl.config import TrainConfig

ROOT = Path(__file__).parents[1]
PRESETS = sorted((ROOT / "analyses" / "presets").glob("*.yaml"))


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nsteps: 7\nlayers: [1, 3]\n")
    cfg = build_config(TrainConfig, path, ["--steps", "9", "seed=4", "--no-progress", "--eval-data", "null"])
    assert (cfg.lr, cfg.steps, cfg.layers, cfg.seed, cfg.progress, cfg.eval_data) == (0.001, 9, [1, 3], 4, False, None)


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = build_config(TrainConfig, None, ["--layers", "2", "--baseline", "grpo"])
    path = tmp_path / "again.yaml"
    path.write_text(to_yaml(cfg))
    assert build_config(TrainConfig, path) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--lrr", "1"], "unknown key 'lrr' for TrainConfig; did you mean 'lr'?"),
        (["--lr", "fast"], "lr must be float, got 'fast'"),
        (["--baseline", "ppo"], r"baseline must be one of \['rloo', 'group_mean', 'grpo'\]"),
        (["--generations", "1"], "generations must be >= 2 for the rloo baseline"),
        (["stray"], "cannot read 'stray'"),
        (["--max-model-len", "48"], r"max_model_len must exceed max_new_tokens"),
    ],
)
def test_bad_overrides_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(TrainConfig, None, overrides)


def test_bad_files_are_named(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("step: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'step'.*did you mean 'steps'"):
        build_config(TrainConfig, typo)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(TrainConfig, tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_config(TrainConfig, listy)


def test_class_checks_name_the_config_once(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("steps: 0\n")
    with pytest.raises(ConfigError) as err:
        build_config(TrainConfig, path, ["--seed", "1"])
    assert str(err.value) == f"{path} + command line: TrainConfig: steps must be >= 1"


def test_a_few_anchors_and_command_line_text_work(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text("steps: &n 3\nsave_every: *n\nlayers: &l [1, 2]\n")
    cfg = build_config(TrainConfig, path, ["--eval-data", "1.50", "--problem-key", "yes"])
    assert (cfg.steps, cfg.save_every, cfg.layers) == (3, 3, [1, 2])
    assert (cfg.eval_data, cfg.problem_key) == ("1.50", "yes")  # text fields keep what was typed


def test_parse_overrides_forms() -> None:
    assert parse_overrides(["--a=1", "--b", "2", "c=3", "--flag", "--no-other"]) == {
        "a": "1",
        "b": "2",
        "c": "3",
        "flag": "true",
        "other": "false",
    }


def test_describe_documents_every_field() -> None:
    text = describe(TrainConfig)
    assert "--prompts-per-step (int, default 32)" in text and "--baseline (rloo|group_mean|grpo" in text


def test_presets_exist_and_validate() -> None:
    assert len(PRESETS) >= 8
    for preset in PRESETS:
        cfg = build_config(TrainConfig, preset)
        if cfg.model != "smollm2-135m":  # the paper's setups; the SmolLM2 one is sized for a CPU
            assert cfg.prompts_per_step == 128 and cfg.steps == 314, preset.name


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """`analyses/runner.py`, imported as the analysis runners import it (the repository root on sys.path)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from analyses import runner

    return runner


def test_runner_settings_defaults_and_checks(tmp_path: Path, runner: ModuleType) -> None:
    runner_settings = runner.runner_settings
    (tmp_path / "config.yaml").write_text("steps: 12\nseeds: [0, 1, 2]\n")
    assert runner_settings("doc", tmp_path, []) == ({"steps": 12, "seeds": [0, 1, 2]}, tmp_path / "results")
    other = tmp_path / "other.yaml"
    other.write_text("- a list\n")
    with pytest.raises(ConfigError, match="other.yaml: expected a mapping"):
        runner_settings("doc", tmp_path, ["--config", str(other), "--out", str(tmp_path / "x")])
    assert runner_settings("doc", tmp_path, ["--out", str(tmp_path / "x")])[1] == tmp_path / "x"


def test_runners_build_the_configs_their_command_lines_did(tmp_path: Path, runner: ModuleType) -> None:
    """The runners' configs from dicts equal those they built from command-line strings."""
    preset, run_dir = ROOT / "analyses" / "presets" / "smollm2-135m-word-arith.yaml", tmp_path / "run"
    run_dir.mkdir()
    built = runner.training_config(preset, run_dir, 12, trainable="lora", lr=2e-3, seed=1)
    assert built == build_config(
        TrainConfig,
        preset,
        [
            "--trainable",
            "lora",
            "--lr",
            "0.002",
            "--seed",
            "1",
            "--steps",
            "12",
            "--eval-data",
            "null",
            "--no-progress",
            "--out-dir",
            str(run_dir),
            "--resume",
        ],
    )
    settings = read_config(ROOT / "analyses" / "table1" / "config.yaml")
    assert build_config(EvalConfig, None, {**settings["eval"], "out_dir": "x"}) == build_config(
        EvalConfig,
        None,
        [
            "--limit",
            "128",
            "--max-new-tokens",
            "48",
            "--decoding",
            "greedy",
            "--seeds",
            "0",
            "--answer-fallback",
            "last_number",
            "--no-progress",
            "--out-dir",
            "x",
        ],
    )


def test_help_is_one_short_clause_and_the_docstring_explains_each_field() -> None:
    """`--help` and YAML comments stay short; the explanation lives in the class docstring (the API docs)."""
    from steerlens.analysis.clustering import ClusteringConfig
    from steerlens.analysis.llm_client import ChatConfig
    from steerlens.options import DataOptions, ModelOptions, SamplingOptions

    for cls in (TrainConfig, EvalConfig, ChatConfig, ClusteringConfig):
        long = {f.name: len(f.metadata["help"]) for f in dataclasses.fields(cls) if len(f.metadata["help"]) > 100}
        assert not long, f"{cls.__name__}: help over 100 characters: {long}"
    for cls in (TrainConfig, EvalConfig, ModelOptions, DataOptions, SamplingOptions):
        own = set(cls.__annotations__)  # the fields the class declares itself
        undocumented = sorted(name for name in own if f"`{name}`" not in (cls.__doc__ or ""))
        assert not undocumented, f"{cls.__name__}'s docstring does not explain {undocumented}"


def test_the_heldout_benchmark_is_the_presets_fixed_heldout_set(tmp_path: Path, runner: ModuleType) -> None:
    """Table 1 and the mechanisms evaluate on the very problems every training run of the preset reports on."""
    from steerlens.data.problems import load_problems
    from steerlens.rl.job import math_problems

    preset, path = ROOT / "analyses" / "presets" / "smollm2-135m-word-arith.yaml", tmp_path / "heldout.jsonl"
    assert runner.heldout_benchmark(preset, path) == f"word-arith={path}"
    cfg = build_config(TrainConfig, preset, {"out_dir": str(tmp_path / "run"), "seed": 3})
    _, held_out = math_problems(cfg)
    written = load_problems(path)
    assert len(written) == cfg.eval_problems == 128
    assert [(p.problem, p.answer) for p in written] == [(p.problem, p.answer) for p in held_out]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("steps: 3\nlr: 0.1\nsteps: 5\n", "line 3, column 1: duplicate key 'steps' on lines 1 and 3"),
        ("eval:\n  limit: 1\n  seeds: [0]\n  limit: 2\n", "line 4, column 3: duplicate key 'limit' on lines 2 and 4"),
        ("runs:\n  - {a: 1, a: 2}\n", "line 2, column 12: duplicate key 'a' on line 2 twice"),
        ("runs:\n  - a: 1\n    b: 2\n    a: 3\n", "line 4, column 5: duplicate key 'a' on lines 2 and 4"),
        ("1: x\n0x1: y\n", "line 2, column 1: duplicate key 1 on lines 1 and 2 (written '1' and '0x1')"),
    ],
    ids=["top level", "nested", "flow mapping", "mapping in a list", "written differently"],
)
def test_duplicate_yaml_keys_are_refused_with_both_lines(tmp_path: Path, text: str, problem: str) -> None:
    """PyYAML keeps the last of two equal keys silently; a config file names the key and both of its lines."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_config(path)
    assert str(err.value) == f"{path}: not valid YAML ({problem})"
    with pytest.raises(ConfigError, match="duplicate key"):
        build_config(TrainConfig, None, ["--layers", "{a: 1, a: 2}"])  # a flag's value is YAML too


def test_keys_merged_in_may_be_overridden_and_equal_keys_may_sit_in_different_mappings(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {lr: 1, steps: 2}\nrun:\n  <<: *b\n  lr: 3\nother: {lr: 4}\n")
    assert read_config(path) == {"base": {"lr": 1, "steps": 2}, "run": {"lr": 3, "steps": 2}, "other": {"lr": 4}}
