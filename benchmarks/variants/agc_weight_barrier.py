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
import jax.numpy as jnp
import optax

import _ab  # benchmarks/variants/_ab.py
import gradclip_jax
from gradclip_jax import _adaptive


def main():
  adam = lambda: optax.adam(1e-3)
  agc = lambda: gradclip_jax.adaptive_grad_clip(0.01)
  old = _ab.traced_with(agc, _adaptive, "_weights_apart",
                        lambda ws: [jnp.asarray(w) for w in ws])
  txs = {"adam alone": adam,
         "adaptive_grad_clip old": lambda: optax.chain(old(), adam()),
         "adaptive_grad_clip now": lambda: optax.chain(agc(), adam())}
  _ab.run(__doc__.splitlines()[0], txs, dtypes=(jnp.bfloat16, jnp.float32))


if __name__ == "__main__":
  main()
