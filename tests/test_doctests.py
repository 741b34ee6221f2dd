"""Runs the examples in the library's docstrings, so the docs cannot drift.

Two contracts:

* every module in ``MODULES`` (the modules that define the public functions, private
  rule modules included, since ``doctest`` only collects the objects a module defines,
  and the public ``config`` and ``dp.accounting``) has examples, and they pass: a
  module with none fails instead of passing with 0 attempted;
* every public function of ``gradclip_jax``, ``gradclip_jax.functional`` and
  ``gradclip_jax.dp`` (their ``__all__``) has a ``>>>`` example in its docstring (run by
  the first test, through the module that defines it).
"""

import doctest
import importlib
import inspect

import pytest

PUBLIC_NAMESPACES = ["gradclip_jax", "gradclip_jax.functional", "gradclip_jax.dp"]
# Public modules whose functions are not re-exported by the namespaces above.
OTHER_PUBLIC_MODULES = ["gradclip_jax.config", "gradclip_jax.dp.accounting"]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _public_functions():
  out = []
  for space in PUBLIC_NAMESPACES:
    module = importlib.import_module(space)
    for attr in getattr(module, "__all__", []):
      obj = getattr(module, attr)
      if inspect.isfunction(obj):
        out.append((f"{space}.{attr}", obj))
  return out


PUBLIC = _public_functions()
# The modules that define the public functions (private rule modules included: doctest
# only collects what a module defines, so a namespace that re-exports finds nothing).
MODULES = sorted({obj.__module__ for _, obj in PUBLIC} | set(OTHER_PUBLIC_MODULES))


def test_the_module_list_covers_the_rules():
  for name in ("gradclip_jax._clipping", "gradclip_jax._adaptive",
               "gradclip_jax.functional", "gradclip_jax.dp._per_example"):
    assert name in MODULES, f"{name} defines no public function any more?"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  if name == "gradclip_jax.dp.accounting":
    pytest.importorskip("dp_accounting")  # the [train] extra
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=FLAGS)
  assert result.attempted > 0, (
      f"{name} has no docstring examples: each public function needs an Examples: "
      "section with >>> lines")
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_the_public_api_is_listed():
  names = {n for n, _ in PUBLIC}
  for n in ("gradclip_jax.clip_by_global_norm", "gradclip_jax.functional.global_norm",
            "gradclip_jax.dp.per_example_clip", "gradclip_jax.dp.clipped_grad"):
    assert n in names, f"{n} is missing from its module's __all__"


@pytest.mark.parametrize("qualname,obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_every_public_function_has_a_run_example(qualname, obj):
  doc = inspect.getdoc(obj) or ""
  assert ">>>" in doc, f"{qualname} has no >>> example in its docstring"
  # MODULES holds obj.__module__ by construction, so this example is run above.
