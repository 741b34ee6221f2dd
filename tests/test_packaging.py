"""The release artifacts and the version: what a user installs is what the tests test.

* The wheel, built once per session from a copy of the package's sources
  (``setuptools.build_meta``, as ``python -m build`` does), holds every module of the
  source tree (and of ``pkgutil.walk_packages``) and ``py.typed``, and nothing else.
* One version: the wheel's, ``gradclip_jax.__version__`` and the docs' agree, and the
  CHANGELOG has a dated section per release, newest first.
* The dependency floors in ``pyproject.toml`` are those of ``gradclip_jax._compat``,
  and an older JAX or Optax is an ``ImportError`` naming the version needed.

``.ci/wheel_check.sh`` goes further (sdist, ``twine check``, a fresh environment outside
the checkout running the README's quickstart).
"""

from __future__ import annotations

import doctest
import email.parser
import os
import pathlib
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import gradclip_jax
from gradclip_jax import _compat

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradclip_jax"
# What the sdist holds (MANIFEST.in) and the wheel is built from.
BUILD_INPUTS = ("gradclip_jax", "pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md",
                "MANIFEST.in")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> pathlib.Path:
  """The wheel built from a clean copy of the sources (no stale ``build/``)."""
  src = tmp_path_factory.mktemp("wheel_src")
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in BUILD_INPUTS:
    path = ROOT / name
    if path.is_dir():
      shutil.copytree(path, src / name, ignore=ignore)
    else:
      shutil.copy2(path, src / name)
  out = tmp_path_factory.mktemp("wheel_out")
  done = subprocess.run(
      [sys.executable, "-c",
       "import sys; from setuptools import build_meta; "
       "print(build_meta.build_wheel(sys.argv[1]))", str(out)],
      cwd=src, capture_output=True, text=True, check=False, timeout=300)
  assert done.returncode == 0, (
      "building the wheel failed (the [test] extra installs setuptools>=77):\n"
      + done.stdout[-3000:] + done.stderr[-3000:])
  return out / done.stdout.strip().splitlines()[-1]


def _package_files(wheel_path: pathlib.Path) -> set[str]:
  names = zipfile.ZipFile(wheel_path).namelist()
  return {n for n in names if not n.split("/")[0].endswith(".dist-info")}


def _metadata(wheel_path: pathlib.Path):
  with zipfile.ZipFile(wheel_path) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    return email.parser.Parser().parsestr(z.read(name).decode())


def _source_modules() -> set[str]:
  return {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
          if "__pycache__" not in p.parts}


def test_wheel_holds_every_module_of_the_source_tree(wheel):
  files = _package_files(wheel)
  missing = sorted(_source_modules() - files)
  assert not missing, f"modules missing from the wheel: {missing}"
  assert "gradclip_jax/py.typed" in files


def test_wheel_holds_every_module_pkgutil_finds(wheel):
  files = _package_files(wheel)
  found = list(pkgutil.walk_packages(gradclip_jax.__path__, "gradclip_jax."))
  assert len(found) > 30, found  # the walk reached the subpackages
  for module in found:
    rel = module.name.replace(".", "/")
    expected = f"{rel}/__init__.py" if module.ispkg else f"{rel}.py"
    assert expected in files, f"{module.name} ({expected}) is not in the wheel"


def test_wheel_holds_nothing_but_the_package(wheel):
  files = _package_files(wheel)
  extra = sorted(files - _source_modules() - {"gradclip_jax/py.typed"})
  assert not extra, f"files in the wheel that are not modules of the package: {extra}"
  assert all(f.startswith("gradclip_jax/") for f in files), sorted(files)


def test_one_version_for_the_wheel_the_package_and_the_docs(wheel):
  meta = _metadata(wheel)
  assert meta["Version"] == gradclip_jax.__version__
  assert wheel.name.startswith(f"gradclip_jax-{gradclip_jax.__version__}-")
  conf = (ROOT / "docs" / "conf.py").read_text()
  assert re.search(r"^release = gradclip_jax\.__version__$", conf, re.M), (
      "docs/conf.py must take its release from gradclip_jax.__version__")
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" not in pyproject["project"]
  assert pyproject["project"]["dynamic"] == ["version"]


def test_wheel_metadata_states_the_floors(wheel):
  meta = _metadata(wheel)
  requires = [r.split(";")[0].replace(" ", "") for r in meta.get_all("Requires-Dist")]
  for dist in _compat.MINIMUM:
    ranges = {",".join(sorted(r[len(dist):].split(","))) for r in requires
              if re.match(rf"{re.escape(dist)}[<>=]", r)}
    want = ",".join(sorted(_compat.requirement(dist)[len(dist):].split(",")))
    assert ranges == {want}, (
        f"the wheel requires {dist}{ranges}, gradclip_jax._compat says {want}")
  assert meta["Requires-Python"] == ">=3.11"
  classifiers = meta.get_all("Classifier")
  assert "Programming Language :: Python :: 3.11" in classifiers
  assert "Programming Language :: Python :: 3.10" not in classifiers  # JAX 0.10: 3.11+
  urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
  assert {"Source", "Issues", "Changelog", "Documentation"} <= set(urls)


def test_changelog_has_a_dated_section_per_release():
  text = (ROOT / "CHANGELOG.md").read_text()
  heads = re.findall(r"^## \[([^\]]+)\](.*)$", text, re.M)
  assert heads and heads[0] == ("Unreleased", ""), heads[:1]
  releases = heads[1:]
  assert releases, "no released version in CHANGELOG.md"
  versions, dates = [], []
  for version, rest in releases:
    m = re.fullmatch(r" - (\d{4}-\d{2}-\d{2})", rest)
    assert m, f"## [{version}] needs ' - YYYY-MM-DD' after it, got {rest!r}"
    versions.append(_compat.parse(version))
    dates.append(m.group(1))
  assert versions == sorted(versions, reverse=True), "releases must be newest first"
  assert dates == sorted(dates, reverse=True), "release dates must be newest first"
  for version, _ in heads:  # each heading links to its diff or tag
    assert re.search(rf"^\[{re.escape(version)}\]: https://", text, re.M), version
  # A development version is ahead of every release; a release has its section.
  current = gradclip_jax.__version__
  if ".dev" in current:
    assert _compat.parse(current) > versions[0], (current, releases[0])
  else:
    assert releases[0][0] == current, (
        f"__version__ is {current} but the newest CHANGELOG section is {releases[0][0]}")


def test_pyproject_ranges_are_compat_ranges():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  requires = project["dependencies"] + project["optional-dependencies"]["train"]
  stated = {re.match(r"[\w.-]+", r).group(0): r for r in requires}
  assert {d: stated.get(d) for d in _compat.MINIMUM} == {
      d: _compat.requirement(d) for d in _compat.MINIMUM}


def test_compat_examples():
  result = doctest.testmod(_compat)
  assert result.attempted > 0 and result.failed == 0


def test_compat_check_names_the_version_needed(monkeypatch):
  found = {"jax": "0.9.2", "jaxlib": "0.9.2", "optax": _compat.MINIMUM["optax"]}
  monkeypatch.setattr(_compat, "installed_version", found.get)
  with pytest.raises(ImportError) as e:
    _compat.check("jax", "jaxlib", "optax")
  msg = str(e.value)
  assert f"needs jax>={_compat.MINIMUM['jax']}" in msg and "found jax 0.9.2" in msg
  assert f'pip install "{_compat.requirement("jax")}"' in msg
  assert "optax" not in msg  # a supported Optax is not named
  monkeypatch.setattr(_compat, "installed_version", {"flax": "0.11.0"}.get)
  with pytest.raises(ImportError, match=r"^gradclip_jax\[train\] needs flax>="):
    _compat.check("flax", extra="train")
  # JAX 0.13 and later: above the tested range.
  monkeypatch.setattr(_compat, "installed_version", {"jax": "0.13.0"}.get)
  with pytest.raises(ImportError, match=r"needs jax>=0\.10\.2,<0\.13\.0, found jax 0\.13\.0"):
    _compat.check("jax")
  monkeypatch.setenv(_compat.SKIP_ENV, "1")
  _compat.check("jax")  # skipped on request
  monkeypatch.setattr(_compat, "installed_version", lambda dist: None)
  _compat.check("jax", "flax")  # not installed: left to the import that needs it


def test_import_with_an_old_jax_is_a_clear_import_error(tmp_path):
  """``import gradclip_jax`` where the installed JAX says 0.4.35: the package's own
  check, before anything reads a newer JAX API."""
  info = tmp_path / "jax-0.4.35.dist-info"
  info.mkdir()
  (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jax\nVersion: 0.4.35\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run([sys.executable, "-c", "import gradclip_jax"], env=env,
                        capture_output=True, text=True, check=False, timeout=120)
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("ImportError: gradclip_jax needs jax>="), done.stderr[-2000:]
  assert "found jax 0.4.35" in last
