"""``skip_spikes``: its norm read through an optimization barrier, or not.

``skip_spikes(adam)`` computes the global norm of the gradients and hands the same
gradients to Adam. Without a barrier XLA:CPU merges the norm's conversions and
squares with Adam's identical ones and writes them to memory between the two: for
float32 leaves the shared ``g * g``, for bfloat16 leaves a float32 copy of every
gradient (counted with ``benchmarks/gpu_traffic.kernels`` on the CPU's compiled step:
bf16 2.40x adam alone's bytes, 2.00x behind the barrier; f32 1.60x either way once the
squares are apart). ``_adaptive._norm_apart`` reads the norm through a barrier. It
replaced an earlier fix for float32 only (the leaves times a run-time 1 before
``inner``), which made bfloat16 slower.

This times, in one process and interleaved rounds (``clip_overhead.time_steps``), on
the 25M tree: adam alone, ``skip_spikes(adam)`` with no barrier, and as it is now.

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        python benchmarks/variants/skip_norm_barrier.py [--repeats 11]
"""
import argparse
import os
import sys

import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_overhead  # noqa: E402  (benchmarks/clip_overhead.py)
import gradclip_jax  # noqa: E402
from gradclip_jax import _adaptive, _norms  # noqa: E402


def no_barrier(make_tx):
  """The optimizer with ``_norm_apart`` reading the gradients directly while traced."""
  def make():
    tx = make_tx()

    def update(updates, state, params=None, **extra_args):
      saved = _adaptive._norm_apart  # pylint: disable=protected-access
      _adaptive._norm_apart = lambda u: _norms.tree_norm(_norms.leaves_of(u))
      try:
        return tx.update(updates, state, params, **extra_args)
      finally:
        _adaptive._norm_apart = saved
    return optax.GradientTransformationExtraArgs(tx.init, update)
  return make


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=11)
  args = parser.parse_args()
  adam = lambda: optax.adam(1e-3)
  skip = lambda: gradclip_jax.skip_spikes(adam())
  txs = {"adam alone": adam, "skip_spikes(adam) no barrier": no_barrier(skip),
         "skip_spikes(adam) now": skip}
  for dtype in (jnp.bfloat16, jnp.float32):
    result = clip_overhead.time_steps(txs, "25M", dtype, args.repeats)
    for name, (seconds, ratio, _) in result.items():
      print(f"{jnp.dtype(dtype).name:8s} {name:30s} {seconds * 1e3:8.2f} ms  {ratio:.3f}x",
            flush=True)


if __name__ == "__main__":
  main()
