"""Library-wide settings: the backend-tuning switch.

A few parts of gradclip_jax exist only to steer one XLA backend (CPU, or GPU)
towards a better program (an optimization barrier, a ``lax.cond`` around the overflow
rescue, ...). They never change a result: with the tuning off every rule returns
bit-identical values on CPU (a GPU workaround can change the order in which XLA adds
the same terms). They live in :mod:`gradclip_jax._tuning`, each under a name listed in
:data:`WORKAROUNDS`, and all of them are behind one switch:

* the environment variable ``GRADCLIP_JAX_BACKEND_TUNING``, read when
  ``gradclip_jax`` is imported: unset, empty or ``"1"`` turns every workaround on,
  ``"0"`` turns all of them off, and a comma-separated list of workaround names
  (e.g. ``"scale_barrier,overflow_cond"``) turns just those off;
* :func:`set_backend_tuning` at run time, and :func:`backend_tuning` to query it.

The switch is read when a rule is *traced*. ``jax.jit`` caches the trace of a Python
function, so a function traced before the switch changed keeps its program: change
the switch before the first call, or call ``jax.clear_caches()`` after changing it.

Examples:
  >>> from gradclip_jax import config
  >>> config.backend_tuning()
  True
  >>> config.set_backend_tuning(False)
  >>> config.backend_tuning(), config.backend_tuning("scale_barrier")
  (False, False)
  >>> config.set_backend_tuning(True, disabled=["scale_barrier"])
  >>> config.backend_tuning(), config.backend_tuning("scale_barrier")
  (True, False)
  >>> config.set_backend_tuning(True)
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, Optional

ENV_VAR = "GRADCLIP_JAX_BACKEND_TUNING"

#: The names of the backend workarounds, each documented in :mod:`gradclip_jax._tuning`.
WORKAROUNDS = ("overflow_cond", "scale_barrier", "unit_scales_once",
               "value_clip_tested", "agc_weights_apart", "skip_norm_apart",
               "skip_ordered_select", "gpu_column_pairs")

_enabled = True
_disabled: frozenset = frozenset()


def _check_names(names: Iterable[str]) -> frozenset:
  names = frozenset(str(n).strip() for n in names if str(n).strip())
  unknown = sorted(names - set(WORKAROUNDS))
  if unknown:
    raise ValueError(f"unknown backend workaround(s) {unknown}; the names are "
                     f"{list(WORKAROUNDS)}")
  return names


def _parse(value: Optional[str]) -> tuple:
  """(enabled, disabled names) from the environment variable's text."""
  if value is None or value.strip() in ("", "1", "on", "true", "True"):
    return True, frozenset()
  if value.strip() in ("0", "off", "false", "False"):
    return False, frozenset()
  return True, _check_names(value.split(","))


def set_backend_tuning(enabled: bool, *, disabled: Iterable[str] = ()) -> None:
  """Turns the backend workarounds on or off for rules traced from now on.

  Args:
    enabled: ``False`` turns every workaround off; ``True`` turns them on except
      those named in ``disabled``.
    disabled: names from :data:`WORKAROUNDS` to keep off while ``enabled`` is True.

  Returns:
    None.

  Raises:
    TypeError: if ``enabled`` is not a bool.
    ValueError: for a name not in :data:`WORKAROUNDS`.

  Examples:
    >>> from gradclip_jax import config
    >>> config.set_backend_tuning(True, disabled=("overflow_cond",))
    >>> config.backend_tuning("overflow_cond"), config.backend_tuning("scale_barrier")
    (False, True)
    >>> config.set_backend_tuning(True)
  """
  global _enabled, _disabled
  if not isinstance(enabled, bool):
    raise TypeError(f"enabled must be True or False, got {enabled!r}")
  if isinstance(disabled, str):
    disabled = disabled.split(",")
  _disabled = _check_names(disabled)
  _enabled = enabled


def backend_tuning(name: Optional[str] = None) -> bool:
  """Whether the backend tuning (or the one workaround ``name``) is on.

  Args:
    name: ``None`` for the switch as a whole, or a name from :data:`WORKAROUNDS`.

  Returns:
    ``True`` when the switch is on (and ``name``, if given, is not disabled).

  Raises:
    ValueError: for a name not in :data:`WORKAROUNDS`.

  Examples:
    >>> from gradclip_jax import config
    >>> config.backend_tuning("unit_scales_once")
    True
  """
  if name is None:
    return _enabled
  _check_names([name])
  return _enabled and name not in _disabled


@contextlib.contextmanager
def backend_tuning_set(enabled: bool, *, disabled: Iterable[str] = ()) -> Iterator[None]:
  """Context manager: :func:`set_backend_tuning` inside, the previous setting after.

  Args:
    enabled: as in :func:`set_backend_tuning`.
    disabled: as in :func:`set_backend_tuning`.

  Yields:
    None.

  Raises:
    TypeError: if ``enabled`` is not a bool.
    ValueError: for a name not in :data:`WORKAROUNDS`.

  Examples:
    >>> from gradclip_jax import config
    >>> with config.backend_tuning_set(False):
    ...   config.backend_tuning()
    False
    >>> config.backend_tuning()
    True
  """
  saved = (_enabled, _disabled)
  set_backend_tuning(enabled, disabled=disabled)
  try:
    yield
  finally:
    set_backend_tuning(saved[0], disabled=saved[1])


_enabled, _disabled = _parse(os.environ.get(ENV_VAR))

__all__ = ["backend_tuning", "backend_tuning_set", "set_backend_tuning"]
