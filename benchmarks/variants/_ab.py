"""What the design probes in this folder share: an optimizer traced with one of the
library's internals replaced, and an interleaved A/B of rule + adam steps.

Each probe compares "as it is now" against an older form of one mechanism, in one
process and interleaved rounds (``clip_overhead.time_steps``) on the 25M tree.
"""
import argparse
import os
import sys

import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_overhead  # noqa: E402  (benchmarks/clip_overhead.py)


def traced_with(make_tx, module, name, value):
  """A factory of ``make_tx()`` whose update runs with ``module.name = value``.

  The replacement holds only while the update is traced (the step is jitted, so that
  is when the internal is called), and the original is restored after.
  """
  def make():
    tx = make_tx()

    def update(updates, state, params=None, **extra_args):
      saved = getattr(module, name)
      setattr(module, name, value)
      try:
        return tx.update(updates, state, params, **extra_args)
      finally:
        setattr(module, name, saved)
    return optax.GradientTransformationExtraArgs(tx.init, update)
  return make


def run(description: str, txs: dict, dtypes=(jnp.float32, jnp.bfloat16)) -> None:
  """Parses ``--repeats``, times ``txs`` (name -> factory; the first is the baseline)
  on the 25M tree for each dtype, and prints ms and the ratio to the baseline."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--repeats", type=int, default=11)
  args = parser.parse_args()
  width = max(len(n) for n in txs) + 2
  for dtype in dtypes:
    result = clip_overhead.time_steps(txs, "25M", dtype, args.repeats)
    for name, (seconds, ratio, _) in result.items():
      print(f"{jnp.dtype(dtype).name:8s} {name:{width}s} {seconds * 1e3:8.2f} ms  "
            f"{ratio:.3f}x", flush=True)
