"""The oldest versions of JAX, Optax and Flax that gradclip_jax is tested with.

``import gradclip_jax`` calls :func:`check` for JAX, jaxlib and Optax, and raises an
``ImportError`` that names the version needed and the ``pip`` command that installs it,
instead of failing later with an ``AttributeError`` deep inside a trace (the ghost
engine reads ``jax.extend.core.DropVar``, public since JAX 0.10.0; the sharded global
norm gave wrong values under GSPMD before JAX 0.5; Flax before 0.12.1 does not import
with JAX 0.10). The trainers call :func:`check` for Flax.

``MINIMUM`` is the one place these floors are written in the package; ``pyproject.toml``
states the same floors for pip, and ``tests/test_packaging.py`` checks that the two
agree. ``.ci/oldest_deps.sh`` runs the core tests with exactly these versions.
"""

from __future__ import annotations

import importlib.metadata
import re

#: distribution -> oldest version tested (``.ci/oldest_deps.sh`` installs these).
MINIMUM = {
    "jax": "0.10.2",
    "jaxlib": "0.10.2",
    "numpy": "2.0.0",
    "optax": "0.2.5",
    "flax": "0.12.2",
}

_RELEASE = re.compile(r"\d+(?:\.\d+)*")


def parse(version: str) -> tuple[int, ...]:
  """The release numbers of a version string, padded to three: ``"0.10"`` -> ``(0, 10, 0)``.

  Pre-release, development and local suffixes are dropped, so a nightly of a release
  counts as that release.

  >>> parse("0.10.2"), parse("0.9.0.1"), parse("0.12.1rc1+local"), parse("1.0")
  ((0, 10, 2), (0, 9, 0, 1), (0, 12, 1), (1, 0, 0))
  """
  m = _RELEASE.match(version.strip().lstrip("vV"))
  if m is None:
    raise ValueError(f"not a version number: {version!r}")
  parts = tuple(int(p) for p in m.group(0).split("."))
  return parts + (0,) * (3 - len(parts))


def installed_version(dist: str) -> str | None:
  """The installed version of distribution ``dist``, or None if it is not installed."""
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def check(*dists: str, extra: str | None = None) -> None:
  """Raises ``ImportError`` if an installed distribution is older than ``MINIMUM``.

  A distribution that is not installed is left to the ``import`` that needs it.
  ``extra`` names the pip extra that installs them (``"train"``) in the message.

  >>> check("jax", "optax")  # nothing to say when the versions are new enough
  """
  old = []
  for dist in dists:
    found = installed_version(dist)
    if found is not None and parse(found) < parse(MINIMUM[dist]):
      old.append((dist, found))
  if not old:
    return
  found_text = ", ".join(f"{d} {v}" for d, v in old)
  needed = " ".join(f'"{d}>={MINIMUM[d]}"' for d, _ in old)
  what = f'"gradclip_jax[{extra}]"' if extra else "gradclip_jax"
  raise ImportError(
      f"gradclip_jax needs {', '.join(f'{d}>={MINIMUM[d]}' for d, _ in old)}, found "
      f"{found_text}. Upgrade with: pip install -U {needed} (the versions {what} is "
      f"tested with are listed in gradclip_jax._compat.MINIMUM).")
