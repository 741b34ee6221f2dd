"""The documentation's sources, checked without building the site.

* Every public name (the ``__all__`` of each module the API reference covers) is listed
  in an ``autosummary`` table of that module's generated API page, so it gets its own
  page (``docs/_ext/apigen.py`` writes those pages from ``__all__`` at build time).
* Every page under ``docs/`` is reachable from a toctree, and every guide is a MyST-NB
  text notebook (so its code cells are executed by the build).
* Relative links in ``README.md`` and ``docs/**/*.md`` point to files that exist
  (a removed result file must not stay linked).

The full build (``python -m sphinx -W -b html docs docs/_build/html``) is run by
``.ci/run``.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import apigen  # noqa: E402  pylint: disable=wrong-import-position

FRONT_MATTER = "---\nfile_format: mystnb\nkernelspec:\n  name: python3\n---\n"


def _autosummary_entries(rst: str) -> list[str]:
  """Names listed in the ``.. autosummary::`` blocks of an reST text."""
  names, inside = [], False
  for line in rst.splitlines():
    if line.startswith(".. autosummary::"):
      inside = True
      continue
    if inside:
      if line.startswith("   :") or not line.strip():
        continue
      if line.startswith("   "):
        names.append(line.strip())
      else:
        inside = False
  return names


@pytest.fixture(scope="module")
def api_pages(tmp_path_factory):
  out = tmp_path_factory.mktemp("docs")
  written = apigen.write_pages(out)
  return out / apigen.API_DIR, written


def test_api_covers_the_public_modules(api_pages):
  _, written = api_pages
  for required in ("gradclip_jax", "gradclip_jax.functional", "gradclip_jax.dp",
                   "gradclip_jax.dp.accounting"):
    assert required in written
  index = (api_pages[0] / "index.rst").read_text()
  for modname in written:
    assert f"   {modname}" in index.splitlines()


def _autosummary_blocks(rst: str) -> list[tuple[bool, list[str]]]:
  """``(has_toctree, names)`` of each ``.. autosummary::`` block."""
  blocks = []
  for block in re.split(r"^\.\. autosummary::\n", rst, flags=re.M)[1:]:
    body = block.split("\n\n", 1)
    options, rest = body[0], body[1] if len(body) > 1 else ""
    names = []
    for line in rest.splitlines():
      if not line.startswith("   ") or not line.strip():
        break
      names.append(line.strip())
    blocks.append((":toctree:" in options, names))
  return blocks


def _pages(api_dir) -> dict[str, list[tuple[bool, list[str]]]]:
  return {p.stem: _autosummary_blocks(p.read_text()) for p in api_dir.glob("gradclip_jax*.rst")}


@pytest.mark.parametrize("modname", [m for m, _, _ in apigen.MODULES])
def test_every_public_name_has_an_api_page(api_pages, modname):
  try:
    module = importlib.import_module(modname)
  except ModuleNotFoundError as e:
    if e.name != modname:
      raise
    pytest.skip(f"{modname} does not exist (yet)")
  pages = _pages(api_pages[0])
  page = (api_pages[0] / f"{modname}.rst").read_text()
  names = getattr(module, "__all__", None)
  if names is None:  # a module without __all__: its own public functions and classes
    names = [n for n, v in vars(module).items() if not n.startswith("_")
             and callable(v) and getattr(v, "__module__", None) == modname]
  assert names, f"{modname} has no public names"
  with_page = {f"{m}.{n}" for m, blocks in pages.items() for toc, ns in blocks if toc
               for n in ns}
  for name in names:
    obj = getattr(module, name)
    if isinstance(obj, type(sys)):  # a submodule: linked to its own page
      assert f":doc:`{modname}.{name}`" in page
      assert f"{modname}.{name}" in pages, f"{modname}.{name} is public but has no API page"
      continue
    here = [n for toc, ns in pages[modname] for n in ns]
    if name in here:  # documented here: the entry must generate its page
      assert f"{modname}.{name}" in with_page, f"{modname}.{name} has no page"
    else:  # a re-export: a link to the page of the same object in a submodule
      links = [n[1:] for n in here if n.startswith("~") and n.endswith("." + name)]
      assert links, f"{modname}.{name} is not listed on its API page"
      target = links[0]
      if not target.startswith("gradclip_jax"):  # relative to this module
        target = f"{modname}.{target}"
      assert target in with_page, f"{modname}.{name} links to {target}, which has no page"
      home, _, attr = target.rpartition(".")
      assert getattr(importlib.import_module(home), attr) is obj


def test_reexports_get_one_page(api_pages):
  documented = [f"{m}.{n}" for m, blocks in _pages(api_pages[0]).items()
                for toc, ns in blocks if toc for n in ns]
  objects = {}
  for full in documented:
    home, _, attr = full.rpartition(".")
    obj = getattr(importlib.import_module(home), attr)
    assert id(obj) not in objects, f"{full} and {objects[id(obj)]} are one object, two pages"
    objects[id(obj)] = full


def test_apigen_lists_names_once(api_pages):
  for page in api_pages[0].glob("gradclip_jax*.rst"):
    entries = _autosummary_entries(page.read_text())
    assert len(entries) == len(set(entries)), page.name


def test_the_parser_sees_autosummary_entries():
  rst = (".. autosummary::\n   :toctree: x\n\n   a\n   b\n\nText\n\n"
         ".. autosummary::\n   :nosignatures:\n\n   ~m.c\n")
  assert _autosummary_entries(rst) == ["a", "b", "~m.c"]
  assert _autosummary_blocks(rst) == [(True, ["a", "b"]), (False, ["~m.c"])]


def _toctree_entries(md: str) -> list[str]:
  entries = []
  for block in re.findall(r"```\{toctree\}\n(.*?)```", md, flags=re.S):
    entries += [l.strip() for l in block.splitlines()
                if l.strip() and not l.strip().startswith(":")]
  return entries


def test_every_page_is_in_the_toctree():
  entries = _toctree_entries((DOCS / "index.md").read_text())
  pages = [p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.md")
           if not p.relative_to(DOCS).parts[0].startswith("_")
           and p.relative_to(DOCS).parts[0] not in ("notebooks", "api", "jupyter_execute")
           and p.name != "index.md"]
  assert pages
  for page in pages:
    assert page in entries, f"docs/{page}.md is in no toctree of docs/index.md"
  assert "api/index" in entries and any(e.startswith("notebooks/") for e in entries)


@pytest.mark.parametrize("guide", sorted(p.name for p in (DOCS / "guides").glob("*.md")))
def test_guides_are_executed_text_notebooks(guide):
  text = (DOCS / "guides" / guide).read_text()
  assert text.startswith(FRONT_MATTER), f"{guide} lacks the mystnb front matter"


def _relative_links(md: str) -> list[str]:
  links = re.findall(r"\]\(([^)\s]+)\)", md)
  return [l.split("#")[0] for l in links
          if not re.match(r"^[a-z]+:", l) and not l.startswith("#") and l.split("#")[0]]


@pytest.mark.parametrize("source", ["README.md"] + sorted(
    p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md")
    if not {"_build", "jupyter_execute", "notebooks"} & set(p.relative_to(DOCS).parts)))
def test_relative_links_exist(source):
  path = ROOT / source
  for link in _relative_links(path.read_text()):
    target = (path.parent / link).resolve()
    candidates = [target, target.with_suffix(".md"), target.with_suffix(".ipynb")]
    # docs/notebooks/ holds build-time copies of notebooks/*.ipynb.
    if (DOCS / "notebooks") in target.parents:
      copy = ROOT / "notebooks" / target.relative_to(DOCS / "notebooks")
      candidates += [copy, copy.with_suffix(".ipynb")]
    # docs/api/ is written by the build (apigen): its index and one page per module.
    if (DOCS / apigen.API_DIR) in target.parents:
      generated = ["index"] + [m for m, _, _ in apigen.MODULES]
      candidates += [DOCS / "conf.py"] if target.stem in generated else []
    # A link into the Sphinx site may omit the .md suffix.
    assert any(c.exists() for c in candidates), (
        f"{source} links to {link}, which does not exist")


def test_stale_stubs_are_removed(tmp_path):
  stubs = tmp_path / apigen.API_DIR / apigen.STUB_DIR
  stubs.mkdir(parents=True)
  (stubs / "gradclip_jax.no_longer_public.rst").write_text("stale\n")
  (stubs / "gradclip_jax.clip_by_norm.rst").write_text("kept\n")
  apigen.write_pages(tmp_path)
  assert not (stubs / "gradclip_jax.no_longer_public.rst").exists()
  assert (stubs / "gradclip_jax.clip_by_norm.rst").read_text() == "kept\n"


def _results_mentioned(text: str) -> list[str]:
  """``results/...`` paths in a text, ``{md,json}`` alternatives expanded."""
  found = []
  for m in re.finditer(r"results/([\w.\-]+?)(?:\.\{([\w,]+)\}|\.(\w+))(?=[`)\s,;]|$)", text):
    stem, alts, ext = m.groups()
    found += [f"results/{stem}.{e}" for e in (alts.split(",") if alts else [ext])]
  return found


def test_results_keep_the_latest_run_of_each_benchmark():
  # A result's name is <benchmark>-<device>-<date>[-variant].<ext>: one date per name.
  dates = {}
  for p in (ROOT / "results").iterdir():
    m = re.search(r"\d{4}-\d{2}-\d{2}", p.name)
    assert m, f"results/{p.name} has no date in its name"
    key = p.name[:m.start()] + p.name[m.end():].split(".")[0]
    dates.setdefault(key, set()).add(m.group())
  stale = {k: sorted(v) for k, v in dates.items() if len(v) > 1}
  assert not stale, f"results/ keeps older runs of {stale}: keep the latest only"


def test_results_mentioned_exist():
  sources = [ROOT / "README.md"] + [p for p in DOCS.rglob("*.md")
                                    if "_build" not in p.parts and "jupyter_execute" not in p.parts]
  mentioned = {(s.relative_to(ROOT).as_posix(), r) for s in sources
               for r in _results_mentioned(s.read_text())}
  assert mentioned, "the docs cite no result file"
  for source, path in sorted(mentioned):
    if "<" in path:  # a pattern such as results/dp_cost-<device>-<date>
      continue
    assert (ROOT / path).exists(), f"{source} cites {path}, which is not in results/"


def test_results_paths_are_parsed():
  text = "`results/a-cpu-2026-01-01.{md,json}` and `results/b.jsonl`."
  assert _results_mentioned(text) == ["results/a-cpu-2026-01-01.md",
                                      "results/a-cpu-2026-01-01.json", "results/b.jsonl"]
