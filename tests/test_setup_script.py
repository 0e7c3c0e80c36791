"""How `scripts/setup.sh` finds the CPU torch build (issue 32, item 7), run as `setup.sh --torch-only` into a
temporary venv, offline: pip reads no configuration file (PIP_CONFIG_FILE=/dev/null), its index is an empty local
one, and the torch it finds is a small stand-in wheel named `torch-<version>+cpu` (the version from
scripts/constraints-cpu.txt). Where it lies decides the case: pip's configured sources (a local wheel folder),
else "PyTorch's CPU index" (STEERLENS_TORCH_INDEX, here a local index folder), else neither: then the index is a
socket on 127.0.0.1 that accepts connections and never answers, which the script must give up on within its
short timeout, saying in one line what to do.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "setup.sh"
TORCH_VERSION = next(
    line.removeprefix("torch==").strip()
    for line in (ROOT / "scripts" / "constraints-cpu.txt").read_text().splitlines()
    if line.startswith("torch==")
)
WHEEL = f"torch-{TORCH_VERSION}+cpu-py3-none-any.whl"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="setup.sh is a bash script")


def _write_stand_in_torch(folder: Path) -> Path:
    """A valid, tiny wheel that pip installs as torch <version>+cpu (a module that only knows its version)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"torch-{TORCH_VERSION}+cpu.dist-info"
    files = {
        "torch/__init__.py": f'__version__ = "{TORCH_VERSION}+cpu"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {TORCH_VERSION}+cpu\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: steerlens-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    path = folder / WHEEL
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One venv (with pip) for the cases; each case starts without torch in it."""
    path = tmp_path_factory.mktemp("setup") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path


@pytest.fixture
def no_torch(venv: Path) -> Path:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "torch"], capture_output=True)
    return venv


@pytest.fixture
def silent_index() -> Iterator[tuple[str, socket.socket]]:
    """An "index" on 127.0.0.1 that takes connections into its backlog and never answers one."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.setblocking(False)
    yield f"http://127.0.0.1:{server.getsockname()[1]}/whl/cpu", server
    server.close()


def _contacted(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True


def _local_index(root: Path) -> Path:
    """A PEP 503 simple index folder holding only torch's page with the stand-in wheel."""
    wheel = _write_stand_in_torch(root / "torch")
    (root / "torch" / "index.html").write_text(
        f'<html><body><a href="{wheel.name.replace("+", "%2B")}">x</a></body></html>'
    )
    return root


def _setup(
    venv: Path, tmp_path: Path, *, find_links: Path, torch_index: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    empty_index = tmp_path / "empty-index"
    empty_index.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "STEERLENS_", "VIRTUAL_ENV"))}
    env.update(
        PIP_CONFIG_FILE=os.devnull,  # no pip.conf: neither this machine's wheel folder nor its index settings
        PIP_INDEX_URL=empty_index.as_uri(),
        PIP_FIND_LINKS=str(find_links),
        PIP_NO_CACHE_DIR="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_DEFAULT_TIMEOUT="180",  # the script's own short timeout must win for PyTorch's index
        STEERLENS_VENV=str(venv),
        STEERLENS_TORCH_INDEX=torch_index,
        STEERLENS_TORCH_INDEX_TIMEOUT="2",
    )
    start = time.monotonic()
    result = subprocess.run(
        ["bash", str(SCRIPT), "--torch-only"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    return result, time.monotonic() - start


def _installed_torch(venv: Path) -> str | None:
    code = "import importlib.metadata as m\ntry: print(m.version('torch'))\nexcept m.PackageNotFoundError: print('-')"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True).stdout
    return None if out.strip() == "-" else out.strip()


@pytest.mark.skipif(sys.platform != "linux", reason="the +cpu build is asked for on Linux")
def test_local_wheel_folder_first_and_pytorch_index_not_contacted(
    no_torch: Path, tmp_path: Path, silent_index: tuple[str, socket.socket]
) -> None:
    url, server = silent_index
    wheels = tmp_path / "wheels"
    _write_stand_in_torch(wheels)
    result, _ = _setup(no_torch, tmp_path, find_links=wheels, torch_index=url)
    assert result.returncode == 0, result.stderr
    assert _installed_torch(no_torch) == f"{TORCH_VERSION}+cpu"
    assert result.stderr == "" and result.stdout == ""
    assert not _contacted(server)


@pytest.mark.skipif(sys.platform != "linux", reason="the +cpu build is asked for on Linux")
def test_pytorch_index_when_the_configured_sources_lack_the_cpu_build(no_torch: Path, tmp_path: Path) -> None:
    index = _local_index(tmp_path / "pytorch-index")
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    result, _ = _setup(no_torch, tmp_path, find_links=empty, torch_index=index.as_uri())
    assert result.returncode == 0, result.stderr
    assert _installed_torch(no_torch) == f"{TORCH_VERSION}+cpu"
    assert result.stderr.splitlines() == [
        f"setup.sh: torch=={TORCH_VERSION}+cpu is not in pip's configured sources; trying {index.as_uri()}"
    ]


@pytest.mark.skipif(sys.platform != "linux", reason="the +cpu build is asked for on Linux")
def test_neither_source_gives_one_line_saying_what_to_do_without_waiting_long(
    no_torch: Path, tmp_path: Path, silent_index: tuple[str, socket.socket]
) -> None:
    url, server = silent_index
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    result, seconds = _setup(no_torch, tmp_path, find_links=empty, torch_index=url)
    assert result.returncode == 1
    assert _installed_torch(no_torch) is None
    assert _contacted(server)  # the index was tried ...
    assert seconds < 60  # ... and given up on after the script's 2 s timeout (pip's default here: 180 s)
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].endswith(f"trying {url}")
    advice = lines[1]
    assert advice.startswith(
        f"setup.sh: found torch=={TORCH_VERSION}+cpu neither in pip's configured sources nor at {url}"
    )
    assert "PIP_FIND_LINKS=<its folder> bash scripts/setup.sh" in advice and "STEERLENS_TORCH_INDEX" in advice
    log = Path(advice.split("pip's output: ")[1].split(")")[0])
    assert log.is_file() and "No matching distribution found" in log.read_text()


def test_unknown_argument_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == "usage: bash scripts/setup.sh [--torch-only]"
