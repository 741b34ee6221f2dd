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


def test_gpu_traffic_counts_each_kernels_operands_and_results():
  # The counting works on any compiled module; a CPU one stands in for the GPU's here.
  gpu_traffic = pytest.importorskip("gpu_traffic")
  x = jnp.ones((1000,), jnp.float32)
  clip = jax.jit(lambda g: jnp.clip(g, -0.5, 0.5), donate_argnums=0)
  rows = gpu_traffic.kernels(clip.lower(x).compile().as_text())
  assert len(rows) == 1 and rows[0][2:] == (4000, 4000), rows
  # A norm and a scale: two reads of the leaf and one write, besides small scalars.
  f = jax.jit(lambda g: g * (1.0 / jnp.sqrt(jnp.sum(g * g))))
  s = gpu_traffic.summary(f.lower(jnp.ones((4096, 256), jnp.float32)).compile())
  leaf = 4096 * 256 * 4
  assert 2 * leaf <= s["read_mb"] * 1e6 < 2 * leaf + 64, s
  assert leaf <= s["write_mb"] * 1e6 < leaf + 64, s
  assert gpu_traffic.shape_bytes("(f32[], bf16[1024,64]{1,0}, pred[3])") == 4 + 131072 + 3


HLO_TPU_LIKE = """\
HloModule m

ENTRY %main (p0: f32[1024,256], p1: f32[1024,256], pred: pred[]) -> f32[1024,256] {
  %p0 = f32[1024,256]{1,0:T(8,128)} parameter(0)
  %p1 = f32[1024,256]{1,0:T(8,128)} parameter(1)
  %pred = pred[]{:T(512)} parameter(2)
  %copy-start = (f32[1024,256]{1,0:T(8,128)S(1)}, f32[1024,256]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%p0)
  %copy-done = f32[1024,256]{1,0:T(8,128)S(1)} copy-done(%copy-start)
  %fusion = (f32[1024,256]{1,0:T(8,128)}, f32[]{:T(128)}, /*index=2*/f32[]{:T(128)}) fusion(%copy-done, %p1), kind=kLoop, calls=%f
  %gte = f32[1024,256]{1,0:T(8,128)} get-tuple-element(%fusion), index=0
  %all-reduce = (f32[]{:T(128)}, f32[]{:T(128)}) all-reduce(%p1, %p1), replica_groups={}
  %conditional = f32[1024,256]{1,0} conditional(%pred, %gte, %gte), true_computation=%a, false_computation=%b
  ROOT %out = f32[1024,256]{1,0:T(8,128)} add(%conditional, %gte)
}
"""


def test_compiled_programs_counts_hbm_bytes_only():
  """The TPU-side rules of the traffic model: a VMEM (S(1)) operand is not HBM
  traffic, an asynchronous copy moves its HBM side once, a tuple shape whose
  elements carry /*index=N*/ comments still parses, a conditional reads its
  predicate, and collectives are counted with their result bytes."""
  cp = pytest.importorskip("compiled_programs")
  leaf = 1024 * 256 * 4
  rows = {r[0]: r[2:] for r in cp.kernels(HLO_TPU_LIKE)}
  assert rows["copy-start"] == (leaf, 0)       # HBM -> VMEM: one read
  assert rows["fusion"] == (leaf, leaf + 8)    # reads p1 (p0 comes from VMEM)
  assert rows["conditional"] == (1, 0)         # its predicate only
  assert rows["out"] == (2 * leaf, leaf)
  assert cp.collectives(HLO_TPU_LIKE) == {"all-reduce": (1, 8)}
  assert cp.shape_bytes("(f32[4]{0:T(128)S(1)}, bf16[8])") == 16
  assert cp.shape_bytes("(f32[4]{0:T(128)S(1)}, bf16[8])", hbm_only=False) == 32


def test_compiled_programs_verdict_uses_limits_and_counterparts():
  cp = pytest.importorskip("compiled_programs")
  rows = {"adam alone": {"hbm_ratio": 1.0},
          "clip_by_global_norm": {"hbm_ratio": 1.08},
          "optax.clip_by_global_norm": {"hbm_ratio": 1.07},
          "clip_by_value": {"hbm_ratio": 1.0}, "optax.clip": {"hbm_ratio": 1.0}}
  assert cp.verdict("clip_by_global_norm", rows, "float32") == (
      "> optax.clip_by_global_norm")
  assert cp.verdict("clip_by_global_norm", rows, "bfloat16") == (
      "> 1.05, > optax.clip_by_global_norm")
  assert cp.verdict("clip_by_value", rows, "float32") == "ok"
  assert cp.verdict("adam alone", rows, "float32") == ""
