"""The ``gradclip`` command: ``gradclip ptb ...`` and ``gradclip classify ...``.

Each subcommand lives in a module exposing ``add_arguments(parser)`` and ``main(args)``;
the modules are imported only when needed, so a missing or broken trainer does not
break the others (``gradclip --help`` still lists it).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

SUBCOMMANDS = {
    "ptb": ("gradclip_jax.training.ptb.train",
            "PTB word-level LSTM language model (Zaremba et al. 2014)"),
    "classify": ("gradclip_jax.training.classify.train",
                 "IMDB / MR sentence classifier"),
}


def _load(name: str):
  return importlib.import_module(SUBCOMMANDS[name][0])


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
  """The parser; only the chosen subcommand's module (if any) is imported."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(
      prog="gradclip", description="Train models with gradclip_jax gradient clipping.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  chosen = next((a for a in argv if not a.startswith("-")), None)
  for name, (_, help_text) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    if name == chosen:
      _load(name).add_arguments(p)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("gradclip_jax").setLevel(logging.INFO)
  parser = build_parser(argv)
  args = parser.parse_args(argv)
  from gradclip_jax.training import common  # pylint: disable=import-outside-toplevel
  common.tune_host_allocator()  # Faster steps on CPU; GRADCLIP_TUNE_MALLOC=0 disables.
  try:
    result = _load(args.command).main(args)
  except common.FlagError as e:  # a bad flag combination: a usage error, exit status 2
    parser.error(f"{args.command}: {e}")
  return int(result or 0)


if __name__ == "__main__":
  sys.exit(main())
