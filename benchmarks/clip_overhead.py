"""Cost of clipping inside a fused optimizer step: ``rule + adam`` over ``adam`` alone.

Runs on whatever backend JAX picks (CPU, GPU, TPU). In one process it times the
jitted step ``p, s = step(p, s, g)`` with donated parameter and state buffers for

* ``optax.adam`` alone (the baseline),
* ``optax.chain(optax.clip_by_global_norm(1.0), optax.adam)``,
* ``optax.chain(gradclip_jax.<rule>, optax.adam)`` for every gradclip_jax rule,

on a 25M-parameter tree in float32 and in bfloat16, and on a tree of 1,000 small
leaves (where compile time is reported too). Each number is the median over
``--repeats`` timed calls after a warm-up, synchronised with
``jax.block_until_ready``. It prints a markdown table of milliseconds and ratios.

    python benchmarks/clip_overhead.py            # everything
    python benchmarks/clip_overhead.py --quick    # fewer repeats, core rules only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import gradclip_jax


def make_tree(kind: str, dtype) -> dict:
  """The parameter trees: one 25M model of a few leaves, or 1,000 small leaves."""
  key = jax.random.PRNGKey(0)
  if kind == "25M":
    # Transformer-like: embeddings, a few large matrices, vectors (25,001,000 total).
    shapes = {"embed": (8192, 1024), "w_in": (1024, 4096), "w_out": (4096, 1024),
              "attn": (1024, 3072), "proj": (3072, 1024), "head": (1024, 2929),
              "ln": (1000,), "bias": (4096,)}
  elif kind == "1000 leaves":
    shapes = {f"layer{i:04d}": (64, 32) if i % 2 == 0 else (32,) for i in range(1000)}
  else:
    raise ValueError(kind)
  keys = jax.random.split(key, len(shapes))
  return {name: (0.01 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
          for k, (name, shape) in zip(keys, shapes.items())}


def optimizers(adaptive: bool) -> dict:
  """name -> factory of the whole optimizer: adam alone, or a clip rule + adam."""
  adam = lambda: optax.adam(1e-3)
  clip = {
      "optax.clip_by_global_norm": lambda: optax.clip_by_global_norm(1.0),
      "clip_by_global_norm": lambda: gradclip_jax.clip_by_global_norm(1.0),
      "clip_by_norm": lambda: gradclip_jax.clip_by_norm(1.0),
      "clip_by_value": lambda: gradclip_jax.clip_by_value(-0.01, 0.01),
  }
  if adaptive:  # the adaptive rules, where this version of the package has them
    candidates = {
        "adaptive_grad_clip": lambda: gradclip_jax.adaptive_grad_clip(0.01),
        "autoclip": lambda: gradclip_jax.autoclip(10.0, 1000),
        "zclip": lambda: gradclip_jax.zclip(),
        "adagc": lambda: gradclip_jax.adagc(),
    }
    clip.update({k: v for k, v in candidates.items() if hasattr(gradclip_jax, k)})
  out = {"adam alone": adam}
  out.update({name: (lambda f=f: optax.chain(f(), adam())) for name, f in clip.items()})
  if adaptive and hasattr(gradclip_jax, "skip_spikes"):
    # skip_spikes wraps the optimizer instead of preceding it.
    out["skip_spikes(adam)"] = lambda: gradclip_jax.skip_spikes(adam())
  return out


def time_step(make_tx, kind, dtype, repeats, warmup=3):
  """(median step seconds, compile seconds) of ``p, s = step(p, s, g)``."""
  params = make_tree(kind, dtype)
  grads = jax.tree.map(lambda p: (p * 3.0).astype(dtype), params)
  tx = make_tx()

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    params, state = compiled(params, state, grads)
  jax.block_until_ready((params, state))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    params, state = compiled(params, state, grads)
    jax.block_until_ready((params, state))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), compile_s


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--quick", action="store_true", help="5 repeats, core rules only")
  ap.add_argument("--trees", default="25M/float32,25M/bfloat16,1000 leaves/float32",
                  help="comma-separated tree/dtype pairs")
  ap.add_argument("--json", help="also write the results to this JSON file")
  args = ap.parse_args(argv)
  repeats = 5 if args.quick else args.repeats
  device = jax.devices()[0]
  print(f"# clip + adam step overhead on {device.platform} ({device.device_kind}), "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"optax {optax.__version__}, median of {repeats}\n")
  results = []
  for spec in args.trees.split(","):
    kind, dtype = spec.split("/")
    base = None
    print(f"## {kind} {dtype}\n")
    print("| optimizer | step ms | / adam alone | compile s |")
    print("|---|---:|---:|---:|")
    for name, make_tx in optimizers(adaptive=not args.quick).items():
      t, c = time_step(make_tx, kind, jnp.dtype(dtype), repeats)
      base = t if base is None else base
      results.append(dict(tree=kind, dtype=dtype, optimizer=name, step_ms=1e3 * t,
                          ratio=t / base, compile_s=c))
      print(f"| {name} | {1e3 * t:.2f} | {t / base:.3f} | {c:.2f} |", flush=True)
    print()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=str(device.device_kind), platform=device.platform,
                     jax=jax.__version__, optax=optax.__version__,
                     results=results), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
