"""The benchmark suite's bookkeeping: log parsing, the traffic model, the timers."""

import os
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
run = pytest.importorskip("run")

import gradclip_jax as gc  # noqa: E402

LOG = """\
benchmarks on gpu (NVIDIA H100 80GB HBM3)
  throughput       one 25M leaf float32  copy limit (g*s in place)        0.09 ms  1.00x copy
  throughput       one 25M leaf float32  optax.clip_by_global_norm        0.13 ms  1.40x copy
  throughput       one 25M leaf float32  clip_by_global_norm              0.13 ms  1.45x copy
  throughput       one 25M leaf float32  clip_by_global_norm (under bound)     0.13 ms  1.40x copy
  overhead 25M/float32    adam alone                       0.29 ms 1.000
  overhead 25M/float32    clip_by_global_norm              0.37 ms 1.280
  compile    10 leaves optax         0.38 s
  ptb small     306,950 words/s with clipping,    308,856 without; step ratio 1.0062
"""


def test_parse_log_takes_ratios_to_optax_from_the_copy_ratios():
  res = run.parse_log(LOG)
  rows = {r["rule"]: r for r in res["throughput"]}
  # 0.13 ms against 0.13 ms would say 1.00; the copy ratios say 1.45 / 1.40.
  assert rows["clip_by_global_norm"]["vs_optax"] == pytest.approx(1.45 / 1.40)
  assert rows["clip_by_global_norm"]["vs_copy"] == 1.45
  assert res["overhead"][1]["ratio"] == 1.28
  assert res["compile"][0] == dict(leaves=10, impl="optax", compile_s=0.38)
  assert res["ptb"][0]["wps_clip"] == 306950
  assert "| clip_by_global_norm | 0.130 |" in run.markdown(
      dict(device="d", platform="p", date="x", jax="j", optax="o", host="h", **res))


def test_least_traffic_and_bandwidth():
  assert run.least_traffic("copy limit (g*s in place)") == 2
  assert run.least_traffic("clip_by_global_norm") == 3
  assert run.least_traffic("clip_by_global_norm (under bound)") == 1
  assert run.least_traffic("optax.clip (by value)") == 2
  assert run.least_traffic("adaptive_grad_clip") == 4
  # A global-norm clip at 1.5x the copy's time moves bytes as fast as the copy.
  assert run.bandwidth_vs_copy("clip_by_global_norm", 1.5) == pytest.approx(1.0)


def test_time_rules_interleaves_rules_and_returns_per_round_times():
  fresh = lambda: {"w": jnp.full((64, 64), 0.01, jnp.float32)}
  rules = {run.COPY: (run._copy_tx, None),
           "optax.clip_by_global_norm": (optax.clip_by_global_norm, 1e-3),
           "clip_by_global_norm": (gc.clip_by_global_norm, 1e-3),
           "clip_by_global_norm (under bound)": (gc.clip_by_global_norm, 1e30)}
  times = run.time_rules(rules, fresh, repeats=3, inner=2)
  assert list(times) == list(rules)
  assert all(len(v) == 3 and all(0 < t < 10 for t in v) for v in times.values())
  assert run.median_ratio(times, run.COPY, run.COPY) == 1.0


def test_parse_log_prefers_a_printed_ratio_to_optax():
  line = ("  throughput       one 25M leaf float32  clip_by_global_norm"
          "              0.130 ms  1.45x copy 0.987x optax")
  rows = run.parse_log(line)["throughput"]
  assert rows[0]["vs_optax"] == 0.987


def test_the_copy_limit_is_not_folded_away_in_bfloat16():
  g = {"w": jnp.ones((8, 8), jnp.bfloat16)}
  f = lambda g, t: run._copy_tx(t).update(g, optax.EmptyState())[0]
  text = jax.jit(f).lower(g, jnp.bfloat16(1.0)).compile().as_text()
  assert "multiply" in text
