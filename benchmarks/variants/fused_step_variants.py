"""Fused clip + adam step on the 25M tree: cond / fused overflow check x barrier.

The library's ``clip_by_global_norm`` compiled with ``_norms.overflow_guarded`` and
``_norms.scale_leaves`` patched, against adam alone and Optax's clip, timed as
``clip_overhead.time_steps`` does off CPU (rounds of 10 chained calls). Run on the H100
on 2026-11-26 (results/gpu-H100-2026-11-26-fused-step-variants.log). On CPU the
library's own branch is the ``cond`` one, so there the first and third rows agree.

    python benchmarks/variants/fused_step_variants.py [repeats [inner]]
"""
import statistics, sys, time, os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax, jax.numpy as jnp, optax
from jax import lax
import gradclip_jax
from gradclip_jax import _norms
import clip_overhead

orig_guard, orig_scale = _norms.overflow_guarded, _norms.scale_leaves

def scale_nobarrier(leaves, scales):
  leaves = list(leaves)
  if not isinstance(scales, (list, tuple)):
    scales = [scales] * len(leaves)
  return [_norms.apply_scale(x, s) for x, s in zip(leaves, scales)]

PATCHES = {
  "fused+barrier (lib)": (orig_guard, orig_scale),
  "fused+nobarrier": (orig_guard, scale_nobarrier),
  "cond+barrier": (lambda l, c, f: c(l), orig_scale),
  "cond+nobarrier": (lambda l, c, f: c(l), scale_nobarrier),
}

def main(repeats=9, inner=10):
  print(jax.devices(), flush=True)
  adam = lambda: optax.adam(1e-3)
  for dtype in (jnp.float32, jnp.bfloat16):
    entries = {}
    entries["adam alone"] = clip_overhead._compiled_step(adam, "25M", dtype)
    entries["optax"] = clip_overhead._compiled_step(
        lambda: optax.chain(optax.clip_by_global_norm(1.0), adam()), "25M", dtype)
    for name, (g, s) in PATCHES.items():
      _norms.overflow_guarded, _norms.scale_leaves = g, s
      jax.clear_caches()
      entries[name] = clip_overhead._compiled_step(
          lambda: optax.chain(gradclip_jax.clip_by_global_norm(1.0), adam()), "25M", dtype)
      _norms.overflow_guarded, _norms.scale_leaves = orig_guard, orig_scale
    for e in entries.values():
      for _ in range(3):
        e[1], e[2] = e[0](e[1], e[2], e[3])
      jax.block_until_ready((e[1], e[2]))
    times = {n: [] for n in entries}
    for _ in range(repeats):
      for n, e in entries.items():
        e[1], e[2] = e[0](e[1], e[2], e[3]); jax.block_until_ready((e[1], e[2]))
        t0 = time.perf_counter()
        for _ in range(inner):
          e[1], e[2] = e[0](e[1], e[2], e[3])
        jax.block_until_ready((e[1], e[2]))
        times[n].append((time.perf_counter() - t0) / inner)
    base = times["adam alone"]
    for n, ts in times.items():
      r = statistics.median(t / b for t, b in zip(ts, base))
      print(f"{jnp.dtype(dtype).name:8} {n:22} {statistics.median(ts)*1e3:7.3f} ms  ratio {r:5.3f}", flush=True)

if __name__ == "__main__":
  main(*(int(a) for a in sys.argv[1:]))
