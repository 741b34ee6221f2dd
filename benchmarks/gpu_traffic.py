"""Memory traffic of each rule's compiled GPU program, counted without a GPU.

A clip is memory-bound: on a GPU its time follows the bytes its kernels move and, for
small leaves, the number of kernels it launches. XLA can compile for a GPU it does not
have ("deviceless" compilation): given a target description, the CUDA plugin builds
the optimized HLO module, fusion decisions included, on any host. This script compiles

* each standalone rule (``benchmarks/run.py``'s list, threshold passed at run time,
  gradient donated) on the trees of ``run.py`` in float32 and bfloat16, next to the
  in-place copy ``g * t`` (the bandwidth limit) and Optax's rules;
* each ``rule + adam`` step (``compiled_programs.step_optimizers``: the 25M tree of
  ``clip_overhead.py`` in float32, float32 or bfloat16 gradients, params and state
  donated) next to adam alone and Optax's rules, as ``tpu_programs.py`` compiles it
  for a TPU;

and counts, for every kernel of the module's entry computation, the bytes of its
operands (read) and of its results (written) (``compiled_programs.kernels``, shared
with the TPU script). That is a model, not a timing: it assumes every operand is read
once in full and every result written once, and it knows nothing of caches. What it
shows exactly is where XLA inserts a defensive copy, materialises an intermediate, or
splits a pass in two, which are the differences that decide a memory-bound kernel's
speed. Timings need a device: ``benchmarks/run.py``. ``--ab-workarounds`` compiles the
AGC step again with the GPU workaround ``gpu_column_pairs`` off (the same-run evidence
that keeps it).

Needs the CUDA plugin at jax's version (``pip install
"jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"``; in a separate
virtual environment on a machine without a GPU, where the plugin would only print
warnings at every import). On a host with a GPU the local device is the target;
elsewhere ``--target`` names a ``GpuTargetConfig`` text proto (``h100.txtpb`` beside
this script: an H100 SXM's published figures, sm_90, 132 SMs, 50 MB L2).

    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 \\
        python benchmarks/gpu_traffic.py [--quick] [--fused-only] [--ab-workarounds] \\
        [--json FILE.json] [--md FILE.md]

On this project's CPU machine (jax 0.10.2 with jax-cuda12-plugin 0.10.2, 2026-11-27),
the one 25M-entry f32 leaf: copy 200 MB; ``optax.clip`` 200 MB in 1 kernel; our
``clip_by_value`` 300 MB before its GPU form (max/min reductions, then a selected
write) and 200 MB after (the clip and its hit flag fused into one kernel).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compiled_programs as cp  # noqa: E402  (benchmarks/compiled_programs.py)
import run as suite  # noqa: E402  (benchmarks/run.py)

from gradclip_jax import config  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
# The traffic model lives in compiled_programs (shared with tpu_programs.py).
kernels = cp.kernels
shape_bytes = cp.shape_bytes
summary = cp.summary


def gpu_device(target: str):
  """The local GPU if there is one, else a compile-only H100 (or ``target``)."""
  try:
    return jax.devices("cuda")[0]
  except RuntimeError:
    pass
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    with open(target, encoding="utf-8") as f:
      config = f.read()
  except OSError as e:
    raise SystemExit(f"gpu_traffic: cannot read the GPU target file {target!r}: {e}")
  try:
    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                        target_config=config)
  except NotImplementedError as e:
    raise SystemExit(
        "gpu_traffic: the CUDA plugin is not loaded. Install jax[cuda12] at jaxlib's "
        "version and run with JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 on a host without a "
        f"GPU ({e})")
  return topo.devices[0]


def _on(device, tree):
  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      tree)


def _compile(fn, args, donate):
  return jax.jit(fn, donate_argnums=donate).trace(*args).lower(
      lowering_platforms=("cuda",)).compile()


def standalone(device, shape, dtype) -> dict:
  """name -> traffic of one ``tx.update`` on a donated gradient tree."""
  grads = jax.eval_shape(lambda: suite.tree_of(shape, jnp.dtype(dtype)))
  out = {}
  rules = {suite.COPY: (suite._copy_tx, 1.0), **suite.standalone_rules()}  # pylint: disable=protected-access
  # The threshold in the gradients' dtype, as in run.py (Optax's clip_by_global_norm
  # fails on a float32 threshold with bfloat16 gradients).
  t = jax.ShapeDtypeStruct((), jnp.dtype(dtype))
  for name, (make, t0) in rules.items():

    def update(g, s, p, t, make=make, t0=t0):
      tx = make(t) if t0 is not None else make(None)
      return tx.update(g, s, p)

    tx0 = make(jnp.ones((), dtype)) if t0 is not None else make(None)
    state = jax.eval_shape(tx0.init, grads)
    # The parameters (AGC reads them) are a separate, undonated tree, as in run.py.
    out[name] = summary(_compile(update, _on(device, (grads, state, grads, t)),
                                 donate=(0,)))
  return out


def fused_step(device, dtype, names=None) -> dict:
  """name -> traffic of ``p, s = step(p, s, g)``: f32 params, ``dtype`` gradients."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  makers = cp.step_optimizers()
  out = {}
  for name in names or makers:
    out[name] = cp.summary(cp.compile_step(makers[name], dtype, lambda x: sharding,
                                           "cuda"))
  return out


def workaround_ab(device, dtype) -> dict:
  """The AGC + adam step with the GPU workaround on and off (and adam alone)."""
  out = fused_step(device, dtype, ["adam alone", "adaptive_grad_clip"])
  with config.backend_tuning_set(True, disabled=["gpu_column_pairs"]):
    jax.clear_caches()
    out["adaptive_grad_clip, gpu_column_pairs off"] = fused_step(
        device, dtype, ["adaptive_grad_clip"])["adaptive_grad_clip"]
  jax.clear_caches()
  return out


def table(rows: dict, base: str, label: str) -> str:
  lines = [f"| {label} | kernels | read MB | written MB | total / {base} |",
           "|---|---:|---:|---:|---:|"]
  ref = rows[base]["read_mb"] + rows[base]["write_mb"]
  for name, r in rows.items():
    tot = r["read_mb"] + r["write_mb"]
    lines.append(f"| {name} | {r['kernels']} | {r['read_mb']:.0f} | {r['write_mb']:.0f} "
                 f"| {tot / ref:.2f} |")
  return "\n".join(lines)


def fused_table(rows: dict, dtype: str) -> str:
  """The fused steps over adam alone, with the issue's limits and Optax's rules."""
  rows = cp.ratio_rows(rows)
  lines = ["| optimizer | kernels | HBM MB | / adam alone | limit | temp MB |",
           "|---|---:|---:|---:|---|---:|"]
  for name, r in rows.items():
    temp = "" if r["temp_mb"] is None else f"{r['temp_mb']:.1f}"
    lines.append(f"| {name} | {r['kernels']} | {r['hbm_mb']:.0f} | "
                 f"{r['hbm_ratio']:.3f} | {cp.verdict(name, rows, dtype)} | {temp} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--target", default=os.path.join(_HERE, "h100.txtpb"),
                  help="GpuTargetConfig text proto, used when no GPU is attached")
  ap.add_argument("--quick", action="store_true", help="one-leaf f32 standalone only")
  ap.add_argument("--fused-only", action="store_true",
                  help="only the rule + adam steps (and the workaround A/B)")
  ap.add_argument("--ab-workarounds", action="store_true",
                  help="also the AGC step with the GPU workaround off")
  ap.add_argument("--json", help="also write the numbers to this file")
  ap.add_argument("--md", help="also write the markdown report to this file")
  args = ap.parse_args(argv)
  device = gpu_device(args.target)
  versions = cp.versions("jaxlib", "jax-cuda12-plugin")
  head = (f"# Memory traffic of the compiled GPU programs ({device.device_kind})\n\n"
          f"{cp.run_info('gpu_traffic.py', argv, versions)}\n")
  report = cp.Report(head)
  result = {"device": device.device_kind, "versions": versions, "standalone": {},
            "fused_step": {}, "workaround_ab": {}}
  shapes = ["one 25M leaf"] if args.quick else ["one 25M leaf", "transformer 25M",
                                               "1000 small leaves"]
  for dtype in (["float32"] if args.quick else ["float32", "bfloat16"]):
    if not args.fused_only:
      for shape in shapes:
        rows = standalone(device, shape, dtype)
        result["standalone"][f"{shape}, {dtype}"] = rows
        section = (f"## Standalone clip, {shape}, {dtype}\n\n"
                   f"{table(rows, suite.COPY, 'rule')}\n")
        report.add(section)
    if args.quick:
      continue
    rows = fused_step(device, dtype)
    result["fused_step"][dtype] = rows
    section = (f"## Rule + adam step, 25M float32 tree, {dtype} gradients\n\n"
               f"{fused_table(rows, dtype)}\n")
    report.add(section)
    if args.ab_workarounds:
      rows = workaround_ab(device, dtype)
      result["workaround_ab"][dtype] = rows
      section = (f"## GPU workaround gpu_column_pairs on and off, {dtype} gradients\n\n"
                 f"{fused_table(rows, dtype)}\n")
      report.add(section)
  report.write(result, args.json, args.md)


if __name__ == "__main__":
  main()
