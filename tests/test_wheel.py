"""The wheel and the sdist (issue 32, item 3): `python -m build` makes both, `twine check` passes, and the wheel,
installed into a fresh virtual environment outside the checkout, imports, answers `steerlens --help`, trains on
the toy task and loads the shipped SmolLM2 vectors.

The fresh environment: `python -m venv --without-pip` in a temporary folder, the wheel installed into it with
`pip --python <new venv> install --no-deps`, and then one `.pth` file naming a folder of links to the checkout
venv's installed packages (torch, transformers, vLLM, ...) minus steerlens's own editable install and minus every
`.pth` file (the editable finder among them), so those are never processed. Installing the real dependencies
would download or copy gigabytes on every CI run; what this test is about is the wheel's own content (modules,
package data, entry points, console script, metadata), and steerlens reaches the new interpreter only through
the wheel: each check asserts that `steerlens.__file__` and its `dist-info` lie inside the new venv. Every
command runs with its working directory outside the checkout and without PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import steerlens

ROOT = Path(__file__).resolve().parents[1]
NAME = f"steerlens-{steerlens.__version__}"


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, (
        f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def _source_files() -> list[str]:
    """What a fresh clone holds: tracked files plus untracked ones git does not ignore (this tree's own state)."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout
        return [name for name in out.split("\0") if name and (ROOT / name).is_file()]
    keep = ["pyproject.toml", "README.md", *(str(p.relative_to(ROOT)) for p in (ROOT / "steerlens").rglob("*"))]
    return [name for name in keep if (ROOT / name).is_file() and "__pycache__" not in name]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build` on a copy of the tree (the checkout is not written to): an sdist, and a wheel built
    from that sdist, so the wheel's content also proves the sdist complete."""
    work = tmp_path_factory.mktemp("build")
    src = work / "src"
    for name in _source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(src)], cwd=work)
    return work / "dist"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _shipped_package_data() -> set[str]:
    """Every asset file in the source package, and the typing marker: all must ship."""
    data = {str(p.relative_to(ROOT)) for p in (ROOT / "steerlens" / "assets").rglob("*") if p.is_file()}
    return data | {"steerlens/py.typed"}


def test_build_makes_one_wheel_and_one_sdist_that_twine_accepts(dist: Path) -> None:
    assert sorted(p.name for p in dist.iterdir()) == [f"{NAME}-py3-none-any.whl", f"{NAME}.tar.gz"]
    out = _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())]).stdout
    assert out.count("PASSED") == 2, out


def test_wheel_carries_modules_package_data_entry_points_and_one_version(dist: Path) -> None:
    with zipfile.ZipFile(dist / f"{NAME}-py3-none-any.whl") as wheel:
        names = set(wheel.namelist())
        meta = Parser().parsestr(wheel.read(f"{NAME}.dist-info/METADATA").decode())
        entry_points = wheel.read(f"{NAME}.dist-info/entry_points.txt").decode()
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "steerlens").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert _shipped_package_data() <= names, sorted(_shipped_package_data() - names)
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "analyses/", "bench/"))]
    # the version is written once (steerlens/__init__.py); the metadata carries that number
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert meta["Version"] == steerlens.__version__
    assert meta.get_all("Requires-Dist")[: len(project["dependencies"])] == project["dependencies"]
    # every entry point pyproject declares, the vLLM plugin included
    declared = {"console_scripts": project["scripts"], **project["entry-points"]}
    for group, entries in declared.items():
        for key, target in entries.items():
            assert f"[{group}]" in entry_points and f"{key} = {target}" in entry_points, (group, key)
    assert "[vllm.general_plugins]\nsteerlens = steerlens.backends.vllm_plugin:register" in entry_points


def test_sdist_carries_what_the_wheel_is_built_from(dist: Path) -> None:
    with tarfile.open(dist / f"{NAME}.tar.gz") as sdist:
        names = {name.removeprefix(f"{NAME}/") for name in sdist.getnames()}
        pkg_info = Parser().parsestr(sdist.extractfile(f"{NAME}/PKG-INFO").read().decode())  # type: ignore[union-attr]
    assert {"pyproject.toml", "README.md", "PKG-INFO"} <= names
    assert _shipped_package_data() <= names, sorted(_shipped_package_data() - names)
    assert pkg_info["Version"] == steerlens.__version__


@pytest.fixture(scope="module")
def fresh_venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv outside the checkout: steerlens from the wheel only, the heavy dependencies borrowed (see top)."""
    base = tmp_path_factory.mktemp("fresh")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base)
    python = venv / "bin" / "python"
    wheel = dist / f"{NAME}-py3-none-any.whl"
    # installed before the borrowed packages are visible, so pip sees an empty environment
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)])
    deps = base / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name
        if name.endswith(".pth") or name.startswith(("steerlens", "__editable__")) or name == "__pycache__":
            continue
        (deps / name).symlink_to(entry)
    new_site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    (new_site / "_borrowed_dependencies.pth").write_text(f"{deps}\n")
    return venv


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", VIRTUAL_ENV=str(venv))
    return env


def test_fresh_venv_imports_steerlens_from_the_wheel_and_loads_the_shipped_vectors(
    fresh_venv: Path, tmp_path: Path
) -> None:
    check = textwrap.dedent(
        """
        import importlib.metadata as md, json, sys
        from pathlib import Path
        import steerlens as sl
        from steerlens.models import resolve_model
        from steerlens.smollm import TRAINED_VECTORS

        vectors = sl.SteeringVectors.load(TRAINED_VECTORS)
        dists = [d for d in md.distributions() if d.metadata["Name"] == "steerlens"]
        plugins = md.entry_points(group="vllm.general_plugins").select(name="steerlens")
        print(json.dumps({
            "prefix": sys.prefix,
            "file": sl.__file__,
            "version": sl.__version__,
            "metadata_version": md.version("steerlens"),
            "dists": [str(d.locate_file("")) for d in dists],
            "plugin": [str(e.dist.locate_file("")) for e in plugins],
            "plugin_loads": all(callable(e.load()) for e in plugins),
            "sources": [e.value for e in md.entry_points(group="steerlens.model_sources")],
            "toy": resolve_model("toy-arith"),
            "vectors_file": str(TRAINED_VECTORS),
            "vectors": [list(vectors.values.shape), vectors.model, vectors.num_layers],
            "typed": (Path(sl.__file__).parent / "py.typed").is_file(),
        }))
        """
    )
    info = json.loads(
        _run([str(fresh_venv / "bin" / "python"), "-c", check], cwd=tmp_path, env=_env(fresh_venv)).stdout
    )
    venv = str(fresh_venv)
    assert info["prefix"] == venv
    for key in ("file", "toy", "vectors_file"):
        assert info[key].startswith(venv + "/") and not info[key].startswith(str(ROOT)), (key, info[key])
    assert info["version"] == info["metadata_version"] == steerlens.__version__
    assert len(info["dists"]) == 1 and info["dists"][0].startswith(venv + "/")  # the checkout's is not visible
    assert len(info["plugin"]) == 1 and info["plugin"][0].startswith(venv + "/") and info["plugin_loads"]
    assert info["sources"] == ["steerlens.smollm:checkpoint_dir"]
    assert info["vectors"] == [[30, 576], "smollm2-135m", 30]
    assert info["typed"]


def test_fresh_venv_console_script_answers_help(fresh_venv: Path, tmp_path: Path) -> None:
    script = fresh_venv / "bin" / "steerlens"
    assert script.read_text().splitlines()[0] == f"#!{fresh_venv / 'bin' / 'python'}"
    out = _run([str(script), "--help"], cwd=tmp_path, env=_env(fresh_venv)).stdout
    for command in ("train", "eval", "serve", "convert"):
        assert command in out


@pytest.mark.slow
def test_fresh_venv_trains_two_steps_on_the_toy_task(fresh_venv: Path, tmp_path: Path) -> None:
    """`steerlens train --steps 2` with the toy defaults; in vLLM where it is installed, whose engine processes load
    steerlens's plugin through the wheel's entry point (~1 min), else in HF generate."""
    import importlib.util

    engine = "vllm" if importlib.util.find_spec("vllm") else "hf"
    run = tmp_path / "run"
    cmd = [str(fresh_venv / "bin" / "steerlens"), "train", "--steps", "2", "--engine", engine, "--out-dir", str(run)]
    _run(cmd, cwd=tmp_path, env=_env(fresh_venv), timeout=600)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    assert all(row["applied"] for row in rows)  # both updates taken (finite loss and gradients)
    artefact = Path(summary["artefact"])
    assert artefact.is_relative_to(run)
    vectors = (
        steerlens.SteeringVectors.load(artefact)
        if artefact.is_file()
        else steerlens.SteeringVectors.from_pretrained(artefact)  # a vectors folder (issue 32, item 4)
    )
    assert vectors.model == "toy-arith" and vectors.values.abs().sum() > 0
