#!/usr/bin/env bash
# Installs libtpu into the active Python environment, at the version that goes with the
# installed jax ("jax[tpu]==<jax's version>"), so that tests/test_tpu_compile.py compiles
# every rule for a TPU topology on this CPU machine (libtpu compiles ahead of time; no
# TPU is needed). Run it after the package is installed:
#
#     bash .ci/tpu_setup.sh
#
# The test suite runs with JAX_PLATFORMS=cpu (tests/conftest.py), so libtpu is loaded
# only by the TPU compile test.
set -euo pipefail
JAX_VERSION=$(python -c "import jax; print(jax.__version__)")
python -m pip install -q "jax[tpu]==${JAX_VERSION}"
python - <<'PY'
import importlib.metadata as md
print(f"tpu_setup: jax {md.version('jax')}, libtpu {md.version('libtpu')}")
PY
