"""Runs the examples in the library's docstrings, so the docs cannot drift."""

import doctest
import importlib

import pytest

MODULES = ["gradclip_jax._clipping", "gradclip_jax.functional",
           "gradclip_jax._adaptive", "gradclip_jax.dp"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  try:
    module = importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name == name:
      pytest.skip(f"{name} is not part of this version")
    raise
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
