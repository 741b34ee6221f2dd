"""Reader and batcher for Mikolov's preprocessed Penn Treebank (word level).

As in TensorFlow's ``ptb_word_lm`` reader: ``<eos>`` is appended to every line, word ids
are given by decreasing train frequency (ties alphabetical), and the token stream is cut
into ``batch_size`` rows that are read in windows of ``num_steps`` (targets shifted by
one), so the LSTM state can be carried from one window to the next.
"""
from __future__ import annotations

import collections
import gzip
import os
import pathlib
from typing import Iterator, NamedTuple

import numpy as np

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")


class PTBData(NamedTuple):
  """Token-id streams of the three splits and the vocabulary (word -> id)."""

  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  vocab: dict[str, int]


def _find(data_dir: pathlib.Path, split: str) -> pathlib.Path:
  name = f"ptb.{split}.txt"
  for candidate in (data_dir / name, data_dir / (name + ".gz")):
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(f"PTB file {name}(.gz) not found in {data_dir}")


def _read_words(path: pathlib.Path) -> list[str]:
  """Words of a PTB file, with ``<eos>`` at the end of every line."""
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      raw = path.read_bytes()
    text = raw.decode("utf-8")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"malformed PTB file {path}: {e}") from e
  words = text.replace("\n", f" {EOS} ").split()
  if not words or all(w == EOS for w in words):
    raise ValueError(f"malformed PTB file {path}: no words")
  return words


def build_vocab(words: list[str]) -> dict[str, int]:
  """Word -> id, most frequent first, ties broken alphabetically (as the TF reader)."""
  counts = collections.Counter(words)
  ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  return {w: i for i, (w, _) in enumerate(ordered)}


def load_ptb(data_dir: os.PathLike | str, *, vocab_size: int | None = 10000) -> PTBData:
  """Reads and verifies ``ptb.{train,valid,test}.txt`` (or ``.txt.gz``) in ``data_dir``.

  Checks that every file exists and decodes, is non-empty, that the train vocabulary
  (with ``<eos>``) has ``vocab_size`` words (skip with ``None``) and contains ``<eos>``
  and ``<unk>``, and that valid/test use only train words.

  Raises:
    FileNotFoundError: naming the missing file (or folder).
    ValueError: naming the malformed file and what is wrong with it.
  """
  data_dir = pathlib.Path(data_dir)
  if not data_dir.is_dir():
    raise FileNotFoundError(f"PTB data directory {data_dir} not found")
  paths = {s: _find(data_dir, s) for s in SPLITS}
  words = {s: _read_words(p) for s, p in paths.items()}
  vocab = build_vocab(words["train"])
  if vocab_size is not None and len(vocab) != vocab_size:
    raise ValueError(f"malformed PTB file {paths['train']}: vocabulary has {len(vocab)} "
                     f"words including {EOS}, expected {vocab_size}")
  for token in (EOS, UNK):
    if token not in vocab:
      raise ValueError(f"malformed PTB file {paths['train']}: no {token} token")
  ids = {}
  for s in SPLITS:
    unknown = sorted(set(words[s]) - vocab.keys())
    if unknown:
      raise ValueError(f"malformed PTB file {paths[s]}: {len(unknown)} word(s) not in the "
                       f"train vocabulary, e.g. {unknown[:5]}")
    ids[s] = np.fromiter((vocab[w] for w in words[s]), dtype=np.int32, count=len(words[s]))
  return PTBData(ids["train"], ids["valid"], ids["test"], vocab)


def batchify(ids: np.ndarray, batch_size: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """The tutorial's ``ptb_producer`` for a whole epoch, at once.

  Returns ``(inputs, targets)``, each ``[epoch_size, batch_size, num_steps]`` int32 with
  ``epoch_size = (len(ids) // batch_size - 1) // num_steps``; row ``b`` of window ``i``
  is ``ids[b * batch_len + i * num_steps : ... + num_steps]``, targets shifted by one.
  """
  batch_len = len(ids) // batch_size
  epoch_size = (batch_len - 1) // num_steps
  if epoch_size <= 0:
    raise ValueError(f"{len(ids)} tokens are too few for batch_size={batch_size}, "
                     f"num_steps={num_steps}")
  data = np.asarray(ids[: batch_size * batch_len], np.int32).reshape(batch_size, batch_len)
  n = epoch_size * num_steps
  x = data[:, :n].reshape(batch_size, epoch_size, num_steps).transpose(1, 0, 2)
  y = data[:, 1:n + 1].reshape(batch_size, epoch_size, num_steps).transpose(1, 0, 2)
  return np.ascontiguousarray(x), np.ascontiguousarray(y)


def windows(ids: np.ndarray, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """The stream cut into disjoint windows of ``num_steps + 1`` tokens (DP-SGD's examples).

  Returns ``(inputs, targets)``, each ``[N, num_steps]`` int32 with
  ``N = len(ids) // (num_steps + 1)``: window ``i`` is
  ``ids[i * (num_steps + 1) : (i + 1) * (num_steps + 1)]``, its inputs all but the last
  token and its targets all but the first. Every token belongs to one window (the
  remainder, fewer than ``num_steps + 1`` tokens, to none).
  """
  size = num_steps + 1
  n = len(ids) // size
  if n <= 0:
    raise ValueError(f"{len(ids)} tokens are too few for windows of {size} tokens")
  w = np.asarray(ids[:n * size], np.int32).reshape(n, size)
  return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])


def iterate(ids: np.ndarray, batch_size: int, num_steps: int,
            start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields the ``(inputs, targets)`` windows of one epoch, from window ``start`` on."""
  x, y = batchify(ids, batch_size, num_steps)
  for i in range(start, len(x)):
    yield x[i], y[i]


def epoch_size(num_tokens: int, batch_size: int, num_steps: int) -> int:
  return (num_tokens // batch_size - 1) // num_steps
