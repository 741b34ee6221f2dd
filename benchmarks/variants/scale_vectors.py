"""Per-unit scale vectors: recomputed in every consumer (old) or computed once (now).

A clip with one scale per unit (``adaptive_grad_clip``, ``clip_by_norm`` with ``axes``)
turns the unit norms into scales with a chain of compares and selects
(``_norms.clip_scale``). XLA fuses that chain into each consumer, so inside Adam's two
moment kernels it was recomputed for every entry of the leaf. ``_norms.computed_once``
(CPU only) sends the non-scalar scales through one never-taken ``lax.cond``, whose
outputs are buffers: the moment kernels then read the scale vector. This times both,
in one process and interleaved rounds (``clip_overhead.time_steps``), on the 25M tree
with adam: "old" patches ``computed_once`` to the identity while the step is traced.

On this project's 2-core CPU (jax 0.10.2, tuned allocator, 11 rounds, 2026-11-27), two
runs: f32 AGC 1.68x and 1.56x adam alone old, 1.46x and 1.46x now;
``clip_by_norm(axes=0)`` 1.47x and 1.25x old, 1.26x and 1.22x now. bf16 was unchanged
within noise (AGC 1.64 / 1.67 and 1.57 / 1.60, clip_by_norm 1.23 / 1.25 and 1.25 /
1.21): XLA writes the scaled bf16 gradient once anyway, so the chain ran once per entry
there.

    python benchmarks/variants/scale_vectors.py [--repeats 11]
"""
import jax.numpy as jnp
import optax

import _ab  # benchmarks/variants/_ab.py
import gradclip_jax
from gradclip_jax import _norms


def main():
  adam = lambda: optax.adam(1e-3)
  rules = {"adaptive_grad_clip": lambda: gradclip_jax.adaptive_grad_clip(0.01),
           "clip_by_norm(axes=0)": lambda: gradclip_jax.clip_by_norm(1.0, axes=0)}
  txs = {"adam alone": adam}
  for name, make in rules.items():
    old = _ab.traced_with(make, _norms, "computed_once", list)
    txs[f"{name} old"] = lambda o=old: optax.chain(o(), adam())
    txs[f"{name} now"] = lambda m=make: optax.chain(m(), adam())
  _ab.run(__doc__.splitlines()[0], txs)


if __name__ == "__main__":
  main()
