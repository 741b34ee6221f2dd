"""Training speed of the PTB LSTM (``gradclip ptb``): words/s and the cost of clipping.

For each config (default: small and medium) this times the jitted train step on real
PTB windows (or random tokens without ``--data-dir``) with
``chain(clip_by_global_norm(max_grad_norm), sgd)`` and with ``chain(identity, sgd)``,
after a warm-up, interleaving the two so that load changes hit both alike, and prints
words/s and the ratio of the step times (clip / no clip).

  python benchmarks/ptb_speed.py --data-dir ../shared/data/ptb [--configs small medium]

Two A/B modes, each interleaved in one process (compiled executables side by side):

* ``--ab-exact-one``: the ``--clip none`` step as the trainers run it against one whose
  gradients are multiplied by ``where(norm < 0, 0, 1)``, an exact 1 that ties every
  update to the global norm (a data dependency that spares XLA:CPU a copy of the donated
  weights, which the trainers once used), and the number of ``copy`` ops in each
  compiled step. The factor was dropped because this A/B did not show it saving 5% of
  the step.
* ``--baseline DIR``: this checkout's default step (``--clip global_norm``) against the
  one of another checkout of gradclip_jax at ``DIR`` (e.g. ``git worktree add /tmp/base
  REV``), imported under the same package name after this one's step is compiled.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

from gradclip_jax.training import cli, clip
from gradclip_jax.training.ptb import configs, input_pipeline, train


def _windows(data_dir, config):
  if data_dir:
    ids = input_pipeline.load_ptb(data_dir).train
  else:
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 200_000, dtype=np.int32)
  return input_pipeline.batchify(ids, config.batch_size, config.num_steps)


def _step_fn(config, clip_name, epoch_size, matmul_dtype="float32"):
  model = train.build_model(config, matmul_dtype)
  tx = train.build_optimizer(config, clip.build_clip(clip_name, None, config.max_grad_norm),
                             epoch_size)
  state = train.init_state(model, tx, config, seed=0)
  return train.make_train_step(model, tx), state


CPU_SECONDS = {}


def _time(step, state, xs, ys, start, n):
  jax.block_until_ready(state)
  t, c = time.perf_counter(), time.process_time()
  for i in range(start, start + n):
    state = step(state, xs[i % len(xs)], ys[i % len(xs)])
  jax.block_until_ready(state)
  CPU_SECONDS[id(step)] = (time.process_time() - c) / n
  return state, (time.perf_counter() - t) / n


def interleaved(runs: dict, xs, ys, *, steps: int, repeats: int, warmup: int):
  """Times every ``runs[name] = [step, state]`` alike, interleaved; per-repeat seconds
  per step and process CPU seconds per step, by name."""
  for name, (step, state) in runs.items():  # compile + warm up
    runs[name][1], _ = _time(step, state, xs, ys, 0, warmup)
  times = {c: [] for c in runs}
  cpu = {c: [] for c in runs}
  for r in range(repeats):
    for name, (step, state) in runs.items():
      runs[name][1], dt = _time(step, state, xs, ys, warmup + r * steps, steps)
      times[name].append(dt)
      cpu[name].append(CPU_SECONDS[id(step)])
  return times, cpu


def measure(name, steps=50, repeats=5, warmup=10, data_dir=None):
  """Words/s of config ``name`` with and without clipping, as a dict (for run.py)."""
  config = configs.get_config(name)
  xs, ys = _windows(data_dir, config)
  runs = {c: list(_step_fn(config, c, len(xs))) for c in ("global_norm", "none")}
  times, cpu = interleaved(runs, xs, ys, steps=steps, repeats=repeats, warmup=warmup)
  words = config.batch_size * config.num_steps
  clip_t = statistics.median(times["global_norm"])
  none_t = statistics.median(times["none"])
  print(f"{name:>6}: {words / clip_t:9,.0f} words/s with clip_by_global_norm "
        f"({clip_t * 1e3:.2f} ms/step), {words / none_t:9,.0f} words/s without; "
        f"clip/no-clip step time {clip_t / none_t:.4f} (medians; best of each "
        f"{min(times['global_norm']) / min(times['none']):.4f})",
        flush=True)
  cc, cn = statistics.median(cpu["global_norm"]), statistics.median(cpu["none"])
  print(f"        process CPU time per step: {cc * 1e3:.1f} ms with clipping, {cn * 1e3:.1f} ms "
        f"without (ratio {cc / cn:.4f}); a load-robust view when the machine is shared",
        flush=True)
  return dict(config=name, wps_clip=words / clip_t, wps_noclip=words / none_t,
              ratio=clip_t / none_t, ms_clip=1e3 * clip_t, ms_noclip=1e3 * none_t,
              cpu_ratio=cc / cn, data="ptb" if data_dir else "random tokens",
              device=jax.devices()[0].device_kind)


def _copies(compiled) -> int:
  return sum(1 for line in compiled.as_text().splitlines() if " copy(" in line)


def _report(times, cpu, words, a, b):
  for name in (a, b):
    t = statistics.median(times[name])
    print(f"  {name:>24}: {t * 1e3:7.2f} ms/step ({words / t:8,.0f} words/s), process CPU "
          f"{statistics.median(cpu[name]) * 1e3:.1f} ms/step; repeats "
          f"{', '.join(f'{x * 1e3:.1f}' for x in times[name])} ms", flush=True)
  ratio = statistics.median(times[b]) / statistics.median(times[a])
  best = min(times[b]) / min(times[a])
  cpu_ratio = statistics.median(cpu[b]) / statistics.median(cpu[a])
  print(f"  {b} / {a}: median step time {ratio:.4f}, best {best:.4f}, process CPU "
        f"{cpu_ratio:.4f}", flush=True)


def ab_exact_one(name, data_dir, steps, repeats, warmup):
  """``--clip none`` without and with the exact-1 factor, compiled ahead of time."""
  config = configs.get_config(name)
  xs, ys = _windows(data_dir, config)
  plain = clip.update_with_norm

  def with_one(tx, grads, opt_state, params):
    norm = clip.gradclip_jax.functional.global_norm(grads)
    one = jax.numpy.where(norm < 0, 0.0, 1.0)
    grads = jax.tree.map(lambda g: g * one.astype(g.dtype), grads)
    updates, new_state = tx.update(grads, opt_state, params)
    return updates, new_state, norm

  runs = {}
  for label, fn in (("as trained", plain), ("with the exact 1", with_one)):
    clip.update_with_norm = fn
    try:
      step, state = _step_fn(config, "none", len(xs))
      compiled = step.lower(state, xs[0], ys[0]).compile()
    finally:
      clip.update_with_norm = plain
    print(f"  {label}: {_copies(compiled)} copy ops in the compiled step", flush=True)
    runs[label] = [compiled, state]
  times, cpu = interleaved(runs, xs, ys, steps=steps, repeats=repeats, warmup=warmup)
  print(f"{name}, --clip none:", flush=True)
  _report(times, cpu, config.batch_size * config.num_steps, "with the exact 1", "as trained")


def ab_baseline(name, data_dir, baseline, steps, repeats, warmup):
  """This checkout's default step against the one of the checkout at ``baseline``."""
  config = configs.get_config(name)
  xs, ys = _windows(data_dir, config)
  step, state = _step_fn(config, "global_norm", len(xs))
  runs = {"this checkout": [step.lower(state, xs[0], ys[0]).compile(), state]}
  for mod in [m for m in sys.modules if m == "gradclip_jax" or m.startswith("gradclip_jax.")]:
    del sys.modules[mod]
  sys.path.insert(0, os.path.abspath(baseline))
  import gradclip_jax  # pylint: disable=import-outside-toplevel
  assert gradclip_jax.__file__.startswith(os.path.abspath(baseline)), gradclip_jax.__file__
  from gradclip_jax.training.ptb import train as old_train  # pylint: disable=import-outside-toplevel
  from gradclip_jax.training import common as old_common  # pylint: disable=import-outside-toplevel
  model = old_train.build_model(config)
  tx = old_train.build_optimizer(
      config, old_common.build_clip("global_norm", None, config.max_grad_norm), len(xs))
  old_state = old_train.init_state(model, tx, config, seed=0)
  old_step = old_train.make_train_step(model, tx).lower(old_state, xs[0], ys[0]).compile()
  runs[f"baseline {baseline}"] = [old_step, old_state]
  times, cpu = interleaved(runs, xs, ys, steps=steps, repeats=repeats, warmup=warmup)
  print(f"{name}, --clip global_norm:", flush=True)
  _report(times, cpu, config.batch_size * config.num_steps, f"baseline {baseline}",
          "this checkout")


def main():
  # As the gradclip trainers do (see cli.tune_host_allocator); GRADCLIP_TUNE_MALLOC=0
  # measures glibc's default behaviour instead.
  tuned = cli.tune_host_allocator()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  p.add_argument("--data-dir", default=None, help="PTB folder (default: random tokens)")
  p.add_argument("--configs", nargs="+", default=["small", "medium"])
  p.add_argument("--steps", type=int, default=50, help="timed steps per repeat")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=10)
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--ab-exact-one", action="store_true",
                    help="A/B of the exact-1 factor (--clip none)")
  mode.add_argument("--baseline", metavar="DIR", default=None,
                    help="A/B against the gradclip_jax checkout in DIR")
  args = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{len(jax.devices())}, "
        f"load average {os.getloadavg()[0]:.2f}, host allocator tuned: {tuned}", flush=True)
  for name in args.configs:
    if args.ab_exact_one:
      ab_exact_one(name, args.data_dir, args.steps, args.repeats, args.warmup)
    elif args.baseline:
      ab_baseline(name, args.data_dir, args.baseline, args.steps, args.repeats, args.warmup)
    else:
      measure(name, args.steps, args.repeats, args.warmup, args.data_dir)
  print(f"load average at the end {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
  main()
