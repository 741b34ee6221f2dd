"""AGC's weight norms with and without an optimization barrier on the weights.

In a training step the weights feed both AGC's unit norms and the parameter update.
XLA:CPU upcasts a bfloat16 update to float32, and common-subexpression elimination gave
both one shared float32 ``convert`` of every weight, which XLA:CPU wrote to memory
(100 MB for the 25M tree) and read back every step. ``_adaptive._weights_apart`` sends
the weights through an optimization barrier before the norms, so the norm's reduction
converts on its own. Counted with ``benchmarks/gpu_traffic.kernels`` on the CPU's
compiled step (bytes read + written over adam alone's): bf16 1.80 before, 1.40 after;
f32 1.20 both. This times both, in one process and interleaved rounds
(``clip_overhead.time_steps``), on the 25M tree with adam: "old" patches
``_weights_apart`` to no barrier while the step is traced.

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 \
        python benchmarks/variants/agc_weight_barrier.py [--repeats 11]
"""
import argparse
import os
import sys

import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_overhead  # noqa: E402  (benchmarks/clip_overhead.py)
import gradclip_jax  # noqa: E402
from gradclip_jax import _adaptive  # noqa: E402


def old_style(make_clip):
  """The clip with ``_weights_apart`` as a plain list while its update is traced."""
  def make():
    tx = make_clip()

    def update(updates, state, params=None):
      saved = _adaptive._weights_apart  # pylint: disable=protected-access
      _adaptive._weights_apart = lambda ws: [jnp.asarray(w) for w in ws]
      try:
        return tx.update(updates, state, params)
      finally:
        _adaptive._weights_apart = saved
    return optax.GradientTransformation(tx.init, update)
  return make


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=11)
  args = parser.parse_args()
  adam = lambda: optax.adam(1e-3)
  agc = lambda: gradclip_jax.adaptive_grad_clip(0.01)
  txs = {"adam alone": adam,
         "adaptive_grad_clip old": lambda: optax.chain(old_style(agc)(), adam()),
         "adaptive_grad_clip now": lambda: optax.chain(agc(), adam())}
  for dtype in (jnp.bfloat16, jnp.float32):
    result = clip_overhead.time_steps(txs, "25M", dtype, args.repeats)
    for name, (seconds, ratio, _) in result.items():
      print(f"{jnp.dtype(dtype).name:8s} {name:28s} {seconds * 1e3:8.2f} ms  {ratio:.3f}x",
            flush=True)


if __name__ == "__main__":
  main()
