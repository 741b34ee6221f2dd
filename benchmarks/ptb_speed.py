"""Training speed of the PTB LSTM (``gradclip ptb``): words/s and the cost of clipping.

For each config (default: small and medium) this times the jitted train step on real
PTB windows (or random tokens without ``--data-dir``) with
``chain(clip_by_global_norm(max_grad_norm), sgd)`` and with ``chain(identity, sgd)``,
after a warm-up, interleaving the two so that load changes hit both alike, and prints
words/s and the ratio of the step times (clip / no clip).

  python benchmarks/ptb_speed.py --data-dir ../shared/data/ptb [--configs small medium]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from gradclip_jax.training import common
from gradclip_jax.training.ptb import configs, input_pipeline, train


def _windows(args, config):
  if args.data_dir:
    ids = input_pipeline.load_ptb(args.data_dir).train
  else:
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 200_000, dtype=np.int32)
  return input_pipeline.batchify(ids, config.batch_size, config.num_steps)


def _step_fn(config, clip_name, epoch_size, matmul_dtype="float32"):
  model = train.build_model(config, matmul_dtype)
  clip = common.build_clip(clip_name, None, config.max_grad_norm)
  tx = train.build_optimizer(config, clip, epoch_size)
  state = train.init_state(model, tx, config, seed=0)
  return train.make_train_step(model, tx), state


CPU_SECONDS = {}


def _time(step, state, xs, ys, start, n):
  jax.block_until_ready(state)
  t, c = time.perf_counter(), time.process_time()
  for i in range(start, start + n):
    state = step(state, xs[i % len(xs)], ys[i % len(xs)])
  jax.block_until_ready(state)
  CPU_SECONDS[step] = (time.process_time() - c) / n
  return state, (time.perf_counter() - t) / n


def bench(args, name):
  """Times config ``name``, prints the summary; returns (words/s with clip, ratio)."""
  r = measure(name, args.steps, args.repeats, args.warmup, args.data_dir)
  return r["wps_clip"], r["ratio"]


def measure(name, steps=50, repeats=5, warmup=10, data_dir=None):
  """Words/s of config ``name`` with and without clipping, as a dict (for run.py)."""
  args = argparse.Namespace(data_dir=data_dir, steps=steps, repeats=repeats, warmup=warmup)
  config = configs.get_config(name)
  xs, ys = _windows(args, config)
  runs = {c: list(_step_fn(config, c, len(xs))) for c in ("global_norm", "none")}
  for c, (step, state) in runs.items():  # compile + warm up
    runs[c][1], _ = _time(step, state, xs, ys, 0, args.warmup)
  times = {c: [] for c in runs}
  cpu = {c: [] for c in runs}
  for r in range(args.repeats):
    for c, (step, state) in runs.items():
      runs[c][1], dt = _time(step, state, xs, ys, args.warmup + r * args.steps, args.steps)
      times[c].append(dt)
      cpu[c].append(CPU_SECONDS[step])
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


def main():
  # As the gradclip trainers do (see common.tune_host_allocator); GRADCLIP_TUNE_MALLOC=0
  # measures glibc's default behaviour instead.
  tuned = common.tune_host_allocator()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", default=None, help="PTB folder (default: random tokens)")
  p.add_argument("--configs", nargs="+", default=["small", "medium"])
  p.add_argument("--steps", type=int, default=50, help="timed steps per repeat")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=10)
  args = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{len(jax.devices())}, "
        f"load average {os.getloadavg()[0]:.2f}, host allocator tuned: {tuned}", flush=True)
  for name in args.configs:
    bench(args, name)


if __name__ == "__main__":
  main()
