"""Cost of DP-SGD steps: plain SGD vs vmap(grad) clipping vs ghost clipping.

IMDB-sized classifier (vocab 20k, embedding 128, LSTM 128 via ``nn.RNN(nn.LSTMCell)``,
T = 256, right padding masked by ``seq_lengths`` and masked mean pooling). One
*process per (mode, batch size)*, so each has its own peak RSS, read with
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in the child after the timed steps.

Modes: ``plain`` (grad of the mean loss + SGD), ``vmap`` (clipped_grad(method="vmap")
+ add_noise + SGD: per-example gradients of the whole model), ``ghost``
(clipped_grad(method="ghost") + add_noise + SGD).

  python benchmarks/dp_cost.py                       # B in {64, 256, 1024}
  python benchmarks/dp_cost.py --batch-sizes 64 256 --modes plain ghost
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VOCAB, EMBED, HIDDEN, T = 20_000, 128, 128, 256


def child(mode: str, b: int, steps: int, microbatch: int | None = None) -> dict:
  import resource  # pylint: disable=import-outside-toplevel

  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  import gradclip_jax  # pylint: disable=import-outside-toplevel

  class Classifier(nn.Module):

    @nn.compact
    def __call__(self, tok, lengths):
      x = nn.Embed(VOCAB, EMBED)(tok)
      h = nn.RNN(nn.LSTMCell(HIDDEN))(x, seq_lengths=lengths)
      mask = (jnp.arange(tok.shape[1])[None] < lengths[:, None])[..., None]
      pooled = jnp.sum(h * mask, 1) / jnp.maximum(lengths[:, None], 1)
      return nn.Dense(2)(pooled)

  model = Classifier()
  key = jax.random.key(0)
  k1, k2, k3 = jax.random.split(key, 3)
  lengths = jax.random.randint(k1, (b,), T // 4, T + 1)
  tok = jax.random.randint(k2, (b, T), 1, VOCAB)
  tok = jnp.where(jnp.arange(T)[None] < lengths[:, None], tok, 0)
  y = jax.random.randint(k3, (b,), 0, 2)
  params = model.init(key, tok[:2], lengths[:2])

  def per_example_loss(p, tok, lengths, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, tok, lengths), y)

  if mode == "plain":
    tx = optax.sgd(0.1)

    def grads_fn(p, *batch):
      return jax.grad(lambda p: per_example_loss(p, *batch).mean())(p)
  else:
    tx = optax.chain(gradclip_jax.add_noise(1.0, 1.0, seed=0), optax.scale(1.0 / b),
                     optax.sgd(0.1))
    grads_fn = gradclip_jax.clipped_grad(per_example_loss, max_norm=1.0, method=mode,
                                         microbatch_size=microbatch)

  opt_state = tx.init(params)

  @jax.jit
  def step(p, s, *batch):
    g = grads_fn(p, *batch)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, tok, lengths, y).compile()
  compile_s = time.perf_counter() - t0
  rss_compile_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  try:
    temp_gb = compiled.memory_analysis().temp_size_in_bytes / 2**30
  except Exception:  # pylint: disable=broad-except
    temp_gb = float("nan")
  step = compiled
  params, opt_state = step(params, opt_state, tok, lengths, y)  # warm-up
  jax.block_until_ready(params)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    params, opt_state = step(params, opt_state, tok, lengths, y)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t0)
  rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
  return {"mode": mode, "batch": b, "step_s": min(times), "median_s": sorted(times)[len(times) // 2],
          "compile_s": compile_s, "peak_rss_gb": rss_gb, "rss_after_compile_gb": rss_compile_gb,
          "xla_temp_gb": temp_gb}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
  ap.add_argument("--modes", nargs="+", default=["plain", "vmap", "ghost"],
                  choices=["plain", "vmap", "ghost"])
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--microbatch", type=int, default=None,
                  help="microbatch_size for the vmap/ghost modes (bounds their memory)")
  ap.add_argument("--timeout", type=float, default=1800)
  ap.add_argument("--child", nargs=2, metavar=("MODE", "B"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.steps,
                                       args.microbatch)))
    return 0

  load = os.getloadavg()
  print(f"# dp_cost: vocab {VOCAB}, embed {EMBED}, LSTM {HIDDEN}, T {T}; "
        f"{os.cpu_count()} CPUs, load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  rows = []
  for b in args.batch_sizes:
    for mode in args.modes:
      cmd = [sys.executable, __file__, "--child", mode, str(b), "--steps", str(args.steps)]
      if args.microbatch and mode != "plain":
        cmd += ["--microbatch", str(min(args.microbatch, b))]
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if line:
          rows.append(json.loads(line[-1][7:]))
        else:
          err = (proc.stderr.strip().splitlines() or ["?"])[-1]
          rows.append({"mode": mode, "batch": b, "error": f"rc={proc.returncode}: {err[:80]}"})
      except subprocess.TimeoutExpired:
        rows.append({"mode": mode, "batch": b, "error": "timeout"})
      r = rows[-1]
      print(f"  done {mode} B={b}: {r}", file=sys.stderr, flush=True)

  plain = {r["batch"]: r for r in rows if r["mode"] == "plain" and "error" not in r}
  if args.microbatch:
    print(f"# vmap/ghost with microbatch_size={args.microbatch}")
  print(f"{'B':>5} {'mode':>6} {'s/step':>8} {'x plain':>8} {'peak GB':>8} {'x plain':>8} "
        f"{'XLA tmp GB':>10} {'RSS@compile':>11} {'compile s':>9}")
  for r in rows:
    if "error" in r:
      print(f"{r['batch']:>5} {r['mode']:>6}  {r['error']}")
      continue
    p = plain.get(r["batch"])
    tx = f"{r['step_s'] / p['step_s']:.2f}" if p else "-"
    mx = f"{r['peak_rss_gb'] / p['peak_rss_gb']:.2f}" if p else "-"
    print(f"{r['batch']:>5} {r['mode']:>6} {r['step_s']:>8.3f} {tx:>8} "
          f"{r['peak_rss_gb']:>8.2f} {mx:>8} {r['xla_temp_gb']:>10.2f} "
          f"{r['rss_after_compile_gb']:>11.2f} {r['compile_s']:>9.1f}")
  load = os.getloadavg()
  print(f"# load avg at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
