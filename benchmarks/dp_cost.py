"""Cost of a DP-SGD step against a plain step: ghost clipping, per-example vmap.

Models (``--models``):

* ``lstm``: linen ``nn.RNN(nn.LSTMCell(128))`` over ``nn.Embed(20000, 128)``, T = 256,
  masked mean pooling, 2 classes (an IMDB-sized classifier);
* ``olstm``: the same with ``nn.OptimizedLSTMCell(128)`` (fused gate kernels);
* ``nnx_tf``: a ``flax.nnx`` transformer encoder, ``nnx.Embed(20000, 128)`` plus learned
  positions, 2 pre-LayerNorm blocks (``nnx.MultiHeadAttention``, 4 heads, the padding
  mask, a 512-wide GELU MLP), T = 128;
* ``nnx_lm``: a ``flax.nnx`` causal language model with tied input/output embeddings
  (vocabulary 8192, width 256, 4 pre-LayerNorm blocks with ``jax.nn.dot_product_attention``
  and a 1024-wide MLP), T = 128, the loss of an example its mean next-token loss.

Modes: ``plain`` (the gradient of the mean loss), ``ghost``
(``clipped_grad(method="ghost")`` with default arguments), ``vmap``
(``clipped_grad(method="vmap")``: per-example gradients of the whole model); every
mode is followed by the same update (Gaussian noise for the DP modes, ``1/B``, SGD),
jitted with the parameters and optimizer state donated.

**Time**: one process per (model, B) compiles every mode, then times them in
interleaved rounds (each round runs each mode once, in turn, ended by
``jax.block_until_ready``), after a warm-up; the ratio to ``plain`` is the median of
the per-round ratios, so a change of the machine's speed during the run hits both
sides alike. **Memory**: XLA's memory analysis of each compiled step (temporaries),
and the peak RSS of a separate process per (model, mode, B) that compiles and runs two
steps of that mode alone (``--no-rss`` skips these).

``--ghost-budgets 512`` adds, in the same processes, ghost modes with
``gradclip_jax.dp.GHOST_MEMORY_BUDGET`` set to each given MiB (``ghost@512MiB``).

    python benchmarks/dp_cost.py                      # all models, their default B
    python benchmarks/dp_cost.py --models lstm --batch-sizes 256 --rounds 7
    python benchmarks/dp_cost.py --quick              # tiny shapes, a smoke check

Run it alone on the machine (``flock /tmp/gradclip-timing.lock python ...``). The
load average before and after, the versions and the command go to the result file
``results/dp_cost-<backend>-<date>.{json,md}`` (``--out PREFIX``, ``--no-write``).
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

MODELS = ("lstm", "olstm", "nnx_tf", "nnx_lm")
FULL = {"vocab": 20_000, "embed": 128, "hidden": 128,
        "T": {"lstm": 256, "olstm": 256, "nnx_tf": 128, "nnx_lm": 128}, "blocks": 2,
        "heads": 4, "lm": {"vocab": 8192, "width": 256, "blocks": 4, "heads": 4}}
QUICK = {"vocab": 500, "embed": 16, "hidden": 16,
         "T": {"lstm": 16, "olstm": 16, "nnx_tf": 16, "nnx_lm": 16}, "blocks": 2,
         "heads": 4, "lm": {"vocab": 300, "width": 16, "blocks": 2, "heads": 2}}
#: The batch size of each model when ``--batch-sizes`` is not given.
DEFAULT_B = {"lstm": 256, "olstm": 256, "nnx_tf": 256, "nnx_lm": 32}


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


def _nnx_lm(cfg: dict, t: int):
  """A causal LM whose output projection is the token embedding (tied)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  lm = cfg["lm"]
  d, heads = lm["width"], lm["heads"]

  class Block(nnx.Module):

    def __init__(self, rngs):
      self.ln1 = nnx.LayerNorm(d, rngs=rngs)
      self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
      self.proj = nnx.Linear(d, d, rngs=rngs)
      self.ln2 = nnx.LayerNorm(d, rngs=rngs)
      self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
      self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
      b, n, _ = x.shape
      q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, n, 3 * heads, d // heads), 3,
                          axis=2)
      a = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, n, d)
      x = x + self.proj(a)
      return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))

  class LM(nnx.Module):

    def __init__(self, rngs):
      self.tok = nnx.Embed(lm["vocab"], d, rngs=rngs)
      self.pos = nnx.Param(jax.random.normal(rngs.params(), (t, d)) * 0.02)
      self.blocks = nnx.List([Block(rngs) for _ in range(lm["blocks"])])
      self.ln = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, tok):
      x = self.tok(tok) + self.pos[...][None, :tok.shape[1]]
      for block in self.blocks:
        x = block(x)
      return self.tok.attend(self.ln(x))  # logits = h @ E^T

  return LM(nnx.Rngs(0))


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
    params = jax.jit(net.init)(key, tok, lengths)

    def loss_fn(p, tok, lengths, y):
      return ce(net.apply(p, tok, lengths), y)
  elif model == "nnx_tf":
    from flax import nnx  # pylint: disable=import-outside-toplevel
    graphdef, params, rest = nnx.split(_nnx_transformer(cfg, t), nnx.Param, ...)

    def loss_fn(p, tok, lengths, y):
      return ce(nnx.merge(graphdef, p, rest)(tok, lengths), y)
  elif model == "nnx_lm":
    from flax import nnx  # pylint: disable=import-outside-toplevel
    graphdef, params, rest = nnx.split(_nnx_lm(cfg, t + 1), nnx.Param, ...)
    vocab = cfg["lm"]["vocab"]

    def batch(b):  # noqa: F811  (token sequences of t + 1: inputs and targets)
      return (jax.random.randint(jax.random.fold_in(key, b), (b, t + 1), 0, vocab),)

    def loss_fn(p, tok):
      logits = nnx.merge(graphdef, p, rest)(tok[:, :-1])
      return ce(logits, tok[:, 1:]).mean(axis=1)
  else:
    raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
  return loss_fn, params, batch


def _step(mode: str, loss_fn, b: int, budget_mib):
  """(jitted step, optimizer) of one mode; the step is (params, state, *batch)."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  import gradclip_jax  # pylint: disable=import-outside-toplevel
  import gradclip_jax.dp  # pylint: disable=import-outside-toplevel

  if mode == "plain":
    tx = optax.sgd(0.1)

    def grads_fn(p, *batch):
      return jax.grad(lambda p: loss_fn(p, *batch).mean())(p)
  else:
    tx = optax.chain(gradclip_jax.add_noise(1.0, 1.0, seed=0), optax.scale(1.0 / b),
                     optax.sgd(0.1))
    clipped = gradclip_jax.clipped_grad(loss_fn, max_norm=1.0, method=mode)

    def grads_fn(p, *batch):
      old = gradclip_jax.dp.GHOST_MEMORY_BUDGET
      gradclip_jax.dp.GHOST_MEMORY_BUDGET = (None if budget_mib is None
                                             else budget_mib * 2 ** 20)
      try:  # read while the step is traced
        return clipped(p, *batch)
      finally:
        gradclip_jax.dp.GHOST_MEMORY_BUDGET = old

  def step(p, s, *batch):
    g = grads_fn(p, *batch)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1)), tx


def _modes(modes, budgets):
  out = [(m, None) for m in modes]
  if "ghost" in modes:
    out += [("ghost", mib) for mib in budgets]
  return out


def _label(mode, mib):
  return mode if mib is None else f"{mode}@{mib}MiB"


def timing_child(model: str, b: int, modes: list, budgets: list, rounds: int,
                 quick: bool) -> dict:
  """Compiles every mode, then times them in interleaved rounds (one process)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  cfg = QUICK if quick else FULL
  loss_fn, params0, make_batch = build(model, cfg, jax.random.key(0))
  batch = make_batch(b)
  runs = {}
  for mode, mib in _modes(modes, budgets):
    step, tx = _step(mode, loss_fn, b, mib)
    params = jax.tree.map(lambda x: x.copy(), params0)
    state = tx.init(params)
    t0 = time.perf_counter()
    compiled = step.lower(params, state, *batch).compile()
    compile_s = time.perf_counter() - t0
    try:
      mem = compiled.memory_analysis()
      temp_gb = mem.temp_size_in_bytes / 2 ** 30
    except Exception:  # pylint: disable=broad-except  # not every backend reports it
      temp_gb = float("nan")
    params, state = compiled(params, state, *batch)  # warm-up
    jax.block_until_ready(params)
    runs[_label(mode, mib)] = {"fn": compiled, "args": [params, state], "times": [],
                               "compile_s": compile_s, "xla_temp_gb": temp_gb}
  for _ in range(rounds):
    for r in runs.values():
      t0 = time.perf_counter()
      r["args"] = list(r["fn"](*r["args"], *batch))
      jax.block_until_ready(r["args"])
      r["times"].append(time.perf_counter() - t0)
  base = runs.get("plain")
  rows = []
  for label, r in runs.items():
    row = {"model": model, "batch": b, "mode": label,
           "median_s": float(np.median(r["times"])), "times_s": r["times"],
           "compile_s": r["compile_s"], "xla_temp_gb": r["xla_temp_gb"],
           "finite": bool(all(np.all(np.isfinite(np.asarray(x)))
                              for x in jax.tree.leaves(r["args"][0])))}
    if base is not None:
      ratios = [t / p for t, p in zip(r["times"], base["times"])]
      row["ratio_median"] = float(np.median(ratios))
      row["ratio_min"], row["ratio_max"] = float(min(ratios)), float(max(ratios))
    if label.startswith("ghost"):
      import gradclip_jax.dp  # pylint: disable=import-outside-toplevel
      cov = gradclip_jax.dp.ghost_coverage(loss_fn, params0, *batch)
      row["coverage"] = sorted(set(cov.values()))
      row["fallback_entries"] = f"{sum(v.startswith('fallback') for v in cov.values())}" \
                                f"/{len(cov)}"
    rows.append(row)
  return {"rows": rows}


def rss_child(model: str, b: int, mode: str, mib, quick: bool) -> dict:
  """Peak RSS of a process that compiles and runs two steps of one mode alone."""
  import resource  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  cfg = QUICK if quick else FULL
  loss_fn, params, make_batch = build(model, cfg, jax.random.key(0))
  batch = make_batch(b)
  step, tx = _step(mode, loss_fn, b, mib)
  state = tx.init(params)
  for _ in range(2):
    params, state = step(params, state, *batch)
    jax.block_until_ready(params)
  return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def _run_child(args: list, timeout: float) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__)] + args
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          check=False)
  except subprocess.TimeoutExpired:
    return {"error": "timeout"}
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if line:
    return json.loads(line[-1][7:])
  err = (proc.stderr.strip().splitlines() or ["?"])[-1]
  return {"error": f"rc={proc.returncode}: {err[:160]}"}


def _table(rows: list) -> str:
  out = ["| model | B | mode | s/step (median) | time / plain (median of rounds) | "
         "range | XLA temp GB | temp / plain | peak RSS GB | RSS / plain | compile s |",
         "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
  plain = {(r["model"], r["batch"]): r for r in rows if r.get("mode") == "plain"}
  for r in rows:
    if "error" in r:
      out.append(f"| {r['model']} | {r['batch']} | {r.get('mode', '')} | {r['error']} "
                 "| | | | | | | |")
      continue
    p = plain.get((r["model"], r["batch"]), {})
    rng = (f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}" if "ratio_min" in r else "")
    tmp = (f"{r['xla_temp_gb'] / p['xla_temp_gb']:.2f}"
           if p.get("xla_temp_gb") else "")
    rss = r.get("peak_rss_gb")
    rss_ratio = (f"{rss / p['peak_rss_gb']:.2f}" if rss and p.get("peak_rss_gb") else "")
    out.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['median_s']:.3f} | "
               f"{r.get('ratio_median', float('nan')):.2f} | {rng} | "
               f"{r['xla_temp_gb']:.3f} | {tmp} | "
               f"{'' if rss is None else f'{rss:.2f}'} | {rss_ratio} | "
               f"{r['compile_s']:.1f} |")
  return "\n".join(out)


def _versions() -> dict:
  import importlib.metadata as md  # pylint: disable=import-outside-toplevel
  out = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                  help="default: each model's DEFAULT_B (8 with --quick)")
  ap.add_argument("--modes", nargs="+", default=["plain", "ghost"],
                  choices=["plain", "vmap", "ghost"])
  ap.add_argument("--rounds", type=int, default=None,
                  help="interleaved timing rounds after the warm-up (default 7, 2 "
                       "with --quick)")
  ap.add_argument("--quick", action="store_true",
                  help="tiny shapes (width 16, T 16, B 8) for a smoke check")
  ap.add_argument("--ghost-budgets", type=int, nargs="+", default=[], metavar="MIB",
                  help="also time ghost with GHOST_MEMORY_BUDGET set to each of these "
                       "MiB (same processes, interleaved)")
  ap.add_argument("--no-rss", action="store_true",
                  help="skip the peak-RSS processes (one per model, mode and B)")
  ap.add_argument("--timeout", type=float, default=3600)
  ap.add_argument("--out", default=None, help="results prefix (default "
                  "results/dp_cost-<backend>-<date>)")
  ap.add_argument("--no-write", action="store_true")
  ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  rounds = args.rounds or (2 if args.quick else 7)
  if args.child:
    kind = args.child[0]
    if kind == "time":
      res = timing_child(args.child[1], int(args.child[2]), args.modes, args.ghost_budgets,
                         rounds, args.quick)
    else:
      mib = None if args.child[4] == "-" else int(args.child[4])
      res = rss_child(args.child[1], int(args.child[2]), args.child[3], mib, args.quick)
    print("RESULT " + json.dumps(res))
    return 0

  import jax  # pylint: disable=import-outside-toplevel
  backend = jax.default_backend()
  load0 = os.getloadavg()
  header = (f"dp_cost on {backend}, {os.cpu_count()} CPUs ({platform.machine()}), "
            f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
  print("# " + header, flush=True)
  rows = []
  common = ["--modes", *args.modes, "--rounds", str(rounds)] + (
      ["--quick"] if args.quick else []) + (
          ["--ghost-budgets", *map(str, args.ghost_budgets)] if args.ghost_budgets else [])
  for model in args.models:
    sizes = args.batch_sizes or ([8] if args.quick else [DEFAULT_B[model]])
    for b in sizes:
      print(f"  {model} B={b}: timing {', '.join(args.modes)} in {rounds} interleaved "
            "rounds ...", file=sys.stderr, flush=True)
      res = _run_child(["--child", "time", model, str(b)] + common, args.timeout)
      if "error" in res:
        rows.append({"model": model, "batch": b, "error": res["error"]})
        print(f"    failed: {res['error']}", file=sys.stderr, flush=True)
        continue
      got = res["rows"]
      if not args.no_rss:
        for r in got:
          mode, _, mib = r["mode"].partition("@")
          mib = mib[:-3] if mib else "-"
          print(f"  {model} B={b}: peak RSS of {r['mode']} ...", file=sys.stderr,
                flush=True)
          rss = _run_child(["--child", "rss", model, str(b), mode, mib] + (
              ["--quick"] if args.quick else []), args.timeout)
          r["peak_rss_gb"] = rss.get("peak_rss_gb")
      for r in got:
        print(f"    {r['mode']}: {r['median_s']:.3f} s/step, "
              f"x{r.get('ratio_median', float('nan')):.2f} plain", file=sys.stderr,
              flush=True)
      rows.extend(got)
  load1 = os.getloadavg()
  footer = f"load average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}"
  table = _table(rows)
  print(table)
  print("# " + footer)
  if not args.quick and not args.no_write:
    today = datetime.date.today().isoformat()
    prefix = pathlib.Path(args.out or pathlib.Path(__file__).resolve().parents[1]
                          / "results" / f"dp_cost-{backend}-{today}")
    cmdline = "python benchmarks/dp_cost.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    meta = {"command": cmdline, "header": header, "footer": footer,
            "machine": platform.machine(), "python": platform.python_version(),
            "versions": _versions(), "config": FULL, "rounds": rounds, "date": today}
    prefix.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                      indent=1) + "\n")
    vers = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    prefix.with_suffix(".md").write_text(
        f"# dp_cost ({today})\n\n`{cmdline}`\n\n{header}; {footer}. {vers}.\n\n"
        f"Time: every mode compiled in one process per (model, B), then {rounds} "
        "interleaved rounds after a warm-up; time / plain is the median of the "
        "per-round ratios (range: smallest and largest). Peak RSS: a separate process "
        "per row running two steps of that mode alone.\n\n"
        f"{table}\n")
    print(f"# wrote {prefix}.json and .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
