"""Cost of clipping inside a fused optimizer step: ``rule + adam`` over ``adam`` alone.

Runs on whatever backend JAX picks (CPU, GPU, TPU). In one process it times the
jitted step ``p, s = step(p, s, g)`` with donated parameter and state buffers for

* ``optax.adam`` alone (the baseline),
* ``optax.chain(optax.clip_by_global_norm(1.0), optax.adam)``,
* ``optax.chain(gradclip_jax.<rule>, optax.adam)`` for every gradclip_jax rule,

on a 25M-parameter tree in float32 and in bfloat16, and on a tree of 1,000 small
leaves (where compile time is reported too). The steps of one tree are timed in
interleaved rounds (per round, each optimizer makes an untimed call and then timed
ones, synchronised with ``jax.block_until_ready``, after a warm-up; 1 timed call on CPU,
10 chained ones elsewhere, see ``time_steps``); a step time is the median over
``--repeats`` rounds, a ratio the median of the per-round ratios. It prints a
markdown table of milliseconds and ratios.

    python benchmarks/clip_overhead.py            # everything
    python benchmarks/clip_overhead.py --quick    # fewer repeats, core rules only
    python benchmarks/clip_overhead.py --malloc tuned   # glibc keeps freed memory
    python benchmarks/clip_overhead.py --trees "1000 leaves/float32" \
        --rules optax.clip_by_global_norm,clip_by_global_norm   # a subset

On CPU the result depends on the host allocator. A clip whose scaled gradients XLA
materialises (bfloat16: XLA:CPU does not duplicate the scale into both Adam moment
fusions) writes a 50 MB temporary every step. With glibc's defaults that buffer is
mmapped and unmapped each step, so the step pays ~12,700 page faults (measured with
``getrusage``): bf16 clip + adam ran 1.6-1.9x adam alone, and Optax's f32 clip 2.5-3x.
``--malloc tuned`` re-executes the script with ``MALLOC_ARENA_MAX=1``,
``MALLOC_MMAP_THRESHOLD_=256MB`` and ``MALLOC_TRIM_THRESHOLD_=1GB`` (glibc only; they
must be set before the process starts, as XLA's threads take their own malloc arenas
early), so freed buffers are reused: no page faults, and bf16 clip + adam at ~1.15x.
The header says which allocator a run used.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _compiled_step(make_tx, kind, dtype):
  """(compiled step, params, state, grads, compile seconds) for one optimizer."""
  params = make_tree(kind, dtype)
  grads = jax.tree.map(lambda p: (p * 3.0).astype(dtype), params)
  tx = make_tx()

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  return [compiled, params, state, grads, time.perf_counter() - t0]


def time_steps(make_txs: dict, kind, dtype, repeats, warmup=3, inner=None,
               per_round=False) -> dict:
  """name -> (median step seconds, median ratio to the first entry, compile seconds).

  With ``per_round=True``: name -> dict(median, ratio, compile, times), ``times`` the
  step time of every round (for ratios between two entries of the same rounds).

  All steps are compiled first, then timed in interleaved rounds (per round and
  optimizer, one untimed call, then ``inner`` timed calls synchronised once), so that a
  drift of the machine's speed during the run (15% within an hour on the 2-core CPU)
  hits every optimizer alike. The ratio is the median over rounds of
  ``t[name] / t[first]`` within the round. ``inner`` defaults to 1 on CPU (steps of
  tens of ms) and 10 elsewhere: a GPU step of half a millisecond would otherwise carry
  a host round trip of tens of microseconds, pulling every ratio towards 1.
  """
  if inner is None:
    inner = 1 if jax.default_backend() == "cpu" else 10
  entries = {name: _compiled_step(f, kind, dtype) for name, f in make_txs.items()}
  for e in entries.values():
    for _ in range(warmup):
      e[1], e[2] = e[0](e[1], e[2], e[3])
    jax.block_until_ready((e[1], e[2]))
  times = {name: [] for name in entries}
  for _ in range(repeats):
    for name, e in entries.items():
      # An untimed call first: with glibc's default allocator a step's page faults
      # depend on what the previous step freed (its dynamic mmap threshold follows the
      # sizes freed), so the first call after another optimizer's is not steady state.
      e[1], e[2] = e[0](e[1], e[2], e[3])
      jax.block_until_ready((e[1], e[2]))
      t0 = time.perf_counter()
      for _ in range(inner):
        e[1], e[2] = e[0](e[1], e[2], e[3])
      jax.block_until_ready((e[1], e[2]))
      times[name].append((time.perf_counter() - t0) / inner)
  base = times[next(iter(times))]
  if per_round:
    return {name: dict(median=statistics.median(ts),
                       ratio=statistics.median(t / b for t, b in zip(ts, base)),
                       compile=entries[name][4], times=ts)
            for name, ts in times.items()}
  return {name: (statistics.median(ts),
                 statistics.median(t / b for t, b in zip(ts, base)), entries[name][4])
          for name, ts in times.items()}


# glibc settings of ``--malloc tuned`` (see the module docstring).
TUNED_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(256 << 20),
                    "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def malloc_mode() -> str:
  """``tuned`` when this process started with :data:`TUNED_MALLOC_ENV`, else ``default``."""
  tuned = all(os.environ.get(k) == v for k, v in TUNED_MALLOC_ENV.items())
  return "tuned" if tuned else "default"


def reexec_with_malloc(mode: str) -> None:
  """Restarts this script with the allocator environment of ``mode`` if needed."""
  if malloc_mode() == mode:
    return
  env = dict(os.environ)
  for k, v in TUNED_MALLOC_ENV.items():
    if mode == "tuned":
      env[k] = v
    else:
      env.pop(k, None)
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--malloc", choices=("default", "tuned"), default=None,
                  help="host allocator settings (CPU); default: as the process started")
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--quick", action="store_true", help="5 repeats, core rules only")
  ap.add_argument("--trees", default="25M/float32,25M/bfloat16,1000 leaves/float32",
                  help="comma-separated tree/dtype pairs")
  ap.add_argument("--rules", default="",
                  help="comma-separated optimizer names to time (default: all); "
                       "'adam alone' is always timed first")
  ap.add_argument("--json", help="also write the results to this JSON file")
  args = ap.parse_args(argv)
  if args.malloc is not None and argv is None:
    reexec_with_malloc(args.malloc)
  repeats = 5 if args.quick else args.repeats
  device = jax.devices()[0]
  print(f"# clip + adam step overhead on {device.platform} ({device.device_kind}), "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"optax {optax.__version__}, median of {repeats}, host allocator "
        f"{malloc_mode()}\n")
  results = []
  for spec in args.trees.split(","):
    kind, dtype = spec.split("/")
    print(f"## {kind} {dtype}\n")
    print("| optimizer | step ms | / adam alone | compile s |")
    print("|---|---:|---:|---:|")
    txs = optimizers(adaptive=not args.quick)
    if args.rules:
      wanted = {"adam alone", *args.rules.split(",")}
      txs = {k: v for k, v in txs.items() if k in wanted}
    timed = time_steps(txs, kind, jnp.dtype(dtype), repeats)
    for name, (t, ratio, c) in timed.items():
      results.append(dict(tree=kind, dtype=dtype, optimizer=name, step_ms=1e3 * t,
                          ratio=ratio, compile_s=c))
      print(f"| {name} | {1e3 * t:.2f} | {ratio:.3f} | {c:.2f} |", flush=True)
    print()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=str(device.device_kind), platform=device.platform,
                     jax=jax.__version__, optax=optax.__version__,
                     malloc=malloc_mode(),
                     results=results), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
