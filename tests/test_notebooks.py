"""Executes every notebook top to bottom (GRADCLIP_QUICK=1 shrinks the work).

A cell that raises fails the test. The committed notebooks keep the outputs of a full
run (notebooks/build.py); nothing here writes them back.
"""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob(
    "*.ipynb"))


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, shared_data_dir):
  monkeypatch.setenv("GRADCLIP_QUICK", "1")
  monkeypatch.setenv("GRADCLIP_DATA_DIR", str(shared_data_dir))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # The kernel is a fresh process: give it one CPU device, like a user's notebook.
  monkeypatch.setenv("XLA_FLAGS", "")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  errors = [o for c in nb.cells for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
