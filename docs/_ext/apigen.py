"""Writes the API reference pages from the ``__all__`` lists of the public modules.

At ``config-inited`` (before the sources are listed and autosummary runs) this
writes ``docs/api/<module>.rst`` for each module in :data:`MODULES`: one
``autosummary`` table per group of names (grouped by the private module that defines
them), each name with its own page generated from its docstring. An object exported
by several modules (``gradclip_jax.add_noise`` is ``gradclip_jax.dp.add_noise``) gets
one page, under the deepest of them; the others link to it. A name added to a
module's ``__all__`` therefore gets its page without editing the docs;
``tests/test_docs.py`` checks the pages list every public name. The generated files
are git-ignored.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import types

# (module, title, one-line description); a module that does not exist is skipped.
MODULES = [
    ("gradclip_jax", "gradclip_jax",
     "The clipping rules, each an ``optax.GradientTransformation``, and their states."),
    ("gradclip_jax.functional", "gradclip_jax.functional",
     "Pure functions on a gradient tree (no state), the building blocks of the rules."),
    ("gradclip_jax.dp", "gradclip_jax.dp",
     "Differential privacy: per-example clipping, Gaussian noise, ghost norms."),
    ("gradclip_jax.dp.accounting", "gradclip_jax.dp.accounting",
     "Privacy accounting (RDP) over Google's ``dp-accounting`` package."),
    ("gradclip_jax.config", "gradclip_jax.config",
     "Library-wide switches."),
]

# Titles of the groups, by the module that defines a name (first prefix match wins).
GROUPS = [
    ("gradclip_jax._clipping", "Clipping rules"),
    ("gradclip_jax._adaptive", "Adaptive rules"),
    ("gradclip_jax.dp", "Differential privacy"),
    ("gradclip_jax.functional", "Functions"),
    ("gradclip_jax.config", "Configuration"),
]

API_DIR = "api"
STUB_DIR = "_autosummary"


def public_names(module: types.ModuleType) -> list[str]:
  """The module's ``__all__``, or (without one) its public functions and classes."""
  names = getattr(module, "__all__", None)
  if names is None:
    names = [n for n, v in vars(module).items()
             if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
             and getattr(v, "__module__", None) == module.__name__]
  return list(names)


def _group(obj) -> str:
  where = getattr(obj, "__module__", "") or ""
  for prefix, title in GROUPS:
    if where == prefix or where.startswith(prefix + "."):
      return title
  return "Other"


def _import(modname: str):
  """The module, or None when it does not exist (a broken import inside it raises)."""
  try:
    return importlib.import_module(modname)
  except ModuleNotFoundError as e:
    if e.name != modname:
      raise
    return None


def home_modules() -> dict[int, str]:
  """``{id(obj): module}``: the deepest public module whose ``__all__`` has the object.

  A name re-exported by a parent (``gradclip_jax.add_noise`` is
  ``gradclip_jax.dp.add_noise``) gets one page, under its home module; the parent's page
  links to it.
  """
  home: dict[int, str] = {}
  for modname, _, _ in sorted(MODULES, key=lambda m: m[0].count(".")):
    module = _import(modname)
    if module is None:
      continue
    for name in public_names(module):
      obj = getattr(module, name)
      if not isinstance(obj, types.ModuleType):
        home[id(obj)] = modname  # deeper modules overwrite their parents
  return home


def _table(names: list[str], toctree: bool) -> list[str]:
  lines = [".. autosummary::"]
  if toctree:
    lines.append(f"   :toctree: {STUB_DIR}")
  lines += ["   :nosignatures:", ""] + [f"   {n}" for n in names] + [""]
  return lines


def module_page(modname: str, title: str, blurb: str,
                home: dict[int, str] | None = None) -> str | None:
  """reST text of one module's API page, or None when the module does not exist."""
  module = _import(modname)
  if module is None:
    return None
  home = home_modules() if home is None else home
  names = public_names(module)
  submodules = [n for n in names if isinstance(getattr(module, n, None), types.ModuleType)]
  groups: dict[str, list[tuple[str, str]]] = {}
  for name in names:
    if name in submodules:
      continue
    obj = getattr(module, name)
    where = home.get(id(obj), modname)
    if where != modname:  # documented on its home module's page: link there
      # Relative to this module where possible (autosummary refuses the full name of a
      # submodule of the current module).
      rel = where[len(modname) + 1:] if where.startswith(modname + ".") else where
      kind, entry = "Elsewhere", f"~{rel}.{name}"
    else:
      kind, entry = ("Classes" if inspect.isclass(obj) else "Functions"), name
    groups.setdefault(_group(obj), []).append((kind, entry))
  lines = [title, "=" * len(title), "", f".. automodule:: {modname}",
           "   :no-members:", ""]
  if not (module.__doc__ or "").strip():  # the module's docstring says it better
    lines += [blurb, ""]
  lines += [f".. currentmodule:: {modname}", ""]
  for group, entries in groups.items():
    if len(groups) > 1:
      lines += [group, "-" * len(group), ""]
    # Functions (the rules) first, then their state classes; re-exports link home.
    for kind in ("Functions", "Classes", "Elsewhere"):
      members = [n for k, n in entries if k == kind]
      if members:
        lines += _table(members, toctree=kind != "Elsewhere")
  if submodules:
    lines += ["Submodules", "-" * len("Submodules"), ""]
    lines += [f"- :doc:`{modname}.{n}`" for n in submodules]
    lines += [""]
  return "\n".join(lines)


def _stub_names(text: str, modname: str) -> set[str]:
  """Full names whose stubs the ``:toctree:`` tables of a page generate."""
  names, in_toctree, in_names = set(), False, False
  for line in text.splitlines():
    if line.startswith(".. autosummary::"):
      in_toctree, in_names = False, False
    elif line.startswith("   :toctree:"):
      in_toctree = True
    elif in_toctree and line.startswith("   ") and not line.startswith("   :"):
      names.add(f"{modname}.{line.strip()}")
      in_names = True
    elif in_names and not line.strip():
      in_toctree, in_names = False, False
  return names


def write_pages(docs_dir: pathlib.Path) -> list[str]:
  """Writes docs/api/<module>.rst and docs/api/index.rst; returns the module names.

  Stubs left in docs/api/_autosummary/ by an earlier build for names that are no
  longer public are removed (they would be pages outside every toctree).
  """
  out = docs_dir / API_DIR
  out.mkdir(exist_ok=True)
  written, stubs = [], set()
  home = home_modules()
  for modname, title, blurb in MODULES:
    text = module_page(modname, title, blurb, home)
    if text is not None:
      stubs |= _stub_names(text, modname)
    target = out / f"{modname}.rst"
    if text is None:
      if target.exists():
        target.unlink()
      continue
    if not target.exists() or target.read_text() != text:
      target.write_text(text)
    written.append(modname)
  index = ["API reference", "=============", "",
           "One page per public name, generated from its docstring: the formula, the",
           "arguments, the state fields, the errors raised and an example.", "",
           ".. toctree::", "   :maxdepth: 2", ""]
  index += [f"   {m}" for m in written] + [""]
  for old in (out / STUB_DIR).glob("*.rst"):
    if old.stem not in stubs:
      old.unlink()
  text = "\n".join(index)
  target = out / "index.rst"
  if not target.exists() or target.read_text() != text:
    target.write_text(text)
  return written


def _on_config_inited(app, _config) -> None:
  write_pages(pathlib.Path(app.srcdir))


def setup(app):
  # Before the sources are listed and autosummary generates its stubs from them.
  app.connect("config-inited", _on_config_inited)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
