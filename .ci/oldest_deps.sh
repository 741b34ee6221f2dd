#!/usr/bin/env bash
# CI: the version-sensitive tests against the oldest versions gradclip_jax claims
# (gradclip_jax/_compat.py MINIMUM, which pyproject.toml repeats and
# tests/test_packaging.py keeps equal), in a fresh virtual environment of their own
# (a temporary folder, removed at the end). The rest of .ci/run uses the newest versions.
#
#   bash .ci/oldest_deps.sh                      # the selection below (CI)
#   bash .ci/oldest_deps.sh tests/test_dp.py ... # any pytest arguments instead
#
# The selection covers what differs between the releases of our dependencies and broke
# (or would break) us on older ones: the ghost engine's reading of jaxprs
# (jax.extend.core; Linen remat/scan, NNX, Equinox, custom_vjp), the backend
# workarounds whose results must be bit-identical with the tuning off and the bf16
# fusion guard (XLA:CPU's decisions), the float64 contract (jax.enable_x64), the sharded
# norms (GSPMD, shard_map), Optax's wrappers and flax.nnx.Optimizer, the docstring
# examples of the public API. Measured: see the commit that last changed this list.
set -euo pipefail
cd "$(dirname "$0")/.."
export CI="${CI:-true}"
SECONDS=0
work=$(mktemp -d "${TMPDIR:-/tmp}/gradclip-oldest.XXXXXX")
trap 'rm -rf "$work"' EXIT
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"

# dist==version for each floor, read from the package's source without importing it.
python - > "$work/constraints.txt" <<'PY'
import ast, pathlib
tree = ast.parse(pathlib.Path("gradclip_jax/_compat.py").read_text())
node = next(n for n in tree.body if isinstance(n, ast.Assign)
            and [ast.unparse(t) for t in n.targets] == ["MINIMUM"])
for dist, version in ast.literal_eval(node.value).items():
  print(f"{dist}=={version}")
PY
# The library with the trainers' extra, and the test tools (not the notebooks' or docs').
pip install -q -e ".[train]" chex equinox pytest hypothesis \
  -c "$work/constraints.txt" 2>&1 | quiet
python - "$work/constraints.txt" <<'PY'
import importlib.metadata as md, sys
pins = dict(line.strip().split("==") for line in open(sys.argv[1]) if line.strip())
got = {d: md.version(d) for d in pins}
assert got == pins, f"the oldest-deps environment has {got}, not {pins}"
print("ci: oldest deps:", ", ".join(f"{d} {v}" for d, v in got.items()),
      f"(Python {sys.version.split()[0]})")
PY
echo "ci: oldest deps environment ready in ${SECONDS} s"

SECONDS=0
if [ "$#" -gt 0 ]; then
  pytest -q -p no:cacheprovider "$@"
else
  ghost=tests/test_ghost_models.py::test_exact_against_vmap
  prec=tests/test_precision_contract.py
  # -k: the bit-identity check in float32 only (one compile for every rule; the
  # float16/bfloat16 ones take as long again each and failed on the same JAX releases).
  pytest -q -p no:cacheprovider -k "not bit_identical_results or float32" \
    "$ghost[tied_lm]" "$ghost[plain_jax]" "$ghost[nnx_mlp]" "$ghost[custom_vjp]" \
    "$ghost[shared_input]" "$ghost[equinox]" "$ghost[lstm]" \
    tests/test_dp.py::test_coverage_report "tests/test_dp.py::test_ghost_matches_vmap[mixed]" \
    tests/test_dp.py::PerExampleClipTest::test_float64_under_x64 \
    tests/test_tuning.py::test_tuning_off_gives_bit_identical_results \
    tests/test_adaptive.py::test_step_writes_no_float32_copy_of_bf16_leaves \
    tests/test_many_leaves.py::FewKernelsTest \
    tests/test_numerics.py::test_float64_keeps_float64_at_1e_minus_200_and_1e200 \
    $prec::test_global_norm_float64_property $prec::test_clip_by_global_norm_float64 \
    $prec::test_mixed_float32_float64_tree $prec::test_float64_nonfinite_policies_keep_float64 \
    tests/test_sharding.py tests/test_composition.py tests/test_doctests.py
fi
echo "ci: oldest deps tests passed in ${SECONDS} s"
