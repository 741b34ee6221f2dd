"""The oldest versions of JAX, Optax and Flax that gradclip_jax is tested with.

``import gradclip_jax`` calls :func:`check` for JAX, jaxlib and Optax, and raises an
``ImportError`` that names the versions needed and the ``pip`` command that installs
them, instead of failing later deep inside a trace: the ghost engine reads
``jax.extend.core.DropVar``, public since JAX 0.10.0 (and reads ``scan``'s
parameters in both their JAX 0.10 and their JAX 0.11/0.12 form); the backend workarounds are bit-identical to
the plain programs from JAX 0.10.2; the sharded global norm gave wrong values under
GSPMD before JAX 0.5; Flax before 0.12.2 fails with JAX 0.10.2. The trainers call
``check("flax", extra="train")``.

``MINIMUM`` and ``BELOW`` are the one place this range is written in the package;
``pyproject.toml`` states the same range for pip, and ``tests/test_packaging.py`` checks
that the two agree. ``.ci/oldest_deps.sh`` runs the version-sensitive tests with exactly
the ``MINIMUM`` versions.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

#: distribution -> oldest version tested (``.ci/oldest_deps.sh`` installs these).
MINIMUM = {
    "jax": "0.10.2",
    "jaxlib": "0.10.2",
    "numpy": "2.0.0",
    "optax": "0.2.5",
    "flax": "0.12.2",
}

#: distribution -> first release NOT supported (pyproject.toml caps it the same way).
#: The newest JAX tested is 0.12.1 (Python 3.12, by hand: the rules, the DP engine and
#: the trainers' tests); CI's Python 3.11 cannot install JAX 0.11 or later.
BELOW = {
    "jax": "0.13.0",
    "jaxlib": "0.13.0",
}
#: Set to 1 to skip the check (to try the package with an untested release).
SKIP_ENV = "GRADCLIP_JAX_SKIP_VERSION_CHECK"

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


def requirement(dist: str) -> str:
  """The supported range of ``dist`` as pip writes it.

  >>> requirement("jax"), requirement("optax")
  ('jax>=0.10.2,<0.13.0', 'optax>=0.2.5')
  """
  below = f",<{BELOW[dist]}" if dist in BELOW else ""
  return f"{dist}>={MINIMUM[dist]}{below}"


def check(*dists: str, extra: str | None = None) -> None:
  """Raises ``ImportError`` if an installed distribution is outside the tested range.

  A distribution that is not installed is left to the ``import`` that needs it.
  ``extra`` names the pip extra that installs them (``"train"``) in the message.
  ``GRADCLIP_JAX_SKIP_VERSION_CHECK=1`` skips the check.

  >>> check("jax", "optax")  # nothing to say when the versions are supported
  """
  if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
    return
  bad = []
  for dist in dists:
    found = installed_version(dist)
    if found is None:
      continue
    v = parse(found)
    if v < parse(MINIMUM[dist]) or (dist in BELOW and v >= parse(BELOW[dist])):
      bad.append((dist, found))
  if not bad:
    return
  wanted = [requirement(d) for d, _ in bad]
  command = " ".join(f'"{w}"' for w in wanted)
  what = f"gradclip_jax[{extra}]" if extra else "gradclip_jax"
  raise ImportError(
      f"{what} needs {', '.join(wanted)}, found "
      f"{', '.join(f'{d} {v}' for d, v in bad)}. Install a tested version with: "
      f"pip install {command} "
      f"(or set {SKIP_ENV}=1 to try this one).")
