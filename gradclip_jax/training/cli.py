"""The ``gradclip`` command: ``gradclip ptb``, ``gradclip classify``, ``gradclip data fetch``.

Each sub-command lives in a module exposing ``add_arguments(parser)`` and
``main(args) -> int``; only the chosen one is imported, so ``gradclip --help`` and
``gradclip data`` work without the trainers' dependencies.

Exit status: 0 done; 2 a user mistake (one line on stderr, no traceback; ``--debug``
shows it), also when the ``[train]`` extra is missing; 130 / 143 stopped by SIGINT /
SIGTERM after saving a checkpoint (the line printed says how to resume); anything else
is a bug and comes with its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import shlex
import signal
import sys
import traceback
from typing import Sequence

from gradclip_jax import _compat
from gradclip_jax.training import flags
from gradclip_jax.training.errors import Interrupted, UsageError

SUBCOMMANDS = {
    "ptb": ("gradclip_jax.training.ptb.train",
            "PTB word-level LSTM language model (Zaremba et al. 2014)"),
    "classify": ("gradclip_jax.training.classify.train",
                 "IMDB / MR sentence classifier"),
    "data": ("gradclip_jax.training.fetch", "Download and verify the data sets"),
}
#: Sub-commands that need the ``[train]`` extra, and the modules it provides
#: (module -> distribution).
TRAINERS = ("ptb", "classify")
TRAIN_EXTRA = {"flax": "flax", "orbax.checkpoint": "orbax-checkpoint", "tqdm": "tqdm",
               "dp_accounting": "dp-accounting"}
INSTALL_TRAIN = 'pip install "gradclip_jax[train]"'

# glibc's mallopt parameters (malloc.h) and the values tune_host_allocator sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 256 << 20
_TRIM_THRESHOLD = 1 << 30
ALLOCATOR_ENV = "GRADCLIP_TUNE_MALLOC"


def tune_host_allocator() -> bool:
  """Keeps freed host memory for reuse instead of unmapping it (glibc only).

  XLA:CPU allocates the temporary buffers of every step afresh. glibc serves blocks
  above its mmap threshold (at most 32 MB after its own adjustments) with ``mmap`` and
  returns them with ``munmap``, so the next step pays a page fault for every 4 KB of
  every large buffer it writes: the PTB small step spent ~11 ms of ~45 ms in them
  (measured with ``jax.profiler``: the 16 MB logits and the embedding gradient's zero
  fill). With an mmap threshold of 256 MB and a trim threshold of 1 GB the buffers stay
  in the heap and are reused: 9.1k -> 12.1k words/s on PTB small on the 2-core CPU
  (``benchmarks/ptb_speed.py``). The cost is a process that keeps up to ~1 GB of freed
  memory instead of returning it to the OS.

  Process-wide, so only the ``gradclip`` trainers (at start-up) and the PTB speed
  benchmark call it; importing ``gradclip_jax`` never does. Set
  ``GRADCLIP_TUNE_MALLOC=0`` to turn it off. Returns whether the settings were applied
  (False off glibc / Linux).
  """
  if os.environ.get(ALLOCATOR_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  if not sys.platform.startswith("linux"):
    return False
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl)
    return False
  return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
      mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def _installed(module: str) -> bool:
  """Whether ``module`` can be found, without importing it (``dp_accounting`` pulls in
  SciPy: importing it to check would add seconds to every command)."""
  if module in sys.modules:
    return sys.modules[module] is not None
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def missing_train_extra() -> list[str]:
  """The distributions of the ``[train]`` extra that are not installed."""
  return [dist for module, dist in TRAIN_EXTRA.items() if not _installed(module)]


def _chosen(argv: Sequence[str]) -> str | None:
  return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None
                 ) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
  """The parser and its sub-parsers; only the chosen sub-command's module is imported."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = flags.ArgumentParser(
      prog="gradclip", description="Train models with gradclip_jax gradient clipping.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                              parser_class=flags.ArgumentParser)
  chosen = _chosen(argv)
  subparsers = {}
  for name, (module, help_text) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    subparsers[name] = p
    if name == chosen:
      importlib.import_module(module).add_arguments(p)
  return parser, subparsers


def resume_command(argv: Sequence[str]) -> str:
  """``gradclip ARGV`` without ``--overwrite`` and with ``--resume``."""
  args = [a for a in argv if a != "--overwrite"]
  if "--resume" not in args:
    args.append("--resume")
  return "gradclip " + shlex.join(args)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``gradclip ARGV``; returns the exit status (see the module docstring)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("gradclip_jax").setLevel(logging.INFO)
  chosen = _chosen(argv)
  if chosen in TRAINERS and (missing := missing_train_extra()):
    print(f"gradclip {chosen}: error: the trainers need the [train] extra "
          f"({', '.join(missing)} not installed): {INSTALL_TRAIN}", file=sys.stderr)
    return 2
  if chosen in TRAINERS:
    try:  # Flax outside the tested range: say which versions, not a traceback later
      _compat.check("flax", extra="train")
    except ImportError as e:
      print(f"gradclip {chosen}: error: {e}", file=sys.stderr)
      return 2
  try:
    parser, subparsers = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
      subparsers[args.command].unknown_arguments(extra)
  except SystemExit as e:  # argparse: --help (0) or a usage error (2, usage printed)
    return e.code if isinstance(e.code, int) else 2
  prog = f"gradclip {args.command}"
  try:
    if getattr(args, "distributed", False):
      from gradclip_jax.training import mesh  # pylint: disable=import-outside-toplevel
      mesh.initialize_distributed(args.coordinator_address, args.num_processes,
                                  args.process_id)
    if args.command in TRAINERS:
      tune_host_allocator()  # Faster steps on CPU; GRADCLIP_TUNE_MALLOC=0 disables.
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(args) or 0)
  except UsageError as e:
    if getattr(args, "debug", False):
      traceback.print_exc()
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  except Interrupted as e:
    print(f"{prog}: {signal.Signals(e.signum).name}: checkpoint saved at step {e.step} in "
          f"{e.workdir}; continue with: {resume_command(argv)}", file=sys.stderr, flush=True)
    return e.exit_code
  except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, compiling)
    print(f"{prog}: interrupted outside the training loop: no new checkpoint",
          file=sys.stderr)
    return 128 + signal.SIGINT


if __name__ == "__main__":
  sys.exit(main())
