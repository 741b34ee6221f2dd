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
import jax.numpy as jnp
import optax

import _ab  # benchmarks/variants/_ab.py
import gradclip_jax
from gradclip_jax import _adaptive, _norms


def main():
  adam = lambda: optax.adam(1e-3)
  skip = lambda: gradclip_jax.skip_spikes(adam())
  no_barrier = _ab.traced_with(skip, _adaptive, "_norm_apart",
                               lambda u: _norms.tree_norm(_norms.leaves_of(u)))
  txs = {"adam alone": adam, "skip_spikes(adam) no barrier": no_barrier,
         "skip_spikes(adam) now": skip}
  _ab.run(__doc__.splitlines()[0], txs, dtypes=(jnp.bfloat16, jnp.float32))


if __name__ == "__main__":
  main()
