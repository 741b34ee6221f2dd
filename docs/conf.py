"""Sphinx configuration of the gradclip_jax documentation.

Build (warnings are errors)::

    pip install -e ".[docs]"
    python -m sphinx -W -b html docs docs/_build/html

The guides (``docs/**/*.md`` with ``file_format: mystnb``) are executed during the
build, and an error in a cell fails it. The tutorial notebooks ``notebooks/*.ipynb``
are copied into ``docs/notebooks/`` (git-ignored) and rendered with their saved
outputs, without re-execution. The API pages are generated from the ``__all__``
lists of the public modules by ``docs/_ext/apigen.py``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

# The guides run on one CPU device with no preallocation surprises.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

import gradclip_jax  # noqa: E402  (after the environment is set)

project = "gradclip_jax"
author = "The gradclip_jax authors"
copyright = "2026, The gradclip_jax authors"  # pylint: disable=redefined-builtin
release = gradclip_jax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "myst_nb",
    "apigen",
]

# --- sources ----------------------------------------------------------------------
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints",
                    "_templates"]
templates_path = ["_templates"]

# --- notebooks --------------------------------------------------------------------
# Text notebooks (the guides) are always executed; the tutorial notebooks are shown
# with the outputs saved by notebooks/build.py.
nb_execution_mode = "force"
nb_execution_excludepatterns = ["notebooks/*"]
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 300
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3


def _copy_notebooks(_app, _config) -> None:
  """Copies notebooks/*.ipynb into docs/notebooks/ (git-ignored), refreshing stale ones."""
  target = DOCS / "notebooks"
  target.mkdir(exist_ok=True)
  sources = sorted((ROOT / "notebooks").glob("*.ipynb"))
  names = {p.name for p in sources}
  for old in target.glob("*.ipynb"):
    if old.name not in names:
      old.unlink()
  for src in sources:
    dst = target / src.name
    if not dst.exists() or dst.read_bytes() != src.read_bytes():
      shutil.copyfile(src, dst)


# --- API reference ----------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False

# --- HTML -------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"gradclip_jax {release}"
html_static_path = []
html_theme_options = {
    "repository_url": "https://github.com/gradclip-jax/gradclip_jax",
    "use_repository_button": True,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}


_FIELD_DOC = re.compile(r"^Alias for field number \d+$")


def _field_comments(cls) -> dict[str, str]:
  """``{field: comment}`` from the class source lines ``field: type  # comment``."""
  try:
    source = inspect.getsource(cls)
  except (OSError, TypeError):
    return {}
  found = {}
  for line in source.splitlines():
    m = re.match(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
    if m:
      found[m.group(1)] = m.group(2).strip()
  return found


def _namedtuple_field_docs(app, what, name, obj, options, lines):
  """Replaces a NamedTuple field's "Alias for field number N" by its source comment."""
  del app, obj, options
  if what not in ("attribute", "property") or len(lines) != 1 or not _FIELD_DOC.match(
      lines[0]):
    return
  modname, _, rest = name.rpartition(".")
  clsname = modname.rpartition(".")[2]
  try:
    cls = getattr(importlib.import_module(modname.rpartition(".")[0]), clsname)
  except (ImportError, AttributeError):
    return
  comment = _field_comments(cls).get(rest)
  lines[:] = [comment] if comment else []


def setup(app):
  app.connect("autodoc-process-docstring", _namedtuple_field_docs)
  app.connect("config-inited", _copy_notebooks)
