"""The API reference builds from the docstrings (pdoc, no warnings) and the public API type-checks (mypy).

Both run as CI would, in a subprocess with this interpreter: `python -m pdoc ...` and `python -m mypy`
(its files and settings are `[tool.mypy]` in pyproject.toml).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "steerlens"
# Modules left out of the reference (regexes, passed as pdoc's `!` specs). None: every module imports
# without side effects (toy.py runs only under `__main__`, cli.py just builds its typer app, vllm_plugin.py
# imports vLLM only when vLLM calls it).
SKIP: list[str] = []


def _all_names(package: str) -> set[str] | None:
    """A package's `__all__` (importing it is cheap: steerlens's public names load lazily), or None."""
    names = getattr(importlib.import_module(package), "__all__", None)
    return set(names) if names is not None else None


def doc_specs() -> list[str]:
    """pdoc's module arguments: every module of the package, each named exactly once.

    pdoc walks a package's submodules itself, but only those in its `__all__` when it has one
    (`steerlens`, `steerlens.backends`, ...), and warns when a module is named twice; so name the
    package, then each module its parent would not already bring in.
    """
    specs = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:
            parent_all = _all_names(".".join(parts[:-1]))
            if parent_all is None or parts[-1] in parent_all:
                continue  # pdoc reaches it from its parent package
        specs.append(".".join(parts))
    return specs + [f"!{pattern}" for pattern in SKIP]


def test_api_reference_builds_without_warnings(tmp_path: Path) -> None:
    out = tmp_path / "api"
    cmd = [sys.executable, "-m", "pdoc", "--docformat", "markdown", *doc_specs(), "--output-directory", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = f"$ python {' '.join(cmd[1:])}\nexit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    problems = [
        line for line in (proc.stderr + proc.stdout).splitlines() if "warn" in line.lower() or "error" in line.lower()
    ]
    if problems:
        pytest.fail("pdoc warned:\n" + "\n".join(problems) + "\n\n" + report, pytrace=False)
    for page in [
        "steerlens.html",
        "steerlens/backends.html",
        "steerlens/backends/hf.html",
        "steerlens/backends/vllm.html",
        "steerlens/vectors.html",
        "steerlens/data.html",
        "steerlens/evaluation.html",
        "steerlens/rl/trainer.html",
        "steerlens/analysis.html",
    ]:
        assert (out / page).is_file(), f"pdoc wrote no {page}\n{report}"
    # Every module has its page, named once (a repeated spec is a pdoc warning, caught above).
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in PACKAGE.rglob("*.py")
    }
    modules = {m for m in modules if not any(re.match(pattern, m) for pattern in SKIP)}
    pages = {".".join(p.relative_to(out).with_suffix("").parts) for p in out.rglob("*.html")} - {"index"}
    assert pages == modules, f"missing pages: {sorted(modules - pages)}; unexpected: {sorted(pages - modules)}"


@pytest.mark.slow  # ~3 s with mypy's cache (.mypy_cache), 10-20 s cold (it reads torch's annotations)
def test_public_api_type_checks() -> None:
    cmd = [sys.executable, "-m", "mypy"]  # files and settings: [tool.mypy] in pyproject.toml
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"$ python -m mypy  (exit {proc.returncode})\n{proc.stdout}{proc.stderr}", pytrace=False)
