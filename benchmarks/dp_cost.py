"""Cost of DP-SGD steps: plain SGD vs vmap(grad) clipping vs ghost clipping.

Three IMDB-sized classifiers (right padding masked by the lengths, masked mean
pooling, 2 classes):

* ``lstm``: linen ``nn.RNN(nn.LSTMCell(128))`` over ``nn.Embed(20000, 128)``, T = 256;
* ``olstm``: the same with ``nn.OptimizedLSTMCell(128)`` (Flax's recommended cell,
  fused gate kernels), T = 256;
* ``nnx_tf``: a ``flax.nnx`` transformer encoder, ``nnx.Embed(20000, 128)`` plus
  learned positions, 2 pre-LayerNorm blocks (``nnx.MultiHeadAttention`` with 4
  heads and the padding mask, a 512-wide GELU MLP), T = 128; its parameters are
  split off with ``nnx.split`` and merged back inside the loss.

One *process per (model, mode, batch size)*, so each has its own peak RSS, read with
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in the child after the timed steps.
The step time is the median over ``--steps`` timed steps after one warm-up step,
each ended by ``jax.block_until_ready``.

Modes: ``plain`` (grad of the mean loss + SGD), ``vmap`` (clipped_grad(method="vmap")
+ add_noise + SGD: per-example gradients of the whole model), ``ghost``
(clipped_grad(method="ghost") with default arguments + add_noise + SGD).
``--ghost-budgets 512`` adds, in the same run, ghost rows with
``gradclip_jax.dp.GHOST_MEMORY_BUDGET`` set to each given MiB (an A/B of the
default microbatch budget; the mode column reads ``ghost@512MiB``).

  python benchmarks/dp_cost.py                                 # B in {256, 1024}
  python benchmarks/dp_cost.py --models olstm --batch-sizes 256 --modes plain ghost
  python benchmarks/dp_cost.py --quick                         # small shapes, seconds

Timings go under the shared lock (``flock /tmp/gradclip-timing.lock python ...``).
Without ``--quick`` the table is written to
``results/dp_cost-<device>-<date>.{json,md}`` (``--out PREFIX`` to change it,
``--no-write`` to skip).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

MODELS = ("lstm", "olstm", "nnx_tf")
FULL = {"vocab": 20_000, "embed": 128, "hidden": 128,
        "T": {"lstm": 256, "olstm": 256, "nnx_tf": 128}, "blocks": 2, "heads": 4}
QUICK = {"vocab": 500, "embed": 16, "hidden": 16,
         "T": {"lstm": 16, "olstm": 16, "nnx_tf": 16}, "blocks": 2, "heads": 4}


def _linen_classifier(cell_name: str, cfg: dict):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  cell_cls = getattr(nn, cell_name)

  class Classifier(nn.Module):

    @nn.compact
    def __call__(self, tok, lengths):
      x = nn.Embed(cfg["vocab"], cfg["embed"])(tok)
      h = nn.RNN(cell_cls(cfg["hidden"]))(x, seq_lengths=lengths)
      mask = (jnp.arange(tok.shape[1])[None] < lengths[:, None])[..., None]
      pooled = jnp.sum(h * mask, 1) / jnp.maximum(lengths[:, None], 1)
      return nn.Dense(2)(pooled)

  return Classifier()


def _nnx_transformer(cfg: dict, t: int):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  d, heads = cfg["embed"], cfg["heads"]

  class Block(nnx.Module):

    def __init__(self, rngs):
      self.ln1 = nnx.LayerNorm(d, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False,
                                         rngs=rngs)
      self.ln2 = nnx.LayerNorm(d, rngs=rngs)
      self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
      self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x, mask):
      x = x + self.attn(self.ln1(x), mask=mask)
      return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))

  class Classifier(nnx.Module):

    def __init__(self, rngs):
      self.tok = nnx.Embed(cfg["vocab"], d, rngs=rngs)
      self.pos = nnx.Embed(t, d, rngs=rngs)
      self.blocks = nnx.List([Block(rngs) for _ in range(cfg["blocks"])])
      self.ln = nnx.LayerNorm(d, rngs=rngs)
      self.out = nnx.Linear(d, 2, rngs=rngs)

    def __call__(self, tok, lengths):
      valid = jnp.arange(tok.shape[1])[None] < lengths[:, None]
      x = self.tok(tok) + self.pos(jnp.arange(tok.shape[1]))[None]
      mask = nnx.make_attention_mask(valid, valid)
      for block in self.blocks:
        x = block(x, mask)
      x = self.ln(x)
      pooled = jnp.sum(x * valid[..., None], 1) / jnp.maximum(lengths[:, None], 1)
      return self.out(pooled)

  return Classifier(nnx.Rngs(0))


def build(model: str, cfg: dict, key):
  """(per-example loss fn, params, batch maker) for one benchmark model."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  t = cfg["T"][model]
  ce = optax.softmax_cross_entropy_with_integer_labels

  def batch(b):
    k1, k2, k3 = jax.random.split(jax.random.fold_in(key, b), 3)
    lengths = jax.random.randint(k1, (b,), t // 4, t + 1)
    tok = jax.random.randint(k2, (b, t), 1, cfg["vocab"])
    tok = jnp.where(jnp.arange(t)[None] < lengths[:, None], tok, 0)
    return tok, lengths, jax.random.randint(k3, (b,), 0, 2)

  if model in ("lstm", "olstm"):
    net = _linen_classifier("LSTMCell" if model == "lstm" else "OptimizedLSTMCell", cfg)
    tok, lengths, _ = batch(2)
    params = net.init(key, tok, lengths)

    def loss_fn(p, tok, lengths, y):
      return ce(net.apply(p, tok, lengths), y)
  elif model == "nnx_tf":
    from flax import nnx  # pylint: disable=import-outside-toplevel
    graphdef, params, rest = nnx.split(_nnx_transformer(cfg, t), nnx.Param, ...)

    def loss_fn(p, tok, lengths, y):
      return ce(nnx.merge(graphdef, p, rest)(tok, lengths), y)
  else:
    raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
  return loss_fn, params, batch


def child(model: str, mode: str, b: int, steps: int, quick: bool,
          microbatch: int | None = None, budget_mib: int | None = None) -> dict:
  import resource  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  import gradclip_jax  # pylint: disable=import-outside-toplevel
  import gradclip_jax.dp  # pylint: disable=import-outside-toplevel

  if budget_mib is not None:
    gradclip_jax.dp.GHOST_MEMORY_BUDGET = budget_mib * 2 ** 20
  cfg = QUICK if quick else FULL
  loss_fn, params, make_batch = build(model, cfg, jax.random.key(0))
  batch = make_batch(b)

  if mode == "plain":
    tx = optax.sgd(0.1)

    def grads_fn(p, *batch):
      return jax.grad(lambda p: loss_fn(p, *batch).mean())(p)
  else:
    tx = optax.chain(gradclip_jax.add_noise(1.0, 1.0, seed=0), optax.scale(1.0 / b),
                     optax.sgd(0.1))
    grads_fn = gradclip_jax.clipped_grad(loss_fn, max_norm=1.0, method=mode,
                                         microbatch_size=microbatch)

  opt_state = tx.init(params)

  @jax.jit
  def step(p, s, *batch):
    g = grads_fn(p, *batch)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, *batch).compile()
  compile_s = time.perf_counter() - t0
  rss_compile_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  try:
    temp_gb = compiled.memory_analysis().temp_size_in_bytes / 2**30
  except Exception:  # pylint: disable=broad-except
    temp_gb = float("nan")  # not every backend reports it
  params, opt_state = compiled(params, opt_state, *batch)  # warm-up
  jax.block_until_ready(params)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    params, opt_state = compiled(params, opt_state, *batch)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t0)
  rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
  label = mode if budget_mib is None else f"{mode}@{budget_mib}MiB"
  row = {"model": model, "mode": label, "batch": b, "median_s": float(np.median(times)),
         "min_s": min(times), "steps": steps, "compile_s": compile_s,
         "peak_rss_gb": rss_gb, "rss_after_compile_gb": rss_compile_gb,
         "xla_temp_gb": temp_gb, "finite": bool(all(
             np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params)))}
  if mode == "ghost":
    try:
      cov = gradclip_jax.dp.ghost_coverage(loss_fn, params, *make_batch(2))
      n_fb = sum(str(v).startswith("fallback") or "fallback" in str(v)
                 for v in cov.values())
      row["fallback_entries"] = f"{n_fb}/{len(cov)}"
    except Exception as e:  # pylint: disable=broad-except
      row["fallback_entries"] = f"? ({type(e).__name__})"
  return row


def _table(rows: list) -> str:
  plain = {(r["model"], r["batch"]): r for r in rows
           if r["mode"] == "plain" and "error" not in r}
  out = ["| model | B | mode | s/step (median) | x plain | peak RSS GB | x plain | "
         "XLA temp GB | compile s | fallback entries |",
         "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['error']} "
                 "| | | | | | |")
      continue
    p = plain.get((r["model"], r["batch"]))
    tx = f"{r['median_s'] / p['median_s']:.2f}" if p else "-"
    mx = f"{r['peak_rss_gb'] / p['peak_rss_gb']:.2f}" if p else "-"
    out.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['median_s']:.3f} | "
               f"{tx} | {r['peak_rss_gb']:.2f} | {mx} | {r['xla_temp_gb']:.2f} | "
               f"{r['compile_s']:.1f} | {r.get('fallback_entries', '')} |")
  return "\n".join(out)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                  help="default 256 1024 (8 with --quick)")
  ap.add_argument("--modes", nargs="+", default=["plain", "vmap", "ghost"],
                  choices=["plain", "vmap", "ghost"])
  ap.add_argument("--steps", type=int, default=None,
                  help="timed steps after the warm-up (default 5, 2 with --quick)")
  ap.add_argument("--quick", action="store_true",
                  help="tiny shapes (vocab 500, width 16, T 16, B 8) for a smoke check")
  ap.add_argument("--microbatch", type=int, default=None,
                  help="microbatch_size for the vmap/ghost modes (default: the method's)")
  ap.add_argument("--ghost-budgets", type=int, nargs="+", default=[], metavar="MIB",
                  help="also run the ghost mode with GHOST_MEMORY_BUDGET set to each "
                       "of these MiB (an A/B of the default budget, same run)")
  ap.add_argument("--budget-mib", type=int, default=None, help=argparse.SUPPRESS)
  ap.add_argument("--skip-vmap-above", type=int, default=256,
                  help="skip vmap at batch sizes above this (its per-example "
                       "gradients of the 20k x 128 embedding need B x 10 MB)")
  ap.add_argument("--timeout", type=float, default=1800)
  ap.add_argument("--out", default=None, help="results prefix (default "
                  "results/dp_cost-cpu-<date>)")
  ap.add_argument("--no-write", action="store_true")
  ap.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "B"),
                  help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  steps = args.steps or (2 if args.quick else 5)
  if args.child:
    print("RESULT " + json.dumps(child(args.child[0], args.child[1], int(args.child[2]),
                                       steps, args.quick, args.microbatch,
                                       args.budget_mib)))
    return 0
  sizes = args.batch_sizes or ([8] if args.quick else [256, 1024])

  load0 = os.getloadavg()
  cfg = QUICK if args.quick else FULL
  header = (f"dp_cost: vocab {cfg['vocab']}, width {cfg['embed']}, T {cfg['T']}; "
            f"{os.cpu_count()} CPUs, load avg at start {load0[0]:.2f} {load0[1]:.2f} "
            f"{load0[2]:.2f}")
  print("# " + header, flush=True)
  rows = []
  for model in args.models:
    for b in sizes:
      runs = [(mode, None) for mode in args.modes]
      if "ghost" in args.modes:
        runs += [("ghost", mib) for mib in args.ghost_budgets]
      for mode, mib in runs:
        if mode == "vmap" and b > args.skip_vmap_above:
          continue
        cmd = [sys.executable, __file__, "--child", model, mode, str(b),
               "--steps", str(steps)] + (["--quick"] if args.quick else [])
        if args.microbatch and mode != "plain":
          cmd += ["--microbatch", str(min(args.microbatch, b))]
        if mib is not None:
          cmd += ["--budget-mib", str(mib)]
        try:
          proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                check=False)
          line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
          if line:
            rows.append(json.loads(line[-1][7:]))
          else:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"model": model, "mode": mode, "batch": b,
                         "error": f"rc={proc.returncode}: {err[:120]}"})
        except subprocess.TimeoutExpired:
          rows.append({"model": model, "mode": mode, "batch": b, "error": "timeout"})
        print(f"  done {model} {mode} B={b}: {rows[-1]}", file=sys.stderr, flush=True)

  load1 = os.getloadavg()
  table = _table(rows)
  footer = f"load avg at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}"
  print(table)
  print("# " + footer)
  if not args.quick and not args.no_write:
    today = datetime.date.today().isoformat()
    prefix = pathlib.Path(args.out or pathlib.Path(__file__).resolve().parents[1]
                          / "results" / f"dp_cost-cpu-{today}")
    cmdline = "python benchmarks/dp_cost.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    meta = {"command": cmdline, "header": header, "footer": footer,
            "machine": platform.machine(), "python": platform.python_version(),
            "config": cfg, "steps": steps}
    prefix.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                      indent=1) + "\n")
    prefix.with_suffix(".md").write_text(
        f"# dp_cost ({today})\n\n`{cmdline}`\n\n{header}; {footer}. Step time: median of "
        f"{steps} steps after a warm-up; peak RSS of the process (one per row).\n\n"
        f"{table}\n")
    print(f"# wrote {prefix}.json and .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
