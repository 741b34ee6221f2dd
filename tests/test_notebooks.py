"""The tutorial notebooks: built from their sources, executable, and their printed
results reproducible.

* Every ``notebooks/sources/*.py`` has its ``.ipynb``, whose code cells are the source's
  code cells, all executed, with no error saved (the committed outputs come from this
  code, by ``notebooks/build.py``).
* Each notebook executes top to bottom in a fresh kernel (``GRADCLIP_QUICK=1`` shrinks
  the work of the later experiments); a cell that raises fails the test. Several
  notebooks check their own claims with ``assert`` against NumPy (03) and print the
  numbers their text states.
* Where ``GRADCLIP_QUICK`` shapes a cell, specific claims it prints are checked against
  an outside reference (``CLAIMS``: the data set's documented token counts, the
  agreement of ghost and vmap per-example norms).
* The printed output of every cell that ``GRADCLIP_QUICK`` cannot change (all cells of a
  notebook that does not read it, and the cells before the first one that uses it) is
  compared with the committed output: the same text, and every number within a
  relative 1e-4. So a change in the library's results that makes a notebook's text
  untrue fails here until the notebook is rebuilt (``python notebooks/build.py NN``).
"""

import importlib.util
import math
import os
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NB_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted((NB_DIR / "sources").glob("*.py"))
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


def _build_module():
  spec = importlib.util.spec_from_file_location("_notebook_build", NB_DIR / "build.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _code(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def test_every_source_has_its_executed_notebook():
  assert SOURCES, "no notebook sources found"
  assert {p.stem for p in NOTEBOOKS} == {p.stem for p in SOURCES}, (
      "each notebooks/sources/NN_name.py must have notebooks/NN_name.ipynb and back")
  read_cells = _build_module().read_cells
  for source in SOURCES:
    nb = nbformat.read(NB_DIR / (source.stem + ".ipynb"), as_version=4)
    want = [c.source for c in read_cells(source) if c.cell_type == "code"]
    got = [c.source for c in _code(nb)]
    assert got == want, (f"{source.stem}.ipynb's code differs from its source: rebuild it "
                         f"with `python notebooks/build.py {source.stem[:2]}`")
    for i, cell in enumerate(_code(nb)):
      assert cell.get("execution_count") is not None, (
          f"{source.stem}.ipynb code cell {i} was never executed")
      assert not [o for o in cell.get("outputs", []) if o.get("output_type") == "error"], (
          f"{source.stem}.ipynb code cell {i} saved an error")


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|[-+]?\b(?:inf|nan)\b")


def _printed(cell) -> str:
  """The cell's stdout and plain-text results, in order."""
  parts = []
  for o in cell.get("outputs", []):
    if o.get("output_type") == "stream" and o.get("name") == "stdout":
      parts.append(o.get("text", ""))
    elif o.get("output_type") in ("execute_result", "display_data"):
      text = o.get("data", {}).get("text/plain", "")
      if not text.startswith("<Figure"):
        parts.append(text)
  return "".join(parts)


def _split(text):
  """(text with every number replaced by '#' and no whitespace, the numbers)."""
  numbers = [float(m) for m in _NUMBER.findall(text)]
  template = re.sub(r"\s+", "", _NUMBER.sub("#", text))
  return template, numbers


def assert_same_printout(got: str, want: str, where: str, rtol=1e-4, atol=1e-6):
  t_got, n_got = _split(got)
  t_want, n_want = _split(want)
  assert t_got == t_want and len(n_got) == len(n_want), (
      f"{where} prints something else than the committed notebook:\n--- now ---\n{got}"
      f"\n--- committed ---\n{want}")
  for i, (a, b) in enumerate(zip(n_got, n_want)):
    same = (math.isnan(a) and math.isnan(b)) or a == b or (
        math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol + rtol * abs(b))
    assert same, (f"{where}: number {i} is {a}, the committed notebook says {b}:\n"
                  f"--- now ---\n{got}\n--- committed ---\n{want}")


def _uses_quick(source: str) -> bool:
  return re.search(r"\bQUICK\b", source) is not None


def _reproducible_cells(nb) -> int:
  """How many leading code cells ``GRADCLIP_QUICK`` cannot change."""
  cells = _code(nb)
  for i, cell in enumerate(cells):
    if "GRADCLIP_QUICK" in cell.source:
      rest = cell.source.split("\n")
      defining = [l for l in rest if "GRADCLIP_QUICK" in l]
      others = [l for l in rest if "GRADCLIP_QUICK" not in l]
      if any(_uses_quick(l) for l in others) or not defining:
        return i
      for j in range(i + 1, len(cells)):
        if _uses_quick(cells[j].source):
          return j
      return len(cells)
  return len(cells)


# Claims a notebook prints in a cell that GRADCLIP_QUICK also shapes, checked on the
# executed output: (code cell, pattern, check of the matched groups, what it means).
CLAIMS = {
    # shared/data/README.md: PTB tokens including <eos>, per split.
    "04_ptb_language_model": [
        (0, r"\{'train': (\d+), 'valid': (\d+), 'test': (\d+)\} tokens",
         lambda m: tuple(map(int, m.groups())) == (929_589, 73_760, 82_430),
         "the PTB token counts of shared/data/README.md")],
    # Ghost norms are exact: they agree with the vmap per-example norms to float32 error.
    "06_private_training": [
        (1, r"max \|ghost - vmap\| / norm on \d+ reviews: (\S+)",
         lambda m: float(m.group(1)) < 1e-5,
         "ghost and vmap per-example norms agree to < 1e-5 relative")],
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_reproduces_its_outputs(path, monkeypatch, shared_data_dir):
  monkeypatch.setenv("GRADCLIP_QUICK", "1")
  monkeypatch.setenv("GRADCLIP_DATA_DIR", str(shared_data_dir))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # The kernel is a fresh process: give it one CPU device, like a user's notebook.
  monkeypatch.setenv("XLA_FLAGS", "")
  committed = nbformat.read(path, as_version=4)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  errors = [o for c in nb.cells for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  n = _reproducible_cells(committed)
  for i, (cell, saved) in enumerate(zip(_code(nb)[:n], _code(committed)[:n])):
    assert_same_printout(_printed(cell), _printed(saved), f"{path.stem} code cell {i}")
  for i, pattern, check, meaning in CLAIMS.get(path.stem, []):
    printed = _printed(_code(nb)[i])
    match = re.search(pattern, printed)
    assert match and check(match), (
        f"{path.stem} code cell {i} must show {meaning}; it printed:\n{printed}")
