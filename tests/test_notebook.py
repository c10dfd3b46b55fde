"""The quickstart notebook runs top to bottom (executed by nbclient on the venv's kernel)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    last = nb.cells[-1].outputs[-1]["data"]["text/plain"]
    assert any(k in last for k in ("distributed", "single_point", "inconclusive", "undetermined", "exhausting",
                                    "multiple_solutions", "damage"))
