"""Command-line flags of the trainers: the parser, the shared flags, config overrides, errors.

* :class:`UsageError` -- a user mistake (bad flag value, missing data, reused workdir):
  ``gradclip`` prints one line and exits with status 2, never a traceback.
* :class:`ArgumentParser` -- ``argparse`` without silent abbreviations
  (``allow_abbrev=False``) and with a "did you mean --max-steps?" hint for a mistyped flag.
* :func:`add_common_arguments` -- the flags every trainer accepts; :func:`run_options`
  turns them into a :class:`~gradclip_jax.training.options.RunOptions`.
* :func:`override` -- ``--set FIELD=VALUE`` on any frozen config dataclass.
* Argument types that refuse bad values at parse time: :func:`positive_float`,
  :func:`positive_int`, :func:`nonnegative_int`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import os
import pathlib
import re
import typing
from typing import Any, Iterable, Iterator, Sequence

from gradclip_jax.training import clip as clip_lib
from gradclip_jax.training import dp as dp_lib
from gradclip_jax.training.errors import UsageError
from gradclip_jax.training.options import RunOptions

__all__ = ["UsageError", "ArgumentParser", "add_common_arguments", "run_options",
           "override", "positive_float", "positive_int", "nonnegative_int",
           "suggest_flag", "data_errors"]


def suggest_flag(parser: argparse.ArgumentParser, unknown: str) -> str | None:
  """The option of ``parser`` closest to ``unknown`` (difflib), or ``None``."""
  name = unknown.split("=", 1)[0]
  options = sorted(set(re.findall(r"--[A-Za-z0-9][-A-Za-z0-9]*", parser.format_help())))
  close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
  return close[0] if close else None


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` with ``allow_abbrev=False`` and "did you mean" hints.

  ``--max-step 10`` is an error (not ``--max-steps``); an unknown flag close to a known
  one gets a suggestion (see :meth:`unknown_arguments`).
  """

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(*args, **kwargs)

  def unknown_arguments(self, extra: Sequence[str]) -> typing.NoReturn:
    """Exits with status 2: the unknown arguments, and the closest known flag if any."""
    message = f"unrecognized arguments: {' '.join(extra)}"
    flags = [a for a in extra if a.startswith("--")]
    hint = suggest_flag(self, flags[0]) if flags else None
    if hint:
      message += f" (did you mean {hint}?)"
    self.error(message)


# ---------------------------------------------------------------------------
# Argument types.
# ---------------------------------------------------------------------------


def positive_float(text: str) -> float:
  """A finite float > 0 (an ``argparse`` type)."""
  try:
    v = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
  if not (v > 0 and math.isfinite(v)):
    raise argparse.ArgumentTypeError(f"must be positive and finite, got {text}")
  return v


def _int(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
  """An integer >= 1 (an ``argparse`` type)."""
  v = _int(text)
  if v < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
  return v


def nonnegative_int(text: str) -> int:
  """An integer >= 0 (an ``argparse`` type)."""
  v = _int(text)
  if v < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
  return v


class _StoreExplicit(argparse.Action):
  """``store``, and remember in ``namespace._explicit`` that the flag was given."""

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, values)
    setattr(namespace, "_explicit", set(getattr(namespace, "_explicit", ())) | {self.dest})


# ---------------------------------------------------------------------------
# The shared flags.
# ---------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, *,
                         default_clip: str = "global_norm") -> None:
  """Adds the flags shared by every trainer to ``parser``."""
  g = parser.add_argument_group("common training options")
  g.add_argument("--data-dir", required=True, type=pathlib.Path,
                 help="folder holding the data set files (plain or .gz); get them with "
                 "'gradclip data fetch'")
  g.add_argument("--workdir", required=True, type=pathlib.Path,
                 help="output folder of one run: metrics.jsonl and checkpoints/")
  g.add_argument("--resume", action="store_true",
                 help="continue the run in --workdir from its latest checkpoint")
  g.add_argument("--overwrite", action="store_true",
                 help="start afresh in a --workdir that holds a run: its files are removed")
  g.add_argument("--clip", default=default_clip, choices=clip_lib.RULES, metavar="RULE",
                 action=_StoreExplicit,
                 help=f"gradient clipping rule, one of: {', '.join(clip_lib.RULES)} "
                 f"(default {default_clip}; with --dp only 'none' may be given)")
  g.add_argument("--clip-value", type=positive_float, default=None,
                 help="threshold for the rule (default: the config's max_grad_norm); "
                 "for the adaptive rules it sets autoclip's percentile, zclip's "
                 "z_threshold, adagc's lambda_rel, agc's clipping (default: theirs)")
  g.add_argument("--max-steps", type=positive_int, default=None,
                 help="stop after this many training steps in total (smoke runs); "
                 "metrics and a checkpoint are written first")
  g.add_argument("--max-epochs", type=positive_int, default=None,
                 help="override the config's number of epochs")
  g.add_argument("--seed", type=_int, default=0, help="random seed (default 0)")
  g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a config field, e.g. --set hidden_size=64 (repeatable)")
  g.add_argument("--checkpoint-every", type=nonnegative_int, default=500, metavar="STEPS",
                 help="also checkpoint every this many steps inside an epoch "
                 "(0: only at epoch ends; default 500)")
  g.add_argument("--num-devices", type=positive_int, default=None,
                 help="data-parallel devices to use (default: the largest number of "
                 "jax.devices() that divides the batch size)")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")
  g.add_argument("--debug", action="store_true",
                 help="show the Python traceback of an error")
  m = parser.add_argument_group(
      "multi-host", "Several processes (hosts) train one model: each reads the data and "
      "feeds its slice of every global batch; process 0 writes metrics and logs.")
  m.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() first; the coordinator, the "
                 "number of processes and this process's id come from the flags below, "
                 "else from JAX's cluster auto-detection (SLURM, Open MPI, TPU pods, ...)")
  m.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                 help="address of process 0 (with --distributed)")
  m.add_argument("--num-processes", type=positive_int, default=None,
                 help="number of processes (with --distributed)")
  m.add_argument("--process-id", type=nonnegative_int, default=None,
                 help="this process's index (with --distributed)")


def run_options(args: argparse.Namespace) -> RunOptions:
  """The :class:`RunOptions` of parsed flags (DP flags checked: :class:`UsageError`)."""
  for flag in ("coordinator_address", "num_processes", "process_id"):
    if getattr(args, flag) is not None and not args.distributed:
      raise UsageError(f"--{flag.replace('_', '-')} only applies with --distributed")
  dp = dp_lib.dp_flags_from_args(args)
  return RunOptions(
      data_dir=args.data_dir, clip="dp" if dp is not None else args.clip,
      clip_value=args.clip_value, seed=args.seed, max_steps=args.max_steps,
      max_epochs=args.max_epochs, checkpoint_every=args.checkpoint_every,
      num_devices=args.num_devices, progress=not args.no_progress, dp=dp)


# ---------------------------------------------------------------------------
# --set FIELD=VALUE
# ---------------------------------------------------------------------------


def _parse_value(text: str, annotation: str) -> Any:
  """Parses ``text`` for a field annotated ``annotation`` (a string: PEP 563)."""
  optional = "None" in annotation
  if optional and text.lower() == "none":
    return None
  if annotation.startswith("tuple"):
    return tuple(s.strip() for s in text.split(",") if s.strip())
  if annotation.startswith("bool"):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"not a boolean: {text!r}")
  if re.match(r"int\b", annotation):
    return int(text)
  if re.match(r"float\b", annotation):
    return float(text)
  return text


def override(config: Any, assignments: Iterable[str]) -> Any:
  """Applies ``field=value`` strings (``--set``) to the frozen dataclass ``config``.

  Raises:
    UsageError: an unknown field (with the closest field name) or a malformed value.
  """
  fields = {f.name: f for f in dataclasses.fields(config)}
  changes = {}
  for item in assignments:
    key, sep, text = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep:
      raise UsageError(f"--set expects FIELD=VALUE; got {item!r}")
    if key not in fields:
      close = difflib.get_close_matches(key, list(fields), n=1)
      hint = f" (did you mean {close[0]}?)" if close else ""
      raise UsageError(f"--set {item!r}: no config field {key!r}{hint}; the fields are "
                       f"{', '.join(fields)}")
    try:
      changes[key] = _parse_value(text.strip(), str(fields[key].type))
    except ValueError as e:
      raise UsageError(f"--set {item!r}: {e}") from None
  return dataclasses.replace(config, **changes)


# ---------------------------------------------------------------------------
# --data-dir
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def data_errors(dataset: str, data_dir: os.PathLike | str) -> Iterator[None]:
  """Checks that ``data_dir`` exists; turns the loaders' errors into a ``UsageError``.

  Both messages say how to get the data: ``gradclip data fetch DATASET DIR``.
  """
  data_dir = pathlib.Path(data_dir)
  fetch = f"gradclip data fetch {dataset} {data_dir}"
  if not data_dir.is_dir():
    raise UsageError(f"--data-dir {data_dir} does not exist; download the {dataset} data "
                     f"there with: {fetch}")
  try:
    yield
  except UsageError:
    raise
  except (OSError, ValueError) as e:  # FileNotFoundError, the loaders' malformed-file errors
    raise UsageError(f"--data-dir {data_dir}: {e} (download a verified copy with: "
                     f"{fetch})") from e
