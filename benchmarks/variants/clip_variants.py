"""Global-norm clip variants on one 25M leaf: overflow check (cond / fused) x barrier.

Run on the H100 on 2026-11-26 (results/gpu-H100-2026-11-26-clip-variants.log) to choose
how ``_norms.overflow_guarded`` should handle the float32-overflow rescue off CPU.
Each variant is timed two ways: "piped" (a repeat is ``inner`` chained calls and one
``block_until_ready``) and "per-call" (a sync after every call).

    python benchmarks/variants/clip_variants.py [inner [repeats [out.json]]]
"""
import functools, statistics, sys, time, json
import jax, jax.numpy as jnp, optax
from jax import lax
import gradclip_jax
import gradclip_jax.functional
from gradclip_jax import _norms

DOWN, UP = 2.0 ** -64, 2.0 ** 64

def sq(x): x = x.astype(jnp.float32); return x * x

def norm_plain(leaves):
  return jnp.sqrt(sum(jnp.sum(sq(x)) for x in leaves))

def norm_cond(leaves):
  s = sum(jnp.sum(sq(x)) for x in leaves)
  def rescue(ls):
    return UP * jnp.sqrt(sum(jnp.sum(sq(jnp.abs(x.astype(jnp.float32)) * DOWN)) for x in ls))
  return lax.cond(jnp.isposinf(s), rescue, lambda ls: jnp.sqrt(s), leaves)

def norm_fused(leaves):
  s = sum(jnp.sum(sq(x)) for x in leaves)
  t = sum(jnp.sum(sq(jnp.abs(x.astype(jnp.float32)) * DOWN)) for x in leaves)
  return jnp.where(jnp.isposinf(s), UP * jnp.sqrt(t), jnp.sqrt(s))

def scale_plain(leaves, s):
  return [jnp.where(s != 1, (x.astype(jnp.float32) * s).astype(x.dtype), x) for x in leaves]

def scale_barrier(leaves, s):
  s, leaves = lax.optimization_barrier((s, list(leaves)))
  return scale_plain(leaves, s)

def make(norm, scale):
  def clip(g, t):
    leaves, tdef = jax.tree.flatten(g)
    n = norm(leaves)
    s = _norms.clip_scale(n, t)
    return jax.tree.unflatten(tdef, scale(leaves, s)), n
  return clip

VARIANTS = {
  "copy g*s": lambda g, t: (jax.tree.map(lambda x: (x * t).astype(x.dtype), g), t),
  "optax": lambda g, t: (optax.clip_by_global_norm(t.astype(jax.tree.leaves(g)[0].dtype)).update(g, optax.EmptyState())[0], t),
  "library (current)": lambda g, t: gradclip_jax.clip_by_global_norm(t).update(
      g, gradclip_jax.clip_by_global_norm(t).init(g)),
  "cond+barrier": make(norm_cond, scale_barrier),
  "fused+barrier": make(norm_fused, scale_barrier),
  "fused+plain": make(norm_fused, scale_plain),
  "cond+plain": make(norm_cond, scale_plain),
  "plain+plain": make(norm_plain, scale_plain),
}

def timeit(fn, g, t0, inner, repeats):
  f = jax.jit(fn, donate_argnums=0)
  ts = [jnp.asarray(t0 * 0.9 ** i, jnp.float32) for i in range(inner * (repeats + 1))]
  g, _ = f(g, ts[0]); jax.block_until_ready(g)
  per_call, piped = [], []
  k = 0
  for r in range(repeats):
    # pipelined: inner calls, one block
    jax.block_until_ready(g)
    t = time.perf_counter()
    for i in range(inner):
      g, _ = f(g, ts[k]); k += 1
    jax.block_until_ready(g)
    piped.append((time.perf_counter() - t) / inner)
  for r in range(repeats):
    t = time.perf_counter()
    g, _ = f(g, ts[k % len(ts)]); k += 1
    jax.block_until_ready(g)
    per_call.append(time.perf_counter() - t)
  return statistics.median(piped), statistics.median(per_call), g

def main():
  inner = int(sys.argv[1]) if len(sys.argv) > 1 else 20
  repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
  print(jax.devices(), jax.__version__, flush=True)
  results = []
  # Correctness on this backend: overflow rescue and a NumPy reference.
  import numpy as np
  big = {"a": jnp.full((16,), 1e30, jnp.float32), "b": jnp.full((9,), -1e30, jnp.bfloat16)}
  n = jax.jit(gradclip_jax.functional.global_norm)(big)
  print("overflow norm", float(n), "expected", float(np.sqrt(16 * 1e60 + 9 * float(jnp.asarray(1e30, jnp.bfloat16)) ** 2)), flush=True)
  rng = np.random.default_rng(0)
  g = {"a": rng.normal(size=(300, 70)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
  tx = gradclip_jax.clip_by_global_norm(1.0)
  out, st = jax.jit(tx.update)(g, tx.init(g))
  ref = np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in g.values()))
  print("norm", float(st.global_norm), "numpy", ref, "clipped a max err",
        float(np.abs(np.asarray(out["a"]) - g["a"] / ref).max()), flush=True)
  text = jax.jit(tx.update).lower(g, tx.init(g)).compile().as_text()
  print("conditionals in the compiled clip:", text.count("conditional("), flush=True)
  for shape, dtype in [((5000, 5000), jnp.float32), ((5000, 5000), jnp.bfloat16)]:
    nb = 5000 * 5000 if shape[0] == 5000 else 2500 * 2500
    nb *= jnp.dtype(dtype).itemsize
    base = None
    for name, fn in VARIANTS.items():
      g = {"w": jnp.full(shape, 0.01, dtype)}
      p, c, _ = timeit(fn, g, 1e-3, inner, repeats)
      base = base or p
      line = dict(shape=shape, dtype=jnp.dtype(dtype).name, variant=name,
                  piped_us=p * 1e6, percall_us=c * 1e6, vs_copy=p / base,
                  gbps=nb / p / 1e9)
      results.append(line)
      print(f"{str(shape):12} {line['dtype']:8} {name:18} piped {p*1e6:8.1f} us "
            f"({p/base:4.2f}x copy, {nb/p/1e9:6.0f} GB/s)  per-call {c*1e6:8.1f} us", flush=True)
  return results

if __name__ == "__main__":
  res = main()
  if len(sys.argv) > 3:
    json.dump(res, open(sys.argv[3], "w"), indent=1)
