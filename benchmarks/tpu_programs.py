"""The rule + adam step as a TPU v5e compiles it, read without a TPU.

libtpu compiles ahead of time for a TPU topology on any host
(``jax.experimental.topologies.get_topology_desc``). This script compiles
``optax.chain(rule, optax.adam(1e-3))`` for every rule of gradclip_jax, next to adam
alone and Optax's own rules (``optax.clip_by_global_norm``, ``optax.clip``,
``optax.adaptive_grad_clip``), on the 25M-parameter float32 tree of
``clip_overhead.py`` with float32 and with bfloat16 gradients, parameters and
optimizer state donated, for

* one v5e chip (the first chip of a ``v5e:2x2`` slice), and
* a 4-chip (``v5e:2x2``) and an 8-chip (``v5e:2x4``) mesh, every 2-D leaf split on
  its first axis over all chips (1-D leaves and scalars replicated),

(and, on one chip, a single 8192 x 8192 leaf, larger than the chip's VMEM), and
reports for each program (``compiled_programs.summary``): the HBM traffic of its
kernels (the model of ``compiled_programs.kernels``: VMEM-resident operands are
on-chip, not HBM traffic), XLA's ``cost_analysis()["bytes accessed"]``, the
temporaries of XLA's memory analysis, the number of fusions, and the cross-chip
collectives (all-reduces, all-gathers and their bytes). A sharded clip needs one
all-reduce (every chip's partial sums at once) and no all-gather. Ratios are over
adam alone's; ``LIMITS`` are the issue tracker's.

On a v5e, XLA places what fits in the chip's 128 MiB of VMEM there and its cost
analysis counts those on-chip reads and copies too: on the one-chip 25M tree it
reports 2,043 MB for adam alone, whose kernels move 730 MB to and from HBM. Both
numbers are given; the limits are judged on the HBM traffic.

Install libtpu at the installed jax's version (not a dependency of the library; the
one-liner is ``.ci/tpu_setup.sh``)::

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"

    python benchmarks/tpu_programs.py --json results/tpu-programs-v5e-DATE.json \\
        --md results/tpu-programs-v5e-DATE.md

``--quick``: the one-chip float32 step of three rules only.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

# libtpu reads these at start-up; without a TPU they only quiet its probing.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no lock file: no TPU used

import jax  # noqa: E402  pylint: disable=wrong-import-position
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compiled_programs as cp  # noqa: E402  pylint: disable=wrong-import-position

# (label, topology, chips used, parameter tree)
MACHINES = [("1 chip", "v5e:2x2", 1, "25M"), ("1 chip", "v5e:2x2", 1, "one 67M leaf"),
            ("4 chips", "v5e:2x2", 4, "25M"), ("8 chips", "v5e:2x4", 8, "25M")]
QUICK_RULES = ("adam alone", "clip_by_global_norm", "optax.clip_by_global_norm")


def topology_devices(topology: str) -> list:
  """The devices of a TPU ``topology``; ``SystemExit`` with the fix if libtpu is absent."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return list(topologies.get_topology_desc(topology, platform="tpu").devices)
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(
        f"tpu_programs: cannot build the TPU topology {topology!r} ({e}). Install "
        f"libtpu at jax's version: pip install \"jax[tpu]=={jax.__version__}\" "
        "(or run .ci/tpu_setup.sh)") from e


def sharding_for(devices: list):
  """leaf -> its sharding: one chip, or 2-D leaves split on axis 0 over a mesh."""
  if len(devices) == 1:
    one = jax.sharding.SingleDeviceSharding(devices[0])
    return lambda x: one
  mesh = Mesh(devices, ("chips",))
  split = NamedSharding(mesh, PartitionSpec("chips", None))
  whole = NamedSharding(mesh, PartitionSpec())
  return lambda x: split if len(x.shape) == 2 else whole


def measure(devices, dtype: str, names, tree: str = "25M") -> dict:
  """name -> summary of the compiled step, for the rules in ``names``."""
  sharding_of = sharding_for(devices)
  makers = cp.step_optimizers()
  out = {}
  for name in names:
    t0 = time.perf_counter()
    out[name] = cp.summary(cp.compile_step(makers[name], dtype, sharding_of, "tpu",
                                           tree))
    out[name]["compile_s"] = time.perf_counter() - t0
  return cp.ratio_rows(out)


def _fmt(x, spec):
  return "" if x is None else format(x, spec)


def table(rows: dict, dtype: str) -> str:
  lines = ["| optimizer | HBM MB | / adam | limit | bytes accessed MB | / adam | "
           "temp MB | fusions | all-reduce | all-gather (MB) |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
  for name, r in rows.items():
    c = r["collectives"]
    gathers = c.get("all-gather", 0)
    gathered = f"{gathers} ({r['gathered_mb']:.1f})" if gathers else "0"
    lines.append(
        f"| {name} | {r['hbm_mb']:.0f} | {r['hbm_ratio']:.3f} | "
        f"{cp.verdict(name, rows, dtype)} | {_fmt(r['bytes_accessed_mb'], '.0f')} | "
        f"{_fmt(r.get('accessed_ratio'), '.3f')} | {_fmt(r['temp_mb'], '.1f')} | "
        f"{r['fusions']} | {c.get('all-reduce', 0)} | {gathered} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="one chip, float32, three optimizers")
  ap.add_argument("--json", help="write the numbers to this file")
  ap.add_argument("--md", help="write the markdown report to this file")
  ap.add_argument("--rules", default="", help="comma-separated optimizer names "
                  "(default: all; 'adam alone' is always compiled)")
  args = ap.parse_args(argv)
  names = list(cp.step_optimizers())
  if args.quick:
    names = list(QUICK_RULES)
  elif args.rules:
    wanted = {"adam alone", *args.rules.split(",")}
    names = [n for n in names if n in wanted]
  machines = MACHINES[:1] if args.quick else MACHINES
  dtypes = ["float32"] if args.quick else ["float32", "bfloat16"]
  ver = cp.versions("jaxlib", "libtpu", "libtpu-nightly")
  head = (f"# The rule + adam step compiled for TPU v5e (libtpu, no TPU attached)\n\n"
          f"{cp.run_info('tpu_programs.py', argv, ver)}"
          f"\n\n25M-parameter float32 tree of `clip_overhead.py`, params and state "
          f"donated. HBM MB: the kernels' HBM operands and results "
          f"(`compiled_programs.kernels`); bytes accessed: XLA's cost analysis, which "
          f"on a v5e also counts VMEM-resident reads and copies. Limit: the issue's "
          f"bound on HBM MB / adam and Optax's counterpart ('ok' when both hold).\n")
  report = cp.Report(head)
  result = {"date": datetime.date.today().isoformat(), "versions": ver, "machines": {}}
  for label, topology, chips, tree in machines:
    devices = topology_devices(topology)[:chips]
    key = f"{label}, {tree}"
    result["machines"][key] = {"topology": topology, "chips": chips, "tree": tree}
    for dtype in dtypes:
      rows = measure(devices, dtype, names, tree)
      result["machines"][key][dtype] = rows
      section = (f"## {label} ({topology}, {devices[0].device_kind}), {tree} tree, "
                 f"{dtype} gradients\n\n{table(rows, dtype)}\n")
      report.add(section)
  report.write(result, args.json, args.md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
