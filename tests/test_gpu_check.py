"""`bench/gpu_check.py --device cpu` runs every step end to end: all pass, only the vLLM step is skipped.

The same command on a CUDA machine is the GPU check (bf16, realistic shapes); here it runs the CPU mode
(fp32, small shapes) in a subprocess, as CI would, and reads back what it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
STEPS = ["equivalence", "rloo_update", "presets", "analysis", "vllm"]


@pytest.mark.slow
def test_cpu_mode_passes_every_step_and_writes_both_reports(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu" and report["dtype"] == "float32" and report["ok"]
    assert "CPU mode: float32" in report["note"]
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == STEPS
    for name, step in steps.items():
        assert step["seconds"] >= 0 and step["title"]
        if name == "vllm":
            assert step["status"] == "skipped" and step["reason"], step
        else:
            assert step["status"] == "pass", step

    backends = steps["equivalence"]["figures"]["backends"]
    assert all(part["status"] in ("pass", "skipped") for part in backends.values()), backends
    assert all(
        part["steered_diff"] <= steps["equivalence"]["figures"]["tol"]
        for part in backends.values()
        if part["status"] == "pass"
    )
    update = steps["rloo_update"]["figures"]
    assert update["predicted"]["total_bytes"] > update["predicted"]["weights_bytes"] > 0
    assert update["measured_peak_bytes"] is None  # no allocator statistics on CPU

    presets = steps["presets"]["figures"]
    gpu_presets = sorted(
        p.stem for p in (SCRIPT.parents[1] / "analyses" / "presets").glob("*.yaml") if not p.stem.startswith("smollm2")
    )
    assert sorted(k for k, v in presets.items() if isinstance(v, dict)) == gpu_presets
    assert {presets[name]["trainable"] for name in gpu_presets} == {"steering", "lora", "full"}
    assert all(presets[name]["status"] == "pass" and all(x == x for x in presets[name]["loss"]) for name in gpu_presets)

    markdown = (out / "gpu_check.md").read_text()
    assert all(f"| {name} |" in markdown for name in STEPS)
