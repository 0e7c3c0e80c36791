"""Re-execute the tutorial notebooks and write their outputs in place, so a code host shows every table and figure.

    python scripts/run_notebooks.py                                   # every notebooks/*.ipynb
    python scripts/run_notebooks.py notebooks/04_papers_in_miniature.ipynb

Rerun it after changing the library or the results a notebook reads (`analyses/*/results`):
`tests/test_notebooks.py` re-executes each notebook and fails when its text outputs differ from the committed
ones. Each notebook runs top to bottom in a fresh `python3` kernel of this interpreter (nbclient) inside a
temporary folder. A plotly figure is kept twice in one output: its JSON (`application/vnd.plotly.v1+json`, drawn
interactively by JupyterLab and VS Code, without plotly.js in the file) and a static SVG beside it
(`image/svg+xml`, what a code host shows), drawn by kaleido. Text that changes from run to run (temporary and
checkout paths, memory addresses) is normalised, and the SVGs' random element ids are replaced by a digest of
the figure, so rerunning unchanged code rewrites the same files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
RENDERER = "steerlens_notebook"  # a figure's JSON and a static SVG, in one output
PLOTLY = "application/vnd.plotly.v1+json"
TEXT_TYPES = ("text/plain", "text/markdown", "text/html", "text/latex")  # compared by the tests; images are not


def kernel_setup() -> None:
    """Run inside the notebook's kernel before its first cell: a plotly figure displays as its JSON and an SVG."""
    import warnings

    import plotly.io as pio
    from plotly.io._base_renderers import MimetypeRenderer, PlotlyRenderer

    class FigureAndImage(MimetypeRenderer):
        def to_mimebundle(self, fig_dict: dict) -> dict:
            figure = PlotlyRenderer().to_mimebundle(fig_dict)[PLOTLY]
            template = figure.get("layout", {}).get("template", {})
            if "data" in template:  # the template's defaults for trace types the figure has not: half its JSON
                used = {trace.get("type", "scatter") for trace in figure.get("data", [])}
                template["data"] = {kind: value for kind, value in template["data"].items() if kind in used}
            return {PLOTLY: figure, "image/svg+xml": figure_svg(figure)}

    pio.renderers[RENDERER] = FigureAndImage()
    pio.renderers.default = RENDERER
    # tqdm.auto warns that ipywidgets is missing; progress bars are off here anyway
    warnings.filterwarnings("ignore", message="IProgress not found")


_scope: Any = None


def figure_svg(fig_dict: dict) -> str:
    """The figure as SVG (its layout's size, else 700 x 500 px). plotly.js names elements by random ids: here the
    figure's and its traces' ids derive from a digest of the figure, so an unchanged figure gives the same bytes."""
    global _scope
    import plotly.io as pio

    digest = hashlib.sha256(pio.to_json(fig_dict, validate=False).encode()).hexdigest()[:6]
    traces = [{"uid": f"{digest}{i}", **trace} for i, trace in enumerate(fig_dict.get("data", []))]
    figure = {**fig_dict, "data": traces}
    try:  # kaleido 0.2: a bundled headless Chromium, no browser to install; plotly 7 no longer calls it itself
        from kaleido.scopes.plotly import PlotlyScope
    except ImportError as err:  # kaleido >= 1 drives an installed Chrome through plotly
        if not _has_module("kaleido"):
            raise RuntimeError("the static images need kaleido: pip install -e '.[notebooks]'") from err
        svg = pio.to_image(figure, format="svg", validate=False).decode()
    else:
        import plotly

        if _scope is None:  # the plotly.js that plotly itself ships, so the image matches the interactive figure
            plotlyjs = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
            _scope = PlotlyScope(plotlyjs=str(plotlyjs), mathjax=False)
        svg = _scope.transform(figure, format="svg").decode()
    uid = re.search(r'id="defs-(\w+)"', svg)  # the figure's own id
    return svg.replace(uid.group(1), digest) if uid else svg


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def normalise(text: str, workdir: Path) -> str:
    """Text without what changes between runs and machines: the working folder, the environment, the checkout, a
    temporary folder, the home folder, memory addresses."""
    end = r"(?=[/\\'\"\s]|$)"  # a path ends at a separator, a quote, a space or the end
    for path, name in ((workdir, "."), (Path(sys.prefix), "<venv>"), (ROOT, "<repo>")):
        text = re.sub(re.escape(str(path)) + end, name, text)
    text = re.sub(re.escape(tempfile.gettempdir()) + r"/[^/\s'\"]+", "<tmp>", text)  # one made by mkdtemp
    text = re.sub(re.escape(str(Path.home())) + end, "~", text)
    return re.sub(r"\b0x[0-9a-fA-F]{6,}\b", "0x…", text)


@contextlib.contextmanager
def _kernel_environment() -> Iterator[None]:
    """This interpreter's folder first on PATH (the python3 kernelspec launches `python`: CI runs .venv/bin/python
    without activating the environment), no LLM endpoint, fixed hashing, no progress bars (their rates change
    every run)."""
    saved = dict(os.environ)
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    os.environ.pop("OPENAI_BASE_URL", None)
    os.environ.update(PYTHONHASHSEED="0", TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def execute(path: Path, workdir: Path, timeout: int = 600) -> Any:
    """`path` executed top to bottom in a fresh kernel working in `workdir`, its outputs normalised.

    Raises nbclient's `CellExecutionError` when a cell fails."""
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    metadata = json.loads(json.dumps(notebook.metadata))
    setup = f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import run_notebooks; sys.path.pop(0)\n"
    setup += "run_notebooks.kernel_setup(); print(sys.prefix)"
    notebook.cells.insert(0, nbformat.v4.new_code_cell(setup))
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=timeout,
        record_timing=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    with _kernel_environment():
        client.execute()
    first = notebook.cells.pop(0)
    prefix = "".join(o.get("text", "") for o in first.outputs).strip()
    if prefix != sys.prefix:  # the kernel must be this environment's
        raise RuntimeError(f"{path.name}: the kernel ran in {prefix!r}, not in {sys.prefix!r}")
    notebook.metadata = metadata
    count = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        count += 1
        cell.execution_count = count
        cell.outputs = _coalesced(cell.outputs)
        for output in cell.outputs:
            if "execution_count" in output:
                output["execution_count"] = count
            if "text" in output:
                output["text"] = normalise(output["text"], workdir)
            if "traceback" in output:
                output["traceback"] = [normalise(line, workdir) for line in output["traceback"]]
            for kind in TEXT_TYPES:
                if kind in output.get("data", {}):
                    output["data"][kind] = normalise(output["data"][kind], workdir)
    return notebook


def _coalesced(outputs: list) -> list:
    """Consecutive writes to one stream as one output (how a stream is split depends on when it was flushed)."""
    merged: list = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if output["output_type"] == "stream" and previous and previous["output_type"] == "stream":
            if previous["name"] == output["name"]:
                previous["text"] += output["text"]
                continue
        merged.append(output)
    return merged


def text_outputs(cell: Any) -> list[tuple[str, str]]:
    """A code cell's outputs as (kind, text): streams, errors and every text MIME type."""
    texts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            texts.append((output["name"], output["text"]))
        elif output["output_type"] == "error":
            texts.append(("error", f"{output['ename']}: {output['evalue']}"))
        else:
            data = output.get("data", {})
            texts += [(kind, _joined(data[kind])) for kind in TEXT_TYPES if kind in data]
            texts += [(kind, "<present>") for kind in sorted(data) if kind not in TEXT_TYPES]
    return texts


def _joined(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


def figures(cell: Any) -> list[Any]:
    """A code cell's plotly figures (their JSON)."""
    return [o["data"][PLOTLY] for o in cell.get("outputs", []) if PLOTLY in o.get("data", {})]


def same_figure(a: Any, b: Any, rel: float = 1e-6) -> bool:
    """Plotly figure JSON equal, numbers (plain or base64 arrays) to a relative `rel`: the last bits of a float
    may differ between processors, a changed result may not."""
    import base64

    import numpy as np

    if isinstance(a, dict) and isinstance(b, dict) and "bdata" in a and "bdata" in b:
        if (a.get("dtype"), a.get("shape")) != (b.get("dtype"), b.get("shape")):
            return False
        x, y = (np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]) for v in (a, b))
        return x.shape == y.shape and bool(np.allclose(x, y, rtol=rel, atol=0, equal_nan=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_figure(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_figure(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=rel) or (math.isnan(a) and math.isnan(b))
    return a == b


def differences(committed: Any, executed: Any) -> list[str]:
    """Where the committed notebook's outputs are not what executing it gives, per code cell: the text outputs
    must be equal, the plotly figures equal (numbers to 1e-6), every image there (SVG bytes are not compared:
    renderers differ)."""
    before = [c for c in committed.cells if c.cell_type == "code"]
    after = [c for c in executed.cells if c.cell_type == "code"]
    if len(before) != len(after):
        return [f"{len(before)} code cells committed, {len(after)} executed"]
    found = []
    for i, (old, new) in enumerate(zip(before, after), start=1):
        if text_outputs(old) != text_outputs(new):
            found.append(f"code cell {i}: committed {_brief(old)}, executed {_brief(new)}")
        elif not same_figure(figures(old), figures(new)):
            found.append(f"code cell {i}: its figure's data or layout changed")
    return found


def _brief(cell: Any) -> str:
    outputs = text_outputs(cell)
    if not outputs:
        return "no output"
    return "; ".join(f"{kind} {text[:160]!r}" if text != "<present>" else kind for kind, text in outputs)


def outputs_size(path: Path) -> int:
    """Bytes the outputs add to a notebook file: its size against the same notebook without outputs."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return path.stat().st_size - len(nbformat.writes(notebook).encode()) - 1


def main(argv: list[str] | None = None) -> int:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: every notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="compare with the committed outputs; write nothing")
    args = parser.parse_args(argv)
    failed = False
    for path in args.notebooks or NOTEBOOKS:
        path = path.resolve()
        with tempfile.TemporaryDirectory(prefix="steerlens-notebook-") as workdir:
            executed = execute(path, Path(workdir))
        if args.check:
            found = differences(nbformat.read(path, as_version=4), executed)
            failed |= bool(found)
            print(f"{path.name}: " + ("outputs differ\n  " + "\n  ".join(found) if found else "outputs current"))
            continue
        nbformat.write(executed, path)
        print(f"{path.name}: {path.stat().st_size:,} bytes, of which outputs {outputs_size(path):,}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
