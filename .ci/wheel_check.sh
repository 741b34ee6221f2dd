#!/usr/bin/env bash
# CI: the release artifacts, built and used as a user would use them.
#
#   1. `python -m build` makes the sdist, then the wheel from the unpacked sdist (a file
#      missing from the sdist is missing from the wheel too); `twine check --strict`
#      checks both.
#   2. The wheel's files: every module of the source tree and py.typed, and nothing
#      else (no tests, notebooks, benchmarks, results, docs or data).
#   3. A fresh virtual environment OUTSIDE the checkout installs the wheel (with the
#      dependencies its metadata names, nothing else) and, from a folder outside the
#      checkout, runs the README's quickstart and `gradclip --help`; `gradclip ptb`
#      without the [train] extra must say which extra to install.
#
# Everything happens in a temporary folder, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SECONDS=0
work=$(mktemp -d "${TMPDIR:-/tmp}/gradclip-wheel-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }

# 1. Build and check.
python3 -m venv "$work/tools"
"$work/tools/bin/pip" install -q build twine 2>&1 | quiet
"$work/tools/bin/python" -m build --outdir "$work/dist" . > "$work/build.log" 2>&1 \
  || { cat "$work/build.log"; exit 1; }
"$work/tools/bin/twine" check --strict "$work"/dist/*
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)
echo "ci: built $(basename "$sdist") and $(basename "$wheel") in ${SECONDS} s"

# 2. The wheel's files against the source tree.
python3 - "$wheel" <<'EOF'
import pathlib, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
package = sorted(n for n in names if not n.split("/")[0].endswith(".dist-info"))
source = sorted(str(p.as_posix()) for p in pathlib.Path("gradclip_jax").rglob("*.py")
                if "__pycache__" not in p.parts)
missing = sorted(set(source) - set(package))
assert not missing, f"modules missing from the wheel: {missing}"
assert "gradclip_jax/py.typed" in package, "py.typed missing from the wheel"
extra = sorted(set(package) - set(source) - {"gradclip_jax/py.typed"})
assert not extra, f"files in the wheel that are not the package's modules: {extra}"
print(f"ci: the wheel holds the {len(source)} modules of gradclip_jax/ and py.typed, "
      "nothing else")
EOF

# 3. A user's environment, outside the checkout.
python3 -m venv "$work/user"
"$work/user/bin/pip" install -q "$wheel" 2>&1 | quiet
mkdir "$work/run" && cd "$work/run"
# The README's quickstart: the first ```python block after "## Quickstart". Its last
# line prints a value and says it in a comment ("# 24.494898, ..."): both must agree.
python3 - "$REPO/README.md" > quickstart.py <<'EOF'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
section = text[text.index("\n## Quickstart"):]
print(re.search(r"```python\n(.*?)```", section, re.S).group(1), end="")
EOF
expected=$(grep -oE '^print\(.*\) *# *[-0-9.e]+' quickstart.py | tail -1 | sed -E 's/.*# *//')
got=$("$work/user/bin/python" quickstart.py | tail -1)
echo "ci: README quickstart printed ${got} (README says ${expected})"
[ -n "$expected" ] && [ "$got" = "$expected" ] || { echo "quickstart output differs"; exit 1; }
"$work/user/bin/python" - "$wheel" "$work/user" <<'EOF'
import pathlib, sys
import gradclip_jax
where = pathlib.Path(gradclip_jax.__file__).resolve()
assert pathlib.Path(sys.argv[2]).resolve() in where.parents, f"imported from {where}"
version = pathlib.Path(sys.argv[1]).name.split("-")[1]
assert gradclip_jax.__version__ == version, (gradclip_jax.__version__, version)
print(f"ci: gradclip_jax {version} imports from the wheel's install ({where.parent})")
EOF
"$work/user/bin/gradclip" --help > help.txt
grep -q "ptb" help.txt && grep -q "classify" help.txt
status=0
"$work/user/bin/gradclip" ptb --help > /dev/null 2> ptb.txt || status=$?
[ "$status" = 2 ] && grep -q 'gradclip_jax\[train\]' ptb.txt \
  || { echo "gradclip ptb without [train]: status $status"; cat ptb.txt; exit 1; }
echo "ci: gradclip --help works; gradclip ptb without [train] says: $(cat ptb.txt)"
echo "ci: wheel check passed in ${SECONDS} s"
