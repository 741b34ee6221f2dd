"""The benchmark suite: one entry point, any backend JAX finds (CPU, GPU, TPU).

    python benchmarks/run.py                 # everything, results/<device>-<date>.*
    python benchmarks/run.py --quick         # fewer repeats and shapes (a smoke run)
    python benchmarks/run.py --only throughput,compile

Sections:

* ``throughput``: one clipping transform on its own (jit, gradient buffers donated) for
  every rule, over three tree shapes (one 25M leaf; a transformer-like tree; 1,000
  small leaves) and two dtypes (f32, bf16). Reported as GB/s of gradient bytes and
  against the *copy limit*: the time of ``g <- g * s`` in place (donated), which reads
  and writes every byte once, the least any rule that rewrites the gradient can do.
  ``optax.clip_by_global_norm`` is timed alongside where Optax has the rule.
* ``overhead``: a fused ``rule + adam`` step over ``adam`` alone (see
  ``clip_overhead.py``).
* ``compile``: compile time of a clip + adam step against leaf count, ours vs Optax.
* ``ptb``: words/s of the PTB trainer's step with and without clipping (when the
  trainer is installed; see ``ptb_speed.py``).

Writes ``results/<device>-<date>.json``, a markdown table ``.md`` and a PNG plot.
Times are medians over rounds after a warm-up; in a round every rule of a tree is
timed in turn (interleaved, so that the machine's drift hits all alike), each as the
mean of 10 chained calls synchronised once with ``jax.block_until_ready`` (as in a
training loop, the host dispatches a call while the device runs the one before).
Ratios (to the copy, to Optax) are medians of the per-round ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_overhead  # noqa: E402  pylint: disable=wrong-import-position

import gradclip_jax  # noqa: E402  pylint: disable=wrong-import-position

# ------------------------------------------------------------------------- shapes


def tree_of(shape_name: str, dtype) -> dict:
  if shape_name == "one 25M leaf":
    return {"w": jnp.full((5000, 5000), 0.01, dtype)}
  if shape_name == "transformer 25M":
    return clip_overhead.make_tree("25M", dtype)
  if shape_name == "1000 small leaves":
    return clip_overhead.make_tree("1000 leaves", dtype)
  raise ValueError(shape_name)


def leaves_tree(n: int) -> dict:
  """``n`` leaves alternating (64, 32) matrices and (32,) vectors."""
  return {f"l{i:05d}": jnp.full((64, 32) if i % 2 == 0 else (32,), 0.01)
          for i in range(n)}


# Starting thresholds of the clipping regime (the 0.01-filled trees have a global L2
# norm of about 50): far below every norm, and made 0.9x smaller at every call.
_T_NORM, _T_AVG, _T_AGC = 1e-3, 1e-12, 1e-6


def standalone_rules() -> dict:
  """name -> (factory of the transform from a traced threshold ``t``, first ``t``).

  Rules with a threshold get ``t`` at run time, 0.9x smaller at every call, so each
  timed call clips (a rule that clipped to its bound would not clip the same
  gradient again). The adaptive rules set their own thresholds from their state:
  they get ``t = None`` and are timed in their steady state (the norm and the
  scaling pass run whether or not they clip).
  """
  rules = {
      "optax.clip_by_global_norm": (optax.clip_by_global_norm, _T_NORM),
      "clip_by_global_norm": (gradclip_jax.clip_by_global_norm, _T_NORM),
      "clip_by_global_norm L1": (
          lambda t: gradclip_jax.clip_by_global_norm(t, norm_type=1.0), _T_NORM),
      "clip_by_norm": (gradclip_jax.clip_by_norm, _T_NORM),
      "clip_by_average_norm": (gradclip_jax.clip_by_average_norm, _T_AVG),
      "clip_by_value": (lambda t: gradclip_jax.clip_by_value(-t, t), _T_NORM),
      "optax.clip (by value)": (optax.clip, _T_NORM),
  }
  optional = {
      "adaptive_grad_clip": (gradclip_jax.adaptive_grad_clip, _T_AGC),
      "autoclip (steady)": (lambda t: gradclip_jax.autoclip(10.0, 1000), None),
      "zclip (steady)": (lambda t: gradclip_jax.zclip(), None),
      "adagc (steady)": (lambda t: gradclip_jax.adagc(), None),
      "skip_spikes (steady)": (lambda t: gradclip_jax.skip_spikes(optax.identity()), None),
  }
  rules.update({k: v for k, v in optional.items()
                if hasattr(gradclip_jax, k.split(" ")[0])})
  return rules


# ------------------------------------------------------------------------ timing


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _copy_tx(t):
  """The copy limit as a "rule": ``g <- g * t`` in place, one read and one write.

  ``t`` is a run-time argument (1.0 under ``t0=None``), so XLA cannot fold the multiply
  away: a constant like 0.999, which rounds to 1 in bfloat16, left no work at all.
  """
  return optax.GradientTransformation(
      lambda p: optax.EmptyState(),
      lambda g, s, p=None: (jax.tree.map(lambda x: x * t.astype(x.dtype), g), s))


COPY = "copy limit (g*s in place)"


def time_rules(rules: dict, fresh_tree, repeats, inner=10, warmup=2) -> dict:
  """name -> per-round mean seconds of one ``tx.update`` on a donated gradient tree.

  ``rules``: name -> (``make_tx(t)``, first threshold ``t0`` or None). All rules are
  compiled first, then timed in ``repeats`` interleaved rounds, so that the machine's
  drift hits every rule alike. In a round each rule gets a fresh tree
  (``fresh_tree()``) and makes ``inner`` chained calls, the output fed back as the
  next gradient, synchronised once at the end: on a GPU the host then dispatches a
  call while the device runs the one before, as in a training loop. The threshold is
  passed at run time, starting at ``t0`` and 0.9x smaller at every call, so that every
  call clips (a rule that clipped to its bound would not clip the same gradient
  again); a huge ``t0`` times the under-the-bound case; ``t0=None`` passes 1.0 (the
  adaptive rules set their own thresholds). The thresholds are on the device before
  the clock starts. A fresh tree per round keeps the entries far from float32's
  underflow, which a long chain of shrinking thresholds would reach.
  """
  entries = {}
  for name, (make_tx, t0) in rules.items():
    tree = fresh_tree()
    dtype = jax.tree.leaves(tree)[0].dtype
    # The threshold in the gradients' dtype: optax.clip_by_global_norm fails on a
    # float32 threshold with bfloat16 gradients (lax.select of mixed dtypes).
    ts = [jnp.asarray(1.0 if t0 is None else t0 * 0.9 ** (i + 1), dtype)
          for i in range(max(inner, warmup))]
    params = jax.tree.map(lambda x: x + 1, tree)
    state = make_tx(ts[0]).init(tree)

    def update(g, s, t, make_tx=make_tx, params=params):
      return make_tx(t).update(g, s, params)

    fn = jax.jit(update, donate_argnums=0)
    for i in range(warmup):
      tree, state = fn(tree, state, ts[i])
    jax.block_until_ready(tree)
    entries[name] = [fn, state, ts]
  times = {name: [] for name in entries}
  for _ in range(repeats):
    for name, e in entries.items():
      fn, state, ts = e
      g = jax.block_until_ready(fresh_tree())
      t_start = time.perf_counter()
      for i in range(inner):
        g, state = fn(g, state, ts[i])
      jax.block_until_ready(g)
      times[name].append((time.perf_counter() - t_start) / inner)
      e[1] = state
  return times


def median_ratio(times, name, base) -> float:
  """Median over rounds of ``times[name] / times[base]`` within the round."""
  return statistics.median(a / b for a, b in zip(times[name], times[base]))


# ----------------------------------------------------------------------- sections


# Rules timed on every (shape, dtype); the others (per-leaf and adaptive rules) only
# on float32 and the two 25M trees: their per-leaf norms make XLA's compile time for
# the 1,000-leaf tree the dominant cost of a run (see the compile section).
CORE_RULES = ("optax.clip_by_global_norm", "clip_by_global_norm",
              "clip_by_global_norm L1", "clip_by_value", "optax.clip (by value)")


def section_throughput(repeats, quick, all_rules=False):
  """Standalone clips, each (shape, dtype) timed in interleaved rounds (time_rules)."""
  shapes = ["one 25M leaf"] if quick else ["one 25M leaf", "transformer 25M",
                                           "1000 small leaves"]
  dtypes = ["float32"] if quick else ["float32", "bfloat16"]
  rows = []
  for shape in shapes:
    for dtype in dtypes:
      full = all_rules or (dtype == "float32" and shape != "1000 small leaves")
      rules = {COPY: (_copy_tx, None)}
      for name, spec in standalone_rules().items():
        if quick and name not in ("optax.clip_by_global_norm", "clip_by_global_norm"):
          continue
        if full or name in CORE_RULES:
          rules[name] = spec
      # No clipping needed: the cost of checking.
      rules["optax.clip_by_global_norm (under bound)"] = (optax.clip_by_global_norm, 1e30)
      rules["clip_by_global_norm (under bound)"] = (gradclip_jax.clip_by_global_norm, 1e30)
      fresh = lambda shape=shape, dtype=dtype: tree_of(shape, jnp.dtype(dtype))
      size = nbytes(jax.eval_shape(fresh))
      times = time_rules(rules, fresh, repeats)
      for name in rules:
        t = statistics.median(times[name])
        vs_copy = median_ratio(times, name, COPY)
        base = ("optax.clip_by_global_norm (under bound)" if "under bound" in name
                else "optax.clip_by_global_norm")
        vs_optax = (median_ratio(times, name, base)
                    if name.startswith("clip_by_global_norm") and "L1" not in name
                    and base in times else None)
        rows.append(dict(shape=shape, dtype=dtype, rule=name, ms=1e3 * t,
                         gbps=size / t / 1e9, vs_copy=vs_copy, vs_optax=vs_optax))
        print(f"  throughput {shape:>18} {dtype:8} {name:28} {1e3 * t:8.3f} ms "
              f"{vs_copy:5.2f}x copy" + (f" {vs_optax:5.3f}x optax" if vs_optax else ""),
              flush=True)
  return rows


def section_overhead(repeats, quick):
  rows = []
  specs = ["25M/float32"] if quick else ["25M/float32", "25M/bfloat16"]
  for spec in specs:
    kind, dtype = spec.split("/")
    timed = clip_overhead.time_steps(clip_overhead.optimizers(adaptive=not quick),
                                     kind, jnp.dtype(dtype), repeats)
    for name, (t, ratio, c) in timed.items():
      rows.append(dict(tree=kind, dtype=dtype, optimizer=name, step_ms=1e3 * t,
                       ratio=ratio, compile_s=c))
      print(f"  overhead {spec:14} {name:28} {1e3 * t:8.3f} ms {ratio:5.3f}",
            flush=True)
  return rows


def section_compile(quick, counts=None):
  rows = []
  counts = counts or ([10, 300] if quick else [10, 100, 300, 1000, 3000])
  for n in counts:
    params = leaves_tree(n)
    for name, clip in (("optax", optax.clip_by_global_norm),
                       ("gradclip_jax", gradclip_jax.clip_by_global_norm)):
      tx = optax.chain(clip(1.0), optax.adam(1e-3))

      def step(p, s, g, tx=tx):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      state = tx.init(params)
      t0 = time.perf_counter()
      jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
      rows.append(dict(leaves=n, impl=name, compile_s=time.perf_counter() - t0))
      print(f"  compile {n:5d} leaves {name:13} {rows[-1]['compile_s']:.2f} s",
            flush=True)
  return rows


def section_ptb(quick, data_dir=None, steps=None):
  try:
    import ptb_speed  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # the trainer extra is not installed
    print(f"  ptb: skipped ({e})")
    return []
  if not hasattr(ptb_speed, "measure"):
    print("  ptb: skipped (benchmarks/ptb_speed.py has no measure())")
    return []
  configs = ["small"] if quick else ["small", "medium"]
  # Train as `gradclip ptb` does, with the host allocator tuned (process-wide, hence the
  # last section; see gradclip_jax.training.cli.tune_host_allocator).
  tuned = ptb_speed.cli.tune_host_allocator()
  rows = []
  for c in configs:
    rows.append(ptb_speed.measure(c, steps=steps or (20 if quick else 100), repeats=3 if quick else 5,
                                  data_dir=data_dir))
    r = rows[-1]
    r["host_allocator_tuned"] = tuned
    print(f"  ptb {c:6} {r['wps_clip']:10,.0f} words/s with clipping, "
          f"{r['wps_noclip']:10,.0f} without; step ratio {r['ratio']:.4f}", flush=True)
  return rows


# ------------------------------------------------------------------------ reports


def least_traffic(rule: str) -> int:
  """The memory traffic a rule cannot avoid, in units of the gradient's bytes.

  A copy reads and writes every byte (2). A norm-based clip reads the gradient for
  its norm, then reads and writes it to scale it (3); AGC also reads the weights for
  theirs (4); clipping by value reads and writes once (2). Under the bound a rule
  only has to read the gradient for its norm (1): nothing needs writing.
  """
  if "under bound" in rule:
    return 1
  if rule.startswith("copy limit") or "by value" in rule or rule == "clip_by_value":
    return 2
  if rule.startswith("adaptive_grad_clip"):
    return 4
  return 3


def bandwidth_vs_copy(rule: str, vs_copy: float) -> float:
  """Memory bandwidth the rule achieves over the copy's: least traffic / time."""
  return least_traffic(rule) / 2.0 / vs_copy


def markdown(result) -> str:
  lines = [f"# gradclip_jax benchmarks: {result['device']} ({result['platform']})",
           "", f"{result['date']}, jax {result['jax']}, optax {result['optax']}, "
           f"{result['host']}", ""]
  for key in ("source", "note"):
    if result.get(key):
      lines += [f"{key.capitalize()}: {result[key]}", ""]
  if result.get("throughput"):
    lines += ["## Standalone clip throughput", "",
              "GB/s: gradient bytes per second. / copy limit: time over the time of "
              "`g <- g * s` in place. Bandwidth vs copy: the least memory traffic the "
              "rule needs (`benchmarks/run.py:least_traffic`: 3x the gradient bytes "
              "for a norm-based clip, 1x under the bound) per second, over the copy's "
              "(2x per copy time).", "",
              "| tree | dtype | rule | ms | GB/s | / copy limit | bandwidth vs copy "
              "| / optax |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["throughput"]:
      vo = f"{r['vs_optax']:.2f}" if r.get("vs_optax") else ""
      bw = bandwidth_vs_copy(r["rule"], r["vs_copy"])
      lines.append(f"| {r['shape']} | {r['dtype']} | {r['rule']} | {r['ms']:.3f} | "
                   f"{r['gbps']:.1f} | {r['vs_copy']:.2f} | {100 * bw:.0f}% | {vo} |")
    lines.append("")
  if result.get("overhead"):
    lines += ["## Fused step: rule + adam over adam alone", "",
              "| tree | dtype | optimizer | step ms | ratio |", "|---|---|---|---:|---:|"]
    for r in result["overhead"]:
      lines.append(f"| {r['tree']} | {r['dtype']} | {r['optimizer']} | "
                   f"{r['step_ms']:.2f} | {r['ratio']:.3f} |")
    lines.append("")
  if result.get("compile"):
    lines += ["## Compile time of a clip + adam step", "",
              "| leaves | optax s | gradclip_jax s |", "|---:|---:|---:|"]
    by_n = {}
    for r in result["compile"]:
      by_n.setdefault(r["leaves"], {})[r["impl"]] = r["compile_s"]
    for n, d in sorted(by_n.items()):
      cell = lambda k: f"{d[k]:.2f}" if k in d else ""  # pylint: disable=cell-var-from-loop
      lines.append(f"| {n} | {cell('optax')} | {cell('gradclip_jax')} |")
    lines.append("")
  if result.get("ptb"):
    lines += ["## PTB LSTM training step", "", "| config | words/s (clip) | "
              "words/s (no clip) | clip overhead |", "|---|---:|---:|---:|"]
    for r in result["ptb"]:
      lines.append(f"| {r['config']} | {r['wps_clip']:.0f} | {r['wps_noclip']:.0f} | "
                   f"{100 * (r['ratio'] - 1):.1f}% |")
    lines.append("")
  return "\n".join(lines)


def plot(result, path):
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  rows = [r for r in result.get("throughput", []) if r["dtype"] == "float32"]
  shapes = list(dict.fromkeys(r["shape"] for r in rows))
  rules = list(dict.fromkeys(r["rule"] for r in rows))
  width = 0.8 / max(len(shapes), 1)
  for i, shape in enumerate(shapes):
    vals = {r["rule"]: r["gbps"] for r in rows if r["shape"] == shape}
    axes[0].barh([j + i * width for j in range(len(rules))],
                 [vals.get(r, 0) for r in rules], height=width, label=shape)
  axes[0].set_yticks([j + width * (len(shapes) - 1) / 2 for j in range(len(rules))])
  axes[0].set_yticklabels(rules, fontsize=8)
  axes[0].set_xlabel("GB/s of float32 gradient (higher is better)")
  axes[0].legend(fontsize=8)
  comp = result.get("compile", [])
  for impl in ("optax", "gradclip_jax"):
    pts = sorted((r["leaves"], r["compile_s"]) for r in comp if r["impl"] == impl)
    if pts:
      axes[1].plot(*zip(*pts), marker="o", label=impl)
  axes[1].set_xscale("log")
  axes[1].set_xlabel("leaves")
  axes[1].set_ylabel("compile time of clip + adam step (s)")
  axes[1].legend()
  fig.suptitle(f"gradclip_jax on {result['device']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def main(argv=None):
  ap = argparse.ArgumentParser(description="gradclip_jax benchmark suite")
  ap.add_argument("--quick", action="store_true", help="fewer repeats and shapes")
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--only", default="throughput,overhead,compile,ptb",
                  help="comma-separated sections")
  ap.add_argument("--out", default="results", help="output directory")
  ap.add_argument("--all-rules", action="store_true",
                  help="throughput: every rule on every tree and dtype (slow to compile)")
  ap.add_argument("--leaf-counts", default=None,
                  help="compile: comma-separated leaf counts (default 10,...,3000)")
  ap.add_argument("--ptb-data-dir", default=None,
                  help="ptb: PTB folder for real windows (default: random tokens)")
  ap.add_argument("--ptb-steps", type=int, default=None,
                  help="ptb: timed steps per repeat (default 100)")
  ap.add_argument("--note", default=None, help="a line for the report")
  ap.add_argument("--from-log", default=None,
                  help="rebuild the result files from a log of an earlier run "
                       "(with --device, --platform, --date, --versions)")
  ap.add_argument("--device", default=None, help="--from-log: device kind")
  ap.add_argument("--platform", default=None, help="--from-log: platform")
  ap.add_argument("--date", default=None, help="--from-log: date of the run")
  ap.add_argument("--versions", default=None, help="--from-log: 'jax,optax' versions")
  args = ap.parse_args(argv)
  repeats = 3 if args.quick else args.repeats
  sections = set(args.only.split(","))
  device = jax.devices()[0]
  kind = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{device.platform}-{device.device_kind}")
  date = datetime.date.today().isoformat()
  result = dict(device=device.device_kind, platform=device.platform, date=date,
                jax=jax.__version__, optax=optax.__version__,
                host=f"{platform.machine()}, {os.cpu_count()} cpus",
                quick=args.quick, note=args.note)
  if args.from_log:
    jv, ov = (args.versions or "?,?").split(",")
    result.update(device=args.device or "?", platform=args.platform or "?",
                  date=args.date or date, jax=jv, optax=ov, host="see the log")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.from_log:
    result.update(parse_log(pathlib.Path(args.from_log).read_text()))
    result["source"] = f"rebuilt from the printed log {pathlib.Path(args.from_log).name}"
    kind = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{result['platform']}-{result['device']}")
    return write(result, out / f"{kind}-{result['date']}", final=True)
  stem = out / f"{kind}-{date}{'-quick' if args.quick else ''}"
  print(f"benchmarks on {device.platform} ({device.device_kind})", flush=True)
  # Results are written after every section, so a run cut short keeps what it measured.
  if "throughput" in sections:
    result["throughput"] = section_throughput(repeats, args.quick, args.all_rules)
    write(result, stem)
  if "overhead" in sections:
    result["overhead"] = section_overhead(repeats, args.quick)
    write(result, stem)
  if "compile" in sections:
    counts = [int(c) for c in args.leaf_counts.split(",")] if args.leaf_counts else None
    result["compile"] = section_compile(args.quick, counts)
    write(result, stem)
  if "ptb" in sections:
    result["ptb"] = section_ptb(args.quick, args.ptb_data_dir, args.ptb_steps)
  return write(result, stem, final=True)


def write(result, stem, final=False):
  stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
  stem.with_suffix(".md").write_text(markdown(result))
  if not final:
    return 0
  if plot(result, stem.with_suffix(".png")):
    print(f"wrote {stem}.json, .md, .png")
  else:
    print(f"wrote {stem}.json, .md (no matplotlib: no plot)")
  return 0


_SHAPES = "one 25M leaf|transformer 25M|1000 small leaves"


def parse_log(text):
  """Sections rebuilt from the lines this script prints (for a run cut short).

  Where the log has no copy-limit line (older runs), the copy time is derived from
  the printed ``x copy`` ratio of each rule (2 decimals, so about 1% uncertain).
  """
  res = {"throughput": [], "overhead": [], "compile": [], "ptb": []}
  optax_vs_copy = {}  # (shape, dtype, regime) -> Optax's printed copy ratio
  for line in text.splitlines():
    m = re.match(rf"\s+throughput\s+({_SHAPES})\s+(\S+)\s+(.+?)\s+([\d.]+) ms\s+([\d.]+)x copy",
                 line)
    if m:
      shape, dtype, rule, ms, ratio = m[1], m[2], m[3], float(m[4]), float(m[5])
      size = nbytes(jax.eval_shape(lambda: tree_of(shape, jnp.dtype(dtype))))  # pylint: disable=cell-var-from-loop
      key = (shape, dtype, "under" if "under bound" in rule else "clip")
      # The printed ratio to Optax (newer logs), else one from the printed copy
      # ratios (3 significant digits; the milliseconds of older logs had 2 decimals,
      # too coarse for GPU times).
      if rule.startswith("optax.clip_by_global_norm"):
        optax_vs_copy[key] = ratio
      printed = re.search(r"([\d.]+)x optax", line)
      vo = None
      if printed:
        vo = float(printed[1])
      elif (rule.startswith("clip_by_global_norm") and "L1" not in rule
            and key in optax_vs_copy):
        vo = ratio / optax_vs_copy[key]
      res["throughput"].append(dict(shape=shape, dtype=dtype, rule=rule, ms=ms,
                                    gbps=size / ms / 1e6, vs_copy=ratio, vs_optax=vo))
      continue
    m = re.match(r"\s+overhead (\S+)\s+(.+?)\s+([\d.]+) ms ([\d.]+)$", line)
    if m:
      tree, dtype = m[1].split("/")
      res["overhead"].append(dict(tree=tree, dtype=dtype, optimizer=m[2],
                                  step_ms=float(m[3]), ratio=float(m[4])))
      continue
    m = re.match(r"\s+compile\s+(\d+) leaves (\S+)\s+([\d.]+) s", line)
    if m:
      res["compile"].append(dict(leaves=int(m[1]), impl=m[2], compile_s=float(m[3])))
      continue
    m = re.match(r"\s+ptb (\S+)\s+([\d,]+) words/s with clipping,\s+([\d,]+) without; "
                 r"step ratio ([\d.]+)", line)
    if m:
      res["ptb"].append(dict(config=m[1], wps_clip=float(m[2].replace(",", "")),
                             wps_noclip=float(m[3].replace(",", "")), ratio=float(m[4])))
  return {k: v for k, v in res.items() if v}


if __name__ == "__main__":
  sys.exit(main())
