"""A/B of every backend workaround: the fused ``rule + adam`` step with it on and off.

Each workaround of ``gradclip_jax._tuning`` (the names of
``gradclip_jax.config.WORKAROUNDS``) is timed on the rules and trees it targets,
through the public switch only (``gradclip_jax.config.backend_tuning_set``, no
private name patched). For one rule on one tree, in one process, the jitted step
``p, s = step(p, s, g)`` (parameters and state donated, as in
``clip_overhead.py``) is compiled for

* ``adam alone`` (the baseline of the ratios),
* ``on``: the rule + adam with every workaround on,
* ``off <name>``: the same with only workaround ``<name>`` off (one entry per
  workaround that targets this rule),
* ``all off``: the rule + adam with the tuning off altogether,

and the steps are timed in interleaved rounds (``clip_overhead.time_steps``). The
saving of a workaround is the median over rounds of ``1 - t[on] / t[off <name>]``:
the share of the fused step it removes. The project keeps a workaround only where
that share is at least 5% on the shapes it targets.

    python benchmarks/tuning_ab.py                      # every case, 15 rounds
    python benchmarks/tuning_ab.py --cases scale_barrier --repeats 9
    python benchmarks/tuning_ab.py --json results/tuning-ab-cpu-DATE.json

Most workarounds target XLA:CPU and are lowered only there: on another backend
the ``on`` and ``off`` programs are the same and the savings read ~0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_overhead  # noqa: E402  pylint: disable=wrong-import-position

import gradclip_jax  # noqa: E402  pylint: disable=wrong-import-position
from gradclip_jax import config  # noqa: E402  pylint: disable=wrong-import-position

RULES = {
    "clip_by_global_norm": lambda: optax.chain(gradclip_jax.clip_by_global_norm(1.0),
                                               optax.adam(1e-3)),
    "clip_by_norm(axes=0)": lambda: optax.chain(gradclip_jax.clip_by_norm(1.0, axes=0),
                                                optax.adam(1e-3)),
    "clip_by_value": lambda: optax.chain(gradclip_jax.clip_by_value(-0.01, 0.01),
                                         optax.adam(1e-3)),
    "adaptive_grad_clip": lambda: optax.chain(gradclip_jax.adaptive_grad_clip(0.01),
                                              optax.adam(1e-3)),
    "skip_spikes(adam)": lambda: gradclip_jax.skip_spikes(optax.adam(1e-3)),
}

# workaround -> the (rule, tree/dtype) cases it targets.
TARGETS = {
    "overflow_cond": [("clip_by_global_norm", "25M/float32"),
                      ("clip_by_global_norm", "25M/bfloat16"),
                      ("adaptive_grad_clip", "25M/float32")],
    "scale_barrier": [("clip_by_global_norm", "25M/bfloat16"),
                      ("clip_by_global_norm", "25M/float32")],
    "unit_scales_once": [("adaptive_grad_clip", "25M/float32"),
                         ("clip_by_norm(axes=0)", "25M/float32")],
    "value_clip_tested": [("clip_by_value", "25M/float32"),
                          ("clip_by_value", "25M/bfloat16")],
    "agc_weights_apart": [("adaptive_grad_clip", "25M/bfloat16")],
    "skip_norm_apart": [("skip_spikes(adam)", "25M/float32"),
                        ("skip_spikes(adam)", "25M/bfloat16")],
    "skip_ordered_select": [("skip_spikes(adam)", "25M/float32"),
                            ("skip_spikes(adam)", "25M/bfloat16")],
}


def _under(enabled, disabled, make):
  """A factory whose optimizer is traced with the given tuning setting."""

  class _Tx:  # init/update traced inside the setting (the step is jitted below)
    def __init__(self):
      self.tx = make()

    def init(self, params):
      return self.tx.init(params)

    def update(self, g, s, p):
      with config.backend_tuning_set(enabled, disabled=disabled):
        return self.tx.update(g, s, p)

  return _Tx


def cases(selected) -> dict:
  """(rule, tree/dtype) -> the workarounds to A/B there, in TARGETS order."""
  out = {}
  for name, targets in TARGETS.items():
    if selected and name not in selected:
      continue
    for case in targets:
      out.setdefault(case, []).append(name)
  return out


def run_case(rule, spec, names, repeats) -> dict:
  kind, dtype = spec.split("/")
  make = RULES[rule]
  txs = {"adam alone": lambda: optax.adam(1e-3), "on": _under(True, (), make)}
  for n in names:
    txs[f"off {n}"] = _under(True, (n,), make)
  txs["all off"] = _under(False, (), make)
  timed = clip_overhead.time_steps(txs, kind, jnp.dtype(dtype), repeats,
                                   per_round=True)
  on = timed["on"]["times"]
  row = dict(rule=rule, tree=kind, dtype=dtype,
             step_ms={k: 1e3 * v["median"] for k, v in timed.items()},
             ratio={k: v["ratio"] for k, v in timed.items()}, saving={})
  for n in names + ["all off"]:
    key = n if n == "all off" else f"off {n}"
    off = timed[key]["times"]
    row["saving"][n] = statistics.median(1.0 - a / b for a, b in zip(on, off))
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--cases", default="", help="comma-separated workaround names")
  ap.add_argument("--json", help="also write the results to this JSON file")
  args = ap.parse_args(argv)
  selected = [c for c in args.cases.split(",") if c]
  device = jax.devices()[0]
  print(f"# backend-tuning A/B on {device.platform} ({device.device_kind}), "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"optax {optax.__version__}, {args.repeats} interleaved rounds, host "
        f"allocator {clip_overhead.malloc_mode()}\n")
  print("| rule | tree | workaround | on ms | off ms | on / adam | off / adam "
        "| saving |")
  print("|---|---|---|---:|---:|---:|---:|---:|")
  rows = []
  for (rule, spec), names in cases(selected).items():
    row = run_case(rule, spec, names, args.repeats)
    rows.append(row)
    for n in names + ["all off"]:
      key = n if n == "all off" else f"off {n}"
      print(f"| {rule} | {spec} | {n} | {row['step_ms']['on']:.2f} | "
            f"{row['step_ms'][key]:.2f} | {row['ratio']['on']:.3f} | "
            f"{row['ratio'][key]:.3f} | {100 * row['saving'][n]:.1f}% |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=str(device.device_kind), platform=device.platform,
                     jax=jax.__version__, optax=optax.__version__,
                     malloc=clip_overhead.malloc_mode(), repeats=args.repeats,
                     rows=rows), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
