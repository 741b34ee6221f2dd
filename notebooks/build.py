"""Writes the tutorial notebooks from their cell sources and executes them.

    python notebooks/build.py            # write + execute every notebook (saves outputs)
    python notebooks/build.py 02 05      # only those whose name starts with 02 / 05
    python notebooks/build.py --text 01  # only refresh the markdown cells (no execution)

The cell sources live in ``notebooks/sources/*.py``: plain Python files where a line
``# %% [markdown]`` starts a markdown cell and ``# %%`` a code cell (the "percent"
format that Jupytext and VS Code read). Executing with nbclient stores the real
outputs and plots in the ``.ipynb`` files. ``GRADCLIP_QUICK=1`` shrinks the work
(the tests use it); the committed notebooks are executed in full.
"""

from __future__ import annotations

import os
import pathlib
import sys

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent


def read_cells(source: pathlib.Path):
  """Splits a percent-format file into nbformat cells."""
  cells, kind, lines = [], None, []

  def flush():
    text = "\n".join(lines).strip("\n")
    if kind == "markdown":
      text = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#")
                       for l in text.splitlines())
      cells.append(nbformat.v4.new_markdown_cell(text))
    elif kind == "code" and text:
      cells.append(nbformat.v4.new_code_cell(text))

  for line in source.read_text().splitlines():
    if line.startswith("# %%"):
      flush()
      kind, lines = ("markdown" if "[markdown]" in line else "code"), []
    elif kind is not None:
      lines.append(line)
  flush()
  return cells


def build(source: pathlib.Path, execute: bool = True, timeout: int = 1200):
  nb = nbformat.v4.new_notebook()
  nb.cells = read_cells(source)
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  target = HERE / (source.stem + ".ipynb")
  if execute:
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
  nbformat.write(nb, target)
  return target


def refresh_text(source: pathlib.Path) -> pathlib.Path:
  """Rewrites only the markdown cells of an executed notebook from its source.

  The code cells and their saved outputs are kept; if any code cell differs from the
  source (or the cell layout changed), the notebook must be rebuilt and executed
  instead, and this raises ``ValueError``.
  """
  target = HERE / (source.stem + ".ipynb")
  nb = nbformat.read(target, as_version=4)
  cells = read_cells(source)
  layout = [(c.cell_type, c.source if c.cell_type == "code" else None) for c in cells]
  saved = [(c.cell_type, c.source if c.cell_type == "code" else None) for c in nb.cells]
  if layout != saved:
    raise ValueError(f"{target.name}: the code cells differ from {source.name}; rebuild "
                     "it with `python notebooks/build.py " + source.stem[:2] + "`")
  for old, new in zip(nb.cells, cells):
    if old.cell_type == "markdown":
      old.source = new.source
  nbformat.write(nb, target)
  return target


def main(argv):
  text_only = "--text" in argv
  argv = [a for a in argv if a != "--text"]
  prefixes = argv or [""]
  sources = sorted((HERE / "sources").glob("*.py"))
  for source in sources:
    if any(source.stem.startswith(p) for p in prefixes):
      if text_only:
        print(f"  refreshed the text of {refresh_text(source)}")
        continue
      print(f"building {source.stem} ...", flush=True)
      print(f"  wrote {build(source)}")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  sys.exit(main(sys.argv[1:]))
