"""Memory traffic of each rule's compiled GPU program, counted without a GPU.

A clip is memory-bound: on a GPU its time follows the bytes its kernels move and, for
small leaves, the number of kernels it launches. XLA can compile for a GPU it does not
have ("deviceless" compilation): given a target description, the CUDA plugin builds
the optimized HLO module, fusion decisions included, on any host. This script compiles

* each standalone rule (``benchmarks/run.py``'s list, threshold passed at run time,
  gradient donated) on the trees of ``run.py`` in float32 and bfloat16, next to the
  in-place copy ``g * t`` (the bandwidth limit) and Optax's rules;
* each ``rule + adam`` step of ``benchmarks/clip_overhead.py`` (params and state
  donated) next to adam alone;

and counts, for every kernel of the module's entry computation, the bytes of its
operands (read) and of its results (written). That is a model, not a timing: it
assumes every operand is read once in full and every result written once, and it
knows nothing of caches. What it shows exactly is where XLA inserts a defensive copy,
materialises an intermediate, or splits a pass in two, which are the differences that
decide a memory-bound kernel's speed. Timings need a device: ``benchmarks/run.py``.

Needs the CUDA plugin (``pip install "jax[cuda12]"``, same version as jaxlib; in a
separate virtual environment on a machine without a GPU, where the plugin would only
print warnings at every import). On a host with a GPU the local device is the target;
elsewhere ``--target`` names a ``GpuTargetConfig`` text proto (``h100.txtpb`` beside
this script: an H100 SXM's published figures, sm_90, 132 SMs, 50 MB L2).

    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 \\
        python benchmarks/gpu_traffic.py [--quick] [--json results/gpu-traffic.json]

On this project's CPU machine (jax 0.10.2 with jax-cuda12-plugin 0.10.2, 2026-11-27),
the one 25M-entry f32 leaf: copy 200 MB; ``optax.clip`` 200 MB in 1 kernel; our
``clip_by_value`` 300 MB before its GPU form (max/min reductions, then a selected
write) and 200 MB after (the clip and its ``any`` fused into one kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_overhead  # noqa: E402  (benchmarks/clip_overhead.py)
import run as suite  # noqa: E402  (benchmarks/run.py)

_HERE = os.path.dirname(os.path.abspath(__file__))
_ITEMSIZE = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4,
             "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
# Instructions that launch no kernel and move no data.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "opt-barrier", "optimization-barrier"}


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


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string such as ``(f32[], bf16[1024,64]{1,0})``."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _ITEMSIZE.get(dtype, 0)
  return total


_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*?)\)(.*)$")


def kernels(hlo_text: str) -> list:
  """``[(name, opcode, bytes read, bytes written)]`` for the entry computation."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  shapes, rows = {}, []
  for line in entry.splitlines()[1:]:
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, op, args, _ = m.groups()
    shapes[name] = shape
    if op in _FREE:
      continue
    read = sum(shape_bytes(shapes.get(o, "")) for o in re.findall(r"%([\w.\-]+)", args))
    rows.append((name, op, read, shape_bytes(shape)))
  return rows


def summary(compiled) -> dict:
  rows = kernels(compiled.as_text())
  return {"kernels": len(rows),
          "read_mb": sum(r[2] for r in rows) / 1e6,
          "write_mb": sum(r[3] for r in rows) / 1e6}


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


def fused_step(device, dtype) -> dict:
  """name -> traffic of ``p, s = step(p, s, g)`` with params and state donated."""
  params = jax.eval_shape(lambda: clip_overhead.make_tree("25M", jnp.dtype(dtype)))
  out = {}
  for name, make in clip_overhead.optimizers(adaptive=True).items():
    tx = make()

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    state = jax.eval_shape(tx.init, params)
    out[name] = summary(_compile(step, _on(device, (params, state, params)), donate=(0, 1)))
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


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--target", default=os.path.join(_HERE, "h100.txtpb"),
                  help="GpuTargetConfig text proto, used when no GPU is attached")
  ap.add_argument("--quick", action="store_true", help="one-leaf f32 standalone only")
  ap.add_argument("--json", help="also write the numbers to this file")
  args = ap.parse_args(argv)
  device = gpu_device(args.target)
  print(f"# Memory traffic of the compiled GPU programs ({device.device_kind}; "
        f"jax {jax.__version__}, optax {optax.__version__})\n")
  result = {"device": device.device_kind, "jax": jax.__version__, "standalone": {},
            "fused_step": {}}
  shapes = ["one 25M leaf"] if args.quick else ["one 25M leaf", "transformer 25M",
                                               "1000 small leaves"]
  for dtype in (["float32"] if args.quick else ["float32", "bfloat16"]):
    for shape in shapes:
      rows = standalone(device, shape, dtype)
      result["standalone"][f"{shape}, {dtype}"] = rows
      print(f"## Standalone clip, {shape}, {dtype}\n\n{table(rows, suite.COPY, 'rule')}\n",
            flush=True)
    if not args.quick:
      rows = fused_step(device, dtype)
      result["fused_step"][dtype] = rows
      print(f"## Rule + adam step, 25M tree, {dtype}\n\n"
            f"{table(rows, 'adam alone', 'optimizer')}\n", flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
